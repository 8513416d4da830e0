"""The `cicd` command: validate, run, deploy, qa, down, status, verify, rescan, infra,
artifacts, users, approve, notify, release, history, report, metrics, events, ui, demo.

Exit codes: 0 green, 1 red (a failed stage or gate; a deployment not deployed), 2 usage
or configuration error.
Machine-readable output goes to stdout; progress and messages go to stderr.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import threading
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import pandas as pd
import typer
from rich.console import Console
from rich.filesize import decimal
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperGroup

from cicd_dagster.config import (
    ConfigError,
    ControlConfig,
    EnvironmentConfig,
    RepositoryConfig,
    load_control_config,
    parse_pipeline_config,
)
from cicd_dagster.git import GitError, Mirror, ls_remote, select_refs
from cicd_dagster.report import STAGES
from cicd_dagster.store import HistoryStore
from cicd_dagster.store.models import DELIVERY_STATUSES, FINDING_KINDS

if TYPE_CHECKING:
    from cicd_dagster.deploy.infra import Change

app = typer.Typer(
    help="cicd-dagster: a CI/CD control plane in which every product of delivery is a "
    "Dagster asset.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
history_app = typer.Typer(help="Query the history DB.", no_args_is_help=True)
app.add_typer(history_app, name="history")
infra_app = typer.Typer(
    help="Infrastructure as code: make what runs match the environments of cicd.yaml.",
    no_args_is_help=True,
)
app.add_typer(infra_app, name="infra")
artifacts_app = typer.Typer(help="Manage the artifact store.", no_args_is_help=True)
app.add_typer(artifacts_app, name="artifacts")
users_app = typer.Typer(help="Users and their API tokens (for cicd approve).", no_args_is_help=True)
app.add_typer(users_app, name="users")
notify_app = typer.Typer(
    help="Notification channels (cicd.yaml notifications).", no_args_is_help=True
)
app.add_typer(notify_app, name="notify")
report_app = typer.Typer(help="HTML reports a person would read.", no_args_is_help=True)
app.add_typer(report_app, name="report")
metrics_app = typer.Typer(help="Delivery analytics from the history DB.", no_args_is_help=True)
app.add_typer(metrics_app, name="metrics")
events_app = typer.Typer(help="Delivery events from other systems.", no_args_is_help=True)
app.add_typer(events_app, name="events")


class _DefaultCommandGroup(TyperGroup):
    """A group whose first argument, unless it names a subcommand, goes to the `create`
    subcommand: `cicd release REPO` is `cicd release create REPO`, beside `cicd release
    diff` (a repository named "diff" needs the explicit `create`)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # Any: typer's click is private
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["create", *args]
        return super().parse_args(ctx, args)


release_app = typer.Typer(
    cls=_DefaultCommandGroup,
    help="Releases: `cicd release REPO` tags the next version; `cicd release diff` compares.",
    no_args_is_help=True,
)
app.add_typer(release_app, name="release")

err = Console(stderr=True, soft_wrap=True)  # error lines must stay whole, never wrapped
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="cicd.yaml (default: $CICD_CONFIG or ./cicd.yaml)"),
]


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


class UsageError(Exception):
    """Bad arguments or configuration: exit 2."""


_state: dict[str, Path | None] = {"config": None}


@app.callback()
def main_options(config: ConfigOption = None) -> None:
    _state["config"] = config


def _config(local: Path | None = None) -> ControlConfig:
    path = local or _state["config"] or Path(os.environ.get("CICD_CONFIG", "cicd.yaml"))
    config = load_control_config(path.resolve())
    # The Dagster code location reads the same file.
    os.environ["CICD_CONFIG"] = str(config.config_path)
    return config


def _repository(config: ControlConfig, name: str) -> RepositoryConfig:
    names = [r.name for r in config.repositories]
    if name not in names:
        raise UsageError(f"unknown repository {name!r}; cicd.yaml has: {', '.join(names)}")
    return config.repository(name)


def _resolve(
    control: ControlConfig, repo: RepositoryConfig, ref: str | None
) -> tuple[str, str, str | None]:
    """Fetch the repository and resolve `ref` (default: its default branch) to
    (the ref as named, its commit sha, the branch name if the ref is a branch)."""
    mirror = Mirror(control.git_dir / f"{repo.name}.git", repo.url)
    mirror.fetch()
    state = ls_remote(str(mirror.path))
    target = ref or repo.default_branch or state.default_branch or "main"
    try:
        sha = mirror.resolve(target)
    except GitError as error:
        raise UsageError(f"{repo.name}: cannot resolve {target!r}: {error}") from error
    branches = {r.short for r in state.refs if r.kind == "branch"}
    return target, sha, target if target in branches else None


@app.command()
def validate(config: ConfigOption = None) -> None:
    """Check cicd.yaml and the .cicd.yml at the head of every watched ref."""
    control = _config(config)
    problems = 0
    for repo in control.repositories:
        try:
            state = ls_remote(repo.url)
        except GitError as error:
            err.print(f"[red]✗[/] {repo.name}: {error}")
            problems += 1
            continue
        mirror = Mirror(control.git_dir / f"{repo.name}.git", repo.url)
        mirror.fetch()
        for ref in select_refs(state, repo.branches, repo.tags, repo.default_branch):
            source = f"{repo.name}@{ref.short}:.cicd.yml"
            text = mirror.read_file(ref.sha, ".cicd.yml")
            try:
                if text is None:
                    raise UsageError(f"{source}: no .cicd.yml at {ref.sha[:12]}")
                parse_pipeline_config(text, source)
            except (ConfigError, UsageError) as error:
                err.print(f"[red]✗[/] {error}", markup=False, highlight=False)
                problems += 1
            else:
                err.print(f"[green]✓[/] {source} ({ref.sha[:12]})")
    if problems:
        raise typer.Exit(2)
    err.print(f"[green]✓[/] {control.config_path}")


@app.command()
def run(
    repository: Annotated[str, typer.Argument(help="repository name from cicd.yaml")],
    ref: Annotated[
        str | None, typer.Option(help="branch, tag or sha (default: the default branch)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the run as JSON")] = False,
    force: Annotated[
        bool, typer.Option(help="re-run stages even if their inputs are unchanged")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="stream step logs")] = False,
    config: ConfigOption = None,
) -> None:
    """Materialize the CI assets of one commit in-process (the same definitions as the UI)."""
    from jobs.inprocess import new_run_id, run_commit

    control = _config(config)
    repo = _repository(control, repository)
    target, sha, branch = _resolve(control, repo, ref)
    history = HistoryStore(control.history_db_url)
    run_id = new_run_id()
    err.print(f"[bold]{repo.name}[/] {target} @ {sha[:12]}  run {run_id}")
    with _StageProgress(history, repo.name, sha, run_id, enabled=not verbose):
        report = run_commit(
            control,
            repo.name,
            sha,
            ref=target,
            branch=branch,
            run_id=run_id,
            force=force,
            stream_logs=verbose,
        )
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_report(report)
    raise typer.Exit(0 if report["status"] == "success" else 1)


class _StageProgress:
    """A live line per stage, filled in from the history DB as stages finish."""

    def __init__(
        self, history: HistoryStore, repository: str, sha: str, run_id: str, *, enabled: bool
    ) -> None:
        self.history, self.repository, self.sha, self.run_id = history, repository, sha, run_id
        self.enabled = enabled
        self.stop = threading.Event()
        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err
        )
        self.tasks = {name: self.progress.add_task(f"{name:<12}", total=1) for name in STAGES}

    def __enter__(self) -> _StageProgress:
        if self.enabled:
            self.progress.start()
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.stop.set()
            self.thread.join()
            self._update()
            self.progress.stop()

    def _poll(self) -> None:
        while not self.stop.wait(0.5):
            self._update()

    def _update(self) -> None:
        rows = self.history.stage_rows(self.repository, self.sha)
        for row in rows.to_dict("records"):
            if row["run_id"] == self.run_id and row["name"] in self.tasks:
                style = {"success": "green", "failed": "red"}.get(row["status"], "dim")
                self.progress.update(
                    self.tasks[row["name"]],
                    completed=1,
                    description=f"{row['name']:<12} [{style}]{row['status']}[/]",
                )


def _print_report(report: dict[str, Any]) -> None:
    table = Table(title=f"{report['repository']} @ {report['commit'][:12]}: {report['status']}")
    for column in (
        "stage",
        "status",
        "duration_s",
        "tests",
        "passed",
        "failed",
        "errors",
        "skipped",
    ):
        table.add_column(column)
    for name, stage in report["stages"].items():
        table.add_row(
            name,
            stage["status"],
            f"{stage['duration_s']:.1f}",
            *(str(stage.get(k, "")) for k in ("tests", "passed", "failed", "errors", "skipped")),
        )
    Console().print(table)
    for gate in report["gates"]:
        mark = "[green]✓[/]" if gate["passed"] else "[red]✗[/]"
        Console().print(f"{mark} {gate['name']}: {gate['detail']}", highlight=False)


def _since(value: str | None) -> datetime | None:
    """`30d`, `12h`, `45m` ago, or an ISO date/time."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)([dhm])", value.strip())
    if match:
        amount, unit = int(match[1]), match[2]
        delta = {
            "d": timedelta(days=amount),
            "h": timedelta(hours=amount),
            "m": timedelta(minutes=amount),
        }[unit]
        return datetime.now(UTC) - delta
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as error:
        raise UsageError(f"--since {value!r}: use 30d, 12h, 45m or an ISO date") from error
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _emit(frame: pd.DataFrame, output: OutputFormat) -> None:
    if output is OutputFormat.json:
        sys.stdout.write(frame.to_json(orient="records", date_format="iso", indent=2) + "\n")
    elif output is OutputFormat.csv:
        sys.stdout.write(frame.to_csv(index=False))
    else:
        table = Table(show_lines=False)
        for column in frame.columns:
            table.add_column(str(column))
        for row in frame.itertuples(index=False):
            table.add_row(*("" if pd.isna(v) else str(v) for v in row))
        _print_table(table)


def _print_table(table: Table) -> None:
    console = Console()
    # Piped or captured: no terminal to fit, so print whole lines rather than wrapped cells.
    (console if console.is_terminal else Console(width=240)).print(table)


RepoOption = Annotated[str | None, typer.Option("--repo", help="only this repository")]
SinceOption = Annotated[str | None, typer.Option(help="30d, 12h, 45m or an ISO date")]
BranchOption = Annotated[str | None, typer.Option(help="only this branch")]
FormatOption = Annotated[OutputFormat, typer.Option("--format", help="table, json or csv")]


@history_app.command("builds")
def history_builds(
    repo: RepoOption = None,
    since: SinceOption = None,
    branch: BranchOption = None,
    output: FormatOption = OutputFormat.table,
    config: ConfigOption = None,
) -> None:
    """One row per built commit: status, duration and test counts."""
    history = HistoryStore(_config(config).history_db_url)
    _emit(history.builds(repository=repo, since=_since(since), branch=branch), output)


@history_app.command("tests")
def history_tests(
    repo: RepoOption = None,
    since: SinceOption = None,
    branch: BranchOption = None,
    stage: Annotated[str | None, typer.Option(help="unit, integration, e2e or performance")] = None,
    output: FormatOption = OutputFormat.table,
    config: ConfigOption = None,
) -> None:
    """One row per test case per build."""
    history = HistoryStore(_config(config).history_db_url)
    frame = history.tests(repository=repo, since=_since(since), branch=branch, stage=stage)
    _emit(frame, output)


@history_app.command("deployments")
def history_deployments(
    repo: RepoOption = None,
    env: Annotated[str | None, typer.Option("--env", help="only this environment")] = None,
    since: SinceOption = None,
    output: FormatOption = OutputFormat.table,
    config: ConfigOption = None,
) -> None:
    """One row per deployment attempt: environment, version, strategy, outcome, durations."""
    history = HistoryStore(_config(config).history_db_url)
    frame = history.deployments(repository=repo, environment=env, since=_since(since))
    _emit(frame, output)


@history_app.command("scans")
def history_scans(
    repo: RepoOption = None,
    commit: Annotated[
        str | None, typer.Option("--commit", help="only this commit (a sha or its prefix)")
    ] = None,
    kind: Annotated[
        str | None, typer.Option(help=f"only this kind: {', '.join(FINDING_KINDS)}")
    ] = None,
    since: SinceOption = None,
    output: FormatOption = OutputFormat.table,
    config: ConfigOption = None,
) -> None:
    """One row per security finding per commit: rule, severity, where, suppressed or not."""
    if kind is not None and kind not in FINDING_KINDS:
        raise UsageError(f"--kind {kind!r}: use one of {', '.join(FINDING_KINDS)}")
    history = HistoryStore(_config(config).history_db_url)
    frame = history.findings(repository=repo, commit=commit, since=_since(since), kind=kind)
    _emit(frame, output)


@history_app.command("artifacts")
def history_artifacts(
    repo: RepoOption = None,
    since: SinceOption = None,
    output: FormatOption = OutputFormat.table,
    config: ConfigOption = None,
) -> None:
    """One row per recorded artifact: commit, path, sha256 digest, size."""
    history = HistoryStore(_config(config).history_db_url)
    _emit(history.artifacts(repository=repo, since=_since(since)), output)


def _environment(config: ControlConfig, name: str) -> tuple[int, EnvironmentConfig]:
    names = [e.name for e in config.environments]
    if name not in names:
        raise UsageError(
            f"unknown environment {name!r}; cicd.yaml has: {', '.join(names) or 'none'}"
        )
    return names.index(name), config.environments[names.index(name)]


@app.command()
def rescan(
    repository: Annotated[
        str | None, typer.Argument(help="repository name from cicd.yaml (default: all)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Dagster logs")] = False,
    config: ConfigOption = None,
) -> None:
    """Rescan the commits in service against today's advisory database now (what the
    nightly security_rescan schedule runs); exit 0 clean, 1 when something in service has a
    blocking finding or cannot be rescanned."""
    from jobs.inprocess import rescan_in_process

    control = _config(config)
    if repository is not None:
        _repository(control, repository)
    reports = rescan_in_process(control, repository, stream_logs=verbose)
    if as_json:
        sys.stdout.write(json.dumps({"repositories": reports}, indent=2) + "\n")
    for report in reports:
        if as_json:
            break
        findings = report.get("findings", [])
        if findings:
            table = Table(title=report["repository"])
            for column in ("commit", "where", "rule", "severity", "location", "new"):
                table.add_column(column)
            for row in findings:
                marks = "new" if row["new"] else ""
                marks += " suppressed" if row["suppressed"] else ""
                cells = [row[c] for c in ("commit", "where", "rule", "severity", "location")]
                table.add_row(*cells, marks)
            err.print(table)
        colour = "green" if report["passed"] else "red"
        verdict = "clean" if report["passed"] else "blocked"
        err.print(f"[{colour}]{verdict}[/] {report['repository']}: ", end="")
        err.print(str(report["detail"]), markup=False, highlight=False)
    raise typer.Exit(0 if all(report["passed"] for report in reports) else 1)


@app.command()
def deploy(
    repository: Annotated[str, typer.Argument(help="repository name from cicd.yaml")],
    env: Annotated[str, typer.Option("--env", help="environment from cicd.yaml")],
    commit: Annotated[
        str | None,
        typer.Option(
            help="sha or ref (default: the previous environment's verified commit, or the "
            "default branch head for the first environment)"
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Dagster logs")] = False,
    config: ConfigOption = None,
) -> None:
    """Materialize deployment_<env> of one commit in-process; exit 0 deployed, 1 otherwise."""
    from jobs.inprocess import deploy_commit_in_process

    control = _config(config)
    repo = _repository(control, repository)
    index, environment = _environment(control, env)
    if commit is None and index > 0:
        previous = control.environments[index - 1].name
        verified = HistoryStore(control.history_db_url).last_verified_deployment(
            repo.name, previous
        )
        if verified is None:
            raise UsageError(f"{repo.name}: nothing is verified in {previous} yet; pass --commit")
        sha = str(verified["commit"])
    else:
        _, sha, _ = _resolve(control, repo, commit)
    err.print(f"[bold]{repo.name}[/] {sha[:12]} -> {environment.name}")
    report = deploy_commit_in_process(
        control, repo.name, environment.name, sha, stream_logs=verbose
    )
    _print_deployment(report, environment, as_json)


def _print_deployment(
    report: dict[str, Any], environment: EnvironmentConfig, as_json: bool
) -> None:
    """Print what deploy_commit_in_process reported; exit 0 deployed, 1 otherwise."""
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        colour = "green" if report["status"] == "deployed" else "red"
        err.print(f"[{colour}]{report['status']}[/] {environment.name} at {report['url']}")
        if report.get("reason"):
            err.print(str(report["reason"]), markup=False, highlight=False)
    raise typer.Exit(0 if report["status"] == "deployed" else 1)


@app.command()
def rollback(
    repository: Annotated[str, typer.Argument(help="repository name from cicd.yaml")],
    env: Annotated[str, typer.Option("--env", help="environment from cicd.yaml")],
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="sha or ref (default: the environment's previous verified version)",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Dagster logs")] = False,
    config: ConfigOption = None,
) -> None:
    """Deploy an older verified version again: deployment_<env> of its partition, a switch
    of weights while its slot is in the rollback window; exit 0 deployed, 1 otherwise."""
    from cicd_dagster.stages.deploy import environment_for
    from jobs.inprocess import deploy_commit_in_process

    control = _config(config)
    repo = _repository(control, repository)
    _, environment = _environment(control, env)
    live = environment_for(control, repo.name, environment)
    current = live.current_version()
    if to is not None:
        _, sha, _ = _resolve(control, repo, to)
    else:
        previous = live.previous_version()
        if previous is None:
            deployed = HistoryStore(control.history_db_url).deployments(
                repository=repo.name, environment=environment.name
            )
            older = deployed[(deployed["status"] == "deployed") & (deployed["commit"] != current)]
            if older.empty:
                raise UsageError(
                    f"{repo.name}: {environment.name} has no previous verified version; pass --to"
                )
            previous = str(older.iloc[0]["commit"])
        sha = previous
    if sha == current:
        raise UsageError(f"{repo.name}: {sha[:12]} is already the version of {environment.name}")
    err.print(f"[bold]{repo.name}[/] {environment.name}: roll back to {sha[:12]}")
    report = deploy_commit_in_process(
        control, repo.name, environment.name, sha, stream_logs=verbose, rollback=True
    )
    _print_deployment(report, environment, as_json)


@app.command()
def qa(
    repository: Annotated[str, typer.Argument(help="repository name from cicd.yaml")],
    env: Annotated[str, typer.Option("--env", help="the environment with qa: true")],
    commit: Annotated[
        str | None,
        typer.Option(help="sha or ref (default: the version live in the environment)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Dagster logs")] = False,
    config: ConfigOption = None,
) -> None:
    """Run the QA suite (.cicd.yml qa) against the commit live in ENV: qa_<env> in-process;
    exit 0 passed, 1 failed or refused (the commit is not live there)."""
    from cicd_dagster.stages.deploy import environment_for
    from jobs.inprocess import qa_commit_in_process

    control = _config(config)
    repo = _repository(control, repository)
    _, environment = _environment(control, env)
    if not environment.qa:
        with_qa = [e.name for e in control.environments if e.qa]
        raise UsageError(
            f"{environment.name} does not run QA (environments[].qa); "
            f"QA runs in: {', '.join(with_qa) or 'no environment'}"
        )
    if commit is None:
        live = environment_for(control, repo.name, environment).current_version()
        if live is None:
            raise UsageError(f"{repo.name}: nothing is live in {environment.name}; pass --commit")
        sha = live
    else:
        _, sha, _ = _resolve(control, repo, commit)
    err.print(f"[bold]{repo.name}[/] {sha[:12]}: qa in {environment.name}")
    report = qa_commit_in_process(control, repo.name, environment.name, sha, stream_logs=verbose)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        colour = "green" if report["status"] == "success" else "red"
        verdict = {"success": "passed"}.get(report["status"], report["status"])
        err.print(f"[{colour}]{verdict}[/] qa in {environment.name} at {report['url']}")
        err.print(str(report["detail"]), markup=False, highlight=False)
    raise typer.Exit(0 if report["status"] == "success" else 1)


@app.command()
def verify(
    repository: Annotated[str, typer.Argument(help="repository name from cicd.yaml")],
    commit: Annotated[str, typer.Option(help="the commit: a full sha, or a ref to resolve")],
    public_key: Annotated[
        Path | None,
        typer.Option(help="PEM public key to trust (default: home/keys/signing.pub)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
    config: ConfigOption = None,
) -> None:
    """Check a commit's signed provenance against its stored artifacts: the signature, the
    commit, the builder and every digest; exit 0 verified, 1 not."""
    from cicd_dagster.security.provenance import ProvenanceError, SigningKeyError
    from cicd_dagster.stages.artifact import verify_commit

    control = _config(config)
    repo = _repository(control, repository)
    sha = commit if re.fullmatch(r"[0-9a-f]{40}", commit) else _resolve(control, repo, commit)[1]
    report: dict[str, Any] = {"repository": repo.name, "commit": sha}
    try:
        verified = verify_commit(control, repo.name, sha, public_key)
    except (ProvenanceError, SigningKeyError) as error:
        reason = error.reason if isinstance(error, ProvenanceError) else "key"
        report.update(verified=False, reason=reason, error=str(error))
    else:
        report.update(
            verified=True,
            keyid=verified.keyid,
            builder_id=verified.builder_id,
            invocation_id=verified.invocation_id,
            started_on=verified.started_on,
            finished_on=verified.finished_on,
            subjects=[{"name": s.name, "sha256": s.sha256} for s in verified.subjects],
        )
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    elif report["verified"]:
        err.print(
            f"[green]verified[/] {repo.name}@{sha[:12]}: {len(report['subjects'])} artifacts "
            f"signed by key {report['keyid'][:16]}, run {report['invocation_id']}"
        )
    else:
        err.print(f"[red]not verified[/] {repo.name}@{sha[:12]}", highlight=False)
        err.print(report["error"], markup=False, highlight=False)
    raise typer.Exit(0 if report["verified"] else 1)


@app.command()
def down(
    repository: Annotated[
        str | None, typer.Argument(help="repository name from cicd.yaml (default: all)")
    ] = None,
    env: Annotated[
        str | None, typer.Option("--env", help="only this environment (default: all)")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Stop service slots and routers: of one environment, of a repository, or (with no
    arguments) everything the project started, left-over environments included."""
    from cicd_dagster.deploy import infra

    control = _config(config)
    repositories = [_repository(control, repository).name] if repository else None
    if env is not None:
        _, environment = _environment(control, env)
        for name in repositories or [r.name for r in control.repositories]:
            live = infra.existing_environment(control, name, environment)
            if live is not None:
                live.down()
            err.print(f"stopped {name} {environment.name}")
        return
    stopped = infra.down(control, repository)
    for line in stopped:
        err.print(f"stopped {line}", markup=False, highlight=False)
    if not stopped:
        err.print("nothing was running")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print a JSON list")] = False,
    config: ConfigOption = None,
) -> None:
    """What runs where: per repository and environment, the live commit, its address,
    its health (probed now), since when it runs, and any open incident."""
    from cicd_dagster.deploy.monitor import environment_statuses

    control = _config(config)
    statuses = environment_statuses(control, HistoryStore(control.history_db_url))
    if as_json:
        sys.stdout.write(json.dumps([s.to_json() for s in statuses], indent=2) + "\n")
        return
    colours = {"healthy": "green", "degraded": "yellow", "down": "red", "not_deployed": "dim"}
    table = Table()
    for column in ("repository", "environment", "commit", "url", "health", "since", "strategy"):
        table.add_column(column)
    table.add_column("replicas", justify="right")
    table.add_column("incident")
    for s in statuses:
        health = s.health.replace("_", " ")
        incident = f"since {s.incident_since:%Y-%m-%d %H:%M:%S}" if s.incident_since else ""
        table.add_row(
            s.repository,
            s.environment,
            (s.commit or "")[:12],
            s.url or "",
            f"[{colours[s.health]}]{health}[/]",
            f"{s.since:%Y-%m-%d %H:%M:%S}" if s.since else "",
            f"{s.strategy} ({s.target})",
            str(s.replicas) if s.commit else "",
            incident,
        )
    _print_table(table)


@history_app.command("incidents")
def history_incidents(
    repo: RepoOption = None,
    env: Annotated[str | None, typer.Option("--env", help="only this environment")] = None,
    output: FormatOption = OutputFormat.table,
    config: ConfigOption = None,
) -> None:
    """One row per incident: opened (first failing probe), closed (first healthy check),
    duration_s (time to restore; empty while open)."""
    history = HistoryStore(_config(config).history_db_url)
    _emit(history.incidents(repository=repo, environment=env), output)


@history_app.command("notifications")
def history_notifications(
    repo: RepoOption = None,
    status: Annotated[
        str | None, typer.Option(help=f"only this status: {', '.join(DELIVERY_STATUSES)}")
    ] = None,
    since: SinceOption = None,
    output: FormatOption = OutputFormat.table,
    config: ConfigOption = None,
) -> None:
    """One row per delivery of an event to a notification channel: status, attempts, last
    error, next attempt."""
    if status is not None and status not in DELIVERY_STATUSES:
        raise UsageError(f"--status {status!r}: use one of {', '.join(DELIVERY_STATUSES)}")
    history = HistoryStore(_config(config).history_db_url)
    _emit(history.deliveries(repository=repo, status=status, since=_since(since)), output)


@notify_app.command("test")
def notify_test(
    channel: Annotated[
        int | None, typer.Option("--channel", help="only notifications[N] of cicd.yaml")
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Send a test notification to every channel now (not recorded); exit 1 if one fails."""
    from cicd_dagster.notify import DeliveryError, channels_for
    from cicd_dagster.store.history import EventRecord

    configs = _config(config).notifications
    if not configs:
        raise UsageError("cicd.yaml has no notifications")
    if channel is not None:
        if not 0 <= channel < len(configs):
            raise UsageError(
                f"--channel {channel}: cicd.yaml has notifications[0..{len(configs) - 1}]"
            )
        configs = [configs[channel]]
    event = EventRecord(
        id=0,
        repository="cicd",
        kind="test",
        environment=None,
        commit_sha=None,
        at=datetime.now(UTC),
        message="A test notification sent by `cicd notify test`.",
    )
    failed = False
    for each in channels_for(configs):
        try:
            each.send(event)
        except DeliveryError as error:
            failed = True
            err.print(f"failed: {each.description}: {error}", markup=False, highlight=False)
        else:
            err.print(f"sent: {each.description}", markup=False, highlight=False)
    raise typer.Exit(1 if failed else 0)


@notify_app.command("deliver")
def notify_deliver(
    as_json: Annotated[bool, typer.Option("--json", help="the outcomes as JSON")] = False,
    config: ConfigOption = None,
) -> None:
    """Deliver the pending events now, as the notifications sensor does on every tick;
    exit 1 if an attempt failed."""
    from cicd_dagster.notify import channels_for, deliver

    control = _config(config)
    outcomes = deliver(HistoryStore(control.history_db_url), channels_for(control.notifications))
    for outcome in outcomes:
        err.print(outcome.describe(), markup=False, highlight=False)
    if as_json:
        rows = [
            {
                "channel": outcome.channel,
                "event_id": outcome.event_id,
                "repository": outcome.repository,
                "kind": outcome.kind,
                "status": outcome.status,
                "attempts": outcome.attempts,
                "error": outcome.error,
                "retry_at": outcome.retry_at.isoformat() if outcome.retry_at else None,
            }
            for outcome in outcomes
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    raise typer.Exit(1 if any(outcome.status != "sent" for outcome in outcomes) else 0)


def _print_changes(changes: list[Change], as_json: bool, *, done: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps([c.to_json() for c in changes], indent=2) + "\n")
        return
    if not changes:
        err.print("[green]no changes[/]: what runs matches cicd.yaml")
        return
    symbols = {"create": "+", "update": "~", "restart": "↻", "delete": "-"}
    for change in changes:
        err.print(
            f"{symbols[change.action]} {change.repository}/{change.environment} "
            f"{change.action} {change.resource} {change.name}: {change.reason}",
            markup=False,
            highlight=False,
        )
    verb = "made" if done else "pending"
    err.print(f"{len(changes)} change{'s' if len(changes) != 1 else ''} {verb}")


@infra_app.command("plan")
def infra_plan(
    as_json: Annotated[bool, typer.Option("--json", help="print the changes as JSON")] = False,
    config: ConfigOption = None,
) -> None:
    """Show how what runs differs from cicd.yaml; exit 0 no changes, 1 changes pending
    (like terraform plan -detailed-exitcode, whose 2 is our usage error)."""
    from cicd_dagster.deploy import infra

    changes = infra.plan(_config(config))
    _print_changes(changes, as_json, done=False)
    raise typer.Exit(1 if changes else 0)


@infra_app.command("apply")
def infra_apply(
    as_json: Annotated[bool, typer.Option("--json", help="print the changes made as JSON")] = False,
    config: ConfigOption = None,
) -> None:
    """Provision and repair: folders, ports, router configs, missing or changed slots
    restarted from their release with its limits, orphans stopped. Idempotent."""
    from cicd_dagster.deploy import infra
    from cicd_dagster.deploy.router import RouterError
    from cicd_dagster.deploy.target import SupervisorError

    try:
        changes = infra.apply(_config(config))
    except (RouterError, SupervisorError) as error:
        err.print(f"apply stopped: {error}", markup=False, highlight=False)
        raise typer.Exit(1) from error
    _print_changes(changes, as_json, done=True)


@artifacts_app.command("prune")
def artifacts_prune(
    repo: RepoOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="show what would be deleted, delete nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
    config: ConfigOption = None,
) -> None:
    """Delete the artifacts that cicd.yaml's `artifacts` retention lets go: never those of a
    commit live or standby in an environment, nor of the keep_last newest per repository."""
    from cicd_dagster.artifact_store import ArtifactStoreError
    from cicd_dagster.retention import prune_artifacts

    control = _config(config)
    if repo is not None:
        _repository(control, repo)
    try:
        result = prune_artifacts(control, now=datetime.now(UTC), dry_run=dry_run, repository=repo)
    except ArtifactStoreError as error:
        err.print(f"nothing was pruned: {error}", markup=False, highlight=False)
        raise typer.Exit(1) from error
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
        return
    if result.deleted:
        table = Table("digest", "size", "stored", "named")
        for blob in result.deleted:
            named = [f"{r.repository}@{r.commit[:12]}/{r.name}" for r in result.names(blob.digest)]
            table.add_row(
                blob.digest[:19],
                decimal(blob.size),
                f"{blob.stored_at:%Y-%m-%d}",
                "\n".join(named) or "(unnamed)",
            )
        _print_table(table)
    for kept in result.kept:
        err.print(
            f"kept {kept.repository}@{kept.commit[:12]}: {', '.join(kept.reasons)}",
            markup=False,
            highlight=False,
        )
    if result.retention_days is None:
        err.print("artifacts.retention_days is null: artifacts are kept forever")
    blobs, commits = len(result.deleted), len({(r.repository, r.commit) for r in result.references})
    verb = "would be freed (dry run: nothing was deleted)" if dry_run else "freed"
    err.print(
        f"{blobs} blob{'s' if blobs != 1 else ''} of {commits} commit{'s' if commits != 1 else ''}"
        f": {decimal(result.bytes_freed)} {verb}",
        highlight=False,
    )


OutputOption = Annotated[
    Path | None, typer.Option("--output", "-o", help="where to write it (default: in home/reports)")
]


@report_app.command("quality")
def report_quality(
    repo: Annotated[
        str | None, typer.Option("--repo", help="the repository (default: every one)")
    ] = None,
    since: Annotated[
        str, typer.Option(help="start of the period: 30d, 12h, 45m or an ISO date")
    ] = "30d",
    output: OutputOption = None,
    config: ConfigOption = None,
) -> None:
    """Write the quality report of a repository over a period (builds and pass rates per
    day, failing, flaky and slowest tests, gates, findings, deployments, incidents, DORA
    metrics, build durations, benchmark regressions, cache hit rate); prints its path."""
    from assets.analytics_performance import build_env_records
    from cicd_dagster.quality import render_quality_report
    from jobs.inprocess import use_instance

    control = _config(config)
    names = [_repository(control, repo).name] if repo else [r.name for r in control.repositories]
    if output is not None and len(names) > 1:
        raise UsageError("--output writes one report: pass --repo too")
    start = _since(since)
    assert start is not None
    if start >= datetime.now(UTC):
        raise UsageError(f"--since {since!r} is not in the past")
    history = HistoryStore(control.history_db_url)
    build_envs = build_env_records(use_instance(control), control, start)
    for name in names:
        path = render_quality_report(
            control, history, name, start, output=output, build_envs=build_envs
        )
        sys.stdout.write(f"{path}\n")


@report_app.command("release")
def report_release(
    repository: Annotated[str, typer.Argument(help="repository name from cicd.yaml")],
    version: Annotated[str, typer.Argument(help="the released version, e.g. 1.4.0")],
    output: OutputOption = None,
    config: ConfigOption = None,
) -> None:
    """Write (again) the report of a release: changes, tests and trends, findings,
    deployments, approvals; prints its path."""
    from cicd_dagster.release.report import ReleaseNotFound, render_release_report

    control = _config(config)
    repo = _repository(control, repository)
    history = HistoryStore(control.history_db_url)
    try:
        path = render_release_report(control, history, repo.name, version, output=output)
    except (ReleaseNotFound, ValueError) as error:
        raise UsageError(str(error)) from error
    sys.stdout.write(f"{path}\n")


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="webserver port")] = 3000,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    config: ConfigOption = None,
) -> None:
    """Start the Dagster UI and daemon (dagster dev) on this control plane."""
    control = _config(config)
    control.dagster_home.mkdir(parents=True, exist_ok=True)
    workspace = control.home / "workspace.yaml"
    workspace.write_text(
        "load_from:\n  - python_module:\n      module_name: cicd_dagster.definitions\n"
        "      attribute: defs\n"
    )
    env = {**os.environ, "CICD_CONFIG": str(control.config_path)}
    env.setdefault("DAGSTER_HOME", str(control.dagster_home))
    dagster = Path(sys.executable).with_name("dagster")
    args = [str(dagster), "dev", "-w", str(workspace), "-h", host, "-p", str(port)]
    os.execvpe(args[0], args, env)  # noqa: S606 -- fixed argv, replaces this process


@app.command()
def demo(
    run_it: Annotated[bool, typer.Option("--run/--no-run", help="run the demo's CI once")] = True,
    config: ConfigOption = None,
) -> None:
    """Create the local demo repository named in cicd.yaml (if missing) and run its CI."""
    from cicd_dagster.demo import create_demo_repository

    control = _config(config)
    repo = control.repositories[0]
    path = Path(repo.url)
    if create_demo_repository(path):
        err.print(f"created demo repository {path}")
    if run_it:
        run(repo.name, ref=None, as_json=False, force=False, verbose=False, config=config)


# --- users and approvals ---


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="user name (lowercase letters, digits, - and _)")],
    role: Annotated[
        list[str] | None,
        typer.Option("--role", help="a role (repeatable); replaces the user's roles in the DB"),
    ] = None,
    email: Annotated[
        str | None, typer.Option(help="matched against commit authors (self-approval)")
    ] = None,
    rotate: Annotated[
        bool, typer.Option("--rotate", help="revoke the user's earlier tokens")
    ] = False,
    config: ConfigOption = None,
) -> None:
    """Add a user (or update its roles and email) and print a new API token on stdout:
    shown this once, only its hash is stored. Roles in cicd.yaml's users.NAME add to these."""
    from cicd_dagster.access import AccessError, add_user

    control = _config(config)
    try:
        user, token = add_user(
            control,
            HistoryStore(control.history_db_url),
            name,
            roles=role or [],
            email=email,
            revoke_others=rotate,
        )
    except AccessError as error:
        raise UsageError(str(error)) from error
    roles = ", ".join(sorted(user.roles)) or "none"
    err.print(f"{user.name} (roles: {roles}): a new token, shown once", markup=False)
    sys.stdout.write(token + "\n")


@users_app.command("remove")
def users_remove(
    name: Annotated[str, typer.Argument(help="user name")],
    config: ConfigOption = None,
) -> None:
    """Remove a user: its tokens are revoked at once; its approvals stay in the history."""
    from cicd_dagster.access import AccessError, remove_user

    control = _config(config)
    try:
        remove_user(HistoryStore(control.history_db_url), name)
    except AccessError as error:
        raise UsageError(str(error)) from error
    err.print(f"removed {name}; its tokens are revoked", markup=False)


@users_app.command("list")
def users_list(output: FormatOption = OutputFormat.table, config: ConfigOption = None) -> None:
    """One row per user: email, roles (the DB's and cicd.yaml's), active tokens, last use."""
    from cicd_dagster.access import list_users

    control = _config(config)
    _emit(list_users(control, HistoryStore(control.history_db_url)), output)


@app.command()
def approve(
    repository: Annotated[str, typer.Argument(help="repository name from cicd.yaml")],
    env: Annotated[str, typer.Option("--env", help="environment from cicd.yaml")],
    commit: Annotated[str, typer.Option("--commit", help="the commit's sha (7-40 hex digits)")],
    token: Annotated[
        str | None, typer.Option("--token", help="your API token (default: $CICD_TOKEN)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
    config: ConfigOption = None,
) -> None:
    """Approve a commit for an environment that requires approvals; exit 0 approved (now or
    before), 1 refused. Refusals are recorded too."""
    from cicd_dagster.release.approvals import approve as approve_commit

    control = _config(config)
    repo = _repository(control, repository)
    _, environment = _environment(control, env)
    if not re.fullmatch(r"[0-9a-fA-F]{7,40}", commit):
        raise UsageError(f"--commit {commit!r}: give a commit sha (7-40 hex digits)")
    token = token if token is not None else os.environ.get("CICD_TOKEN", "")
    if not token.strip():
        raise UsageError("no API token: pass --token or set CICD_TOKEN (see `cicd users add`)")
    history = HistoryStore(control.history_db_url)
    outcome = approve_commit(control, history, repo.name, environment.name, commit, token.strip())
    if as_json:
        sys.stdout.write(json.dumps(outcome.to_json(), indent=2) + "\n")
    colour = "green" if outcome.approved else "red"
    verdict = "approved" if outcome.approved else "refused"
    where = f"{repo.name} {outcome.commit[:12]} -> {environment.name}"
    err.print(f"[{colour}]{verdict}[/] {where}: ", end="")
    err.print(outcome.reason, markup=False, highlight=False)
    if outcome.status is not None:
        have, required, approvers = outcome.status
        names = f" ({', '.join(approvers)})" if approvers else ""
        err.print(f"approvals: {have} of {required}{names}", markup=False, highlight=False)
    raise typer.Exit(0 if outcome.approved else 1)


@history_app.command("approvals")
def history_approvals(
    repo: RepoOption = None,
    env: Annotated[str | None, typer.Option("--env", help="only this environment")] = None,
    commit: Annotated[str | None, typer.Option("--commit", help="only this commit")] = None,
    output: FormatOption = OutputFormat.table,
    config: ConfigOption = None,
) -> None:
    """One row per approval or refused attempt: environment, commit, user, decision, why."""
    history = HistoryStore(_config(config).history_db_url)
    _emit(history.approvals(repository=repo, environment=env, commit=commit), output)


@release_app.command("create")
def release_create(
    repository: Annotated[str, typer.Argument(help="repository name from cicd.yaml")],
    commit: Annotated[
        str | None,
        typer.Option(
            help="sha or ref (default: the commit verified last in the last environment; "
            "without environments the default branch head)"
        ),
    ] = None,
    pre: Annotated[
        str | None, typer.Option(help="make a pre-release, e.g. rc for 1.4.0-rc.1")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only plan: no tag, no notes, nothing recorded")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the release as JSON")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Dagster logs")] = False,
    config: ConfigOption = None,
) -> None:
    """Release a commit (`cicd release REPO`): the next version from its conventional
    commits, an annotated tag pushed to the repository, changelog and notes; the release
    asset of its partition. Exit 0 released (or planned), 1 refused or failed."""
    from cicd_dagster.release.versioning import VersioningError, check_pre
    from cicd_dagster.stages.release import ReleaseRefused, plan_release
    from jobs.inprocess import release_in_process

    control = _config(config)
    repo = _repository(control, repository)
    try:
        check_pre(pre)
    except VersioningError as error:
        raise UsageError(str(error)) from error
    history = HistoryStore(control.history_db_url)
    sha = _release_commit(control, history, repo, commit)
    report: dict[str, Any]
    if dry_run:
        try:
            plan = plan_release(control, repo.name, sha, history, pre=pre)
        except ReleaseRefused as error:
            report = {"repository": repo.name, "commit": sha, "status": "refused"}
            report["reason"] = str(error)
        else:
            report = {"status": "planned", **plan.to_json()}
    else:
        err.print(f"[bold]{repo.name}[/] release {sha[:12]}")
        report = release_in_process(control, repo.name, sha, pre=pre, stream_logs=verbose)
    _print_release(report, as_json)


def _release_commit(
    control: ControlConfig, history: HistoryStore, repo: RepositoryConfig, commit: str | None
) -> str:
    if commit is not None or not control.environments:
        return _resolve(control, repo, commit)[1]
    last = control.environments[-1].name
    verified = history.last_verified_deployment(repo.name, last)
    if verified is None:
        raise UsageError(f"{repo.name}: nothing is verified in {last} yet; pass --commit")
    return str(verified["commit"])


def _print_release(report: dict[str, Any], as_json: bool) -> None:
    """Print what a release (or its plan) came to; exit 0 released or planned, else 1."""
    done = report["status"] in ("released", "planned")
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        raise typer.Exit(0 if done else 1)
    if not done:
        err.print(f"[red]{report['status']}[/] ", end="")
        err.print(str(report["reason"]), markup=False, highlight=False)
        raise typer.Exit(1)
    for warning in report["warnings"]:
        err.print(f"warning: {warning}", markup=False, highlight=False)
    verb = "would be" if report["status"] == "planned" else "is"
    count = len(report["commits"])
    err.print(
        f"[green]{report['repository']} {report['version']}[/] {verb} {report['tag']} at "
        f"{report['commit'][:12]} ({report['bump']}; {count} commit{'' if count == 1 else 's'} "
        f"since {report['previous'] or 'the start'})",
        highlight=False,
    )
    if report.get("notes"):
        err.print(f"notes: {report['notes']['markdown']}", markup=False, highlight=False)
    sys.stdout.write(report["changelog"])


@release_app.command("diff")
def release_diff_command(
    repository: Annotated[str, typer.Argument(help="repository name from cicd.yaml")],
    old: Annotated[str, typer.Argument(metavar="FROM", help="the older release: version or tag")],
    new: Annotated[str, typer.Argument(metavar="TO", help="the newer release: version or tag")],
    as_json: Annotated[bool, typer.Option("--json", help="print the diff as JSON")] = False,
    config: ConfigOption = None,
) -> None:
    """What changed between two releases: commits, authors, files, and the test counts and
    security findings of each side's build (new and fixed findings)."""
    from cicd_dagster.stages.release import release_diff

    control = _config(config)
    repo = _repository(control, repository)
    try:
        diff = release_diff(control, HistoryStore(control.history_db_url), repo.name, old, new)
    except ValueError as error:
        raise UsageError(str(error)) from error
    if as_json:
        sys.stdout.write(json.dumps(diff, indent=2, default=str) + "\n")
        return
    before, after = diff["from"], diff["to"]
    err.print(
        f"[bold]{repo.name}[/] {before['version']} ({before['commit'][:12]}) -> "
        f"{after['version']} ({after['commit'][:12]}): {len(diff['commits'])} commits by "
        f"{len(diff['authors'])} authors, {len(diff['files'])} files changed",
        highlight=False,
    )
    commits = Table("commit", "type", "subject", "author", title="commits")
    for c in diff["commits"]:
        commits.add_row(c["sha"][:12], c["type"], c["subject"], c["author"])
    _print_table(commits)
    counts = Table("", "tests", "passed", "failed", "errors", "skipped", "findings", title="builds")
    for label, side in (("from", before), ("to", after)):
        tests = side["tests"] or {}
        findings = ", ".join(f"{n} {s}" for s, n in side["findings"].items()) or "none"
        cells = [str(tests.get(k, "")) for k in ("tests", "passed", "failed", "errors", "skipped")]
        counts.add_row(f"{label} {side['version']}", *cells, findings)
    _print_table(counts)
    err.print(
        f"findings: {len(diff['new_findings'])} new, {len(diff['fixed_findings'])} fixed",
        highlight=False,
    )
    files = Table("status", "path", "+", "-", title="files")
    for f in diff["files"]:
        files.add_row(f["status"], f["path"], str(f["added"] or ""), str(f["deleted"] or ""))
    _print_table(files)


@history_app.command("releases")
def history_releases(
    repo: RepoOption = None,
    since: SinceOption = None,
    output: FormatOption = OutputFormat.table,
    config: ConfigOption = None,
) -> None:
    """One row per release: version, tag, commit, previous version, bump, commit count,
    who and when, notes (json and csv add the changelog)."""
    history = HistoryStore(_config(config).history_db_url)
    frame = history.releases(repository=repo, since=_since(since))
    _emit(frame.drop(columns=["changelog"]) if output is OutputFormat.table else frame, output)


@events_app.command("import")
def events_import(
    file: Annotated[Path, typer.Argument(help="JSON lines of changes, deployments, incidents")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    config: ConfigOption = None,
) -> None:
    """Import changes, deployments and incidents from other systems (fourkeys-style JSON
    lines, see the README); bad lines are reported by number and skipped (exit 1), an id
    imported before changes nothing."""
    from cicd_dagster.analytics.events_import import import_events

    control = _config(config)
    if not file.is_file():
        raise UsageError(f"{file}: no such file")
    done = import_events(HistoryStore(control.history_db_url), file, now=datetime.now(UTC))
    for error in done.errors:
        err.print(f"{file}:{error.line}: {error.message}", markup=False, highlight=False)
    for source_id in done.result.conflicting:
        err.print(
            f"{file}: id {source_id!r} was imported before with other content: kept as it was",
            markup=False,
            highlight=False,
        )
    if as_json:
        sys.stdout.write(json.dumps(done.to_json(), indent=2) + "\n")
    else:
        result = done.result
        sys.stdout.write(
            f"{len(result.imported)} imported, {len(result.unchanged)} already there, "
            f"{len(result.conflicting)} conflicting, {len(done.errors)} bad lines skipped\n"
        )
    if done.errors or done.result.conflicting:
        raise typer.Exit(1)


@metrics_app.command("dora")
def metrics_dora(
    repo: RepoOption = None,
    since: Annotated[
        str, typer.Option(help="start of the period: 90d (fourkeys' 3 months), or an ISO date")
    ] = "90d",
    until: Annotated[
        str | None, typer.Option(help="end of the period: an ISO date/time (default: now)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    config: ConfigOption = None,
) -> None:
    """DORA's four keys per repository with fourkeys' definitions: deployment frequency,
    lead time for changes, change failure rate, time to restore, each with its DORA level
    ("no data" where the period has none)."""
    from cicd_dagster.analytics.dora import all_dora_metrics

    control = _config(config)
    history = HistoryStore(control.history_db_url)
    end = _since(until) or datetime.now(UTC)
    start = _since(since)
    assert start is not None
    if start >= end:
        raise UsageError(f"--since {since!r} is not before the end of the period")
    names = [repo] if repo else None
    configured = {r.name for r in control.repositories}
    if repo and repo not in configured and history.external_events(repo).empty:
        raise UsageError(f"unknown repository {repo!r}: not in cicd.yaml nor imported")
    results = [metrics for metrics, _ in all_dora_metrics(control, history, start, end, names)]
    for metrics in results:
        for note in metrics.notes:
            err.print(f"{metrics.repository}: {note}", markup=False, highlight=False)
    if as_json:
        document = {
            "since": start.isoformat(),
            "until": end.isoformat(),
            "environment": control.environments[-1].name if control.environments else None,
            "repositories": [metrics.to_json() for metrics in results],
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return
    table = Table(title=f"DORA metrics {start:%Y-%m-%d %H:%M} - {end:%Y-%m-%d %H:%M} UTC")
    for column in ("repository", "deployment frequency", "lead time", "change failure", "restore"):
        table.add_column(column)
    for metrics in results:
        table.add_row(metrics.repository, *_dora_cells(metrics.to_json()))
    _print_table(table)


def _dora_cells(document: dict[str, Any]) -> list[str]:
    def cell(metric: dict[str, Any], value: str) -> str:
        if metric["level"] == "no data":
            return "no data"
        return f"{value} ({metric['bucket'] or '-'}, {metric['level']})"

    frequency = document["deployment_frequency"]
    lead = document["lead_time_for_changes"]
    failure = document["change_failure_rate"]
    restore = document["time_to_restore"]
    return [
        cell(frequency, f"{frequency['deployments']} deployments, {frequency['per_week']}/week"),
        cell(lead, f"{lead['median_minutes']} min"),
        cell(failure, f"{failure['failed_deployments']}/{failure['deployments']}"),
        cell(restore, f"{restore['median_minutes']} min"),
    ]


def _period(since: str) -> tuple[datetime, datetime]:
    start = _since(since)
    assert start is not None
    until = datetime.now(UTC)
    if start >= until:
        raise UsageError(f"--since {since!r} is not in the past")
    return start, until


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = json.loads(
        frame.to_json(orient="records", date_format="iso") or "[]"
    )
    return records


def _emit_report(
    repository: str | None,
    start: datetime,
    until: datetime,
    summary: dict[str, Any],
    sections: dict[str, pd.DataFrame],
    as_json: bool,
    json_only: dict[str, pd.DataFrame] | None = None,
) -> None:
    """A metrics report as one JSON object (`json_only` frames too), or as its summary and
    tables for a person."""
    if not as_json:
        _print_sections(summary, sections)
        return
    frames = {**(json_only or {}), **sections}
    document = {
        "repository": repository,
        "since": start.isoformat(),
        "until": until.isoformat(),
        "summary": summary,
        **{title: _records(frame) for title, frame in frames.items()},
    }
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def _print_sections(summary: dict[str, Any], sections: dict[str, pd.DataFrame]) -> None:
    for name, value in summary.items():
        sys.stdout.write(f"{name:<24} {'no data' if value is None else value}\n")
    for title, frame in sections.items():
        sys.stdout.write(f"\n{title}\n")
        if frame.empty:
            sys.stdout.write("no data\n")
        else:
            _emit(frame, OutputFormat.table)


@metrics_app.command("performance")
def metrics_performance(
    repo: RepoOption = None,
    since: Annotated[str, typer.Option(help="30d, 12h, 45m or an ISO date")] = "30d",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    config: ConfigOption = None,
) -> None:
    """Build and stage durations, the slowest tests and how they changed, benchmark
    regressions, the dependency cache hit rate, queue and run times of Dagster runs."""
    from assets.analytics_performance import instance_performance
    from jobs.inprocess import use_instance

    control = _config(config)
    name = _repository(control, repo).name if repo else None
    start, until = _period(since)
    report = instance_performance(
        use_instance(control),
        control,
        HistoryStore(control.history_db_url),
        since=start,
        until=until,
        repository=name,
    )
    regressions = report.benchmarks[report.benchmarks["regressed"]]
    sections = {
        "stages": report.stages,
        "slowest_tests": report.slowest_tests,
        "benchmark_regressions": regressions,
        "cache": report.cache,
        "jobs": report.jobs,
    }
    _emit_report(name, start, until, report.summary(), sections, as_json, {"builds": report.builds})


@metrics_app.command("usage")
def metrics_usage(
    repo: RepoOption = None,
    since: Annotated[str, typer.Option(help="30d, 12h, 45m or an ISO date")] = "30d",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    config: ConfigOption = None,
) -> None:
    """Who triggers what, materializations per asset and repository, the busiest hours,
    deployments per environment, requests per version through the routers."""
    from assets.analytics_performance import instance_usage
    from jobs.inprocess import use_instance

    control = _config(config)
    name = _repository(control, repo).name if repo else None
    start, until = _period(since)
    report = instance_usage(
        use_instance(control),
        control,
        HistoryStore(control.history_db_url),
        since=start,
        until=until,
        repository=name,
    )
    sections = {
        "triggers": report.triggers,
        "assets": report.assets,
        "repositories": report.repositories,
        "hours": report.hours,
        "deployments": report.deployments,
        "requests": report.requests,
    }
    _emit_report(name, start, until, report.summary(), sections, as_json)


@metrics_app.command("flaky")
def metrics_flaky(
    repo: RepoOption = None,
    since: Annotated[str, typer.Option(help="30d, 12h, 45m or an ISO date")] = "30d",
    min_runs: Annotated[
        int, typer.Option("--min-runs", min=1, help="rank only tests run at least this often")
    ] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    config: ConfigOption = None,
) -> None:
    """Flaky tests (passed and failed on the same commit), flakiest first by flip rate
    (flips / (runs - 1)), and quarantine entries that match no test any more."""
    from cicd_dagster.analytics.flaky import collect_test_health

    control = _config(config)
    names = [_repository(control, repo).name] if repo else None
    start, _ = _period(since)
    health = collect_test_health(
        control,
        HistoryStore(control.history_db_url),
        start,
        repositories=names,
        min_runs=min_runs,
    )
    ranking = health.ranking
    summary = {
        "flaky_tests": len(ranking),
        "worst_flip_rate": float(ranking["flip_rate"].max()) if len(ranking) else None,
        "stale_quarantine": sum(len(r.stale_quarantine) for r in health.repositories),
    }
    if as_json:
        document = {
            "repository": repo,
            "since": start.isoformat(),
            "min_runs": min_runs,
            "summary": summary,
            "repositories": [dataclasses.asdict(r) for r in health.repositories],
            "tests": _records(ranking),
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return
    shown = ranking.assign(
        commits=ranking["commits"].map(lambda shas: " ".join(sha[:12] for sha in shas)),
        flip_rate=ranking["flip_rate"].round(3),
    )
    quarantine = pd.DataFrame(
        {
            "repository": r.repository,
            "commit": (r.quarantine_commit or "")[:12],
            "entries": " ".join(r.quarantine),
            "stale": r.quarantine_error or " ".join(r.stale_quarantine),
        }
        for r in health.repositories
    )
    _print_sections(summary, {"flaky_tests": shown, "quarantine": quarantine})


def main() -> None:
    try:
        # Without standalone mode click returns the exit code instead of raising it.
        code = app(standalone_mode=False)
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except (ConfigError, UsageError) as error:
        err.print(f"error: {error}", markup=False, highlight=False)
        sys.exit(2)
    except GitError as error:
        err.print(f"git: {error}", markup=False, highlight=False)
        sys.exit(2)
    except typer.TyperException as error:  # a missing option, a bad value: typer's click
        show = getattr(error, "show", None)
        if show is not None:
            show()
        else:
            err.print(f"error: {error.message}", markup=False, highlight=False)
        sys.exit(error.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
