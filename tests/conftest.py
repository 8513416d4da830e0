"""Fixtures shared by the whole suite."""

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    """The PostgreSQL server named by CICD_TEST_POSTGRES_URL.

    Without it postgres tests skip, except under CICD_REQUIRE_POSTGRES=1 (CI), where a
    missing server must not pass silently.
    """
    url = os.environ.get("CICD_TEST_POSTGRES_URL")
    if url:
        return url
    reason = "CICD_TEST_POSTGRES_URL is not set; start a server with .ci/start-postgres.sh"
    if os.environ.get("CICD_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"CICD_REQUIRE_POSTGRES=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def postgres_url(postgres_server_url: str) -> Iterator[str]:
    """The URL of a fresh, empty database on that server, dropped after the test."""
    server = sa.make_url(postgres_server_url)
    database = f"cicd_test_{uuid.uuid4().hex[:16]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{database}"')
        yield server.set(database=database).render_as_string(hide_password=False)
        with admin.connect() as connection:
            # FORCE: a connection the test leaked must not keep its database alive.
            connection.exec_driver_sql(f'DROP DATABASE "{database}" WITH (FORCE)')
    finally:
        admin.dispose()
