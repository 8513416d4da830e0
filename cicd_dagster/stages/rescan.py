"""security_rescan: what is in service (deployed or released), matched again against
today's advisories.

A release scanned clean last month may be vulnerable today: a new advisory names one of
its dependencies. The rescan reads each in-service commit's SBOM from the artifact store
(after checking the commit's signed provenance, so a tampered SBOM is never what is
scanned), matches its libraries against the advisory database as it is now, applies the
suppressions of that commit's .cicd.yml, and records the findings against the commit.
Findings not recorded before are new: each commit with new ones gets one
`security_finding` event, which notification channels deliver.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

from cicd_dagster.artifact_store import ArtifactStoreError
from cicd_dagster.config import ControlConfig
from cicd_dagster.inventory import InService, in_service
from cicd_dagster.security.osv import AdvisoryDatabase, AdvisoryDatabaseError, load_advisories
from cicd_dagster.security.provenance import ProvenanceError, SigningKeyError
from cicd_dagster.security.sbom import SbomError, sbom_libraries
from cicd_dagster.stages.artifact import SBOM_NAME, artifact_store, verify_commit
from cicd_dagster.stages.context import StageError
from cicd_dagster.stages.security import (
    advisory_warnings,
    apply_suppressions,
    dependency_findings,
    location,
    reaches,
)
from cicd_dagster.stages.source import pipeline_at
from cicd_dagster.store import HistoryStore
from cicd_dagster.store.history import FindingRecord

STAGE = "security_rescan"
_EVENT_ITEMS = 5  # findings named in an event's message


@dataclass(frozen=True)
class CommitRescan:
    repository: str
    commit: str
    where: list[str]  # "prod (live)", "dev (standby)", "v1.2.0 (released)"...
    environment: str | None  # the last environment in promotion order running it
    dependencies: int = 0
    findings: list[FindingRecord] = field(default_factory=list)
    """Every dependency finding today, suppressed ones marked."""
    new: list[FindingRecord] = field(default_factory=list)
    """Those not recorded against the commit before this rescan."""
    error: str | None = None
    """Why the commit could not be rescanned (no SBOM, provenance that does not verify)."""

    def blocking(self, fail_on: str) -> list[FindingRecord]:
        return [f for f in self.findings if not f.suppressed and reaches(f.severity, fail_on)]


@dataclass(frozen=True)
class Rescan:
    commits: list[CommitRescan]
    advisories: int | None  # None: no security.advisory_db, nothing was matched
    warnings: list[str]
    duration_s: float

    def blocking(self, fail_on: str) -> list[tuple[CommitRescan, FindingRecord]]:
        return [(c, f) for c in self.commits for f in c.blocking(fail_on)]

    @property
    def errors(self) -> list[CommitRescan]:
        return [c for c in self.commits if c.error is not None]


def rescan_in_service(
    config: ControlConfig,
    history: HistoryStore,
    repository: str,
    *,
    now: datetime,
    today: date,
) -> Rescan:
    """Rescan every commit of `repository` in service and record what is found.

    A commit that cannot be rescanned is reported in its CommitRescan.error (and as a
    `security_finding` event: an unverifiable artifact in service is news), never skipped
    silently; the others are still rescanned.
    """
    started = time.monotonic()
    advisory_db = config.security.advisory_db
    if advisory_db is None:
        return Rescan([], None, ["no security.advisory_db configured: nothing to match"], 0.0)
    try:
        db = load_advisories(advisory_db)
    except AdvisoryDatabaseError as error:
        raise StageError(f"security rescan: {error}") from error
    commits = [
        _rescan_commit(config, history, db, repository, commit, places, now=now, today=today)
        for commit, places in _by_commit(in_service(config, history), repository).items()
    ]
    return Rescan(commits, len(db.advisories), advisory_warnings(db), time.monotonic() - started)


def _by_commit(items: Sequence[InService], repository: str) -> dict[str, list[InService]]:
    grouped: dict[str, list[InService]] = {}
    for item in items:
        if item.repository == repository:
            grouped.setdefault(item.commit, []).append(item)
    return grouped


def _rescan_commit(
    config: ControlConfig,
    history: HistoryStore,
    db: AdvisoryDatabase,
    repository: str,
    commit: str,
    places: list[InService],
    *,
    now: datetime,
    today: date,
) -> CommitRescan:
    where = [place.where for place in places]
    # The event names the last environment in promotion order that runs it, if any.
    environment = next((p.environment for p in reversed(places) if p.environment), None)
    try:
        installed = _sbom_dependencies(config, repository, commit)
        repository_config = config.repository(repository)
        suppressions = pipeline_at(config, repository_config, commit).security.suppressions
    except StageError as error:
        history.record_event(
            repository,
            "security_finding",
            f"{repository}@{commit[:12]} in {', '.join(where)} cannot be rescanned: {error}",
            environment=environment,
            commit_sha=commit,
            at=now,
        )
        return CommitRescan(repository, commit, where, environment, error=str(error))
    found, aliases = dependency_findings(db, installed)
    findings = apply_suppressions(found, suppressions, aliases, today)
    new = history.record_findings(repository, commit, "rescan", findings, found_at=now)
    announced = [f for f in new if not f.suppressed]
    if announced:
        history.record_event(
            repository,
            "security_finding",
            _event_message(repository, commit, where, announced),
            environment=environment,
            commit_sha=commit,
            at=now,
        )
    return CommitRescan(repository, commit, where, environment, len(installed), findings, new)


def _sbom_dependencies(
    config: ControlConfig, repository: str, commit: str
) -> list[tuple[str, str]]:
    """The libraries of the commit's stored SBOM, once its provenance verifies."""
    try:
        verify_commit(config, repository, commit)
        store = artifact_store(config)
        row = next(r for r in store.list(repository) if r.commit == commit and r.name == SBOM_NAME)
        path = store.path(row.digest)
        return sbom_libraries(
            path.read_text(encoding="utf-8"), f"{repository}@{commit[:12]}/{SBOM_NAME}"
        )
    except StopIteration:
        raise StageError(f"{SBOM_NAME} is not in the artifact store") from None
    except (ProvenanceError, SigningKeyError, ArtifactStoreError, SbomError, OSError) as error:
        raise StageError(str(error)) from error


def _event_message(
    repository: str, commit: str, where: list[str], findings: list[FindingRecord]
) -> str:
    named = "; ".join(f"{f.rule} {f.severity} {location(f)}" for f in findings[:_EVENT_ITEMS])
    more = f"; and {len(findings) - _EVENT_ITEMS} more" if len(findings) > _EVENT_ITEMS else ""
    return (
        f"{len(findings)} new finding(s) in {repository}@{commit[:12]}, in service in "
        f"{', '.join(where)}: {named}{more}"
    )
