"""Alembic migrations of the history DB, applied by HistoryStore.migrate()."""
