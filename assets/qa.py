"""qa_<env>: the QA suite of a commit run against an environment with `qa: true`.

Between deployment_<env> and the next environment's deployment, in the <repo>_deploy group.
It materializes the QA report (a failed suite too) and answers min_pass_rate as a blocking
check; a commit that is not live in the environment fails the step as refused and records
nothing, so an earlier verdict stands.
"""

from collections.abc import Iterator
from datetime import UTC, datetime

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetsDefinition,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.common import fail_stage, gate_results, gate_specs, stage_context
from assets.deploy import deploy_group, deployment_key, qa_key
from assets.tests import GATE_DESCRIPTIONS, report_metadata
from cicd_dagster.config import EnvironmentConfig, RepositoryConfig
from cicd_dagster.resources import CicdResource
from cicd_dagster.stages import StageError
from cicd_dagster.stages.deploy import QA_STAGE
from cicd_dagster.stages.gates import GATES_BY_STAGE
from cicd_dagster.stages.qa import QaRefused, run_qa
from cicd_dagster.store import StageRecord


def qa_asset(
    repository: RepositoryConfig,
    partitions: DynamicPartitionsDefinition,
    environment: EnvironmentConfig,
) -> AssetsDefinition:
    key = qa_key(repository, environment)

    @asset(
        key=key,
        deps=[deployment_key(repository, environment)],
        group_name=deploy_group(repository),
        partitions_def=partitions,
        kinds={"pytest"},
        description=f"The QA suite (.cicd.yml qa) run against the commit live in "
        f"{environment.name}; the next environment takes only commits that passed it.",
        check_specs=gate_specs(
            key, {name: GATE_DESCRIPTIONS[name] for name in GATES_BY_STAGE[QA_STAGE]}, partitions
        ),
    )
    def qa(
        context: AssetExecutionContext, cicd: CicdResource
    ) -> Iterator[MaterializeResult | AssetCheckResult]:
        ctx = stage_context(context, cicd, repository.name)
        started_at = datetime.now(UTC)
        history = cicd.history()
        try:
            outcome = run_qa(ctx, environment)
        except QaRefused as error:
            raise Failure(
                description=f"qa in {environment.name} refused: {error}",
                metadata={"status": "refused"},
                allow_retries=False,
            ) from error
        except StageError as error:
            raise fail_stage(context, cicd, ctx, QA_STAGE, started_at, error) from error
        tests, summary = outcome.tests, outcome.tests.summary
        history.record_stage(
            repository.name,
            ctx.sha,
            StageRecord(
                name=QA_STAGE,
                status=tests.status,
                started_at=started_at,
                duration_s=tests.duration_s,
                detail=outcome.detail,
                run_id=context.run_id,
            ).with_counts(summary),
        )
        if tests.cases is not None:
            history.record_test_cases(repository.name, ctx.sha, QA_STAGE, tests.cases)
        history.record_gates(repository.name, ctx.sha, QA_STAGE, outcome.gates)
        yield MaterializeResult(
            metadata={
                **report_metadata(tests),
                "environment": environment.name,
                "url": MetadataValue.url(outcome.url),
                "verdict": "passed" if outcome.passed else "failed",
                "detail": outcome.detail,
            }
        )
        yield from gate_results(
            outcome.gates, lambda gate: {"value": gate.value, "threshold": gate.threshold}
        )

    return qa


def qa_assets(
    repository: RepositoryConfig,
    partitions: DynamicPartitionsDefinition,
    environments: list[EnvironmentConfig],
) -> list[AssetsDefinition]:
    """The QA asset of the environment with `qa: true` (at most one), if any."""
    return [qa_asset(repository, partitions, env) for env in environments if env.qa]
