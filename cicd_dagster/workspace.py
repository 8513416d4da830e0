"""Where one commit's work lives on disk, and the per-stage lock and result cache.

A commit's checkout is under ``home/workspaces/<repo>/<sha>``; everything the stages
write (reports, logs, collected artifacts, stage results) is under
``home/runs/<repo>/<sha>`` so that re-checking-out a commit never loses a report.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cicd_dagster.config import ControlConfig
from cicd_dagster.locks import file_lock

_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class CommitWorkspace:
    repository: str
    sha: str
    checkout: Path
    run_dir: Path

    @classmethod
    def for_commit(cls, config: ControlConfig, repository: str, sha: str) -> CommitWorkspace:
        # The sha becomes a folder name: only a full lowercase hex sha may (no traversal).
        if not _SHA.match(sha):
            raise ValueError(f"not a 40-hex commit sha: {sha!r}")
        return cls(
            repository=repository,
            sha=sha,
            checkout=config.workspaces_dir / repository / sha,
            run_dir=config.runs_dir / repository / sha,
        )

    def reports_dir(self, stage: str) -> Path:
        return self.run_dir / "reports" / stage

    def log_path(self, stage: str) -> Path:
        return self.run_dir / "logs" / f"{stage}.log"

    @property
    def artifacts_dir(self) -> Path:
        return self.run_dir / "artifacts"

    def _result_path(self, stage: str) -> Path:
        return self.run_dir / "results" / f"{stage}.json"

    def stage_lock(self, stage: str) -> AbstractContextManager[None]:
        """Serialise one stage of one commit across processes (two runs of a commit at once)."""
        return file_lock(self.run_dir / "locks" / f"{stage}.lock")

    def load_result(self, stage: str, fingerprint: str) -> dict[str, Any] | None:
        """The stored result of `stage` if it was produced from exactly these inputs."""
        path = self._result_path(stage)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if stored.get("fingerprint") != fingerprint:
            return None
        result: dict[str, Any] = stored["result"]
        return result

    def save_result(self, stage: str, fingerprint: str, result: dict[str, Any]) -> None:
        path = self._result_path(stage)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "result": result}, default=str))
        tmp.replace(path)


def fingerprint(*parts: object, files: Iterable[Path] = ()) -> str:
    """A stable digest of values and file contents: the cache key of a stage or an env."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\0")
    for path in sorted(files):
        digest.update(str(path.name).encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
