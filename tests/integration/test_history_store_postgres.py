"""History DB behaviour that only PostgreSQL shows.

The behavioural suite in tests/unit/test_history_store.py runs on PostgreSQL too (its
`postgres` parameter); this module holds what SQLite cannot exercise.
"""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from cicd_dagster.store import HistoryStore, StageRecord

pytestmark = pytest.mark.postgres

REPO = "demo"
SHA = "f" * 40


@pytest.fixture
def kolkata_database_url(postgres_url: str) -> Iterator[str]:
    """A database whose sessions default to a time zone that is neither UTC nor whole hours."""
    engine = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    database = sa.make_url(postgres_url).database
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(
                f"ALTER DATABASE \"{database}\" SET TimeZone = 'Asia/Kolkata'"
            )
    finally:
        engine.dispose()
    yield postgres_url


def test_datetimes_come_back_in_utc_whatever_the_session_time_zone(
    kolkata_database_url: str,
) -> None:
    started_at = datetime(2025, 3, 1, 23, 45, tzinfo=timezone(timedelta(hours=-8)))
    history = HistoryStore(kolkata_database_url)
    try:
        history.record_build(REPO, SHA, ref="refs/heads/main", branch="main", run_id=None)
        history.record_stage(REPO, SHA, StageRecord("source", "success", started_at, 1.0))

        stored = history.stage_rows(REPO, SHA)["started_at"].iloc[0]
        created_at = history.builds()["created_at"].iloc[0]
    finally:
        history.dispose()
    assert stored == started_at
    assert str(stored.tz) == "UTC"
    assert str(created_at.tz) == "UTC"
    assert abs(datetime.now(UTC) - created_at) < timedelta(minutes=5)


def test_each_test_gets_an_empty_database(postgres_url: str) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        assert sa.inspect(engine).get_table_names() == []
    finally:
        engine.dispose()
