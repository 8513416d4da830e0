"""Materialize one commit's CI job in this process, recorded in the Dagster instance.

This is what `cicd run` does: the same job and asset definitions the UI and the sensor
use, executed in-process against the instance under DAGSTER_HOME, so the run shows up
in the UI's run list with its events, metadata and checks.
"""

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
from dagster import AssetKey, DagsterInstance, ExecuteInProcessResult, TableMetadataValue
from dagster._core.utils import make_new_run_id

from assets.common import BRANCH_TAG, FORCE_TAG, REF_TAG
from assets.deploy import ROLLBACK_TAG, TRIGGER_TAG
from assets.partitions import commit_partitions
from assets.release import PRE_TAG
from assets.rescan import rescan_key
from cicd_dagster.config import ControlConfig, RepositoryConfig
from cicd_dagster.definitions import build_definitions
from cicd_dagster.locks import file_lock
from cicd_dagster.report import run_report, stage_of_asset
from cicd_dagster.stages.deploy import environment_for
from cicd_dagster.stages.release import record_path
from cicd_dagster.store import HistoryStore
from jobs import RESCAN_JOB, ci_job_name, deploy_job_name, qa_job_name, release_job_name


def use_instance(config: ControlConfig) -> DagsterInstance:
    """The Dagster instance of this control plane (DAGSTER_HOME, else home/dagster)."""
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(config.dagster_home)))
    home.mkdir(parents=True, exist_ok=True)
    settings = home / "dagster.yaml"
    if not settings.exists():
        # Local state only: no telemetry, no first-run banner.
        settings.write_text("telemetry:\n  enabled: false\n")
    # Creating a fresh instance creates its SQLite schemas; two `cicd run`s starting at
    # once on a new home would both try (table alembic_version already exists).
    with file_lock(home / ".cicd-instance.lock"):
        return DagsterInstance.get()


def new_run_id() -> str:
    return make_new_run_id()


def run_commit(
    config: ControlConfig,
    repository: str,
    sha: str,
    *,
    ref: str,
    branch: str | None,
    run_id: str | None = None,
    force: bool = False,
    stream_logs: bool = True,
) -> dict[str, Any]:
    """Run the CI job of one commit; returns the `cicd run --json` report of that run."""
    repo = config.repository(repository)
    run_id = run_id or new_run_id()
    tags = {REF_TAG: ref, BRANCH_TAG: branch or ""}
    if force:
        tags[FORCE_TAG] = "true"
    result = _execute(config, repo, ci_job_name(repo), sha, run_id, tags, stream_logs)
    return run_report(
        repository=repository,
        commit=sha,
        ref=ref,
        branch=branch,
        run_id=run_id,
        stages=_recorded_stages(result),
        gates=[
            {
                "stage": stage_of_asset(evaluation.asset_key.path[-1]),
                "name": evaluation.check_name,
                "passed": evaluation.passed,
                "detail": evaluation.metadata["detail"].value,
            }
            for evaluation in result.get_asset_check_evaluations()
        ],
    )


def _execute(
    config: ControlConfig,
    repository: RepositoryConfig,
    job_name: str,
    sha: str,
    run_id: str,
    tags: dict[str, str],
    stream_logs: bool,
) -> ExecuteInProcessResult:
    """Run a job of one commit's partition in this process, against the instance."""
    instance = use_instance(config)
    partitions_name = commit_partitions(repository).name or ""
    if not instance.has_dynamic_partition(partitions_name, sha):
        instance.add_dynamic_partitions(partitions_name, [sha])
    return _execute_job(config, job_name, run_id, tags, stream_logs, partition_key=sha)


def _execute_job(
    config: ControlConfig,
    job_name: str,
    run_id: str,
    tags: dict[str, str],
    stream_logs: bool,
    *,
    partition_key: str | None = None,
    assets: set[AssetKey] | None = None,
) -> ExecuteInProcessResult:
    """Run a job (or only some of its assets, with their checks) in this process."""
    job = build_definitions(config, stream_logs=stream_logs).resolve_job_def(job_name)
    if assets is not None:
        checks = job.asset_layer.asset_graph.asset_check_keys
        job = job.get_subset(
            asset_selection=assets,
            asset_check_selection={check for check in checks if check.asset_key in assets},
        )
    # The CLI shows its own progress; Dagster's console logger speaks up with --verbose.
    log_level = "DEBUG" if stream_logs else "CRITICAL"
    return job.execute_in_process(
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        instance=use_instance(config),
        partition_key=partition_key,
        run_id=run_id,
        tags={TRIGGER_TAG: "cli", **tags},
        raise_on_error=False,
    )


def rescan_in_process(
    config: ControlConfig, repository: str | None = None, *, stream_logs: bool = False
) -> list[dict[str, Any]]:
    """Run the security_rescan job now (every repository, or one); per repository, what its
    security_rescan asset reported: its metadata, findings as rows, and the check."""
    repositories = [config.repository(repository)] if repository else config.repositories
    result = _execute_job(
        config,
        RESCAN_JOB,
        new_run_id(),
        {},
        stream_logs,
        assets={rescan_key(r) for r in repositories},
    )
    checks = {e.asset_key: e for e in result.get_asset_check_evaluations()}
    materialized = {
        event.step_materialization_data.materialization.asset_key: (
            event.step_materialization_data.materialization.metadata
        )
        for event in result.get_asset_materialization_events()
    }
    failures = [e.step_failure_data for e in result.get_step_failure_events()]
    reports = []
    for repo in repositories:
        key = rescan_key(repo)
        if key not in materialized:
            error = failures[0].error if failures else None
            reports.append(
                {
                    "repository": repo.name,
                    "passed": False,
                    "detail": error.message.strip() if error else "the rescan failed",
                }
            )
            continue
        metadata = materialized[key]
        check = checks[key]
        findings = metadata["findings"]
        assert isinstance(findings, TableMetadataValue)  # rescan_metadata makes a table
        reports.append(
            {
                "repository": repo.name,
                "passed": check.passed,
                "detail": check.metadata["detail"].value,
                **{
                    label: metadata[label].value
                    for label in (
                        "commits_rescanned",
                        "new_findings",
                        "blocking_findings",
                        "unscannable_commits",
                    )
                },
                "advisories": metadata["advisories"].value if "advisories" in metadata else None,
                "findings": [dict(record.data) for record in findings.records],
            }
        )
    return reports


def _recorded_stages(result: ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """Each stage's own metadata when it materialized, else why its step failed."""
    stages: dict[str, dict[str, Any]] = {}
    for event in result.get_asset_materialization_events():
        materialization = event.step_materialization_data.materialization
        stages[stage_of_asset(materialization.asset_key.path[-1])] = {
            label: value.value for label, value in materialization.metadata.items()
        }
    step_to_stage = {
        key.to_python_identifier(): stage_of_asset(key.path[-1])
        for key in result.job_def.asset_layer.executable_asset_keys
    }
    for event in result.get_step_failure_events():
        stage = step_to_stage.get(event.step_key or "")
        if stage is None or stage in stages:
            continue  # a materialized stage whose blocking check failed keeps its report
        failure = event.step_failure_data
        user = failure.user_failure_data
        if user and user.description:
            detail = user.description
        else:
            detail = failure.error.message if failure.error else "the step failed"
        stages[stage] = {"status": "failed", "detail": detail}
    return stages


def deploy_commit_in_process(
    config: ControlConfig,
    repository: str,
    environment: str,
    sha: str,
    *,
    run_id: str | None = None,
    stream_logs: bool = False,
    rollback: bool = False,
) -> dict[str, Any]:
    """Materialize deployment_<environment> of one commit; returns what the history DB
    recorded of that attempt (status, reason, durations) plus the url and run_id. With
    `rollback` the run is tagged as one (cicd rollback) and triggered by "cli:rollback"."""
    repo = config.repository(repository)
    env = next(e for e in config.environments if e.name == environment)
    run_id = run_id or new_run_id()
    tags = {TRIGGER_TAG: "cli:rollback", ROLLBACK_TAG: "true"} if rollback else {}
    result = _execute(config, repo, deploy_job_name(repo, env), sha, run_id, tags, stream_logs)
    history = HistoryStore(config.history_db_url)
    rows = history.deployments(repository=repository, environment=environment)
    rows = rows[rows["run_id"] == run_id]
    report: dict[str, Any] = {
        "repository": repository,
        "environment": environment,
        "commit": sha,
        "run_id": run_id,
        "url": environment_for(config, repository, env).router.url,
    }
    materializations = result.get_asset_materialization_events()
    if rows.empty and materializations:  # nothing to do: the commit is already live
        metadata = materializations[0].step_materialization_data.materialization.metadata
        labels = ("status", "reason", "strategy", "previous_version", "config_digest")
        for label in (*labels, "duration_s"):
            report[label] = metadata[label].value
        report["rollback_s"] = None
        return report
    if rows.empty:  # the step failed before it could record anything
        failures = result.get_step_failure_events()
        detail = failures[0].step_failure_data.error if failures else None
        report.update(status="failed", reason=detail.message if detail else "the run failed")
        return report
    row = rows.iloc[0]
    for column in ("status", "reason", "strategy", "previous_version", "config_digest"):
        report[column] = None if pd.isna(row[column]) else str(row[column])
    for column in ("duration_s", "rollback_s"):
        report[column] = None if pd.isna(row[column]) else round(float(row[column]), 3)
    return report


def qa_commit_in_process(
    config: ControlConfig,
    repository: str,
    environment: str,
    sha: str,
    *,
    run_id: str | None = None,
    stream_logs: bool = False,
) -> dict[str, Any]:
    """Materialize qa_<environment> of one commit (the `cicd qa` JSON): status success,
    failed or refused, detail, the test counts, duration_s, gates, url and run_id."""
    repo = config.repository(repository)
    env = config.environment(environment)
    run_id = run_id or new_run_id()
    result = _execute(config, repo, qa_job_name(repo, env), sha, run_id, {}, stream_logs)
    report: dict[str, Any] = {
        "repository": repository,
        "environment": environment,
        "commit": sha,
        "run_id": run_id,
        "url": environment_for(config, repository, env).router.url,
    }
    materializations = result.get_asset_materialization_events()
    if not materializations:
        failures = result.get_step_failure_events()
        failure = failures[0].step_failure_data if failures else None
        user = failure.user_failure_data if failure else None
        status = user.metadata.get("status") if user else None
        if user and user.description:
            detail = user.description
        else:
            detail = failure.error.message if failure and failure.error else "the run failed"
        report.update(status=status.value if status else "failed", detail=detail)
        return report
    metadata = materializations[0].step_materialization_data.materialization.metadata
    checks = result.get_asset_check_evaluations()
    report.update(
        status="success" if metadata["verdict"].value == "passed" else "failed",
        detail=metadata["detail"].value,
        **{
            label: metadata[label].value
            for label in ("tests", "passed", "failed", "errors", "skipped", "duration_s")
            if label in metadata
        },
        gates=[
            {
                "name": check.check_name,
                "passed": check.passed,
                "detail": check.metadata["detail"].value,
            }
            for check in checks
        ],
    )
    return report


def release_in_process(
    config: ControlConfig,
    repository: str,
    sha: str,
    *,
    pre: str | None = None,
    run_id: str | None = None,
    stream_logs: bool = False,
) -> dict[str, Any]:
    """Materialize the release of one commit; returns the `cicd release --json` object:
    status "released" with the release (release.record_path), else status "refused" or
    "failed" and the reason."""
    repo = config.repository(repository)
    run_id = run_id or new_run_id()
    tags = {PRE_TAG: pre} if pre else {}
    result = _execute(config, repo, release_job_name(repo), sha, run_id, tags, stream_logs)
    materializations = result.get_asset_materialization_events()
    if materializations:
        metadata = materializations[0].step_materialization_data.materialization.metadata
        version = str(metadata["version"].value)
        released = json.loads(record_path(config, repo.name, version).read_text())
        return {"status": "released", "run_id": run_id, **released}
    failures = result.get_step_failure_events()
    failure = failures[0].step_failure_data if failures else None
    user = failure.user_failure_data if failure else None
    status = user.metadata.get("status") if user else None
    if user and user.description:
        reason = user.description
    else:
        reason = failure.error.message if failure and failure.error else "the run failed"
    return {
        "repository": repo.name,
        "commit": sha,
        "status": status.value if status else "failed",
        "reason": reason,
        "run_id": run_id,
    }
