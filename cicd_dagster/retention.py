"""Artifact retention: prune the store without losing what may still be deployed.

A commit is protected while it is in service (live or standby in an environment, or
released, see inventory.py) or among the `artifacts.keep_last` newest commits stored for
its repository, so that a rollback to a recent commit still finds its artifacts. Every
digest a protected commit names is kept, its SBOM and signed provenance with its build
artifacts (they are named under the commit too). Any other blob is deleted once unused
(stored or last named) for `artifacts.retention_days`, with the references that name it.

The history DB is left as it is: `cicd history artifacts` is the record of what was built,
and the store says what is still stored.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cicd_dagster.artifact_store import ArtifactRow, BlobInfo, PruneResult
from cicd_dagster.config import ControlConfig
from cicd_dagster.inventory import in_service
from cicd_dagster.stages.artifact import artifact_store
from cicd_dagster.store import HistoryStore

CommitKey = tuple[str, str]
"""(repository, commit)"""


@dataclass(frozen=True)
class KeptCommit:
    repository: str
    commit: str
    reasons: list[str]
    """e.g. "live in prod", "standby in staging", "one of the 10 newest"."""


@dataclass(frozen=True)
class RetentionResult:
    dry_run: bool
    repository: str | None
    retention_days: int | None
    keep_last: int
    deleted: list[BlobInfo]
    """The blobs deleted (or, in a dry run, that would be)."""
    references: list[ArtifactRow]
    """The names that pointed at them, removed with them."""
    kept: list[KeptCommit]
    """The protected commits that have artifacts in the store, newest first."""

    @property
    def bytes_freed(self) -> int:
        return sum(blob.size for blob in self.deleted)

    def names(self, digest: str) -> list[ArtifactRow]:
        return [row for row in self.references if row.digest == digest]

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "repository": self.repository,
            "retention_days": self.retention_days,
            "keep_last": self.keep_last,
            "deleted": [
                {
                    "digest": blob.digest,
                    "size": blob.size,
                    "stored_at": blob.stored_at.isoformat(),
                    "references": [
                        {"repository": row.repository, "commit": row.commit, "name": row.name}
                        for row in self.names(blob.digest)
                    ],
                }
                for blob in self.deleted
            ],
            "bytes_freed": self.bytes_freed,
            "kept": [
                {"repository": kept.repository, "commit": kept.commit, "reasons": kept.reasons}
                for kept in self.kept
            ],
        }


def protected_commits(
    config: ControlConfig, history: HistoryStore, rows: list[ArtifactRow]
) -> dict[CommitKey, list[str]]:
    """The commits of `rows` that retention must keep, with why, newest first."""
    last_stored: dict[CommitKey, datetime] = {}
    for row in rows:
        key = (row.repository, row.commit)
        last_stored[key] = max(row.stored_at, last_stored.get(key, row.stored_at))
    newest_first = sorted(last_stored, key=lambda key: (last_stored[key], key), reverse=True)
    reasons: dict[CommitKey, list[str]] = defaultdict(list)
    for item in in_service(config, history):
        key = (item.repository, item.commit)
        if key in last_stored:
            reasons[key].append(item.reason)
    keep_last = config.artifacts.keep_last
    ranks: dict[str, int] = defaultdict(int)
    for key in newest_first:
        ranks[key[0]] += 1
        if ranks[key[0]] <= keep_last:
            reasons[key].append(f"one of the {keep_last} newest")
    return {key: reasons[key] for key in newest_first if key in reasons}


def prune_artifacts(
    config: ControlConfig,
    *,
    now: datetime,
    dry_run: bool = False,
    repository: str | None = None,
) -> RetentionResult:
    """Apply cicd.yaml's `artifacts` retention to the store (only to the blobs that
    `repository` names, if given; unnamed blobs then stay). A store index that cannot be
    read raises ArtifactIndexError and nothing is deleted: what it names is unknown."""
    store = artifact_store(config)
    retention_days = config.artifacts.retention_days
    rows = store.list()
    protected = protected_commits(config, HistoryStore(config.history_db_url), rows)
    kept_digests = {row.digest for row in rows if (row.repository, row.commit) in protected}
    if repository is not None:
        candidates = {row.digest for row in rows if row.repository == repository}
        kept_digests |= {row.digest for row in rows if row.repository != repository}
        kept_digests |= {blob.digest for blob in store.backend.iter_blobs()} - candidates
    if retention_days is None:
        pruned = PruneResult([], [])
    else:
        pruned = store.prune(kept_digests, timedelta(days=retention_days), now, dry_run=dry_run)
    # Listed by the commit and name that stored them (unnamed blobs first), not by digest.
    first_name: dict[str, tuple[str, ...]] = {}
    for row in pruned.references:
        name = (row.repository, row.commit, row.name)
        first_name[row.digest] = min(name, first_name.get(row.digest, name))
    return RetentionResult(
        dry_run=dry_run,
        repository=repository,
        retention_days=retention_days,
        keep_last=config.artifacts.keep_last,
        deleted=sorted(
            pruned.blobs, key=lambda blob: (first_name.get(blob.digest, ()), blob.digest)
        ),
        references=pruned.references,
        kept=[
            KeptCommit(key[0], key[1], reasons)
            for key, reasons in protected.items()
            if repository is None or key[0] == repository
        ],
    )
