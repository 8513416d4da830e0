"""Housekeeping: what the scheduled housekeeping jobs remove, and how much space it frees.

- Workspace cleanup: per repository, the checkouts (home/workspaces/<repo>/<sha>) beyond
  `keep_workspaces`, least recently used first, and the dependency envs (home/envs/<repo>/<key>)
  that no build used for `housekeeping.cache_retention_days`. Never what a commit in service
  (live or standby in an environment) uses, nor what a stage is working in right now.
- Artifact retention is cicd_dagster/retention.py's prune_artifacts.
- DB vacuum: VACUUM and ANALYZE of the history DB, with its size before and after.

Sizes are disk usage (allocated blocks, a file linked twice counted once), as `du` reports.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cicd_dagster.config import ControlConfig, RepositoryConfig
from cicd_dagster.git import prune_workspaces
from cicd_dagster.inventory import deployed
from cicd_dagster.store import HistoryStore

# Written by stages/build.py: a finished env, and each build's result (naming its env).
_ENV_READY_MARKER = ".cicd-ready"
_BUILD_RESULT = Path("results") / "build.json"


@dataclass(frozen=True)
class Removed:
    repository: str
    kind: str
    """"workspace" or "env"."""
    path: Path
    bytes: int
    reason: str


@dataclass(frozen=True)
class Kept:
    repository: str
    kind: str
    path: Path
    reason: str
    """Why it stays although the rules would let it go, e.g. "live in prod"."""


@dataclass(frozen=True)
class CleanupResult:
    removed: list[Removed] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(item.bytes for item in self.removed)

    def to_json(self) -> dict[str, Any]:
        return {
            "removed": [_item_json(item) for item in self.removed],
            "kept": [_item_json(item) for item in self.kept],
            "bytes_freed": self.bytes_freed,
        }


@dataclass(frozen=True)
class VacuumResult:
    backend: str
    bytes_before: int
    bytes_after: int
    duration_s: float

    @property
    def bytes_freed(self) -> int:
        return max(self.bytes_before - self.bytes_after, 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "bytes_freed": self.bytes_freed,
            "duration_s": round(self.duration_s, 3),
        }


def clean_workspaces(config: ControlConfig, *, now: datetime) -> CleanupResult:
    """Remove every repository's surplus checkouts and stale dependency envs (see above)."""
    reasons: dict[tuple[str, str], list[str]] = defaultdict(list)
    # Released commits are rebuilt from their tag if ever needed: only what runs is kept.
    for item in deployed(config):
        reasons[(item.repository, item.commit)].append(item.reason)
    result = CleanupResult()
    for repository in config.repositories:
        for sha in _busy_commits(config, repository):
            reasons[(repository.name, sha)].append("a stage is running in it")
        protected = {
            sha: ", ".join(why) for (name, sha), why in reasons.items() if name == repository.name
        }
        _clean_checkouts(config, repository, protected, result)
        _clean_envs(config, repository, protected, now, result)
    return result


def vacuum_history(history: HistoryStore) -> VacuumResult:
    before = history.size_bytes()
    started = time.monotonic()
    history.vacuum()
    duration_s = time.monotonic() - started
    return VacuumResult(history.dialect, before, history.size_bytes(), duration_s)


def _clean_checkouts(
    config: ControlConfig,
    repository: RepositoryConfig,
    protected: dict[str, str],
    result: CleanupResult,
) -> None:
    root = config.workspaces_dir / repository.name
    if not root.is_dir():
        return
    # Measured first: prune_workspaces decides and deletes in one go.
    sizes = {
        entry: disk_usage(entry)
        for entry in root.iterdir()
        if entry.is_dir() and not entry.is_symlink()
    }
    newest = sorted(sizes, key=lambda entry: entry.stat().st_mtime, reverse=True)
    for entry in newest[repository.keep_workspaces :]:
        if entry.name in protected:
            result.kept.append(Kept(repository.name, "workspace", entry, protected[entry.name]))
    keep = repository.keep_workspaces
    removed = prune_workspaces(root, keep, protect=[root / sha for sha in protected])
    reason = f"beyond the {keep} most recently used checkouts"
    result.removed.extend(
        Removed(repository.name, "workspace", path, sizes.get(path, 0), reason) for path in removed
    )


def _clean_envs(
    config: ControlConfig,
    repository: RepositoryConfig,
    protected: dict[str, str],
    now: datetime,
    result: CleanupResult,
) -> None:
    root = config.envs_dir / repository.name
    if not root.is_dir():
        return
    max_age = timedelta(days=config.housekeeping.cache_retention_days)
    last_used, users = _env_usage(config, repository)
    for env_dir in sorted(
        entry for entry in root.iterdir() if entry.is_dir() and not entry.is_symlink()
    ):
        why_kept = next(
            (protected[sha] for sha in users.get(env_dir.name, ()) if sha in protected), None
        )
        if why_kept is not None:
            result.kept.append(
                Kept(repository.name, "env", env_dir, f"used by a commit {why_kept}")
            )
            continue
        used = max(
            last_used.get(env_dir.name, 0.0), _mtime(env_dir / _ENV_READY_MARKER), _mtime(env_dir)
        )
        idle = now - datetime.fromtimestamp(used, tz=now.tzinfo)
        if idle <= max_age:
            continue
        # The lock ensure_env holds while it creates or installs the env: never pull one
        # from under an install; it is retried on the next run.
        with _try_lock(env_dir.with_name(f"{env_dir.name}.lock")) as locked:
            if not locked:
                continue
            size = disk_usage(env_dir)
            shutil.rmtree(env_dir)
        result.removed.append(
            Removed(repository.name, "env", env_dir, size, f"unused for {idle.days} days")
        )


def _env_usage(
    config: ControlConfig, repository: RepositoryConfig
) -> tuple[dict[str, float], dict[str, set[str]]]:
    """From the builds' results: per env key, when a build last used it (mtime of the
    result) and which commits' builds use it."""
    last_used: dict[str, float] = {}
    users: dict[str, set[str]] = {}
    runs = config.runs_dir / repository.name
    for result_path in runs.glob(f"*/{_BUILD_RESULT}") if runs.is_dir() else ():
        try:
            env_dir = json.loads(result_path.read_text())["result"]["env_dir"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a result being written, or from another version: not a use
        key = Path(env_dir).name
        sha = result_path.parent.parent.name
        users.setdefault(key, set()).add(sha)
        last_used[key] = max(last_used.get(key, 0.0), _mtime(result_path))
    return last_used, users


def _busy_commits(config: ControlConfig, repository: RepositoryConfig) -> set[str]:
    """Commits being worked on now: a stage holds a lock in the commit's run folder, or the
    source stage holds the lock of its checkout (home/workspaces/<repo>/<sha>.lock)."""
    runs = config.runs_dir / repository.name
    checkouts = config.workspaces_dir / repository.name
    busy = set()
    for lock_path in runs.glob("*/locks/*.lock") if runs.is_dir() else ():
        if _locked(lock_path):
            busy.add(lock_path.parent.parent.name)
    for lock_path in checkouts.glob("*.lock") if checkouts.is_dir() else ():
        if _locked(lock_path):
            busy.add(lock_path.stem)
    return busy


def _locked(lock_path: Path) -> bool:
    with _try_lock(lock_path) as free:
        return not free


@contextmanager
def _try_lock(lock_path: Path) -> Iterator[bool]:
    """Hold the flock of `lock_path` (as locks.file_lock) if it is free: yields whether it
    is held."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def disk_usage(path: Path) -> int:
    """Bytes allocated to the files under `path` (symlinks not followed), as `du` counts."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for entry in _walk(path):
        try:
            stat = entry.lstat()
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        total += stat.st_blocks * 512
    return total


def _walk(path: Path) -> Iterable[Path]:
    yield path
    for folder, folders, files in os.walk(path):
        for name in (*folders, *files):
            yield Path(folder, name)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _item_json(item: Removed | Kept) -> dict[str, Any]:
    data: dict[str, Any] = {"repository": item.repository, "kind": item.kind}
    data["path"] = str(item.path)
    if isinstance(item, Removed):
        data["bytes"] = item.bytes
    return {**data, "reason": item.reason}
