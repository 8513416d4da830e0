"""Housekeeping jobs and their schedules (cicd.yaml `housekeeping`): workspace and cache
cleanup, artifact retention, history DB vacuum.

Plain op jobs, not assets: they produce nothing, they remove. Each op's output metadata (in
the run's events in the UI) says what went and how much space was freed. A job is always
defined, so it can be launched by hand from the UI; its schedule exists unless cicd.yaml
sets it to null, and runs as soon as the daemon does.
"""

from datetime import UTC, datetime
from typing import Any

import pandas as pd
from dagster import (
    DefaultScheduleStatus,
    GraphDefinition,
    JobDefinition,
    MetadataValue,
    OpDefinition,
    OpExecutionContext,
    ScheduleDefinition,
    in_process_executor,
    op,
)
from rich.filesize import decimal

from assets.common import table
from cicd_dagster.config import ControlConfig
from cicd_dagster.housekeeping import CleanupResult, clean_workspaces, vacuum_history
from cicd_dagster.resources import CicdResource
from cicd_dagster.retention import RetentionResult, prune_artifacts

JOB_PREFIX = "housekeeping_"
_REMOVED_COLUMNS = ["repository", "kind", "path", "bytes", "reason"]


@op(
    description="Delete checkouts beyond keep_workspaces and dependency envs unused for "
    "housekeeping.cache_retention_days; never what a commit in service or a running stage uses."
)
def workspace_cleanup(context: OpExecutionContext, cicd: CicdResource) -> None:
    result = clean_workspaces(cicd.control_config(), now=datetime.now(UTC))
    for item in result.removed:
        context.log.info(f"removed {item.path} ({decimal(item.bytes)}): {item.reason}")
    for kept in result.kept:
        context.log.info(f"kept {kept.path}: {kept.reason}")
    context.log.info(f"{len(result.removed)} removed, {decimal(result.bytes_freed)} freed")
    context.add_output_metadata(_cleanup_metadata(result))


@op(
    description="Delete the artifacts cicd.yaml's artifacts retention lets go (as `cicd "
    "artifacts prune`): never those of a commit in service or of the keep_last newest."
)
def artifact_retention(context: OpExecutionContext, cicd: CicdResource) -> None:
    result = prune_artifacts(cicd.control_config(), now=datetime.now(UTC))
    for blob in result.deleted:
        names = ", ".join(
            f"{r.repository}@{r.commit[:12]}/{r.name}" for r in result.names(blob.digest)
        )
        context.log.info(f"deleted {blob.digest[:19]} ({decimal(blob.size)}): {names or 'unnamed'}")
    if result.retention_days is None:
        context.log.info("artifacts.retention_days is null: artifacts are kept forever")
    context.log.info(f"{len(result.deleted)} blobs deleted, {decimal(result.bytes_freed)} freed")
    context.add_output_metadata(_retention_metadata(result))


@op(description="VACUUM and ANALYZE the history DB (outside a transaction).")
def db_vacuum(context: OpExecutionContext, cicd: CicdResource) -> None:
    result = vacuum_history(cicd.history())
    context.log.info(
        f"{result.backend}: {decimal(result.bytes_before)} -> {decimal(result.bytes_after)} "
        f"in {result.duration_s:.1f} s"
    )
    context.add_output_metadata(
        {
            "backend": result.backend,
            "bytes_before": result.bytes_before,
            "bytes_after": result.bytes_after,
            "bytes_freed": result.bytes_freed,
            "duration_s": round(result.duration_s, 3),
        }
    )


_TASKS: dict[str, OpDefinition] = {
    "workspace_cleanup": workspace_cleanup,
    "artifact_retention": artifact_retention,
    "db_vacuum": db_vacuum,
}


def housekeeping_job_name(task: str) -> str:
    return f"{JOB_PREFIX}{task}"


def housekeeping_jobs() -> list[JobDefinition]:
    """One job per housekeeping task (a single op each, in this process)."""
    return [_job_of(task, task_op) for task, task_op in _TASKS.items()]


def housekeeping_schedules(
    config: ControlConfig, jobs: list[JobDefinition]
) -> list[ScheduleDefinition]:
    """The schedules cicd.yaml gives the jobs (in UTC), on by default: a cleanup nobody
    turned on fills the disk."""
    by_name = {housekeeping_job.name: housekeeping_job for housekeeping_job in jobs}
    schedules = []
    for task in _TASKS:
        cron = getattr(config.housekeeping, task)
        if cron is not None:
            name = housekeeping_job_name(task)
            schedules.append(
                ScheduleDefinition(
                    name=f"{name}_schedule",
                    cron_schedule=cron,
                    execution_timezone="UTC",
                    job=by_name[name],
                    default_status=DefaultScheduleStatus.RUNNING,
                    description=f"housekeeping.{task} of cicd.yaml.",
                )
            )
    return schedules


def _job_of(task: str, task_op: OpDefinition) -> JobDefinition:
    return GraphDefinition(name=housekeeping_job_name(task), node_defs=[task_op]).to_job(
        description=task_op.description,
        tags={"cicd/housekeeping": task},
        executor_def=in_process_executor,
    )


def _cleanup_metadata(result: CleanupResult) -> dict[str, Any]:
    removed = pd.DataFrame(
        [
            {
                "repository": item.repository,
                "kind": item.kind,
                "path": str(item.path),
                "bytes": item.bytes,
                "reason": item.reason,
            }
            for item in result.removed
        ],
        columns=_REMOVED_COLUMNS,
    ).astype({"bytes": int})
    return {
        "bytes_freed": result.bytes_freed,
        "workspaces_removed": sum(item.kind == "workspace" for item in result.removed),
        "envs_removed": sum(item.kind == "env" for item in result.removed),
        "removed": table(removed, _REMOVED_COLUMNS, limit=500),
        "kept": MetadataValue.md(
            "\n".join(f"- `{kept.path}`: {kept.reason}" for kept in result.kept)
            or "nothing protected beyond the rules"
        ),
    }


def _retention_metadata(result: RetentionResult) -> dict[str, Any]:
    columns = ["digest", "size", "stored_at", "names"]
    deleted = pd.DataFrame(
        [
            {
                "digest": blob.digest,
                "size": blob.size,
                "stored_at": blob.stored_at.isoformat(),
                "names": ", ".join(
                    f"{r.repository}@{r.commit[:12]}/{r.name}" for r in result.names(blob.digest)
                ),
            }
            for blob in result.deleted
        ],
        columns=columns,
    ).astype({"size": int})
    return {
        "bytes_freed": result.bytes_freed,
        "blobs_deleted": len(result.deleted),
        "deleted": table(deleted, columns, limit=500),
        "kept": MetadataValue.md(
            "\n".join(
                f"- `{kept.repository}@{kept.commit[:12]}`: {', '.join(kept.reasons)}"
                for kept in result.kept
            )
            or "no protected commit has artifacts in the store"
        ),
        "retention": f"{result.retention_days} days"
        if result.retention_days is not None
        else "null: artifacts are kept forever",
    }
