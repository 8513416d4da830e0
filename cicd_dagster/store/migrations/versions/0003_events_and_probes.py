"""Events (the notification outbox), health probes, and the config digest of deployments.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("config_digest", sa.String(64), nullable=True))
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("repository_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("environment", sa.String(64), nullable=True),
        sa.Column("commit_sha", sa.String(40), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.ForeignKeyConstraint(
            ["repository_id"], ["repositories.id"], name="fk_events_repository_id_repositories"
        ),
    )
    op.create_index("ix_events_at", "events", ["at"])
    op.create_table(
        "health_probes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("repository_id", sa.Integer(), nullable=False),
        sa.Column("environment", sa.String(64), nullable=False),
        sa.Column("commit_sha", sa.String(40), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_health_probes"),
        sa.ForeignKeyConstraint(
            ["repository_id"],
            ["repositories.id"],
            name="fk_health_probes_repository_id_repositories",
        ),
    )
    op.create_index(
        "ix_health_probes_repository_id_environment_at",
        "health_probes",
        ["repository_id", "environment", "at"],
    )


def downgrade() -> None:
    for table in ("health_probes", "events"):
        op.drop_table(table)
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("config_digest")
