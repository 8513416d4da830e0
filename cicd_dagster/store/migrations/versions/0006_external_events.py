"""External delivery events for the DORA metrics (`cicd events import`).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "external_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("repository_id", sa.Integer(), nullable=False),
        sa.Column("source_id", sa.String(255), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("time", TIME, nullable=False),
        sa.Column("sha", sa.String(64), nullable=True),
        sa.Column("changes", sa.JSON(), nullable=False),
        sa.Column("root_cause", sa.String(64), nullable=True),
        sa.Column("resolved_at", TIME, nullable=True),
        sa.Column("imported_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_external_events"),
        sa.ForeignKeyConstraint(
            ["repository_id"],
            ["repositories.id"],
            name="fk_external_events_repository_id_repositories",
        ),
        sa.UniqueConstraint(
            "repository_id", "source_id", name="uq_external_events_repository_id_source_id"
        ),
    )
    op.create_index(
        "ix_external_events_repository_id_type_time",
        "external_events",
        ["repository_id", "type", "time"],
    )


def downgrade() -> None:
    op.drop_index("ix_external_events_repository_id_type_time", table_name="external_events")
    op.drop_table("external_events")
