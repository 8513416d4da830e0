"""The repository sensor: a change source that turns new head commits into CI runs.

The cursor maps each watched ref to the head last seen, so a force-push (a new head
that is not a descendant) and a new tag are both just "a ref whose head changed". A
commit is built once: it becomes a partition and gets one run (run key = the sha), and a
ref that moves to a commit already built (a re-created branch, a tag on a built commit,
a commit built by `cicd run`) requests nothing, whatever the cursor says.
"""

import json
from datetime import UTC, datetime

from dagster import (
    DagsterInstance,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
from dagster._core.storage.tags import PARTITION_NAME_TAG

from assets.common import BRANCH_TAG, DETECTED_AT_TAG, REF_TAG
from cicd_dagster.config import RepositoryConfig
from cicd_dagster.git import GitError, RemoteRef, ls_remote, select_refs


def repository_sensor(
    repository: RepositoryConfig,
    job: UnresolvedAssetJobDefinition,
    partitions: DynamicPartitionsDefinition,
) -> SensorDefinition:
    partitions_name = partitions.name or ""

    def has_run(instance: DagsterInstance, sha: str) -> bool:
        # Any run of the CI job for the commit: the sensor's, `cicd run`'s, a re-execution.
        # The daemon's run-key check only knows this sensor's own runs.
        runs = RunsFilter(job_name=job.name, tags={PARTITION_NAME_TAG: sha})
        return bool(instance.get_run_ids(runs, limit=1))

    @sensor(
        name=f"{repository.identifier}_commits",
        job=job,
        # The daemon checks sensors every 5 s and skips one whose last tick is younger than
        # the minimum; at exactly poll_interval_s a tick due "now" slips a whole loop.
        minimum_interval_seconds=max(1, repository.poll_interval_s - 1),
        default_status=DefaultSensorStatus.RUNNING,
        description=f"Polls {repository.url} for new heads of watched branches and tags.",
    )
    def watch(context: SensorEvaluationContext) -> SensorResult | SkipReason:
        try:
            state = ls_remote(repository.url)
        except GitError as error:
            # Reported on this tick; the cursor is kept so nothing is lost or re-run.
            return SkipReason(f"{repository.name}: {error}")
        refs = select_refs(state, repository.branches, repository.tags, repository.default_branch)
        seen: dict[str, str] = json.loads(context.cursor) if context.cursor else {}
        current = {ref.name: ref.sha for ref in refs}
        for name in sorted(set(seen) - set(current)):
            context.log.info(f"{repository.name}: {name} was deleted")
        for ref in refs:
            if ref.name in seen and seen[ref.name] != ref.sha:
                context.log.info(f"{repository.name}: {ref.name} moved to {ref.sha[:12]}")

        heads: dict[str, list[RemoteRef]] = {}  # sha -> the watched refs pointing at it
        for ref in refs:
            heads.setdefault(ref.sha, []).append(ref)
        changed = {ref.sha for ref in refs if seen.get(ref.name) != ref.sha}
        instance = context.instance
        known = {sha for sha in changed if instance.has_dynamic_partition(partitions_name, sha)}
        built = {sha for sha in known if has_run(instance, sha)}
        to_build = [sha for sha in heads if sha in changed - built]
        if not to_build:
            return SensorResult(skip_reason="no new commits", cursor=json.dumps(current))

        default_branch = repository.default_branch or state.default_branch
        detected_at = datetime.now(UTC).isoformat()
        new_partitions = sorted(changed - known)
        return SensorResult(
            run_requests=[
                _run_request(sha, heads[sha], default_branch, detected_at) for sha in to_build
            ],
            dynamic_partitions_requests=[partitions.build_add_request(new_partitions)]
            if new_partitions
            else [],
            cursor=json.dumps(current),
        )

    return watch


def _run_request(
    sha: str, refs: list[RemoteRef], default_branch: str | None, detected_at: str
) -> RunRequest:
    """The one run of a commit, named after its most specific ref: a tag (a release) before
    the default branch before other branches; cicd/branch is a branch it heads, if any."""
    ranked = sorted(
        refs, key=lambda ref: (ref.kind != "tag", ref.short != default_branch, ref.name)
    )
    branch = next((ref.short for ref in ranked if ref.kind == "branch"), "")
    return RunRequest(
        run_key=sha,
        partition_key=sha,
        tags={REF_TAG: ranked[0].name, BRANCH_TAG: branch, DETECTED_AT_TAG: detected_at},
    )
