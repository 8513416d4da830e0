"""Alembic revisions of the history DB, oldest first."""
