"""The build history DB: what every CI run of every commit did, queryable as DataFrames.

Assets write to it as stages finish; the CLI and reports read it. There is one build per
repository and commit, and every write is an upsert or a replacement of that build's rows, so
re-materializing a partition never duplicates anything.

Deployments and incidents are events instead: every deployment attempt is a row of its own,
and an environment has at most one open incident at a time.

Security findings belong to a build: its own scans replace them on every run, and rescans of
the commit against newer advisories add the ones not seen before.
"""

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, TypeVarTuple

import pandas as pd
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cicd_dagster.reports.junit import TestSummary
from cicd_dagster.store.models import (
    APPROVAL_DECISIONS,
    DELIVERY_STATUSES,
    DEPLOYMENT_STATUSES,
    EVENT_KINDS,
    EXTERNAL_EVENT_TYPES,
    FINDING_KINDS,
    FINDING_SEVERITIES,
    FINDING_SOURCES,
    PROMOTION_STAGES,
    STAGE_NAMES,
    STAGE_STATUSES,
    TEST_STAGES,
    ApiToken,
    Approval,
    Artifact,
    Base,
    Benchmark,
    Build,
    Commit,
    Delivery,
    Deployment,
    Event,
    ExternalEvent,
    Finding,
    GateResult,
    HealthProbe,
    Incident,
    Release,
    Repository,
    Stage,
    TestCase,
    User,
    UTCDateTime,
)

_MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any fixed number: the PostgreSQL advisory lock that serialises concurrent migrate() calls.
_MIGRATION_LOCK_KEY = 0x63696364
_SQLITE_BUSY_TIMEOUT_MS = 30_000
# Execution option marking a connection that will write, so SQLite takes the write lock at BEGIN.
_WRITES = "cicd_writes"
_COUNTS = ("tests", "passed", "failed", "errors", "skipped")

_Model = TypeVar("_Model", bound=Base)
_Columns = TypeVarTuple("_Columns")


@dataclass(frozen=True)
class CommitRecord:
    sha: str
    parents: list[str]
    author_name: str
    author_email: str
    authored_at: datetime
    message: str


@dataclass(frozen=True)
class StageRecord:
    name: str
    status: str
    started_at: datetime
    duration_s: float
    tests: int | None = None
    passed: int | None = None
    failed: int | None = None
    errors: int | None = None
    skipped: int | None = None
    flaky: int | None = None
    pass_rate: float | None = None
    coverage: float | None = None
    detail: str | None = None
    reused: bool = False
    run_id: str | None = None

    def with_counts(self, summary: TestSummary | None) -> "StageRecord":
        """This record with the counts of a test stage's summary (as it is without one)."""
        if summary is None:
            return self
        return dataclasses.replace(
            self,
            tests=summary.tests,
            passed=summary.passed,
            failed=summary.failed,
            errors=summary.errors,
            skipped=summary.skipped,
            flaky=summary.flaky,
            pass_rate=summary.pass_rate,
        )


@dataclass(frozen=True)
class GateRecord:
    name: str
    passed: bool
    value: float | None
    threshold: float | None
    detail: str


@dataclass(frozen=True)
class ArtifactRecord:
    path: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class FindingRecord:
    """One finding of a security scan; `message` must never hold a secret in clear."""

    kind: str
    tool: str
    rule: str
    severity: str
    message: str
    file: str | None = None
    line: int | None = None
    package: str | None = None
    version: str | None = None
    suppressed: bool = False
    suppression_reason: str | None = None

    @property
    def identity(self) -> tuple[str, str, str | None, str | None, str | None, int | None]:
        """What makes two findings the same one, whatever their wording or severity."""
        return (self.kind, self.rule, self.package, self.version, self.file, self.line)


@dataclass(frozen=True)
class DeploymentRecord:
    environment: str
    commit_sha: str
    strategy: str
    status: str
    version: str
    previous_version: str | None
    reason: str
    started_at: datetime
    finished_at: datetime | None = None
    duration_s: float | None = None
    rollback_s: float | None = None
    run_id: str | None = None
    triggered_by: str | None = None
    config_digest: str | None = None


@dataclass(frozen=True)
class ProbeRecord:
    """One probe of an environment's stable address."""

    environment: str
    commit_sha: str | None
    at: datetime
    ok: bool
    status_code: int | None
    latency_ms: float
    error: str | None = None


@dataclass(frozen=True)
class EventRecord:
    """An event of the outbox, as notification channels tell it."""

    id: int
    repository: str
    kind: str
    environment: str | None
    commit_sha: str | None
    at: datetime
    message: str


@dataclass(frozen=True)
class ClaimedDelivery:
    """A pending delivery claimed by one delivery run: `attempts` counts this one."""

    id: int
    channel: str
    attempts: int
    event: EventRecord


@dataclass(frozen=True)
class UserRecord:
    """A user as the DB knows it: its roles there (cicd.yaml may give more)."""

    name: str
    email: str | None
    roles: list[str]
    created_at: datetime
    removed_at: datetime | None


@dataclass(frozen=True)
class TokenOwner:
    """Whose an API token is, and whether it still counts."""

    user: UserRecord
    revoked_at: datetime | None


@dataclass(frozen=True)
class ReleaseRecord:
    """A version of a repository, tagged at a commit (a row of the releases table)."""

    version: str
    tag: str
    commit_sha: str
    previous_version: str | None
    bump: str  # major, minor, patch, prerelease or initial
    prerelease: bool
    commit_count: int
    changelog: str
    created_at: datetime
    notes_path: str | None = None
    report_path: str | None = None
    run_id: str | None = None
    created_by: str | None = None


@dataclass(frozen=True)
class ExternalEventRecord:
    """A change, deployment or incident from another system (a row of external_events)."""

    repository: str
    source_id: str
    type: str  # change, deployment or incident
    time: datetime
    sha: str | None = None
    changes: tuple[str, ...] = ()
    root_cause: str | None = None
    resolved_at: datetime | None = None


@dataclass(frozen=True)
class ImportResult:
    """What an import did, by source id: new rows, rows already there as given, and ids
    already imported with other content (kept as they were)."""

    imported: list[str]
    unchanged: list[str]
    conflicting: list[str]


class HistoryStore:
    """The history DB at a SQLAlchemy URL (SQLite file or PostgreSQL), migrated on open.

    Datetimes go in timezone-aware (naive ones are rejected) and come back in UTC.
    """

    def __init__(self, url: str) -> None:
        parsed_url = sa.make_url(url)
        is_sqlite = parsed_url.get_backend_name() == "sqlite"
        if is_sqlite and parsed_url.database not in (None, "", ":memory:"):
            Path(parsed_url.database).parent.mkdir(parents=True, exist_ok=True)
        self._engine = sa.create_engine(parsed_url)
        if is_sqlite:
            _configure_sqlite(self._engine)
        self.migrate()

    def migrate(self) -> None:
        """Upgrade the schema to the newest revision; a no-op when it is there already.

        Concurrent callers queue on a lock (SQLite's write lock, a PostgreSQL advisory lock)
        held for the whole upgrade, so the first one migrates and the others find it done.
        """
        with self._engine.connect() as connection:
            connection.execution_options(**{_WRITES: True})
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.execute(
                        sa.select(sa.func.pg_advisory_xact_lock(_MIGRATION_LOCK_KEY))
                    )
                config = Config()
                config.set_main_option("script_location", str(_MIGRATIONS_DIR).replace("%", "%%"))
                config.attributes["connection"] = connection
                command.upgrade(config, "head")

    def dispose(self) -> None:
        self._engine.dispose()

    # -- writes ------------------------------------------------------------------------------

    def record_commit(
        self,
        repository: str,
        url: str,
        commit: CommitRecord,
        *,
        detected_at: datetime | None = None,
        run_requested_at: datetime | None = None,
    ) -> None:
        """Upsert the commit; a timestamp left as None keeps the one stored before."""
        with self._writing() as session:
            repository_id = _upsert(session, Repository, {"name": repository}, {"url": url}).id
            timestamps = {"detected_at": detected_at, "run_requested_at": run_requested_at}
            _upsert(
                session,
                Commit,
                {"repository_id": repository_id, "sha": commit.sha},
                {
                    "parents": list(commit.parents),
                    "author_name": commit.author_name,
                    "author_email": commit.author_email,
                    "authored_at": commit.authored_at,
                    "message": commit.message,
                    **{name: value for name, value in timestamps.items() if value is not None},
                },
            )

    def record_build(
        self, repository: str, commit_sha: str, *, ref: str, branch: str | None, run_id: str | None
    ) -> None:
        """Upsert the build; creates the repository (without URL) if no commit recorded it yet."""
        now = datetime.now(UTC)
        with self._writing() as session:
            repository_id = _upsert(session, Repository, {"name": repository}, {}).id
            _upsert(
                session,
                Build,
                {"repository_id": repository_id, "commit_sha": commit_sha},
                {"ref": ref, "branch": branch, "run_id": run_id, "updated_at": now},
                on_insert={"created_at": now},
            )

    def record_stage(self, repository: str, commit_sha: str, stage: StageRecord) -> None:
        """Upsert the stage of the build; its test cases, benchmarks and gates stay."""
        if stage.name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {stage.name!r}; expected one of {STAGE_NAMES}")
        if stage.status not in STAGE_STATUSES:
            raise ValueError(f"unknown stage status {stage.status!r}; expected {STAGE_STATUSES}")
        with self._writing() as session:
            build_id = _build_id(session, repository, commit_sha)
            fields = dataclasses.asdict(stage)
            key = {"build_id": build_id, "name": fields.pop("name")}
            _upsert(session, Stage, key, fields)
            _touch_build(session, build_id)

    def record_test_cases(
        self, repository: str, commit_sha: str, stage: str, cases: pd.DataFrame
    ) -> None:
        """Replace the stage's test cases with one row per row of `cases`."""
        self._replace_stage_rows(repository, commit_sha, stage, TestCase, cases)

    def record_benchmarks(
        self, repository: str, commit_sha: str, stage: str, benchmarks: pd.DataFrame
    ) -> None:
        """Replace the stage's benchmarks; baseline_mean_s and regression may be missing or NaN."""
        self._replace_stage_rows(repository, commit_sha, stage, Benchmark, benchmarks)

    def record_gates(
        self, repository: str, commit_sha: str, stage: str, gates: Sequence[GateRecord]
    ) -> None:
        """Replace the gates the stage evaluated."""
        with self._writing() as session:
            build_id = _build_id(session, repository, commit_sha)
            session.execute(
                sa.delete(GateResult).where(
                    GateResult.build_id == build_id, GateResult.stage == stage
                )
            )
            if gates:
                session.execute(
                    sa.insert(GateResult),
                    [
                        {
                            "build_id": build_id,
                            "stage": stage,
                            "name": gate.name,
                            "passed": gate.passed,
                            "value": gate.value,
                            "threshold": gate.threshold,
                            "detail": gate.detail,
                        }
                        for gate in gates
                    ],
                )
            _touch_build(session, build_id)

    def record_artifacts(
        self, repository: str, commit_sha: str, artifacts: Sequence[ArtifactRecord]
    ) -> None:
        """Upsert the artifacts by path; artifacts recorded before under other paths stay."""
        if not artifacts:
            return
        now = datetime.now(UTC)
        with self._writing() as session:
            build_id = _build_id(session, repository, commit_sha)
            paths = [artifact.path for artifact in artifacts]
            session.execute(
                sa.delete(Artifact).where(Artifact.build_id == build_id, Artifact.path.in_(paths))
            )
            session.execute(
                sa.insert(Artifact),
                [
                    {
                        "build_id": build_id,
                        "path": artifact.path,
                        "sha256": artifact.sha256,
                        "size_bytes": artifact.size_bytes,
                        "recorded_at": now,
                    }
                    for artifact in artifacts
                ],
            )
            _touch_build(session, build_id)

    def record_findings(
        self,
        repository: str,
        commit_sha: str,
        source: str,
        findings: Sequence[FindingRecord],
        *,
        found_at: datetime,
    ) -> list[FindingRecord]:
        """Record security findings of the commit's build and return the ones written.

        source "build": replaces the build's own findings (all of `findings` are returned);
        "rescan": adds those whose identity (kind, rule, package, version, file, line) is not
        recorded for the commit yet, from either source, and returns just those.
        Both are idempotent.
        """
        if source not in FINDING_SOURCES:
            raise ValueError(
                f"unknown finding source {source!r}; expected one of {FINDING_SOURCES}"
            )
        if found_at.tzinfo is None:
            raise ValueError(f"naive datetime {found_at.isoformat()}: pass a timezone-aware one")
        for finding in findings:
            _check_finding(finding)
        with self._writing() as session:
            # Locked so that concurrent rescans of one build take turns (PostgreSQL).
            build_id = _build_id(session, repository, commit_sha, for_update=True)
            if source == "build":
                session.execute(
                    sa.delete(Finding).where(Finding.build_id == build_id, Finding.source == source)
                )
                new = list(findings)
            else:
                identities = session.execute(
                    sa.select(
                        Finding.kind,
                        Finding.rule,
                        Finding.package,
                        Finding.version,
                        Finding.file,
                        Finding.line,
                    ).where(Finding.build_id == build_id)
                )
                seen = {tuple(identity) for identity in identities}
                new = []
                for finding in findings:
                    if finding.identity not in seen:
                        seen.add(finding.identity)
                        new.append(finding)
            if new:
                session.execute(
                    sa.insert(Finding),
                    [
                        {
                            "build_id": build_id,
                            "source": source,
                            "found_at": found_at,
                            **dataclasses.asdict(finding),
                        }
                        for finding in new
                    ],
                )
            _touch_build(session, build_id)
            return new

    def record_deployment(self, repository: str, deployment: DeploymentRecord) -> int:
        """Add the deployment attempt and return its id; creates the repository if needed."""
        if deployment.status not in DEPLOYMENT_STATUSES:
            raise ValueError(
                f"unknown deployment status {deployment.status!r}; "
                f"expected one of {DEPLOYMENT_STATUSES}"
            )
        with self._writing() as session:
            repository_id = _upsert(session, Repository, {"name": repository}, {}).id
            row = Deployment(repository_id=repository_id, **dataclasses.asdict(deployment))
            session.add(row)
            session.flush()
            return row.id

    def open_incident(
        self,
        repository: str,
        environment: str,
        commit_sha: str | None,
        reason: str,
        *,
        at: datetime,
    ) -> int:
        """Open an incident of the environment at `at` and return its id.

        Idempotent: while one is open, its id is returned and nothing else is written.
        """
        with self._writing() as session:
            repository_id = _lock_repository(session, repository)
            open_id = session.scalar(
                sa.select(Incident.id)
                .where(*_open_incident(repository_id, environment))
                .order_by(Incident.opened_at.desc(), Incident.id.desc())
                .limit(1)
            )
            if open_id is not None:
                return open_id
            row = Incident(
                repository_id=repository_id,
                environment=environment,
                commit_sha=commit_sha,
                opened_at=at,
                reason=reason,
            )
            session.add(row)
            session.flush()
            return row.id

    def close_incident(self, repository: str, environment: str, *, at: datetime) -> bool:
        """Close the environment's open incident at `at`; False if none was open."""
        if at.tzinfo is None:
            raise ValueError(f"naive datetime {at.isoformat()}: pass a timezone-aware one")
        with self._writing() as session:
            repository_id = session.scalar(
                sa.select(Repository.id).where(Repository.name == repository).with_for_update()
            )
            if repository_id is None:
                return False
            incidents = session.scalars(
                sa.select(Incident).where(*_open_incident(repository_id, environment))
            ).all()
            for incident in incidents:
                if at < incident.opened_at:
                    raise ValueError(
                        f"closing at {at.isoformat()}, before the incident opened at "
                        f"{incident.opened_at.isoformat()}"
                    )
                incident.closed_at = at
            return bool(incidents)

    def record_event(
        self,
        repository: str,
        kind: str,
        message: str,
        *,
        environment: str | None = None,
        commit_sha: str | None = None,
        at: datetime | None = None,
        once: bool = False,
    ) -> int:
        """Add an event for notification channels to deliver and return its id. With
        `once`, an event of this kind, environment and commit is added only the first time;
        later calls return the first one's id."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {EVENT_KINDS}")
        with self._writing() as session:
            # Locked so that concurrent `once` callers take turns (PostgreSQL).
            repository_id = _lock_repository(session, repository)
            if once:
                first = session.scalar(
                    sa.select(Event.id)
                    .where(
                        Event.repository_id == repository_id,
                        Event.kind == kind,
                        Event.environment.is_not_distinct_from(environment),
                        Event.commit_sha.is_not_distinct_from(commit_sha),
                    )
                    .order_by(Event.id)
                    .limit(1)
                )
                if first is not None:
                    return first
            row = Event(
                repository_id=repository_id,
                kind=kind,
                environment=environment,
                commit_sha=commit_sha,
                at=at or datetime.now(UTC),
                message=message,
            )
            session.add(row)
            session.flush()
            return row.id

    def record_probes(self, repository: str, probes: Sequence[ProbeRecord]) -> None:
        with self._writing() as session:
            repository_id = _upsert(session, Repository, {"name": repository}, {}).id
            session.add_all(
                HealthProbe(repository_id=repository_id, **dataclasses.asdict(probe))
                for probe in probes
            )

    # -- queries -----------------------------------------------------------------------------

    def events(
        self,
        repository: str | None = None,
        kind: str | None = None,
        since: datetime | None = None,
    ) -> pd.DataFrame:
        """One row per event, oldest first (the order they are delivered in)."""
        statement = (
            sa.select(
                Event.id,
                Repository.name.label("repository"),
                Event.kind,
                Event.environment,
                Event.commit_sha.label("commit"),
                Event.at,
                Event.message,
            )
            .select_from(Event)
            .join(Repository)
            .order_by(Event.at, Event.id)
        )
        if repository is not None:
            statement = statement.where(Repository.name == repository)
        if kind is not None:
            statement = statement.where(Event.kind == kind)
        if since is not None:
            statement = statement.where(Event.at >= since)
        return self._read(statement)

    def probes(
        self,
        repository: str | None = None,
        environment: str | None = None,
        since: datetime | None = None,
    ) -> pd.DataFrame:
        """One row per health probe, newest first."""
        statement = (
            sa.select(
                Repository.name.label("repository"),
                HealthProbe.environment,
                HealthProbe.commit_sha.label("commit"),
                HealthProbe.at,
                HealthProbe.ok,
                HealthProbe.status_code,
                HealthProbe.latency_ms,
                HealthProbe.error,
            )
            .select_from(HealthProbe)
            .join(Repository)
            .order_by(HealthProbe.at.desc(), HealthProbe.id.desc())
        )
        if repository is not None:
            statement = statement.where(Repository.name == repository)
        if environment is not None:
            statement = statement.where(HealthProbe.environment == environment)
        if since is not None:
            statement = statement.where(HealthProbe.at >= since)
        return self._read(statement)

    def findings(
        self,
        repository: str | None = None,
        commit: str | None = None,
        since: datetime | None = None,
        kind: str | None = None,
        source: str | None = None,
    ) -> pd.DataFrame:
        """One row per finding, newest build first, then the most severe first.

        `commit` is a sha or a prefix of one; `since` keeps the findings found at or after it.
        """
        statement = (
            sa.select(
                Repository.name.label("repository"),
                Build.commit_sha.label("commit"),
                Build.branch,
                Finding.source,
                Finding.kind,
                Finding.tool,
                Finding.rule,
                Finding.severity,
                Finding.message,
                Finding.file,
                Finding.line,
                Finding.package,
                Finding.version,
                Finding.suppressed,
                Finding.suppression_reason,
                Finding.found_at,
            )
            .select_from(Finding)
            .join(Build)
            .join(Repository)
            .order_by(
                Build.created_at.desc(),
                Build.id.desc(),
                _severity_order(Finding.severity),
                Finding.id,
            )
        )
        if repository is not None:
            statement = statement.where(Repository.name == repository)
        if commit is not None:
            statement = statement.where(Build.commit_sha.startswith(commit, autoescape=True))
        if since is not None:
            statement = statement.where(Finding.found_at >= since)
        if kind is not None:
            statement = statement.where(Finding.kind == kind)
        if source is not None:
            statement = statement.where(Finding.source == source)
        return self._read(statement)

    def artifacts(
        self, repository: str | None = None, since: datetime | None = None
    ) -> pd.DataFrame:
        """One row per recorded artifact, newest first; `since` keeps those recorded at or
        after it."""
        statement = (
            sa.select(
                Repository.name.label("repository"),
                Build.commit_sha.label("commit"),
                Build.branch,
                Artifact.path,
                Artifact.sha256,
                Artifact.size_bytes,
                Artifact.recorded_at,
            )
            .select_from(Artifact)
            .join(Build)
            .join(Repository)
            .order_by(Artifact.recorded_at.desc(), Build.id.desc(), Artifact.path)
        )
        if repository is not None:
            statement = statement.where(Repository.name == repository)
        if since is not None:
            statement = statement.where(Artifact.recorded_at >= since)
        return self._read(statement)

    def stage_rows(self, repository: str, commit_sha: str) -> pd.DataFrame:
        """One row per recorded stage of the build, in pipeline order."""
        columns = [
            column for column in sa.inspect(Stage).columns if column.key not in ("id", "build_id")
        ]
        return self._read(
            sa.select(*columns)
            .join(Build)
            .join(Repository)
            .where(Repository.name == repository, Build.commit_sha == commit_sha)
            .order_by(_stage_order(Stage.name))
        )

    def gate_rows(self, repository: str, commit_sha: str) -> pd.DataFrame:
        """One row per gate of the build: stage, name, passed, value, threshold, detail."""
        return self._read(
            sa.select(
                GateResult.stage,
                GateResult.name,
                GateResult.passed,
                GateResult.value,
                GateResult.threshold,
                GateResult.detail,
            )
            .join(Build)
            .join(Repository)
            .where(Repository.name == repository, Build.commit_sha == commit_sha)
            .order_by(_stage_order(GateResult.stage), GateResult.name)
        )

    def builds(
        self,
        repository: str | None = None,
        since: datetime | None = None,
        branch: str | None = None,
    ) -> pd.DataFrame:
        """One row per build, newest first, with its status, duration and test counts.

        status: "failed" if a CI stage or gate failed (QA is not CI), else "success" once
        source and build succeeded, else "running". Counts add up the test stages; pass_rate is
        passed / (passed + failed + errors), NaN when nothing ran. `since` keeps the builds
        created at or after it.
        """
        totals = _stage_totals(repository, since, branch)
        counts = {name: sa.func.coalesce(totals.c[name], 0) for name in _COUNTS}
        executed = counts["passed"] + counts["failed"] + counts["errors"]
        failed_gate = sa.exists().where(
            GateResult.build_id == Build.id,
            GateResult.stage.not_in(PROMOTION_STAGES),
            sa.not_(GateResult.passed),
        )
        status = sa.case(
            (sa.or_(totals.c.failed_stages > 0, failed_gate), "failed"),
            (totals.c.green_prerequisites == 2, "success"),
            else_="running",
        )
        statement = (
            sa.select(
                Repository.name.label("repository"),
                Build.commit_sha.label("commit"),
                Build.ref,
                Build.branch,
                status.label("status"),
                Build.created_at,
                sa.func.coalesce(totals.c.duration_s, 0.0).label("duration_s"),
                *[total.label(name) for name, total in counts.items()],
                (
                    sa.cast(counts["passed"], sa.Double)
                    / sa.func.nullif(sa.cast(executed, sa.Double), 0)
                ).label("pass_rate"),
                Build.run_id,
            )
            .select_from(Build)
            .join(Repository)
            .outerjoin(totals, totals.c.build_id == Build.id)
            .order_by(Build.created_at.desc(), Build.id.desc())
        )
        return self._read(_filter_builds(statement, repository, since, branch))

    def tests(
        self,
        repository: str | None = None,
        since: datetime | None = None,
        branch: str | None = None,
        stage: str | None = None,
    ) -> pd.DataFrame:
        """One row per test case per build, newest build first."""
        statement = (
            sa.select(
                Repository.name.label("repository"),
                Build.commit_sha.label("commit"),
                Build.branch,
                Build.created_at,
                Stage.name.label("stage"),
                TestCase.suite,
                TestCase.classname,
                TestCase.name,
                TestCase.duration_s,
                TestCase.status,
                TestCase.message,
                TestCase.flaky,
            )
            .select_from(TestCase)
            .join(Stage)
            .join(Build)
            .join(Repository)
            .order_by(
                Build.created_at.desc(), Build.id.desc(), _stage_order(Stage.name), TestCase.id
            )
        )
        if stage is not None:
            statement = statement.where(Stage.name == stage)
        return self._read(_filter_builds(statement, repository, since, branch))

    def last_green_benchmarks(
        self, repository: str, branch: str, *, before_sha: str | None = None
    ) -> pd.DataFrame | None:
        """The benchmarks of the newest build on `branch` (other than `before_sha`) whose
        performance stage succeeded and passed all its gates; None if there is none."""
        failed_gate = sa.exists().where(
            GateResult.build_id == Build.id,
            GateResult.stage == "performance",
            sa.not_(GateResult.passed),
        )
        green_stage = (
            sa.select(Stage.id)
            .join(Build)
            .join(Repository)
            .where(
                Repository.name == repository,
                Build.branch == branch,
                Stage.name == "performance",
                Stage.status == "success",
                ~failed_gate,
            )
            .order_by(Build.created_at.desc(), Build.id.desc())
            .limit(1)
        )
        if before_sha is not None:
            green_stage = green_stage.where(Build.commit_sha != before_sha)
        with self._engine.connect() as connection:
            stage_id = connection.scalar(green_stage)
        if stage_id is None:
            return None
        columns = [
            column
            for column in sa.inspect(Benchmark).columns
            if column.key not in ("id", "stage_id")
        ]
        return self._read(
            sa.select(*columns).where(Benchmark.stage_id == stage_id).order_by(Benchmark.id)
        )

    def deployments(
        self,
        repository: str | None = None,
        environment: str | None = None,
        since: datetime | None = None,
    ) -> pd.DataFrame:
        """One row per deployment attempt, newest first; `since` keeps those started at or
        after it."""
        statement = _deployments_query(repository, environment)
        if since is not None:
            statement = statement.where(Deployment.started_at >= since)
        return self._read(statement)

    def last_verified_deployment(self, repository: str, environment: str) -> pd.Series | None:
        """The newest "deployed" deployment of the environment (a row of deployments()), or
        None if none was ever verified."""
        statement = _deployments_query(repository, environment)
        frame = self._read(statement.where(Deployment.status == "deployed").limit(1))
        return None if frame.empty else frame.iloc[0]

    def incidents(
        self, repository: str | None = None, environment: str | None = None
    ) -> pd.DataFrame:
        """One row per incident, newest first; duration_s is NaN while it is open."""
        statement = (
            sa.select(
                Repository.name.label("repository"),
                Incident.environment,
                Incident.commit_sha.label("commit"),
                Incident.opened_at,
                Incident.closed_at,
                Incident.reason,
            )
            .select_from(Incident)
            .join(Repository)
            .order_by(Incident.opened_at.desc(), Incident.id.desc())
        )
        if repository is not None:
            statement = statement.where(Repository.name == repository)
        if environment is not None:
            statement = statement.where(Incident.environment == environment)
        frame = self._read(statement)
        duration = (frame["closed_at"] - frame["opened_at"]).dt.total_seconds()
        frame["duration_s"] = duration.astype(float)
        columns = ["repository", "environment", "commit", "opened_at", "closed_at", "duration_s"]
        return frame[[*columns, "reason"]]

    # --- reports and housekeeping ---

    def gate_results(
        self, repository: str | None = None, since: datetime | None = None
    ) -> pd.DataFrame:
        """One row per gate evaluated, newest build first: the build's repository, commit,
        branch and created_at, then stage, name, passed, value, threshold, detail. `since`
        keeps the builds created at or after it."""
        statement = (
            sa.select(
                Repository.name.label("repository"),
                Build.commit_sha.label("commit"),
                Build.branch,
                Build.created_at,
                GateResult.stage,
                GateResult.name,
                GateResult.passed,
                GateResult.value,
                GateResult.threshold,
                GateResult.detail,
            )
            .select_from(GateResult)
            .join(Build)
            .join(Repository)
            .order_by(
                Build.created_at.desc(),
                Build.id.desc(),
                _stage_order(GateResult.stage),
                GateResult.name,
            )
        )
        return self._read(_filter_builds(statement, repository, since, None))

    @property
    def dialect(self) -> str:
        """ "sqlite" or "postgresql"."""
        return self._engine.dialect.name

    def size_bytes(self) -> int:
        """The size of the database: SQLite's pages, or PostgreSQL's pg_database_size."""
        with self._engine.connect() as connection:
            if connection.dialect.name == "postgresql":
                size = connection.scalar(sa.text("SELECT pg_database_size(current_database())"))
            else:
                page_size = connection.exec_driver_sql("PRAGMA page_size").scalar_one()
                size = connection.exec_driver_sql("PRAGMA page_count").scalar_one() * page_size
        return int(size)

    def vacuum(self) -> None:
        """Reclaim free space and refresh the planner's statistics: VACUUM and ANALYZE (on
        PostgreSQL VACUUM (ANALYZE) of this schema's tables), which must run outside a
        transaction. SQLite rewrites the whole file and waits for other writers."""
        with self._engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            if connection.dialect.name == "postgresql":
                preparer = connection.dialect.identifier_preparer
                tables = ", ".join(preparer.format_table(t) for t in Base.metadata.sorted_tables)
                connection.exec_driver_sql(f"VACUUM (ANALYZE) {tables}")
            else:
                connection.exec_driver_sql("ANALYZE")  # first, so VACUUM packs its stats too
                connection.exec_driver_sql("VACUUM")
                # The rewritten pages go through the WAL; copy them back and shrink it.
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                # Back in the pool, the driver would no longer be left in autocommit as
                # _configure_sqlite set it up: a fresh connection is.
                connection.invalidate()

    # --- access control and approvals ---

    def save_user(
        self, name: str, *, roles: Sequence[str] | None, email: str | None, at: datetime
    ) -> UserRecord:
        """Create the user, or update it: its roles and email where given (None keeps
        them). A removed user is restored; its old tokens stay revoked."""
        with self._writing() as session:
            values: dict[str, Any] = {"removed_at": None}
            if roles is not None:
                values["roles"] = sorted(set(roles))
            if email is not None:
                values["email"] = email
            defaults = {"created_at": at, "roles": [], "email": None}
            on_insert = {key: value for key, value in defaults.items() if key not in values}
            row = _upsert(session, User, {"name": name}, values, on_insert=on_insert)
            return _user_record(row)

    def add_token(
        self, user: str, token_sha256: str, *, at: datetime, revoke_others: bool = False
    ) -> None:
        """Give the user a token (by its sha256); LookupError for an unknown or removed
        user. `revoke_others` revokes the tokens it had."""
        with self._writing() as session:
            user_id = session.scalar(
                sa.select(User.id).where(User.name == user, User.removed_at.is_(None))
            )
            if user_id is None:
                raise LookupError(f"no user {user!r}: add it first")
            if revoke_others:
                session.execute(
                    sa.update(ApiToken)
                    .where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))
                    .values(revoked_at=at)
                )
            session.add(ApiToken(user_id=user_id, token_sha256=token_sha256, created_at=at))

    def remove_user(self, name: str, *, at: datetime) -> bool:
        """Mark the user removed and revoke its tokens; False if there is no such user
        (or it was removed before). Its approvals stay, as history."""
        with self._writing() as session:
            row = session.scalars(
                sa.select(User).where(User.name == name, User.removed_at.is_(None))
            ).one_or_none()
            if row is None:
                return False
            row.removed_at = at
            session.execute(
                sa.update(ApiToken)
                .where(ApiToken.user_id == row.id, ApiToken.revoked_at.is_(None))
                .values(revoked_at=at)
            )
            return True

    def user(self, name: str) -> UserRecord | None:
        with Session(self._engine) as session:
            row = session.scalars(sa.select(User).where(User.name == name)).one_or_none()
            return None if row is None else _user_record(row)

    def users(self, *, include_removed: bool = False) -> pd.DataFrame:
        """One row per user, by name: name, email, roles (the DB's), created_at,
        removed_at, tokens (how many are active), last_used_at (of any token)."""
        active = sa.case((ApiToken.revoked_at.is_(None), 1), else_=0)
        statement = (
            sa.select(
                User.name,
                User.email,
                User.roles,
                User.created_at,
                User.removed_at,
                sa.func.coalesce(sa.func.sum(active), 0).label("tokens"),
                sa.func.max(ApiToken.last_used_at).label("last_used_at"),
            )
            .select_from(User)
            .outerjoin(ApiToken)
            .group_by(User.id)
            .order_by(User.name)
        )
        if not include_removed:
            statement = statement.where(User.removed_at.is_(None))
        return self._read(statement)

    def token_owner(self, token_sha256: str, *, used_at: datetime) -> TokenOwner | None:
        """The owner of the token with this sha256, or None. The token's last_used_at
        becomes `used_at` when it counts (not revoked, its user not removed)."""
        with self._writing() as session:
            found = session.execute(
                sa.select(ApiToken, User).join(User).where(ApiToken.token_sha256 == token_sha256)
            ).one_or_none()
            if found is None:
                return None
            token, user = found
            if token.revoked_at is None and user.removed_at is None:
                token.last_used_at = used_at
            return TokenOwner(_user_record(user), token.revoked_at)

    def record_approval(
        self,
        repository: str,
        environment: str,
        commit_sha: str,
        *,
        user: str | None,
        decision: str,
        reason: str,
        at: datetime,
    ) -> bool:
        """Add an approval or a refused attempt; False (nothing added) for an approval by
        a user who approved this commit for this environment already."""
        if decision not in APPROVAL_DECISIONS:
            raise ValueError(f"unknown decision {decision!r}; expected one of {APPROVAL_DECISIONS}")
        with self._writing() as session:
            # Locked so that the same user's concurrent approvals take turns (PostgreSQL).
            repository_id = _lock_repository(session, repository)
            if decision == "approved":
                earlier = session.scalar(
                    sa.select(Approval.id).where(
                        Approval.repository_id == repository_id,
                        Approval.environment == environment,
                        Approval.commit_sha == commit_sha,
                        Approval.user_name == user,
                        Approval.decision == "approved",
                    )
                )
                if earlier is not None:
                    return False
            session.add(
                Approval(
                    repository_id=repository_id,
                    environment=environment,
                    commit_sha=commit_sha,
                    user_name=user,
                    decision=decision,
                    reason=reason,
                    at=at,
                )
            )
            return True

    def approvals(
        self,
        repository: str | None = None,
        environment: str | None = None,
        commit: str | None = None,
    ) -> pd.DataFrame:
        """One row per approval or refused attempt, oldest first: repository, environment,
        commit, user, decision, reason, at."""
        statement = (
            sa.select(
                Repository.name.label("repository"),
                Approval.environment,
                Approval.commit_sha.label("commit"),
                Approval.user_name.label("user"),
                Approval.decision,
                Approval.reason,
                Approval.at,
            )
            .select_from(Approval)
            .join(Repository)
            .order_by(Approval.at, Approval.id)
        )
        if repository is not None:
            statement = statement.where(Repository.name == repository)
        if environment is not None:
            statement = statement.where(Approval.environment == environment)
        if commit is not None:
            statement = statement.where(Approval.commit_sha == commit)
        return self._read(statement)

    # --- notifications ---

    def enqueue_deliveries(
        self,
        channel: str,
        kinds: Sequence[str],
        *,
        not_before: datetime,
        new_channel_since: datetime,
    ) -> int:
        """Add a pending delivery to `channel` for each event of `kinds` it has none for yet,
        and return how many were added. Idempotent, and safe to run concurrently.

        Events before `not_before` are never added. A channel starts where its first
        delivery is: a channel without any gets the events since `new_channel_since`, or, if
        there are none, a "skipped" delivery of the newest event marks where it starts, so
        that a new channel is not sent the whole history.
        """
        unknown = sorted(set(kinds) - set(EVENT_KINDS))
        if unknown:
            raise ValueError(f"unknown event kinds {unknown}; expected some of {EVENT_KINDS}")
        with self._writing() as session:
            start = session.scalar(
                sa.select(sa.func.min(Delivery.event_id)).where(Delivery.channel == channel)
            )
            known = sa.exists().where(Delivery.event_id == Event.id, Delivery.channel == channel)
            statement = (
                sa.select(Event.id)
                .where(Event.kind.in_(kinds), Event.at >= not_before, ~known)
                .order_by(Event.id)
            )
            if start is None:
                statement = statement.where(Event.at >= new_channel_since)
            else:
                statement = statement.where(Event.id > start)
            event_ids = list(session.scalars(statement))
            rows = [
                {"event_id": event_id, "channel": channel, "status": "pending", "attempts": 0}
                for event_id in event_ids
            ]
            if start is None and not rows:
                newest = session.scalar(sa.select(sa.func.max(Event.id)))
                if newest is not None:
                    marker = {"event_id": newest, "channel": channel, "status": "skipped"}
                    _insert_new(session, Delivery, [{**marker, "attempts": 0}])
            return _insert_new(session, Delivery, rows)

    def claim_delivery(
        self, channel: str, *, now: datetime, lease_until: datetime
    ) -> ClaimedDelivery | None:
        """The oldest pending delivery to `channel` due at `now`, claimed: its attempt is
        counted and its next attempt moved to `lease_until`, so that concurrent delivery runs
        pass it by (and retry it after the lease if this run dies). None if none is due."""
        if lease_until <= now:
            raise ValueError("lease_until must be after now")
        with self._writing() as session:
            found = session.execute(
                sa.select(Delivery, Event, Repository.name)
                .join(Event, Delivery.event_id == Event.id)
                .join(Repository, Event.repository_id == Repository.id)
                .where(
                    Delivery.channel == channel,
                    Delivery.status == "pending",
                    sa.or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
                )
                .order_by(Event.at, Event.id)
                .limit(1)
                # PostgreSQL: a concurrent run takes the next row rather than this one.
                .with_for_update(of=Delivery, skip_locked=True)
            ).first()
            if found is None:
                return None
            delivery, event, repository = found
            delivery.attempts += 1
            delivery.next_attempt_at = lease_until
            return ClaimedDelivery(
                id=delivery.id,
                channel=channel,
                attempts=delivery.attempts,
                event=EventRecord(
                    id=event.id,
                    repository=repository,
                    kind=event.kind,
                    environment=event.environment,
                    commit_sha=event.commit_sha,
                    at=event.at,
                    message=event.message,
                ),
            )

    def mark_delivered(self, delivery_id: int, *, at: datetime) -> None:
        with self._writing() as session:
            session.execute(
                sa.update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(status="sent", delivered_at=at, next_attempt_at=None, last_error=None)
            )

    def mark_delivery_failed(
        self, delivery_id: int, error: str, *, retry_at: datetime | None
    ) -> None:
        """Record a failed attempt: pending again at `retry_at`, or failed for good if None."""
        with self._writing() as session:
            session.execute(
                sa.update(Delivery)
                .where(Delivery.id == delivery_id)
                .values(
                    status="pending" if retry_at is not None else "failed",
                    next_attempt_at=retry_at,
                    last_error=error,
                )
            )

    def deliveries(
        self,
        repository: str | None = None,
        channel: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
    ) -> pd.DataFrame:
        """One row per delivery of an event to a channel, newest event first; `since` keeps
        the events at or after it. The "skipped" start markers only when asked for."""
        if status is not None and status not in DELIVERY_STATUSES:
            raise ValueError(f"unknown delivery status {status!r}; expected {DELIVERY_STATUSES}")
        statement = (
            sa.select(
                Delivery.event_id,
                Repository.name.label("repository"),
                Event.kind,
                Event.environment,
                Event.commit_sha.label("commit"),
                Event.at,
                Delivery.channel,
                Delivery.status,
                Delivery.attempts,
                Delivery.last_error,
                Delivery.next_attempt_at,
                Delivery.delivered_at,
            )
            .select_from(Delivery)
            .join(Event, Delivery.event_id == Event.id)
            .join(Repository, Event.repository_id == Repository.id)
            .where(
                Delivery.status == status if status is not None else Delivery.status != "skipped"
            )
            .order_by(Event.at.desc(), Event.id.desc(), Delivery.channel)
        )
        if repository is not None:
            statement = statement.where(Repository.name == repository)
        if channel is not None:
            statement = statement.where(Delivery.channel == channel)
        if since is not None:
            statement = statement.where(Event.at >= since)
        return self._read(statement)

    # --- releases ---

    def record_release(self, repository: str, release: ReleaseRecord) -> int:
        """Add the release and return its id; ValueError if the version exists already."""
        with self._writing() as session:
            repository_id = _upsert(session, Repository, {"name": repository}, {}).id
            row = Release(repository_id=repository_id, **dataclasses.asdict(release))
            try:
                with session.begin_nested():
                    session.add(row)
            except IntegrityError as error:
                raise ValueError(f"{repository} {release.version} is released already") from error
            return row.id

    def set_release_report(self, repository: str, version: str, report_path: str) -> None:
        """Link the release's HTML report (written once its row exists); LookupError if
        there is no such release."""
        with self._writing() as session:
            row = session.scalars(
                sa.select(Release)
                .join(Repository)
                .where(Repository.name == repository, Release.version == version)
            ).one_or_none()
            if row is None:
                raise LookupError(f"{repository} has no release {version!r}")
            row.report_path = report_path

    def releases(
        self,
        repository: str | None = None,
        commit: str | None = None,
        since: datetime | None = None,
    ) -> pd.DataFrame:
        """One row per release, newest first; `commit` keeps the releases of that commit,
        `since` those created at or after it."""
        statement = (
            sa.select(
                Repository.name.label("repository"),
                Release.version,
                Release.tag,
                Release.commit_sha.label("commit"),
                Release.previous_version,
                Release.bump,
                Release.prerelease,
                Release.commit_count,
                Release.created_at,
                Release.created_by,
                Release.run_id,
                Release.notes_path,
                Release.report_path,
                Release.changelog,
            )
            .select_from(Release)
            .join(Repository)
            .order_by(Release.created_at.desc(), Release.id.desc())
        )
        if repository is not None:
            statement = statement.where(Repository.name == repository)
        if commit is not None:
            statement = statement.where(Release.commit_sha == commit)
        if since is not None:
            statement = statement.where(Release.created_at >= since)
        return self._read(statement)

    # --- analytics: performance ---

    def stage_durations(
        self, repository: str | None = None, since: datetime | None = None
    ) -> pd.DataFrame:
        """One row per stage of every build created at or after `since`, oldest build
        first: repository, commit, branch, created_at (of the build), stage, status,
        started_at, duration_s, reused."""
        statement = (
            sa.select(
                Repository.name.label("repository"),
                Build.commit_sha.label("commit"),
                Build.branch,
                Build.created_at,
                Stage.name.label("stage"),
                Stage.status,
                Stage.started_at,
                Stage.duration_s,
                Stage.reused,
            )
            .select_from(Stage)
            .join(Build)
            .join(Repository)
            .order_by(Build.created_at, Build.id, _stage_order(Stage.name))
        )
        return self._read(_filter_builds(statement, repository, since, None))

    def test_durations(
        self, repository: str | None, since: datetime, until: datetime
    ) -> pd.DataFrame:
        """Per test timed in the builds created in [since, until): repository, stage,
        classname, name, runs (with a duration), mean_s. Added up here rather than in
        pandas: a month of every repository is hundreds of thousands of test cases."""
        statement = (
            sa.select(
                Repository.name.label("repository"),
                Stage.name.label("stage"),
                TestCase.classname,
                TestCase.name,
                sa.func.count(TestCase.duration_s).label("runs"),
                sa.func.avg(TestCase.duration_s).label("mean_s"),
            )
            .select_from(TestCase)
            .join(Stage)
            .join(Build)
            .join(Repository)
            .where(TestCase.duration_s.is_not(None), Build.created_at < until)
            .group_by(Repository.name, Stage.name, TestCase.classname, TestCase.name)
        )
        return self._read(_filter_builds(statement, repository, since, None))

    def benchmark_history(
        self, repository: str | None = None, since: datetime | None = None
    ) -> pd.DataFrame:
        """One row per benchmark of every build created at or after `since`, oldest first:
        repository, commit, branch, created_at, name, fullname, mean_s, median_s,
        baseline_mean_s, regression and the build's max_perf_regression threshold (NaN
        without one)."""
        threshold = (
            sa.select(GateResult.build_id, GateResult.threshold)
            .where(GateResult.stage == "performance", GateResult.name == "max_perf_regression")
            .subquery()
        )
        statement = (
            sa.select(
                Repository.name.label("repository"),
                Build.commit_sha.label("commit"),
                Build.branch,
                Build.created_at,
                Benchmark.name,
                Benchmark.fullname,
                Benchmark.mean_s,
                Benchmark.median_s,
                Benchmark.baseline_mean_s,
                Benchmark.regression,
                threshold.c.threshold,
            )
            .select_from(Benchmark)
            .join(Stage)
            .join(Build)
            .join(Repository)
            .outerjoin(threshold, threshold.c.build_id == Build.id)
            .order_by(Build.created_at, Build.id, Benchmark.id)
        )
        return self._read(_filter_builds(statement, repository, since, None))

    # --- analytics: flaky tests ---

    def test_outcomes(
        self,
        repository: str | None = None,
        since: datetime | None = None,
        *,
        commit_sha: str | None = None,
        stage: str | None = None,
    ) -> pd.DataFrame:
        """One row per recorded test case (no messages), oldest stage run first: repository,
        commit, stage, started_at (of the stage's last run), classname, name, status, flaky.
        `since` keeps the stage runs started at or after it."""
        statement = (
            sa.select(
                Repository.name.label("repository"),
                Build.commit_sha.label("commit"),
                Stage.name.label("stage"),
                Stage.started_at,
                TestCase.classname,
                TestCase.name,
                TestCase.status,
                TestCase.flaky,
            )
            .select_from(TestCase)
            .join(Stage)
            .join(Build)
            .join(Repository)
            .order_by(Stage.started_at, Stage.id, TestCase.id)
        )
        if repository is not None:
            statement = statement.where(Repository.name == repository)
        if since is not None:
            statement = statement.where(Stage.started_at >= since)
        if commit_sha is not None:
            statement = statement.where(Build.commit_sha == commit_sha)
        if stage is not None:
            statement = statement.where(Stage.name == stage)
        return self._read(statement)

    # --- analytics: dora ---

    def import_events(self, events: Sequence[ExternalEventRecord], *, at: datetime) -> ImportResult:
        """Store the events not stored yet, keyed by (repository, source id): importing the
        same events again changes nothing."""
        result = ImportResult([], [], [])
        with self._writing() as session:
            for event in events:
                if event.type not in EXTERNAL_EVENT_TYPES:
                    raise ValueError(
                        f"event type {event.type!r}: expected one of {EXTERNAL_EVENT_TYPES}"
                    )
                repository_id = _upsert(session, Repository, {"name": event.repository}, {}).id
                row = {
                    "type": event.type,
                    "time": event.time,
                    "sha": event.sha,
                    "changes": list(event.changes),
                    "root_cause": event.root_cause,
                    "resolved_at": event.resolved_at,
                }
                stored = session.scalar(
                    sa.select(ExternalEvent).where(
                        ExternalEvent.repository_id == repository_id,
                        ExternalEvent.source_id == event.source_id,
                    )
                )
                if stored is None:
                    key = {"repository_id": repository_id, "source_id": event.source_id}
                    _insert_new(session, ExternalEvent, [{**key, **row, "imported_at": at}])
                    result.imported.append(event.source_id)
                elif all(getattr(stored, column) == value for column, value in row.items()):
                    result.unchanged.append(event.source_id)
                else:
                    result.conflicting.append(event.source_id)
        return result

    def external_events(self, repository: str | None = None) -> pd.DataFrame:
        """The imported events, oldest first: repository, id (the source's), type, time,
        sha, changes (a list), root_cause, resolved_at."""
        statement = (
            sa.select(
                Repository.name.label("repository"),
                ExternalEvent.source_id.label("id"),
                ExternalEvent.type,
                ExternalEvent.time,
                ExternalEvent.sha,
                ExternalEvent.changes,
                ExternalEvent.root_cause,
                ExternalEvent.resolved_at,
            )
            .select_from(ExternalEvent)
            .join(Repository)
            .order_by(ExternalEvent.time, ExternalEvent.id)
        )
        if repository is not None:
            statement = statement.where(Repository.name == repository)
        return self._read(statement)

    def verified_deployments(self, repository: str, environment: str) -> pd.DataFrame:
        """The environment's "deployed" deployments, oldest first: id, commit, started_at,
        finished_at."""
        statement = (
            sa.select(
                Deployment.id,
                Deployment.commit_sha.label("commit"),
                Deployment.started_at,
                Deployment.finished_at,
            )
            .join(Repository)
            .where(
                Repository.name == repository,
                Deployment.environment == environment,
                Deployment.status == "deployed",
            )
            .order_by(Deployment.started_at, Deployment.id)
        )
        return self._read(statement)

    def delivery_marker(self) -> str:
        """Changes whenever a deployment or incident is recorded, an incident closes or
        an event is imported: what the analytics sensor compares between ticks."""
        counts = [
            sa.select(sa.func.max(Deployment.id)).scalar_subquery(),
            sa.select(sa.func.max(Incident.id)).scalar_subquery(),
            sa.select(sa.func.count(Incident.closed_at)).scalar_subquery(),
            sa.select(sa.func.max(ExternalEvent.id)).scalar_subquery(),
        ]
        with self._engine.connect() as connection:
            row = connection.execute(sa.select(*counts)).one()
        return ":".join("-" if value is None else str(value) for value in row)

    # -- helpers -----------------------------------------------------------------------------

    @contextmanager
    def _writing(self) -> Iterator[Session]:
        """A session whose transaction commits on success and holds SQLite's write lock."""
        with self._engine.connect() as connection:
            connection.execution_options(**{_WRITES: True})
            with Session(connection) as session, session.begin():
                yield session

    def _replace_stage_rows(
        self,
        repository: str,
        commit_sha: str,
        stage: str,
        model: type[TestCase] | type[Benchmark],
        frame: pd.DataFrame,
    ) -> None:
        with self._writing() as session:
            build_id = _build_id(session, repository, commit_sha)
            stage_id = session.scalar(
                sa.select(Stage.id).where(Stage.build_id == build_id, Stage.name == stage)
            )
            if stage_id is None:
                raise LookupError(
                    f"no stage {stage!r} in the build of {repository}@{commit_sha}: "
                    "record_stage() first"
                )
            session.execute(sa.delete(model).where(model.stage_id == stage_id))
            rows = _insert_rows(frame, model, {"stage_id": stage_id})
            if rows:
                session.execute(sa.insert(model), rows)
            _touch_build(session, build_id)

    def _read(self, statement: sa.Select[*tuple[Any, ...]]) -> pd.DataFrame:
        with self._engine.connect() as connection:
            rows = connection.execute(statement).all()
        frame = pd.DataFrame.from_records(rows, columns=list(statement.selected_columns.keys()))
        for column in statement.selected_columns:
            if isinstance(column.type, UTCDateTime):
                frame[column.key] = pd.to_datetime(frame[column.key], utc=True)
            elif isinstance(column.type, sa.Integer | sa.Float):
                # NULLs make a column float64 with NaN, as pd.read_sql does, not object.
                frame[column.key] = pd.to_numeric(frame[column.key])
        return frame


def _configure_sqlite(engine: sa.Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy rather than sqlite3 emits BEGIN (below), so it can choose the lock mode.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL lets readers and one writer work at once; writers from other processes wait.
        cursor.execute(f"PRAGMA busy_timeout = {_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")  # for ON DELETE CASCADE
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        # A deferred transaction that reads and then writes fails at once with SQLITE_BUSY
        # if another process wrote in between; a writer therefore takes the lock up front.
        options = connection.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return  # VACUUM, for one, must run outside any transaction
        writes = options.get(_WRITES, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def _upsert(
    session: Session,
    model: type[_Model],
    key: dict[str, Any],
    values: dict[str, Any],
    *,
    on_insert: dict[str, Any] | None = None,
) -> _Model:
    """The row of `model` with `key`, inserted or updated with `values`.

    On PostgreSQL another transaction may insert the same key between our SELECT and INSERT;
    the INSERT then fails in its savepoint and the other's row is updated instead.
    """
    existing = sa.select(model).filter_by(**key)
    row = session.scalars(existing).one_or_none()
    if row is None:
        try:
            with session.begin_nested():
                row = model(**key, **values, **(on_insert or {}))
                session.add(row)
            return row
        except IntegrityError:
            row = session.scalars(existing).one_or_none()
            if row is None:
                raise
    for name, value in values.items():
        setattr(row, name, value)
    session.flush()
    return row


def _user_record(row: User) -> UserRecord:
    return UserRecord(
        name=row.name,
        email=row.email,
        roles=list(row.roles),
        created_at=row.created_at,
        removed_at=row.removed_at,
    )


def _insert_new(session: Session, model: type[Base], rows: list[dict[str, Any]]) -> int:
    """Insert the rows that violate no unique constraint (a concurrent writer may have added
    the others) and return how many were inserted."""
    inserted = 0
    for row in rows:
        try:
            with session.begin_nested():
                session.execute(sa.insert(model), [row])
            inserted += 1
        except IntegrityError:
            pass
    return inserted


def _lock_repository(session: Session, repository: str) -> int:
    """The repository's id, created if missing, its row locked until the transaction ends.

    SQLite's write lock already serialises writers; on PostgreSQL the row lock makes
    concurrent incident writes of one repository take turns.
    """
    repository_id = _upsert(session, Repository, {"name": repository}, {}).id
    session.execute(
        sa.select(Repository.id).where(Repository.id == repository_id).with_for_update()
    )
    return repository_id


def _open_incident(repository_id: int, environment: str) -> tuple[sa.ColumnElement[bool], ...]:
    return (
        Incident.repository_id == repository_id,
        Incident.environment == environment,
        Incident.closed_at.is_(None),
    )


def _deployments_query(
    repository: str | None, environment: str | None
) -> sa.Select[*tuple[Any, ...]]:
    statement = (
        sa.select(
            Repository.name.label("repository"),
            Deployment.environment,
            Deployment.commit_sha.label("commit"),
            Deployment.version,
            Deployment.previous_version,
            Deployment.strategy,
            Deployment.status,
            Deployment.reason,
            Deployment.started_at,
            Deployment.finished_at,
            Deployment.duration_s,
            Deployment.rollback_s,
            Deployment.run_id,
            Deployment.triggered_by,
            Deployment.config_digest,
        )
        .select_from(Deployment)
        .join(Repository)
        .order_by(Deployment.started_at.desc(), Deployment.id.desc())
    )
    if repository is not None:
        statement = statement.where(Repository.name == repository)
    if environment is not None:
        statement = statement.where(Deployment.environment == environment)
    return statement


def _build_id(
    session: Session, repository: str, commit_sha: str, *, for_update: bool = False
) -> int:
    statement = (
        sa.select(Build.id)
        .join(Repository)
        .where(Repository.name == repository, Build.commit_sha == commit_sha)
    )
    if for_update:
        statement = statement.with_for_update(of=Build)
    build_id = session.scalar(statement)
    if build_id is None:
        raise LookupError(f"no build of {repository}@{commit_sha}: record_build() first")
    return build_id


def _check_finding(finding: FindingRecord) -> None:
    if finding.kind not in FINDING_KINDS:
        raise ValueError(f"unknown finding kind {finding.kind!r}; expected one of {FINDING_KINDS}")
    if finding.severity not in FINDING_SEVERITIES:
        raise ValueError(
            f"unknown finding severity {finding.severity!r}; expected one of {FINDING_SEVERITIES}"
        )


def _touch_build(session: Session, build_id: int) -> None:
    session.execute(
        sa.update(Build).where(Build.id == build_id).values(updated_at=datetime.now(UTC))
    )


def _insert_rows(
    frame: pd.DataFrame, model: type[Base], fixed: dict[str, Any]
) -> list[dict[str, Any]]:
    """Executemany parameters for `model` from the frame's columns of the same names.

    Nullable columns may be missing; NaN and NA become NULL, numpy scalars Python ones.
    """
    columns = [
        column
        for column in sa.inspect(model).columns
        if not column.primary_key and column.key not in fixed
    ]
    missing = [
        column.key
        for column in columns
        if column.key not in frame.columns and not column.nullable and column.default is None
    ]
    if missing:
        raise ValueError(f"{model.__tablename__}: the frame lacks columns {missing}")
    values = {
        column.key: [
            None if pd.isna(value) else column.type.python_type(value)
            for value in frame[column.key].tolist()
        ]
        for column in columns
        if column.key in frame.columns
    }
    return [
        fixed | {key: column_values[index] for key, column_values in values.items()}
        for index in range(len(frame))
    ]


def _stage_totals(
    repository: str | None, since: datetime | None, branch: str | None
) -> sa.Subquery:
    """Per build: duration, failed stages, succeeded source/build stages, test counts; of
    its CI stages only (QA of a deployment is not part of the build). Only of the builds
    the filters keep: neither database pushes the outer query's filters into a GROUP BY,
    so unfiltered it would add up the stages of the whole history on every call."""

    def test_stage_sum(column: sa.ColumnElement[int | None], name: str) -> sa.Label[Any]:
        return sa.func.sum(sa.case((Stage.name.in_(TEST_STAGES), column))).label(name)

    totals = (
        sa.select(
            Stage.build_id,
            sa.func.sum(Stage.duration_s).label("duration_s"),
            sa.func.sum(sa.case((Stage.status == "failed", 1), else_=0)).label("failed_stages"),
            sa.func.sum(
                sa.case(
                    (sa.and_(Stage.name.in_(("source", "build")), Stage.status == "success"), 1),
                    else_=0,
                )
            ).label("green_prerequisites"),
            *[test_stage_sum(getattr(Stage, name), name) for name in _COUNTS],
        )
        .join(Build)
        .join(Repository)
        .where(Stage.name.not_in(PROMOTION_STAGES))
        .group_by(Stage.build_id)
    )
    return _filter_builds(totals, repository, since, branch).subquery()


def _stage_order(column: sa.ColumnExpressionArgument[str]) -> sa.Case[int]:
    return sa.case({name: index for index, name in enumerate(STAGE_NAMES)}, value=column)


def _severity_order(column: sa.ColumnExpressionArgument[str]) -> sa.Case[int]:
    """Most severe first; unknown severities first of all, as the gates treat them."""
    ranks = {name: -index for index, name in enumerate(FINDING_SEVERITIES)}
    return sa.case(ranks, value=column)


def _filter_builds(
    statement: sa.Select[*_Columns],
    repository: str | None,
    since: datetime | None,
    branch: str | None,
) -> sa.Select[*_Columns]:
    if repository is not None:
        statement = statement.where(Repository.name == repository)
    if since is not None:
        statement = statement.where(Build.created_at >= since)
    if branch is not None:
        statement = statement.where(Build.branch == branch)
    return statement
