"""The approval sensor: a commit that waited for approvals deploys once it has them.

A deployment refused for want of approvals records an approval_requested event (once per
commit and environment). For each environment with approvals, the newest such request with
no deployment attempt of its commit there since is what waits; an older one is superseded
by it (`cicd deploy` still deploys it by hand). Once the waiting commit has its approvals,
one run of the environment's deploy job is requested (run key "approved:<env>:<sha>").

What waits is what the UI shows: the sensor's skip reason and cursor name it, e.g.
"shop@0a1b2c3d4e5f -> prod: waiting for approval: 0 of 1 (roles: release-manager)".
"""

import json
from collections.abc import Sequence

import pandas as pd
from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from assets.common import BRANCH_TAG, REF_TAG
from assets.deploy import TRIGGER_TAG
from cicd_dagster.config import EnvironmentConfig, RepositoryConfig
from cicd_dagster.release.approvals import approval_status, waiting_reason
from cicd_dagster.resources import CicdResource
from cicd_dagster.store import HistoryStore
from jobs import deploy_job_name

APPROVALS_INTERVAL_S = 30
APPROVALS_TRIGGER = "sensor:approvals"


def approval_sensors(
    repository: RepositoryConfig,
    environments: Sequence[EnvironmentConfig],
    deploy_jobs: Sequence[UnresolvedAssetJobDefinition],
) -> list[SensorDefinition]:
    """The repository's approval sensor, or none when no environment requires approvals.
    `deploy_jobs` are the environments' deploy jobs, in the same order."""
    gated = [
        (env, job) for env, job in zip(environments, deploy_jobs, strict=True) if env.approvals
    ]
    if not gated:
        return []

    @sensor(
        name=f"{repository.identifier}_approvals",
        jobs=[job for _, job in gated],
        minimum_interval_seconds=APPROVALS_INTERVAL_S,
        default_status=DefaultSensorStatus.RUNNING,
        description=f"Deploys commits of {repository.name} waiting for approval to "
        + ", ".join(env.name for env, _ in gated)
        + " once approved; its skip reason lists what waits.",
    )
    def approvals(context: SensorEvaluationContext, cicd: CicdResource) -> SensorResult:
        config, history = cicd.control_config(), cicd.history()
        requests: list[RunRequest] = []
        waiting: list[str] = []
        for environment, _ in gated:
            sha = waiting_commit(history, repository.name, environment.name)
            if sha is None:
                continue
            status = approval_status(history, config, repository.name, environment.name, sha)
            where = f"{repository.name}@{sha[:12]} -> {environment.name}"
            if status.have < status.required:
                waiting.append(f"{where}: {waiting_reason(environment, status)}")
                continue
            context.log.info(f"{where}: approved by {', '.join(status.approvers)}; deploying")
            ref, branch = _build_ref(history, repository.name, sha)
            requests.append(
                RunRequest(
                    run_key=f"approved:{environment.name}:{sha}",
                    job_name=deploy_job_name(repository, environment),
                    partition_key=sha,
                    tags={TRIGGER_TAG: APPROVALS_TRIGGER, REF_TAG: ref, BRANCH_TAG: branch},
                )
            )
        cursor = json.dumps(waiting)
        if requests:
            return SensorResult(run_requests=requests, cursor=cursor)
        return SensorResult(
            skip_reason="; ".join(waiting) or "nothing waits for approval", cursor=cursor
        )

    return [approvals]


def waiting_commit(history: HistoryStore, repository: str, environment: str) -> str | None:
    """The commit whose deployment to `environment` waits for approvals: the newest one
    refused for want of them and not attempted there since; None if none waits."""
    events = history.events(repository=repository, kind="approval_requested")
    events = events[events["environment"] == environment]
    if events.empty:
        return None
    newest = events.iloc[-1]  # oldest first
    sha, requested_at = str(newest["commit"]), newest["at"]
    attempts = history.deployments(repository=repository, environment=environment)
    since = attempts[
        (attempts["commit"] == sha)
        & (attempts["status"] != "refused")
        & (attempts["started_at"] >= requested_at)
    ]
    return sha if since.empty else None


def _build_ref(history: HistoryStore, repository: str, sha: str) -> tuple[str, str]:
    """The ref and branch the commit was built from, as the deploy job's tags want them."""
    builds = history.builds(repository=repository)
    build = builds[builds["commit"] == sha]
    if build.empty:
        return sha, ""
    row = build.iloc[0]
    return str(row["ref"]), "" if pd.isna(row["branch"]) else str(row["branch"])
