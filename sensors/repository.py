"""The repository sensor: a change source that turns new head commits into CI runs.

The cursor maps each watched ref to the head last seen, so a force-push (a new head
that is not a descendant) and a new tag are both just "a ref whose head changed". A
commit becomes a partition once; its run key is the sha, so a commit reachable from
several refs is built once.
"""

import json
from datetime import UTC, datetime

from dagster import (
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from assets.common import BRANCH_TAG, DETECTED_AT_TAG, REF_TAG
from cicd_dagster.config import RepositoryConfig
from cicd_dagster.git import GitError, ls_remote, select_refs


def repository_sensor(
    repository: RepositoryConfig,
    job: UnresolvedAssetJobDefinition,
    partitions: DynamicPartitionsDefinition,
) -> SensorDefinition:
    @sensor(
        name=f"{repository.name}_commits",
        job=job,
        minimum_interval_seconds=repository.poll_interval_s,
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
        changed = [ref for ref in refs if seen.get(ref.name) != ref.sha]
        if not changed:
            return SensorResult(skip_reason="no new commits", cursor=json.dumps(current))
        detected_at = datetime.now(UTC).isoformat()
        new_partitions = sorted(
            {
                ref.sha
                for ref in changed
                if not context.instance.has_dynamic_partition(partitions.name or "", ref.sha)
            }
        )
        run_requests = []
        requested: set[str] = set()
        for ref in changed:
            if ref.name in seen:
                context.log.info(f"{repository.name}: {ref.name} moved {seen[ref.name][:12]} -> {ref.sha[:12]}")
            if ref.sha in requested:
                continue
            requested.add(ref.sha)
            run_requests.append(
                RunRequest(
                    run_key=ref.sha,
                    partition_key=ref.sha,
                    tags={
                        REF_TAG: ref.name,
                        BRANCH_TAG: ref.short if ref.kind == "branch" else "",
                        DETECTED_AT_TAG: detected_at,
                    },
                )
            )
        return SensorResult(
            run_requests=run_requests,
            dynamic_partitions_requests=[partitions.build_add_request(new_partitions)]
            if new_partitions
            else [],
            cursor=json.dumps(current),
        )

    return watch
