"""The `cicd` command: validate, run, deploy, down, status, verify, rescan, infra, artifacts,
history, ui, demo.

Exit codes: 0 green, 1 red (a failed stage or gate; a deployment not deployed), 2 usage
or configuration error.
Machine-readable output goes to stdout; progress and messages go to stderr.
"""

from __future__ import annotations

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
from cicd_dagster.store.models import FINDING_KINDS

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
