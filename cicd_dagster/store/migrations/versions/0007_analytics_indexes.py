"""Indexes for the history and analytics queries at scale (benchmarks/bench_history_scale.py).

Builds are filtered by when they were created (`--since`, the analytics' periods), for one
repository or for all; without these indexes every such query read all builds of the
repository, or of the whole history, and SQLite added up the stages of every build.
See benchmarks/README.md, (f), for the plans and figures before and after.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_builds_created_at", "builds", ["created_at"])
    op.create_index("ix_builds_repository_id_created_at", "builds", ["repository_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_builds_repository_id_created_at", table_name="builds")
    op.drop_index("ix_builds_created_at", table_name="builds")
