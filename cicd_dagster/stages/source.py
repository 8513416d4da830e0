"""source: the exact commit, checked out into its own workspace, with its .cicd.yml."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cicd_dagster.config import (
    ControlConfig,
    PipelineConfig,
    RepositoryConfig,
    parse_pipeline_config,
)
from cicd_dagster.git import CommitInfo, Mirror, ls_remote, prune_workspaces
from cicd_dagster.stages.context import StageContext, StageError

STAGE = "source"
PIPELINE_FILE = ".cicd.yml"


@dataclass(frozen=True)
class SourceOutcome:
    commit: CommitInfo
    pipeline: PipelineConfig
    checkout: Path
    ref: str
    branch: str | None
    default_branch: str
    duration_s: float


def mirror_for(ctx: StageContext) -> Mirror:
    return mirror_of(ctx.config, ctx.repository)


def mirror_of(config: ControlConfig, repository: RepositoryConfig) -> Mirror:
    return Mirror(config.git_dir / f"{repository.name}.git", repository.url)


def pipeline_at(config: ControlConfig, repository: RepositoryConfig, sha: str) -> PipelineConfig:
    """The .cicd.yml of a commit, read from the mirror (its workspace may be long gone)."""
    source_name = f"{repository.name}@{sha[:12]}:{PIPELINE_FILE}"
    text = mirror_of(config, repository).read_file(sha, PIPELINE_FILE)
    if text is None:
        raise StageError(f"{source_name}: the commit has no {PIPELINE_FILE} at its root")
    return parse_pipeline_config(text, source_name)


def default_branch(ctx: StageContext, mirror: Mirror) -> str:
    if ctx.repository.default_branch:
        return ctx.repository.default_branch
    # A mirror's HEAD follows the remote's, so asking the local mirror needs no network.
    return ls_remote(str(mirror.path)).default_branch or "main"


def load_source(ctx: StageContext) -> tuple[PipelineConfig, str | None, str]:
    """What later stages need of the source stage: (pipeline, branch, default branch)."""
    stored = ctx.workspace.load_result(STAGE, ctx.sha)
    if stored is None:
        raise StageError(f"the source of {ctx.sha} has not been checked out: materialize source")
    pipeline = PipelineConfig.model_validate(stored["pipeline"])
    return pipeline, stored["branch"], stored["default_branch"]


def prepare_source(ctx: StageContext) -> SourceOutcome:
    started = time.monotonic()
    mirror = mirror_for(ctx)
    if not mirror.path.exists() or not mirror.has_commit(ctx.sha):
        mirror.fetch()
    if not mirror.has_commit(ctx.sha):
        raise StageError(f"commit {ctx.sha} is not in {ctx.repository.url} (force-pushed away?)")
    commit = mirror.commit_info(ctx.sha)
    pipeline = pipeline_at(ctx.config, ctx.repository, ctx.sha)
    checkout = mirror.checkout(ctx.sha, ctx.workspace.checkout)
    prune_workspaces(
        checkout.parent, ctx.repository.keep_workspaces, protect=[ctx.workspace.checkout]
    )
    branch = ctx.branch
    if branch is None:
        containing = mirror.refs_containing(ctx.sha)
        branch = containing[0] if containing else None
    default = default_branch(ctx, mirror)
    ctx.workspace.save_result(
        STAGE,
        ctx.sha,
        {"pipeline": pipeline.model_dump(mode="json"), "branch": branch, "default_branch": default},
    )
    return SourceOutcome(
        commit=commit,
        pipeline=pipeline,
        checkout=checkout,
        ref=ctx.ref,
        branch=branch,
        default_branch=default,
        duration_s=time.monotonic() - started,
    )
