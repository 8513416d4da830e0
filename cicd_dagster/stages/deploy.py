"""deployment_<env>: a green commit's service into one environment of the promotion chain.

The commit must be green (every stage and gate recorded passed, with a build) and, past
the first environment, verified in the previous one. Its checkout is copied once to
home/releases/<repo>/<sha> (workspaces are pruned) and run with the build's venv as a
local, supervised service behind the environment's nginx router, whose port is allocated
once and kept in home/routers/<repo>-<env>/port.
"""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime

from cicd_dagster.config import ControlConfig, EnvironmentConfig, PipelineConfig
from cicd_dagster.deploy.health import ProbeConfig
from cicd_dagster.deploy.local import LocalSupervisor, free_port
from cicd_dagster.deploy.router import NginxRouter, find_nginx
from cicd_dagster.deploy.strategies import DeployOutcome, Environment, Release
from cicd_dagster.locks import file_lock
from cicd_dagster.stages.build import load_build
from cicd_dagster.stages.context import StageContext, StageError
from cicd_dagster.stages.source import load_source
from cicd_dagster.store import DeploymentRecord, HistoryStore


def environment_for(
    config: ControlConfig, repository: str, environment: EnvironmentConfig
) -> Environment:
    """The environment `environment` of `repository` on its target, with its stable router
    port (allocated once, kept in home/routers/<repo>-<env>/port)."""
    home = config.home
    router_root = home / "routers" / f"{repository}-{environment.name}"
    router_root.mkdir(parents=True, exist_ok=True)
    port_file = router_root / "port"
    with file_lock(router_root / "port.lock"):
        if not port_file.exists():
            port_file.write_text(f"{free_port()}\n")
        port = int(port_file.read_text())
    router = NginxRouter(router_root, port, nginx=find_nginx() or "nginx")
    # Slot names are "<env>.<version>.<n>": one supervisor folder per repository.
    target = LocalSupervisor(home / "services" / repository)
    verify = environment.verify
    probe = ProbeConfig(
        timeout_s=verify.timeout_s,
        interval_s=verify.interval_s,
        max_attempts=verify.max_attempts,
        success_threshold=verify.success_threshold,
    )
    return Environment(
        environment.name,
        home / "environments" / repository / environment.name,
        router,
        target,
        probe,
    )


def refusal(ctx: StageContext, previous: str | None, history: HistoryStore) -> str | None:
    """Why this commit may not be deployed, or None."""
    repo, sha = ctx.repository.name, ctx.sha
    stages = history.stage_rows(repo, sha)
    if stages.empty or not (stages["name"] == "build").any():
        return f"{sha[:12]} has no build: run its CI first"
    failed = stages[stages["status"] == "failed"]
    if not failed.empty:
        return f"{sha[:12]} is red: stage {', '.join(failed['name'])} failed"
    gates = history.gate_rows(repo, sha)
    if not gates.empty:
        red = gates[~gates["passed"].astype(bool)]
        if not red.empty:
            names = ", ".join(f"{s}.{n}" for s, n in zip(red["stage"], red["name"], strict=True))
            return f"{sha[:12]} is red: gate {names} failed"
    if previous is not None:
        verified = history.last_verified_deployment(repo, previous)
        if verified is None or verified["commit"] != sha:
            current = "nothing" if verified is None else str(verified["commit"])[:12]
            return (
                f"{sha[:12]} is not the verified deployment of {previous} "
                f"({previous} runs {current}): deploy it to {previous} first"
            )
    return None


def release_of(ctx: StageContext, pipeline: PipelineConfig) -> Release:
    """How to run this commit's service: a stable copy of the checkout and the build's venv."""
    service = pipeline.service
    assert service is not None
    build = load_build(ctx, pipeline)
    releases = ctx.config.home / "releases" / ctx.repository.name
    target = releases / ctx.sha
    releases.mkdir(parents=True, exist_ok=True)
    with file_lock(releases / f"{ctx.sha}.lock"):
        if not target.exists():
            partial = releases / f"{ctx.sha}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(ctx.workspace.checkout, partial, symlinks=True)
            partial.rename(target)
    env = ctx.step_env("deploy", pipeline, build.env_dir)
    env["CICD_WORKSPACE"] = str(target)
    return Release(version=ctx.sha, command=service.run, cwd=target, env=env)


def deploy_commit(
    ctx: StageContext,
    environment: EnvironmentConfig,
    previous: str | None,
    history: HistoryStore,
    *,
    run_id: str | None = None,
    triggered_by: str | None = None,
) -> DeployOutcome:
    """Deploy the commit to `environment`, recording the attempt; StageError if refused."""
    started_at = datetime.now(UTC)
    started = time.monotonic()
    repo = ctx.repository.name
    env = environment_for(ctx.config, repo, environment)

    def record(status: str, reason: str, outcome: DeployOutcome | None = None) -> None:
        history.record_deployment(
            repo,
            DeploymentRecord(
                environment=environment.name,
                commit_sha=ctx.sha,
                strategy=environment.strategy.type,
                status=status,
                version=ctx.sha,
                previous_version=(outcome.previous_version if outcome else env.current_version()),
                reason=ctx.masker.mask(reason),
                started_at=started_at,
                finished_at=datetime.now(UTC),
                duration_s=outcome.duration_s if outcome else time.monotonic() - started,
                rollback_s=outcome.rollback_s if outcome else None,
                run_id=run_id,
                triggered_by=triggered_by,
            ),
        )

    reason = refusal(ctx, previous, history)
    pipeline: PipelineConfig | None = None
    if reason is None:
        try:
            pipeline = load_source(ctx)[0]
        except StageError as error:
            reason = error.message
    if reason is None and pipeline is not None and pipeline.service is None:
        reason = f"{ctx.sha[:12]}:.cicd.yml has no service to deploy"
    if reason is None and pipeline is not None:
        try:
            release = release_of(ctx, pipeline)
        except StageError as error:
            reason = error.message
    if reason is not None or pipeline is None:
        reason = reason or "no pipeline"
        record("refused", reason)
        raise StageError(f"deploy to {environment.name} refused: {reason}")
    outcome = env.deploy(release, environment.strategy)
    record(outcome.status, outcome.reason, outcome)
    return outcome
