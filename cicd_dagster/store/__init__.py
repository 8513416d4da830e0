"""The build history DB (SQLAlchemy + Alembic, SQLite or PostgreSQL); no Dagster in here."""

from cicd_dagster.store.history import (
    ArtifactRecord,
    CommitRecord,
    DeploymentRecord,
    FindingRecord,
    GateRecord,
    HistoryStore,
    ProbeRecord,
    StageRecord,
)

__all__ = [
    "ArtifactRecord",
    "CommitRecord",
    "DeploymentRecord",
    "FindingRecord",
    "GateRecord",
    "HistoryStore",
    "ProbeRecord",
    "StageRecord",
]
