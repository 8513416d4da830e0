"""Materialize one commit's CI job in this process, recorded in the Dagster instance.

This is what `cicd run` does: the same job and asset definitions the UI and the sensor
use, executed in-process against the instance under DAGSTER_HOME, so the run shows up
in the UI's run list with its events, metadata and checks.
"""

import os
from dataclasses import dataclass

from dagster import DagsterInstance
from dagster._core.utils import make_new_run_id

from assets.common import BRANCH_TAG, FORCE_TAG, REF_TAG
from assets.partitions import commit_partitions
from cicd_dagster.config import ControlConfig
from cicd_dagster.definitions import build_definitions
from jobs import ci_job_name


@dataclass(frozen=True)
class CommitRun:
    run_id: str
    success: bool


def use_instance(config: ControlConfig) -> DagsterInstance:
    """The Dagster instance of this control plane (DAGSTER_HOME, else home/dagster)."""
    if "DAGSTER_HOME" not in os.environ:
        config.dagster_home.mkdir(parents=True, exist_ok=True)
        os.environ["DAGSTER_HOME"] = str(config.dagster_home)
    return DagsterInstance.get()


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
) -> CommitRun:
    instance = use_instance(config)
    repo = config.repository(repository)
    partitions = commit_partitions(repo)
    if not instance.has_dynamic_partition(partitions.name or "", sha):
        instance.add_dynamic_partitions(partitions.name or "", [sha])
    job = build_definitions(config, stream_logs=stream_logs).resolve_job_def(
        ci_job_name(repository)
    )
    run_id = run_id or make_new_run_id()
    tags = {REF_TAG: ref, BRANCH_TAG: branch or "", "cicd/trigger": "cli"}
    if force:
        tags[FORCE_TAG] = "true"
    # The CLI shows its own progress; Dagster's console logger speaks up with --verbose.
    log_level = "DEBUG" if stream_logs else "CRITICAL"
    result = job.execute_in_process(
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        instance=instance,
        partition_key=sha,
        run_id=run_id,
        tags=tags,
        raise_on_error=False,
    )
    checks_passed = all(
        evaluation.passed for evaluation in result.get_asset_check_evaluations()
    )
    return CommitRun(run_id=run_id, success=result.success and checks_passed)


def new_run_id() -> str:
    return make_new_run_id()
