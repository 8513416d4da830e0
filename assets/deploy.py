"""deployment_<env>: the commit promoted through the environments of cicd.yaml, in order.

The assets are in their own group, <repo>_deploy, so the CI job never deploys. A refused,
failed or rolled-back deployment fails the asset with the reason (a rollback is also an
error line of the run's log). Re-materializing an older partition's deployment is a
rollback to that version: what `cicd rollback` runs, marked with the cicd/rollback tag.
Where approvals are required, the metadata (also of a refusal) lists the commit's approvals
and refused attempts.
"""

from typing import Any

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
from assets.common import stage_context, table
from cicd_dagster.config import EnvironmentConfig, RepositoryConfig
from cicd_dagster.release.approvals import approval_status
from cicd_dagster.resources import CicdResource
from cicd_dagster.stages import StageContext, StageError
from cicd_dagster.stages.deploy import deploy_commit, environment_for
from cicd_dagster.store import HistoryStore

TRIGGER_TAG = "cicd/trigger"
ROLLBACK_TAG = "cicd/rollback"  # "true" on runs of `cicd rollback`


def deployment_key(repository: RepositoryConfig, environment: EnvironmentConfig) -> AssetKey:
    return AssetKey([repository.name, f"deployment_{environment.name}"])


def qa_key(repository: RepositoryConfig, environment: EnvironmentConfig) -> AssetKey:
    return AssetKey([repository.name, f"qa_{environment.name}"])


def deploy_group(repository: RepositoryConfig) -> str:
    return f"{repository.identifier}_deploy"


def deployment_asset(
    repository: RepositoryConfig,
    partitions: DynamicPartitionsDefinition,
    environment: EnvironmentConfig,
    previous: EnvironmentConfig | None,
) -> AssetsDefinition:
    if previous is None:
        # Only a green commit has an artifact (it depends on every test report).
        deps = [artifact_key(repository)]
    elif previous.qa:
        # Stage -> QA -> next: the QA of the previous environment gates this one.
        deps = [qa_key(repository, previous)]
    else:
        deps = [deployment_key(repository, previous)]

    @asset(
        key=deployment_key(repository, environment),
        deps=deps,
        group_name=deploy_group(repository),
        partitions_def=partitions,
        kinds={"nginx"},
        description=f"The commit's service deployed to {environment.name} "
        f"({environment.strategy.type}), verified, or rolled back by itself.",
    )
    def deployment(context: AssetExecutionContext, cicd: CicdResource) -> MaterializeResult:
        ctx = stage_context(context, cicd, repository.name)
        history = cicd.history()
        try:
            outcome = deploy_commit(
                ctx,
                environment,
                previous.name if previous else None,
                history,
                run_id=context.run_id,
                triggered_by=context.run.tags.get(TRIGGER_TAG),
            )
        except StageError as error:
            raise Failure(
                description=str(error),
                metadata={"status": "refused", **approvals_metadata(ctx, history, environment)},
                allow_retries=False,
            ) from error
        approvals = approvals_metadata(ctx, history, environment)
        timeline = "\n".join(f"- {event}" for event in outcome.events)
        if outcome.status == "rolled_back":
            context.log.error(
                f"{environment.name} rolled back to {outcome.previous_version} in "
                f"{outcome.rollback_s or 0:.2f} s: {outcome.reason}"
            )
        if outcome.status != "deployed":
            raise Failure(
                description=f"{outcome.status}: {outcome.reason}",
                metadata={
                    "status": outcome.status,
                    "reason": outcome.reason,
                    "rollback_s": outcome.rollback_s if outcome.rollback_s is not None else -1.0,
                    "config_digest": outcome.config_digest,
                    "timeline": MetadataValue.md(timeline),
                    **approvals,
                },
                allow_retries=False,
            )
        url = environment_for(ctx.config, repository.name, environment).router.url
        return MaterializeResult(
            metadata={
                "status": outcome.status,
                "reason": outcome.reason,
                "url": MetadataValue.url(url),
                "version": outcome.version,
                "previous_version": outcome.previous_version or "",
                "strategy": outcome.strategy,
                "config_digest": outcome.config_digest,
                "rollback": context.run.tags.get(ROLLBACK_TAG) == "true",
                "duration_s": round(outcome.duration_s, 3),
                "timeline": MetadataValue.md(timeline),
                **approvals,
            }
        )

    return deployment


def approvals_metadata(
    ctx: StageContext, history: HistoryStore, environment: EnvironmentConfig
) -> dict[str, Any]:
    """For an environment that requires approvals: how many of the commit's count, and
    every approval and refused attempt for it (who, when, why)."""
    if environment.approvals is None:
        return {}
    repository = ctx.repository.name
    status = approval_status(history, ctx.config, repository, environment.name, ctx.sha)
    attempts = history.approvals(repository, environment.name, ctx.sha)
    return {
        "approvals": f"{status.have} of {status.required}",
        "approvers": ", ".join(status.approvers),
        "approval_attempts": table(attempts, ["at", "user", "decision", "reason"]),
    }


def deployment_assets(
    repository: RepositoryConfig,
    partitions: DynamicPartitionsDefinition,
    environments: list[EnvironmentConfig],
) -> list[AssetsDefinition]:
    """One deployment asset per environment, each depending on the one before."""
    return [
        deployment_asset(repository, partitions, environment, environments[i - 1] if i else None)
        for i, environment in enumerate(environments)
    ]
