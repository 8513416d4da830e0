"""Security scan findings, and when each artifact was recorded.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.add_column(sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=True))
    # Older artifacts were recorded at the latest at their build's last write.
    op.execute(
        "UPDATE artifacts SET recorded_at ="
        " (SELECT builds.updated_at FROM builds WHERE builds.id = artifacts.build_id)"
    )
    with op.batch_alter_table("artifacts") as batch:
        batch.alter_column("recorded_at", existing_type=sa.DateTime(timezone=True), nullable=False)
    op.create_table(
        "findings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("build_id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("tool", sa.String(64), nullable=False),
        sa.Column("rule", sa.Text(), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("file", sa.Text(), nullable=True),
        sa.Column("line", sa.Integer(), nullable=True),
        sa.Column("package", sa.Text(), nullable=True),
        sa.Column("version", sa.String(255), nullable=True),
        sa.Column("suppressed", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("suppression_reason", sa.Text(), nullable=True),
        sa.Column("found_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_findings"),
        sa.ForeignKeyConstraint(
            ["build_id"], ["builds.id"], name="fk_findings_build_id_builds", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_findings_build_id_source", "findings", ["build_id", "source"])
    op.create_index("ix_findings_found_at", "findings", ["found_at"])


def downgrade() -> None:
    op.drop_table("findings")
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_column("recorded_at")
