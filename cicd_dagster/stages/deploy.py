"""deployment_<env>: a green commit's service into one environment of the promotion chain.

The commit must be green (every stage and gate recorded passed, with a build), its signed
provenance must verify with its artifacts in the release as signed, and past the first
environment it must have been verified in the previous one at some time (or in this one
before: a rollback); past an environment with `qa`, its QA there must have passed
(stages/qa.py). An environment with `approvals` also waits until enough people approved
the commit (release/approvals.py). Its checkout is copied once to home/releases/<repo>/<sha>
(workspaces are pruned) and run with the build's venv as a local, supervised service behind the
environment's nginx router, whose port is allocated once and kept in
home/routers/<repo>-<env>/port.

Configuration: the service gets the step environment, the environment's `env` settings,
and its secrets (the repository's, then the environment's), which travel as references
("env:VAR", "file:/path") and are read only when a replica starts. The config digest, an
HMAC of the settings and the secrets' values under a random key kept in
home/keys/deploy-digest.key (0600), tells a change of config without storing a value: the
commit that is live, with a new digest, deploys as a new release.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from cicd_dagster.artifact_store import file_sha256
from cicd_dagster.config import ControlConfig, EnvironmentConfig, PipelineConfig
from cicd_dagster.deploy import layout
from cicd_dagster.deploy.docker import (
    APP_DIR,
    DockerTarget,
    ImageBuildError,
    build_release_image,
    release_image_tag,
)
from cicd_dagster.deploy.health import ProbeConfig
from cicd_dagster.deploy.local import LocalSupervisor, free_port
from cicd_dagster.deploy.router import NginxRouter, find_nginx
from cicd_dagster.deploy.strategies import (
    DeployOutcome,
    Environment,
    Release,
    SecretUnavailable,
    resolve_secrets,
)
from cicd_dagster.deploy.target import Limits, ServiceTarget
from cicd_dagster.locks import file_lock
from cicd_dagster.release.approvals import approval_refusal
from cicd_dagster.runner import SecretMasker
from cicd_dagster.sandbox import sandbox_for
from cicd_dagster.security.provenance import ProvenanceError, SigningKeyError
from cicd_dagster.stages.artifact import SBOM_NAME, verify_commit
from cicd_dagster.stages.build import load_build
from cicd_dagster.stages.context import StageContext, StageError
from cicd_dagster.stages.source import load_source
from cicd_dagster.stages.tests import TEST_STAGES
from cicd_dagster.store import DeploymentRecord, HistoryStore
from cicd_dagster.store.models import PROMOTION_STAGES

QA_STAGE = "qa"


def environment_for(
    config: ControlConfig, repository: str, environment: EnvironmentConfig
) -> Environment:
    """The environment `environment` of `repository` on its target, with its stable router
    port (allocated once, kept in home/routers/<repo>-<env>/port)."""
    home = config.home
    router_root = layout.router_dir(home, repository, environment.name)
    router_root.mkdir(parents=True, exist_ok=True)
    port_file = router_root / "port"
    with file_lock(router_root / "port.lock"):
        if not port_file.exists():
            port_file.write_text(f"{free_port()}\n")
        port = int(port_file.read_text())
    router = NginxRouter(router_root, port, nginx=find_nginx() or "nginx")
    target: ServiceTarget
    if environment.target.type == "docker":
        target = DockerTarget(layout.docker_scope(home, repository))
    else:
        target = LocalSupervisor(layout.services_dir(home, repository))
    verify = environment.verify
    probe = ProbeConfig(
        timeout_s=verify.timeout_s,
        interval_s=verify.interval_s,
        max_attempts=verify.max_attempts,
        success_threshold=verify.success_threshold,
    )
    return Environment(
        environment.name,
        layout.environment_dir(home, repository, environment.name),
        router,
        target,
        probe,
        smoke=verify.smoke,
        smoke_timeout_s=verify.smoke_timeout_s,
        smoke_sandbox=sandbox_for(config),
        rollback_window_s=verify.rollback_window_s,
    )


def was_verified(history: HistoryStore, repository: str, environment: str, sha: str) -> bool:
    """Whether `sha` was ever deployed and verified in `environment`."""
    rows = history.deployments(repository=repository, environment=environment)
    return bool(((rows["commit"] == sha) & (rows["status"] == "deployed")).any())


def unfit_build(history: HistoryStore, repository: str, sha: str) -> str | None:
    """Why this commit's CI does not let it deploy (no build, tests not finished, a failed
    stage or gate), or None for a green commit."""
    stages = history.stage_rows(repository, sha)
    stages = stages[~stages["name"].isin(PROMOTION_STAGES)]
    if stages.empty or not (stages["name"] == "build").any():
        return f"{sha[:12]} has no build: run its CI first"
    failed = stages[stages["status"] == "failed"]
    if not failed.empty:
        return f"{sha[:12]} is red: stage {', '.join(failed['name'])} failed"
    gates = history.gate_rows(repository, sha)
    gates = gates[~gates["stage"].isin(PROMOTION_STAGES)]
    if not gates.empty:
        red = gates[~gates["passed"].astype(bool)]
        if not red.empty:
            names = ", ".join(f"{s}.{n}" for s, n in zip(red["stage"], red["name"], strict=True))
            return f"{sha[:12]} is red: gate {names} failed"
    missing = [stage for stage in TEST_STAGES if not (stages["name"] == stage).any()]
    if missing:
        return f"{sha[:12]} has no {', '.join(missing)} test report yet: let its CI finish"
    return None


def refusal(
    ctx: StageContext, environment: str, previous: str | None, history: HistoryStore
) -> str | None:
    """Why this commit may not be deployed to `environment`, or None."""
    repo, sha = ctx.repository.name, ctx.sha
    reason = unfit_build(history, repo, sha)
    if reason is not None:
        return reason
    # Promotion: verified in the previous environment at any time, not only its latest
    # (rolling a later environment back to an older version needs that). A version
    # verified here before may come back (a rollback).
    if previous is not None and not (
        was_verified(history, repo, previous, sha) or was_verified(history, repo, environment, sha)
    ):
        verified = history.last_verified_deployment(repo, previous)
        current = "nothing" if verified is None else str(verified["commit"])[:12]
        return (
            f"{sha[:12]} was never verified in {previous} ({previous} runs {current}): "
            f"deploy it to {previous} first"
        )
    # Stage -> QA -> next: past an environment with qa, the commit's QA there must have
    # passed (stages/qa.py); a rollback to a version verified here before needs none.
    if (
        previous is not None
        and ctx.config.environment(previous).qa
        and not was_verified(history, repo, environment, sha)
    ):
        failed_qa = unpassed_qa(history, repo, previous, sha)
        if failed_qa is not None:
            return f"qa in {previous} has not passed for {sha[:12]}: {failed_qa}"
    # Approvals last: approvers are asked only for a commit that could otherwise deploy.
    # A rollback to a version verified here before needs none: it was let in once.
    if not was_verified(history, repo, environment, sha):
        return approval_refusal(ctx.config, history, repo, environment, sha)
    return None


def unpassed_qa(history: HistoryStore, repository: str, environment: str, sha: str) -> str | None:
    """Why the commit's QA (run in `environment`) does not count as passed, or None. A
    repository without a QA suite passes once its QA step has run and said so."""
    stages = history.stage_rows(repository, sha)
    qa = stages[stages["name"] == QA_STAGE]
    if qa.empty:
        return f"it has not run: `cicd qa {repository} --env {environment} --commit {sha[:12]}`"
    row = qa.iloc[0]
    gates = history.gate_rows(repository, sha)
    red = gates[(gates["stage"] == QA_STAGE) & ~gates["passed"].astype(bool)]
    if row["status"] in ("success", "not_configured") and red.empty:
        return None
    if isinstance(row["detail"], str) and row["detail"]:
        return row["detail"]
    return str(red["detail"].iloc[0]) if not red.empty else f"it {row['status']}"


def secret_references(ctx: StageContext, environment: EnvironmentConfig) -> dict[str, str]:
    """NAME -> reference of every secret the service gets: the repository's (variables of
    this process), then the environment's, which win on a clash."""
    return {
        **{name: f"env:{name}" for name in ctx.repository.secrets},
        **{name: source.reference for name, source in environment.secrets.items()},
    }


def config_digest(home: Path, settings: Mapping[str, str], secret_values: Mapping[str, str]) -> str:
    """HMAC-SHA256 of the settings and the secrets' values under this home's digest key, so
    the digest tells a change without letting anyone test guesses of a short secret."""
    payload = json.dumps({"settings": settings, "secrets": secret_values}, sort_keys=True)
    return hmac.new(_digest_key(home), payload.encode(), hashlib.sha256).hexdigest()


def digest_key_path(home: Path) -> Path:
    """In home/keys, which build steps never see (sandbox.py): a step could otherwise read
    the key, or create it before the first deploy and so know it."""
    return home / "keys" / "deploy-digest.key"


def _digest_key(home: Path) -> bytes:
    path = digest_key_path(home)
    legacy = home / "deploy-digest.key"  # where it was before 0.2: same key, same digests
    if legacy.exists() and not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(legacy, path)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = path.with_name(f"deploy-digest.key.{os.getpid()}.tmp")
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(secrets.token_bytes(32))
        try:
            os.link(partial, path)  # atomic, and never replaces a key another process made
        except FileExistsError:
            pass
        finally:
            partial.unlink()
    return path.read_bytes()


def release_of(
    ctx: StageContext, pipeline: PipelineConfig, environment: EnvironmentConfig
) -> Release:
    """How to run this commit's service in `environment`: a stable copy of the checkout,
    the build's venv, the settings, and references to the secrets. StageError when an
    artifact is missing or a secret cannot be read."""
    service = pipeline.service
    assert service is not None
    releases = ctx.config.home / "releases" / ctx.repository.name
    target = releases / ctx.sha
    if not target.exists() and not ctx.workspace.checkout.is_dir():
        raise StageError(
            f"missing artifact: neither the release folder {target} nor the checkout "
            f"{ctx.workspace.checkout} exists; re-run the CI of {ctx.sha[:12]}"
        )
    build = load_build(ctx, pipeline)
    if build.env_dir is not None and not build.env_dir.is_dir():
        raise StageError(
            f"missing artifact: the build's venv {build.env_dir} is gone; "
            f"rebuild with `cicd run {ctx.repository.name} --ref {ctx.sha} --force`"
        )
    releases.mkdir(parents=True, exist_ok=True)
    with file_lock(releases / f"{ctx.sha}.lock"):
        if not target.exists():
            partial = releases / f"{ctx.sha}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(ctx.workspace.checkout, partial, symlinks=True)
            partial.rename(target)
    _check_signed(ctx, target)
    references = secret_references(ctx, environment)
    try:
        values = resolve_secrets(references)
    except SecretUnavailable as error:
        raise StageError(str(error)) from error
    env = {
        name: value
        for name, value in ctx.step_env("deploy", pipeline, build.env_dir).items()
        if name not in references
    }
    env.update(environment.env)
    env["CICD_WORKSPACE"] = str(target)
    env["CICD_ENVIRONMENT"] = environment.name
    labels = {
        "cicd.repository": ctx.repository.name,
        "cicd.environment": environment.name,
        "cicd.commit": ctx.sha,
    }
    image = None
    if environment.target.type == "docker":
        image = _release_image(ctx, pipeline, environment, target, labels)
        # A container has the image's PATH and files: only the settings travel.
        settings = {*pipeline.env, *environment.env}
        env = {**_container_settings(env, settings), "CICD_WORKSPACE": APP_DIR}
    limits = environment.target
    return Release(
        version=ctx.sha,
        command=service.run,
        cwd=target,
        env=env,
        secrets=references,
        image=image,
        limits=Limits(limits.memory_mb, limits.cpus, limits.max_open_files),
        labels=labels,
        config_digest=config_digest(ctx.config.home, {**pipeline.env, **environment.env}, values),
        health_path=service.health,
    )


def _check_signed(ctx: StageContext, release_dir: Path) -> None:
    """Only what the commit's provenance signs is deployed: the provenance must verify,
    and each signed artifact must be in the release folder with its signed digest (the
    wheels a docker image installs are taken from there)."""
    try:
        verified = verify_commit(ctx.config, ctx.repository.name, ctx.sha)
    except (ProvenanceError, SigningKeyError) as error:
        raise StageError(f"{ctx.sha[:12]} has no provenance that verifies: {error}") from error
    for subject in verified.subjects:
        if subject.name == SBOM_NAME:
            continue  # made by the artifact stage, never part of the release
        path = release_dir / subject.name
        if not path.is_file():
            raise StageError(f"signed artifact {subject.name} is not in the release {release_dir}")
        if file_sha256(path) != subject.sha256:
            raise StageError(
                f"{path} is not the signed {subject.name} (sha256 {subject.sha256[:16]}…): "
                f"changed after the build; delete {release_dir} and rebuild"
            )


def _release_image(
    ctx: StageContext,
    pipeline: PipelineConfig,
    environment: EnvironmentConfig,
    release_dir: Path,
    labels: dict[str, str],
) -> str:
    """The release's Docker image (built once per commit and image settings)."""
    settings = environment.target
    tag = release_image_tag(
        ctx.repository.name,
        ctx.sha,
        base_image=settings.base_image,
        dockerfile=settings.dockerfile,
    )
    wheels = sorted(
        path.relative_to(release_dir).as_posix()
        for pattern in pipeline.build.artifacts
        for path in release_dir.glob(pattern)
        if path.suffix == ".whl" and path.is_file()
    )
    try:
        return build_release_image(
            release_dir,
            tag=tag,
            base_image=settings.base_image,
            dockerfile=settings.dockerfile,
            wheels=wheels,
            labels={key: value for key, value in labels.items() if key != "cicd.environment"},
            log=ctx.on_line,
        )
    except ImageBuildError as error:
        raise StageError(str(error)) from error


def _container_settings(env: Mapping[str, str], settings: set[str]) -> dict[str, str]:
    """What of a local release's environment a container gets: the `settings` and the
    CICD_* values, not this machine's PATH, HOME or folders."""
    host_paths = {"CICD_WORKSPACE", "CICD_REPORTS_DIR", "CICD_ARTIFACTS_DIR"}
    return {
        name: value
        for name, value in env.items()
        if name in settings or (name.startswith("CICD_") and name not in host_paths)
    }


def deploy_commit(
    ctx: StageContext,
    environment: EnvironmentConfig,
    previous: str | None,
    history: HistoryStore,
    *,
    run_id: str | None = None,
    triggered_by: str | None = None,
) -> DeployOutcome:
    """Deploy the commit to `environment`, recording the attempt and its event; StageError
    if refused. The outcome's reason and timeline are masked.

    The commit that is live with the same config is left alone ("already live", nothing
    recorded). A version still in the rollback window comes back as a switch of weights.
    """
    started_at = datetime.now(UTC)
    started = time.monotonic()
    repo = ctx.repository.name
    env = environment_for(ctx.config, repo, environment)
    masker = ctx.masker

    def record(status: str, reason: str, outcome: DeployOutcome | None = None) -> None:
        history.record_deployment(
            repo,
            DeploymentRecord(
                environment=environment.name,
                commit_sha=ctx.sha,
                strategy=outcome.strategy if outcome else environment.strategy.type,
                status=status,
                version=ctx.sha,
                previous_version=(outcome.previous_version if outcome else env.current_version()),
                reason=reason,
                started_at=started_at,
                finished_at=datetime.now(UTC),
                duration_s=outcome.duration_s if outcome else time.monotonic() - started,
                rollback_s=outcome.rollback_s if outcome else None,
                run_id=run_id,
                triggered_by=triggered_by,
                config_digest=outcome.config_digest if outcome else None,
            ),
        )

    reason = refusal(ctx, environment.name, previous, history)
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
            release = release_of(ctx, pipeline, environment)
        except StageError as error:
            reason = error.message
    if reason is not None or pipeline is None:
        reason = masker.mask(reason or "no pipeline")
        record("refused", reason)
        raise StageError(f"deploy to {environment.name} refused: {reason}")
    masker = SecretMasker([*ctx.secrets.values(), *resolve_secrets(release.secrets).values()])
    if env.is_live(release):
        return DeployOutcome(
            status="deployed",
            version=release.version,
            previous_version=env.previous_version(),
            reason="already live",
            duration_s=time.monotonic() - started,
            rollback_s=None,
            events=[f"{release.version} is already live in {environment.name} with this config"],
            strategy=environment.strategy.type,
            config_digest=release.config_digest,
        )
    if env.in_rollback_window(release):
        outcome = env.rollback(release, environment.strategy.replicas)
    else:
        outcome = env.deploy(release, environment.strategy)
    outcome = replace(
        outcome,
        reason=masker.mask(outcome.reason),
        events=[masker.mask(event) for event in outcome.events],
    )
    record(outcome.status, outcome.reason, outcome)
    history.record_event(
        repo,
        outcome.status,
        f"{repo} {ctx.sha[:12]} {outcome.status} in {environment.name}: {outcome.reason}",
        environment=environment.name,
        commit_sha=ctx.sha,
    )
    return outcome
