"""build: dependencies into an isolated, cached environment, the build steps, artifacts."""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uv import find_uv_bin

from cicd_dagster.artifact_store import file_sha256
from cicd_dagster.config import PipelineConfig
from cicd_dagster.git import checkout_id
from cicd_dagster.locks import file_lock
from cicd_dagster.runner import run_step
from cicd_dagster.stages.context import StageContext, StageError, step_failure
from cicd_dagster.store import ArtifactRecord
from cicd_dagster.workspace import fingerprint

STAGE = "build"
_READY_MARKER = ".cicd-ready"


@dataclass(frozen=True)
class BuildOutcome:
    duration_s: float
    env_dir: Path
    env_key: str
    env_reused: bool
    steps: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[ArtifactRecord] = field(default_factory=list)
    fingerprint: str = ""
    reused: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["env_dir"] = str(self.env_dir)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildOutcome:
        return cls(
            **{
                **data,
                "env_dir": Path(data["env_dir"]),
                "artifacts": [ArtifactRecord(**a) for a in data["artifacts"]],
            }
        )


def env_key(ctx: StageContext, pipeline: PipelineConfig) -> str:
    """The dependency env is reused while the install commands and `cache` files are unchanged."""
    build = pipeline.build
    cache_files = [
        path
        for pattern in build.cache
        for path in ctx.workspace.checkout.glob(pattern)
        if path.is_file()
    ]
    if not build.cache:
        # Without cache keys the env is this commit's alone: isolated, never stale.
        return fingerprint("per-commit", ctx.sha, build.install, build.python)[:32]
    return fingerprint(build.install, build.python, files=cache_files)[:32]


def ensure_env(ctx: StageContext, pipeline: PipelineConfig) -> tuple[Path, str, bool]:
    """Create (or reuse) the venv for this build; returns (env dir, key, reused)."""
    key = env_key(ctx, pipeline)
    env_dir = ctx.config.envs_dir / ctx.repository.name / key
    with file_lock(env_dir.with_name(f"{key}.lock")):
        if (env_dir / _READY_MARKER).exists():
            return env_dir, key, True
        shutil.rmtree(env_dir, ignore_errors=True)
        python = pipeline.build.python or sys.executable
        env = ctx.step_env(STAGE, pipeline, None)
        create = run_step(
            f'"{find_uv_bin()}" venv --quiet --seed --python "$CICD_PYTHON" "$CICD_ENV_DIR"',
            cwd=ctx.workspace.checkout,
            env={**env, "CICD_PYTHON": python, "CICD_ENV_DIR": str(env_dir)},
            timeout_s=300,
            log_path=ctx.workspace.log_path(STAGE),
            masker=ctx.masker,
            on_line=ctx.on_line,
            sandbox=ctx.sandbox,
        )
        if not create.ok:
            raise StageError("could not create the build environment", log_tail=create.log_tail)
        env = ctx.step_env(STAGE, pipeline, env_dir)
        for command in pipeline.build.install:
            result = ctx.run(STAGE, command, env, pipeline.build.timeout_s)
            if not result.ok:
                shutil.rmtree(env_dir, ignore_errors=True)
                raise StageError(step_failure("install", result), log_tail=result.log_tail)
        (env_dir / _READY_MARKER).touch()
        return env_dir, key, False


def build_fingerprint(ctx: StageContext, pipeline: PipelineConfig, key: str) -> str:
    # The checkout is part of the input: a re-created checkout lacks the build's outputs.
    return fingerprint(
        ctx.sha, pipeline.build.model_dump(mode="json"), key, checkout_id(ctx.workspace.checkout)
    )


def load_build(ctx: StageContext, pipeline: PipelineConfig) -> BuildOutcome:
    """The finished build of this commit, for the test stages."""
    stored = ctx.workspace.load_result(
        STAGE, build_fingerprint(ctx, pipeline, env_key(ctx, pipeline))
    )
    if stored is None:
        raise StageError(f"{ctx.sha} has no finished build with these inputs: materialize build")
    return BuildOutcome.from_json(stored)


def run_build(ctx: StageContext, pipeline: PipelineConfig) -> BuildOutcome:
    with ctx.workspace.stage_lock(STAGE):
        started = time.monotonic()
        env_dir, key, env_reused = ensure_env(ctx, pipeline)
        this_fingerprint = build_fingerprint(ctx, pipeline, key)
        cached = None if ctx.force else ctx.workspace.load_result(STAGE, this_fingerprint)
        if cached is not None:
            outcome = BuildOutcome.from_json(cached)
            if all((ctx.workspace.artifacts_dir / a.path).is_file() for a in outcome.artifacts):
                return BuildOutcome(**{**outcome.__dict__, "reused": True})
        steps = []
        env = ctx.step_env(STAGE, pipeline, env_dir)
        for command in pipeline.build.steps:
            result = ctx.run(STAGE, command, env, pipeline.build.timeout_s)
            steps.append(
                {
                    "command": ctx.masker.mask(command),
                    "exit_code": result.exit_code,
                    "duration_s": round(result.duration_s, 3),
                    "timed_out": result.timed_out,
                }
            )
            if not result.ok:
                raise StageError(step_failure("build step", result), log_tail=result.log_tail)
        artifacts = collect_artifacts(ctx, pipeline.build.artifacts)
        outcome = BuildOutcome(
            duration_s=time.monotonic() - started,
            env_dir=env_dir,
            env_key=key,
            env_reused=env_reused,
            steps=steps,
            artifacts=artifacts,
            fingerprint=this_fingerprint,
        )
        ctx.workspace.save_result(STAGE, this_fingerprint, outcome.to_json())
        return outcome


def collect_artifacts(ctx: StageContext, patterns: list[str]) -> list[ArtifactRecord]:
    """Copy matching files into the run's artifact folder; nothing outside the checkout."""
    checkout = ctx.workspace.checkout.resolve()
    target_root = ctx.workspace.artifacts_dir
    shutil.rmtree(target_root, ignore_errors=True)
    records: dict[str, ArtifactRecord] = {}
    for pattern in patterns:
        matches = [p for p in sorted(checkout.glob(pattern)) if p.is_file()]
        if not matches:
            ctx.warnings.append(f"artifact pattern {pattern!r} matched no file")
        for path in matches:
            real = path.resolve()
            if not real.is_relative_to(checkout):
                raise StageError(f"artifact {path} resolves outside the checkout (to {real})")
            relative = real.relative_to(checkout).as_posix()
            target = target_root / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(real, target)
            records[relative] = ArtifactRecord(
                path=relative, sha256=file_sha256(target), size_bytes=target.stat().st_size
            )
    return list(records.values())
