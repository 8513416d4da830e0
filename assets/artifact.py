"""sbom and artifact: the build described (CycloneDX), then, for a green commit only, its
outputs stored by digest with a signed SLSA provenance statement.

artifact depends on the security scan and every test report, so a failed stage or
blocking gate upstream skips it: a red commit publishes nothing.
"""

from datetime import UTC, datetime

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
)

from assets.build import build_key
from assets.common import commit_asset, fail_stage, stage_context, table
from assets.security import security_key
from assets.tests import report_key
from cicd_dagster.config import RepositoryConfig
from cicd_dagster.resources import CicdResource
from cicd_dagster.stages import StageError
from cicd_dagster.stages.artifact import (
    ARTIFACT_STAGE,
    BUILDER_ID,
    SBOM_STAGE,
    publish_artifacts,
    run_sbom,
)
from cicd_dagster.stages.source import load_source
from cicd_dagster.stages.tests import TEST_STAGES
from cicd_dagster.store import StageRecord


def sbom_key(repository: RepositoryConfig) -> AssetKey:
    return AssetKey([repository.name, "sbom"])


def artifact_key(repository: RepositoryConfig) -> AssetKey:
    return AssetKey([repository.name, "artifact"])


def sbom_asset(
    repository: RepositoryConfig, partitions: DynamicPartitionsDefinition
) -> AssetsDefinition:
    @commit_asset(
        repository,
        partitions,
        key=sbom_key(repository),
        deps=[build_key(repository)],
        kinds={"cyclonedx"},
        description="CycloneDX SBOM of the build: its resolved Python environment and the "
        "artifacts it produced.",
    )
    def sbom(context: AssetExecutionContext, cicd: CicdResource) -> MaterializeResult:
        ctx = stage_context(context, cicd, repository.name)
        started_at = datetime.now(UTC)
        try:
            pipeline, _, _ = load_source(ctx)
            outcome = run_sbom(ctx, pipeline)
        except StageError as error:
            raise fail_stage(context, cicd, ctx, SBOM_STAGE, started_at, error) from error
        for warning in outcome.warnings:
            context.log.warning(warning)
        cicd.history().record_stage(
            repository.name,
            ctx.sha,
            StageRecord(
                name=SBOM_STAGE,
                status="success",
                started_at=started_at,
                duration_s=outcome.duration_s,
                reused=outcome.reused,
                run_id=context.run_id,
            ),
        )
        summary = outcome.summary
        licences = pd.DataFrame(list(summary.licenses.items()), columns=["license", "dependencies"])
        return MaterializeResult(
            metadata={
                "status": "success",
                "duration_s": round(outcome.duration_s, 3),
                "reused": outcome.reused,
                "component_count": summary.component_count,
                "library_count": summary.library_count,
                "file_count": summary.file_count,
                "licenses": table(licences, licences.columns, limit=200),
                "digest": f"sha256:{outcome.sha256}",
                "lock_digest": f"sha256:{outcome.lock_sha256}",
                "serial_number": outcome.serial_number,
                "path": MetadataValue.path(str(outcome.path)),
                "warnings": len(outcome.warnings),
            }
        )

    return sbom


def artifact_asset(
    repository: RepositoryConfig, partitions: DynamicPartitionsDefinition
) -> AssetsDefinition:
    @commit_asset(
        repository,
        partitions,
        key=artifact_key(repository),
        deps=[
            sbom_key(repository),
            security_key(repository),
            *(report_key(repository, stage) for stage in TEST_STAGES),
        ],
        kinds={"slsa"},
        description="The green commit's artifacts and SBOM in the content-addressed store, "
        "with a signed SLSA provenance statement (check it with `cicd verify`).",
    )
    def artifact(context: AssetExecutionContext, cicd: CicdResource) -> MaterializeResult:
        ctx = stage_context(context, cicd, repository.name)
        started_at = datetime.now(UTC)
        history = cicd.history()
        run = context.instance.get_run_stats(context.run_id)
        run_started = datetime.fromtimestamp(run.start_time, UTC) if run.start_time else None
        try:
            pipeline, _, _ = load_source(ctx)
            outcome = publish_artifacts(
                ctx,
                pipeline,
                history,
                invocation_id=context.run_id,
                started_on=run_started or started_at,
            )
        except StageError as error:
            raise fail_stage(context, cicd, ctx, ARTIFACT_STAGE, started_at, error) from error
        for name in outcome.rebound:
            context.log.warning(f"{name}: the rebuild made other bytes; provenance re-signed")
        history.record_stage(
            repository.name,
            ctx.sha,
            StageRecord(
                name=ARTIFACT_STAGE,
                status="success",
                started_at=started_at,
                duration_s=outcome.duration_s,
                reused=outcome.reused,
                run_id=context.run_id,
            ),
        )
        subjects = pd.DataFrame(
            [
                {"name": s.path, "digest": f"sha256:{s.sha256}", "size_bytes": s.size_bytes}
                for s in outcome.subjects
            ],
            columns=["name", "digest", "size_bytes"],
        )
        return MaterializeResult(
            metadata={
                "status": "success",
                "duration_s": round(outcome.duration_s, 3),
                "reused": outcome.reused,
                "subjects": table(subjects, subjects.columns, limit=200),
                "subject_count": len(subjects),
                "artifact_bytes": int(subjects["size_bytes"].sum()),
                "provenance_digest": f"sha256:{outcome.provenance.sha256}",
                "key_id": outcome.keyid,
                # False: this machine cannot hide the key from build steps (the build warns).
                "key_isolated": ctx.sandbox is not None,
                "public_key": MetadataValue.path(str(outcome.public_key)),
                "builder_id": BUILDER_ID,
                "rebound": ", ".join(outcome.rebound),
                "verify": MetadataValue.md(f"`cicd verify {repository.name} --commit {ctx.sha}`"),
            }
        )

    return artifact


def artifact_assets(
    repository: RepositoryConfig, partitions: DynamicPartitionsDefinition
) -> list[AssetsDefinition]:
    return [sbom_asset(repository, partitions), artifact_asset(repository, partitions)]
