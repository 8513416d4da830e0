"""build: dependencies installed into a cached env, build steps run, artifacts collected."""

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

from assets.common import commit_asset, fail_stage, stage_context, table
from assets.source import source_key
from cicd_dagster.config import RepositoryConfig
from cicd_dagster.resources import CicdResource
from cicd_dagster.stages import StageError
from cicd_dagster.stages.build import run_build
from cicd_dagster.stages.source import load_source
from cicd_dagster.store import StageRecord


def build_key(repository: RepositoryConfig) -> AssetKey:
    return AssetKey([repository.name, "build"])


def build_asset(
    repository: RepositoryConfig, partitions: DynamicPartitionsDefinition
) -> AssetsDefinition:
    @commit_asset(
        repository,
        partitions,
        key=build_key(repository),
        deps=[source_key(repository)],
        kinds={"python"},
        description="Dependencies, build steps and the collected artifacts of the commit.",
    )
    def build(context: AssetExecutionContext, cicd: CicdResource) -> MaterializeResult:
        ctx = stage_context(context, cicd, repository.name)
        started_at = datetime.now(UTC)
        try:
            pipeline, _, _ = load_source(ctx)
            outcome = run_build(ctx, pipeline)
        except StageError as error:
            raise fail_stage(context, cicd, ctx, "build", started_at, error) from error
        for warning in ctx.warnings:
            context.log.warning(warning)
        history = cicd.history()
        history.record_stage(
            repository.name,
            ctx.sha,
            StageRecord(
                name="build",
                status="success",
                started_at=started_at,
                duration_s=outcome.duration_s,
                reused=outcome.reused,
                run_id=context.run_id,
            ),
        )
        history.record_artifacts(repository.name, ctx.sha, outcome.artifacts)
        artifacts = pd.DataFrame(
            [a.__dict__ for a in outcome.artifacts], columns=["path", "sha256", "size_bytes"]
        )
        steps = pd.DataFrame(
            outcome.steps, columns=["command", "exit_code", "duration_s", "timed_out"]
        )
        return MaterializeResult(
            metadata={
                "status": "success",
                "duration_s": round(outcome.duration_s, 3),
                "reused": outcome.reused,
                "env_reused": outcome.env_reused,
                "env_key": outcome.env_key,
                "steps": table(steps, steps.columns),
                "artifact_count": len(artifacts),
                "artifact_bytes": int(artifacts["size_bytes"].sum()),
                "artifacts": table(artifacts, artifacts.columns),
                "log": MetadataValue.path(str(ctx.workspace.log_path("build"))),
            }
        )

    return build
