"""SQLAlchemy models of the build history DB.

The schema itself is created by the Alembic migrations in ``migrations/versions``; these models
must describe the same tables (a test compares them with the migrated database).
"""

from datetime import UTC, datetime
from typing import Any, get_args

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from cicd_dagster.config import NotificationEvent

STAGE_NAMES = (
    "source",
    "build",
    "unit",
    "integration",
    "e2e",
    "performance",
    "security_scan",
    "sbom",
    "artifact",
    "qa",
)
# Run against a deployed environment after CI: recorded with the build, not part of its
# CI status (a commit that fails QA in staging stays green for dev and for rollbacks).
PROMOTION_STAGES = ("qa",)
STAGE_STATUSES = ("success", "failed", "not_configured", "skipped")
# Stages that run tests; their counts add up to a build's test counts.
TEST_STAGES = ("unit", "integration", "e2e", "performance")
# deployed: verified and live; rolled_back: failed verification, the previous version restored;
# failed: failed without a rollback; refused: not attempted (e.g. a red or unpromoted commit).
DEPLOYMENT_STATUSES = ("deployed", "rolled_back", "failed", "refused")
# Security scan findings: what was scanned, how bad, and who found it (the build's own scans
# or a later rescan of a deployed or released commit against a newer advisory DB).
FINDING_KINDS = ("sast", "dependency", "license", "secret")
FINDING_SEVERITIES = ("low", "medium", "high", "critical", "unknown")
FINDING_SOURCES = ("build", "rescan")
# An approval of a commit for an environment, or an attempt to give one that was refused.
APPROVAL_DECISIONS = ("approved", "refused")
# An event's delivery to a channel: pending (due at next_attempt_at), sent, failed (gave up),
# or skipped: the newest event when the channel was first seen, where its deliveries start.
DELIVERY_STATUSES = ("pending", "sent", "failed", "skipped")
# What notification channels can subscribe to (cicd.yaml notifications[].events).
EVENT_KINDS: tuple[str, ...] = get_args(NotificationEvent)

# Named constraints let later migrations drop or alter them, also in SQLite batch mode.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` that stores and returns UTC on every dialect.

    SQLite keeps no offset (it would store local wall-clock times as given and return naive
    values) and PostgreSQL returns the session's time zone, so values are normalised both ways.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()}: pass a timezone-aware one")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), list[str]: sa.JSON()}


class Repository(Base):
    __tablename__ = "repositories"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(255), unique=True)
    # Unknown until the commit sensor records the repository's first commit.
    url: Mapped[str | None] = mapped_column(sa.Text)


class Commit(Base):
    __tablename__ = "commits"
    __table_args__ = (sa.UniqueConstraint("repository_id", "sha"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    repository_id: Mapped[int] = mapped_column(sa.ForeignKey("repositories.id"))
    sha: Mapped[str] = mapped_column(sa.String(40))
    parents: Mapped[list[str]]
    author_name: Mapped[str] = mapped_column(sa.Text)
    author_email: Mapped[str] = mapped_column(sa.Text)
    authored_at: Mapped[datetime]
    message: Mapped[str] = mapped_column(sa.Text)
    detected_at: Mapped[datetime | None]
    run_requested_at: Mapped[datetime | None]


class Build(Base):
    __tablename__ = "builds"
    __table_args__ = (
        sa.UniqueConstraint("repository_id", "commit_sha"),
        # Queries filter builds by creation time, of one repository or of all (0007).
        sa.Index(None, "created_at"),
        sa.Index(None, "repository_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    repository_id: Mapped[int] = mapped_column(sa.ForeignKey("repositories.id"))
    commit_sha: Mapped[str] = mapped_column(sa.String(40))
    ref: Mapped[str] = mapped_column(sa.Text)
    branch: Mapped[str | None] = mapped_column(sa.Text)
    run_id: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[datetime]
    # Bumped by every write to the build or to its stages, tests, gates and artifacts.
    updated_at: Mapped[datetime]


class Stage(Base):
    __tablename__ = "stages"
    __table_args__ = (sa.UniqueConstraint("build_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    build_id: Mapped[int] = mapped_column(sa.ForeignKey("builds.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(sa.String(32))
    status: Mapped[str] = mapped_column(sa.String(32))
    started_at: Mapped[datetime]
    duration_s: Mapped[float]
    tests: Mapped[int | None]
    passed: Mapped[int | None]
    failed: Mapped[int | None]
    errors: Mapped[int | None]
    skipped: Mapped[int | None]
    flaky: Mapped[int | None]
    pass_rate: Mapped[float | None]
    coverage: Mapped[float | None]
    detail: Mapped[str | None] = mapped_column(sa.Text)
    reused: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    run_id: Mapped[str | None] = mapped_column(sa.String(64))


class TestCase(Base):
    __tablename__ = "test_cases"
    __table_args__ = (
        sa.Index(None, "stage_id"),
        sa.Index(None, "classname", "name"),
    )
    __test__ = False  # not a pytest test class, despite the name

    id: Mapped[int] = mapped_column(primary_key=True)
    stage_id: Mapped[int] = mapped_column(sa.ForeignKey("stages.id", ondelete="CASCADE"))
    report: Mapped[str | None] = mapped_column(sa.Text)
    suite: Mapped[str | None] = mapped_column(sa.Text)
    classname: Mapped[str] = mapped_column(sa.Text)
    name: Mapped[str] = mapped_column(sa.Text)
    file: Mapped[str | None] = mapped_column(sa.Text)
    duration_s: Mapped[float | None]
    status: Mapped[str] = mapped_column(sa.String(32))
    message: Mapped[str | None] = mapped_column(sa.Text)
    flaky: Mapped[bool] = mapped_column(default=False, server_default=sa.false())


class Benchmark(Base):
    __tablename__ = "benchmarks"

    id: Mapped[int] = mapped_column(primary_key=True)
    stage_id: Mapped[int] = mapped_column(
        sa.ForeignKey("stages.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(sa.Text)
    fullname: Mapped[str] = mapped_column(sa.Text)
    mean_s: Mapped[float]
    median_s: Mapped[float]
    stddev_s: Mapped[float]
    min_s: Mapped[float]
    max_s: Mapped[float]
    rounds: Mapped[int]
    baseline_mean_s: Mapped[float | None]
    # Relative slowdown against the baseline (0.1 = 10 % slower), as computed by the caller.
    regression: Mapped[float | None]


class GateResult(Base):
    __tablename__ = "gate_results"
    __table_args__ = (sa.UniqueConstraint("build_id", "stage", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    build_id: Mapped[int] = mapped_column(sa.ForeignKey("builds.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(sa.String(32))
    name: Mapped[str] = mapped_column(sa.String(255))
    passed: Mapped[bool]
    value: Mapped[float | None]
    threshold: Mapped[float | None]
    detail: Mapped[str] = mapped_column(sa.Text)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (sa.UniqueConstraint("build_id", "path"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    build_id: Mapped[int] = mapped_column(sa.ForeignKey("builds.id", ondelete="CASCADE"))
    path: Mapped[str] = mapped_column(sa.Text)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    size_bytes: Mapped[int] = mapped_column(sa.BigInteger)
    recorded_at: Mapped[datetime]


class Finding(Base):
    """One finding of a security scan of a build's commit."""

    __tablename__ = "findings"
    __table_args__ = (sa.Index(None, "build_id", "source"), sa.Index(None, "found_at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    build_id: Mapped[int] = mapped_column(sa.ForeignKey("builds.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(sa.String(16))
    kind: Mapped[str] = mapped_column(sa.String(32))
    tool: Mapped[str] = mapped_column(sa.String(64))
    rule: Mapped[str] = mapped_column(sa.Text)
    severity: Mapped[str] = mapped_column(sa.String(16))
    message: Mapped[str] = mapped_column(sa.Text)
    file: Mapped[str | None] = mapped_column(sa.Text)
    line: Mapped[int | None]
    package: Mapped[str | None] = mapped_column(sa.Text)
    version: Mapped[str | None] = mapped_column(sa.String(255))
    suppressed: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    suppression_reason: Mapped[str | None] = mapped_column(sa.Text)
    found_at: Mapped[datetime]


class Deployment(Base):
    """One deployment attempt; a re-deploy of the same commit is another row."""

    __tablename__ = "deployments"
    __table_args__ = (sa.Index(None, "repository_id", "environment", "started_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    repository_id: Mapped[int] = mapped_column(sa.ForeignKey("repositories.id"))
    commit_sha: Mapped[str] = mapped_column(sa.String(40))
    environment: Mapped[str] = mapped_column(sa.String(64))
    strategy: Mapped[str] = mapped_column(sa.String(32))
    status: Mapped[str] = mapped_column(sa.String(32))
    version: Mapped[str] = mapped_column(sa.String(255))
    previous_version: Mapped[str | None] = mapped_column(sa.String(255))
    reason: Mapped[str] = mapped_column(sa.Text)
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    duration_s: Mapped[float | None]
    rollback_s: Mapped[float | None]
    run_id: Mapped[str | None] = mapped_column(sa.String(64))
    triggered_by: Mapped[str | None] = mapped_column(sa.String(255))
    config_digest: Mapped[str | None] = mapped_column(sa.String(64))


class Incident(Base):
    """An environment found unhealthy, from opened_at until it recovered (closed_at)."""

    __tablename__ = "incidents"
    __table_args__ = (sa.Index(None, "repository_id", "environment", "closed_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    repository_id: Mapped[int] = mapped_column(sa.ForeignKey("repositories.id"))
    environment: Mapped[str] = mapped_column(sa.String(64))
    commit_sha: Mapped[str | None] = mapped_column(sa.String(40))
    opened_at: Mapped[datetime]
    closed_at: Mapped[datetime | None]
    reason: Mapped[str] = mapped_column(sa.Text)


class Event(Base):
    """Something to tell people about (a deployment, a rollback, an incident...): the
    outbox that notification channels deliver from."""

    __tablename__ = "events"
    __table_args__ = (sa.Index(None, "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    repository_id: Mapped[int] = mapped_column(sa.ForeignKey("repositories.id"))
    kind: Mapped[str] = mapped_column(sa.String(32))
    environment: Mapped[str | None] = mapped_column(sa.String(64))
    commit_sha: Mapped[str | None] = mapped_column(sa.String(40))
    at: Mapped[datetime]
    message: Mapped[str] = mapped_column(sa.Text)


class HealthProbe(Base):
    """One probe of a live environment's stable address by the deployment-health sensor."""

    __tablename__ = "health_probes"
    __table_args__ = (sa.Index(None, "repository_id", "environment", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    repository_id: Mapped[int] = mapped_column(sa.ForeignKey("repositories.id"))
    environment: Mapped[str] = mapped_column(sa.String(64))
    commit_sha: Mapped[str | None] = mapped_column(sa.String(40))
    at: Mapped[datetime]
    ok: Mapped[bool]
    status_code: Mapped[int | None]
    latency_ms: Mapped[float]
    error: Mapped[str | None] = mapped_column(sa.Text)


class Release(Base):
    """A version of a repository: tagged at a commit, with its changelog and report."""

    __tablename__ = "releases"
    __table_args__ = (
        sa.UniqueConstraint("repository_id", "version"),
        sa.Index(None, "repository_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    repository_id: Mapped[int] = mapped_column(sa.ForeignKey("repositories.id"))
    version: Mapped[str] = mapped_column(sa.String(64))
    tag: Mapped[str] = mapped_column(sa.String(255))
    commit_sha: Mapped[str] = mapped_column(sa.String(40))
    previous_version: Mapped[str | None] = mapped_column(sa.String(64))
    bump: Mapped[str] = mapped_column(sa.String(16))
    prerelease: Mapped[bool] = mapped_column(default=False, server_default=sa.false())
    commit_count: Mapped[int]
    changelog: Mapped[str] = mapped_column(sa.Text)
    notes_path: Mapped[str | None] = mapped_column(sa.Text)
    report_path: Mapped[str | None] = mapped_column(sa.Text)
    run_id: Mapped[str | None] = mapped_column(sa.String(64))
    created_by: Mapped[str | None] = mapped_column(sa.String(255))
    created_at: Mapped[datetime]


class User(Base):
    """Someone who may act on the control plane (approve): roles beside cicd.yaml's."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(64), unique=True)
    email: Mapped[str | None] = mapped_column(sa.String(255))
    roles: Mapped[list[str]] = mapped_column(sa.JSON)
    created_at: Mapped[datetime]
    removed_at: Mapped[datetime | None]


class ApiToken(Base):
    """An API token of a user, kept only as the sha256 of its value."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id"))
    token_sha256: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class Approval(Base):
    """An approval of a commit for an environment, or a refused attempt to give one."""

    __tablename__ = "approvals"
    __table_args__ = (sa.Index(None, "repository_id", "environment", "commit_sha"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    repository_id: Mapped[int] = mapped_column(sa.ForeignKey("repositories.id"))
    environment: Mapped[str] = mapped_column(sa.String(64))
    commit_sha: Mapped[str] = mapped_column(sa.String(40))
    user_name: Mapped[str | None] = mapped_column(sa.String(64))
    """None when the token matched no user."""
    decision: Mapped[str] = mapped_column(sa.String(16))
    reason: Mapped[str] = mapped_column(sa.Text)
    at: Mapped[datetime]


class Delivery(Base):
    """An event's delivery to one notification channel: attempts, outcome, next retry."""

    __tablename__ = "deliveries"
    __table_args__ = (
        sa.UniqueConstraint("event_id", "channel"),
        sa.Index(None, "status", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    event_id: Mapped[int] = mapped_column(sa.ForeignKey("events.id", ondelete="CASCADE"))
    channel: Mapped[str] = mapped_column(sa.String(255))
    status: Mapped[str] = mapped_column(sa.String(16))
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    next_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]


# fourkeys' three kinds of delivery event, as `cicd events import` takes them.
EXTERNAL_EVENT_TYPES = ("change", "deployment", "incident")


class ExternalEvent(Base):
    """A change, deployment or incident imported from another system (`cicd events
    import`), keyed by its id there: importing it again changes nothing."""

    __tablename__ = "external_events"
    __table_args__ = (
        sa.UniqueConstraint("repository_id", "source_id"),
        sa.Index(None, "repository_id", "type", "time"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    repository_id: Mapped[int] = mapped_column(sa.ForeignKey("repositories.id"))
    source_id: Mapped[str] = mapped_column(sa.String(255))
    type: Mapped[str] = mapped_column(sa.String(16))
    time: Mapped[datetime]
    sha: Mapped[str | None] = mapped_column(sa.String(64))
    """The change's commit, or the deployment's main commit."""
    changes: Mapped[list[str]]
    """A deployment's changes (commit shas); empty for the other types."""
    root_cause: Mapped[str | None] = mapped_column(sa.String(64))
    resolved_at: Mapped[datetime | None]
    imported_at: Mapped[datetime]
