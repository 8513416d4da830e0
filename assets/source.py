"""source: the commit checked out, with who, what and why in its metadata."""

from datetime import UTC, datetime
from typing import Any

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
)

from assets.common import DETECTED_AT_TAG, commit_asset, fail_stage, stage_context, table
from cicd_dagster.config import ConfigError, RepositoryConfig
from cicd_dagster.git import GitError
from cicd_dagster.resources import CicdResource
from cicd_dagster.stages import StageError
from cicd_dagster.stages.source import prepare_source
from cicd_dagster.store import CommitRecord, StageRecord


def source_key(repository: RepositoryConfig) -> AssetKey:
    return AssetKey([repository.name, "source"])


def source_asset(
    repository: RepositoryConfig, partitions: DynamicPartitionsDefinition
) -> AssetsDefinition:
    @commit_asset(
        repository,
        partitions,
        key=source_key(repository),
        kinds={"git"},
        description=f"The commit of {repository.name} checked out, and its .cicd.yml.",
    )
    def source(context: AssetExecutionContext, cicd: CicdResource) -> MaterializeResult:
        ctx = stage_context(context, cicd, repository.name)
        started_at = datetime.now(UTC)
        history = cicd.history()
        try:
            outcome = prepare_source(ctx)
        except (StageError, ConfigError, GitError) as error:
            raise fail_stage(context, cicd, ctx, "source", started_at, error) from error
        commit = outcome.commit
        detected = context.run.tags.get(DETECTED_AT_TAG)
        history.record_commit(
            repository.name,
            repository.url,
            CommitRecord(
                sha=commit.sha,
                parents=list(commit.parents),
                author_name=commit.author_name,
                author_email=commit.author_email,
                authored_at=commit.authored_at,
                message=commit.message,
            ),
            detected_at=datetime.fromisoformat(detected) if detected else None,
        )
        history.record_build(
            repository.name, ctx.sha, ref=ctx.ref, branch=outcome.branch, run_id=context.run_id
        )
        history.record_stage(
            repository.name,
            ctx.sha,
            StageRecord(
                name="source",
                status="success",
                started_at=started_at,
                duration_s=outcome.duration_s,
                run_id=context.run_id,
            ),
        )
        changes = pd.DataFrame(
            [
                {"path": c.path, "status": c.status, "added": c.added, "deleted": c.deleted}
                for c in commit.changed_files
            ],
            columns=["path", "status", "added", "deleted"],
        )
        configured = [name for name, stage in outcome.pipeline.tests.stages().items() if stage]
        metadata: dict[str, Any] = {
            "status": "success",
            "commit": commit.sha,
            "ref": outcome.ref,
            "branch": outcome.branch or "",
            "parents": ", ".join(commit.parents) or "(root commit)",
            "author": f"{commit.author_name} <{commit.author_email}>",
            "authored_at": commit.authored_at.isoformat(),
            "message": MetadataValue.md(f"```\n{commit.message}\n```"),
            "files_changed": len(changes),
            "lines_added": int(changes["added"].fillna(0).sum()),
            "lines_deleted": int(changes["deleted"].fillna(0).sum()),
            "changed_files": table(changes, changes.columns, limit=200),
            "test_stages": ", ".join(configured) or "(none)",
            "checkout": MetadataValue.path(str(outcome.checkout)),
            "duration_s": round(outcome.duration_s, 3),
        }
        if detected:
            metadata["commit_to_run_requested_s"] = round(
                (datetime.fromisoformat(detected) - commit.committed_at).total_seconds(), 3
            )
        return MaterializeResult(metadata=metadata)

    return source
