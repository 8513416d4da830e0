"""What every stage of one commit needs: config, paths, the step environment, masking."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from uv import find_uv_bin

from cicd_dagster.config import ControlConfig, PipelineConfig, RepositoryConfig
from cicd_dagster.runner import SecretMasker, StepResult, base_environment, run_step
from cicd_dagster.sandbox import StepSandbox, isolation_unavailable, sandbox_for
from cicd_dagster.workspace import CommitWorkspace


class StageError(Exception):
    """A stage could not produce its product; the message says why, the tail shows the log."""

    def __init__(self, message: str, *, log_tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail

    def __str__(self) -> str:
        if not self.log_tail:
            return self.message
        return f"{self.message}\n--- log tail ---\n{self.log_tail}"


@dataclass
class StageContext:
    config: ControlConfig
    repository: RepositoryConfig
    workspace: CommitWorkspace
    ref: str
    branch: str | None
    on_line: Callable[[str], None] | None = None
    force: bool = False
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def for_commit(
        cls,
        config: ControlConfig,
        repository: str,
        sha: str,
        *,
        ref: str | None = None,
        branch: str | None = None,
        on_line: Callable[[str], None] | None = None,
        force: bool = False,
    ) -> StageContext:
        repo = config.repository(repository)
        return cls(
            config=config,
            repository=repo,
            workspace=CommitWorkspace.for_commit(config, repo.name, sha),
            ref=ref or sha,
            branch=branch,
            on_line=on_line,
            force=force,
        )

    @property
    def sha(self) -> str:
        return self.workspace.sha

    @cached_property
    def secrets(self) -> dict[str, str]:
        """The named secrets present in the control plane's environment."""
        values = {}
        for name in self.repository.secrets:
            value = os.environ.get(name)
            if value is None:
                self.warnings.append(f"secret {name} is not set in the environment")
            else:
                values[name] = value
        return values

    @cached_property
    def masker(self) -> SecretMasker:
        return SecretMasker(self.secrets.values())

    @cached_property
    def sandbox(self) -> StepSandbox | None:
        """Where this commit's steps run: the control plane's keys hidden from them, or
        None (with a warning) where this machine cannot isolate steps."""
        sandbox = sandbox_for(self.config)
        if sandbox is None:
            self.warnings.append(f"build steps can read the signing key: {isolation_unavailable()}")
        return sandbox

    def step_env(
        self, stage: str, pipeline: PipelineConfig, env_dir: Path | None
    ) -> dict[str, str]:
        """The environment of a step: untrusted values (ref names) only ever travel here."""
        ws = self.workspace
        extra: dict[str, str] = {
            **pipeline.env,
            "CICD_REPOSITORY": self.repository.name,
            "CICD_COMMIT_SHA": self.sha,
            "CICD_REF": self.ref,
            "CICD_BRANCH": self.branch or "",
            "CICD_WORKSPACE": str(ws.checkout),
            "CICD_REPORTS_DIR": str(ws.reports_dir(stage)),
            "CICD_ARTIFACTS_DIR": str(ws.artifacts_dir),
            "UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR", str(self.config.home / "cache" / "uv")),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            **self.secrets,
        }
        env = base_environment(extra)
        # uv is on PATH for steps so `uv pip install` works in every install command.
        path = [str(Path(find_uv_bin()).parent), env["PATH"]]
        if env_dir is not None:
            env["VIRTUAL_ENV"] = str(env_dir)
            path.insert(0, str(env_dir / "bin"))
        env["PATH"] = os.pathsep.join(path)
        return env

    def run(
        self,
        stage: str,
        command: str,
        env: Mapping[str, str],
        timeout_s: float,
        cwd: Path | None = None,
    ) -> StepResult:
        """Run a step of `stage` in the checkout (or `cwd`), logged, masked, sandboxed."""
        return run_step(
            command,
            cwd=cwd or self.workspace.checkout,
            env=env,
            timeout_s=timeout_s,
            log_path=self.workspace.log_path(stage),
            masker=self.masker,
            on_line=self.on_line,
            sandbox=self.sandbox,
        )


def step_failure(kind: str, result: StepResult) -> str:
    """One wording for a failed step, shared by every stage."""
    if result.timed_out:
        return f"{kind} timed out after {result.duration_s:.0f} s: {result.command}"
    return f"{kind} exited {result.exit_code}: {result.command}"
