"""Alembic environment: migrates the connection HistoryStore.migrate() hands over.

There is no alembic.ini and no URL here; the store opens (and locks) the connection itself.
"""

from alembic import context

from cicd_dagster.store.models import Base

context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=Base.metadata,
    # Batch operations run as plain ALTERs on PostgreSQL and as table copies on SQLite,
    # so one revision serves both databases.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
