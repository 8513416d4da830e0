"""release: the commit, verified live in the last environment, tagged with its next version.

In the repository's <repo>_deploy group, after the last environment's deployment (with no
environments: after the artifact). Materializing a partition releases that commit: a refusal
(not verified there, released already, nothing release-worthy...) fails the asset with the
reason. Run tags: cicd/pre=rc makes a pre-release (1.4.0-rc.1), as `cicd release --pre rc`.
"""

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.artifact import artifact_key
from assets.common import table
from assets.deploy import TRIGGER_TAG, deploy_group, deployment_key
from cicd_dagster.config import EnvironmentConfig, RepositoryConfig
from cicd_dagster.resources import CicdResource
from cicd_dagster.stages import StageError
from cicd_dagster.stages.release import ReleaseRefused, make_release

PRE_TAG = "cicd/pre"
DEPLOYMENT_COLUMNS = ["environment", "strategy", "finished_at", "duration_s"]


def release_key(repository: RepositoryConfig) -> AssetKey:
    return AssetKey([repository.name, "release"])


def release_asset(
    repository: RepositoryConfig,
    partitions: DynamicPartitionsDefinition,
    environments: list[EnvironmentConfig],
) -> AssetsDefinition:
    if environments:
        deps = [deployment_key(repository, environments[-1])]
    else:
        deps = [artifact_key(repository)]

    @asset(
        key=release_key(repository),
        deps=deps,
        group_name=deploy_group(repository),
        partitions_def=partitions,
        kinds={"git"},
        description=f"A release of {repository.name}: the next semantic version from the "
        "conventional commits since the last release, an annotated tag pushed to the "
        "repository, the changelog and release notes.",
    )
    def release(context: AssetExecutionContext, cicd: CicdResource) -> MaterializeResult:
        tags = context.run.tags
        try:
            outcome = make_release(
                cicd.control_config(),
                repository.name,
                context.partition_key,
                cicd.history(),
                pre=tags.get(PRE_TAG) or None,
                run_id=context.run_id,
                created_by=tags.get(TRIGGER_TAG, "ui"),
            )
        except StageError as error:
            status = "refused" if isinstance(error, ReleaseRefused) else "failed"
            raise Failure(
                description=str(error), metadata={"status": status}, allow_retries=False
            ) from error
        plan = outcome.plan
        for warning in plan.warnings:
            context.log.warning(warning)
        deployments = pd.DataFrame(plan.deployments, columns=DEPLOYMENT_COLUMNS)
        report = {"report": MetadataValue.path(str(outcome.report))} if outcome.report else {}
        return MaterializeResult(
            metadata={
                "status": "released",
                "version": plan.version,
                "previous": plan.previous or "",
                "tag": plan.tag,
                "bump": plan.bump.value,
                "prerelease": plan.prerelease,
                "commit_count": len(plan.commits),
                "changelog": MetadataValue.md(plan.changelog),
                "notes": MetadataValue.path(str(outcome.notes_markdown)),
                "notes_html": MetadataValue.path(str(outcome.notes_html)),
                "deployments": table(deployments, DEPLOYMENT_COLUMNS),
                **report,
            }
        )

    return release
