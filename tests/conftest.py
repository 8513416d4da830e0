"""Fixtures shared by the whole suite."""

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import docker
import pytest
import sqlalchemy as sa

from cicd_dagster.deploy.router import find_nginx
from tests.servers import mailbox, webhook  # noqa: F401 (fixtures for every test)


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


@pytest.fixture(scope="session")
def nginx() -> str:
    """The nginx binary; a skip without it, or a failure where CI requires it."""
    executable = find_nginx()
    if executable:
        return executable
    reason = "nginx is not installed; run .ci/install-nginx.sh"
    if os.environ.get("CICD_REQUIRE_NGINX") == "1":
        pytest.fail(f"CICD_REQUIRE_NGINX=1 but {reason}")
    pytest.skip(reason)


def _missing(requirement: str, reason: str) -> NoReturn:
    """Skip for want of a real part, or fail where CI requires it (`requirement`=1)."""
    if os.environ.get(requirement) == "1":
        pytest.fail(f"{requirement}=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client of the Docker engine; a skip without a reachable one, or a failure where
    CI requires it (CICD_REQUIRE_DOCKER=1)."""
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        _missing(
            "CICD_REQUIRE_DOCKER",
            f"no reachable Docker engine ({error}); run .ci/start-docker.sh",
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_client: docker.DockerClient) -> str:
    """The base image of generated release images, as .ci/start-docker.sh builds it."""
    name = "cicd-python:3.11"
    try:
        docker_client.images.get(name)
    except docker.errors.ImageNotFound:
        _missing("CICD_REQUIRE_DOCKER", f"the image {name} is missing; run .ci/start-docker.sh")
    return name


@pytest.fixture(scope="session")
def busybox() -> Path:
    """busybox-static's binary, for tiny images imported into a test's own Docker engine."""
    binary = Path("/bin/busybox")
    if not binary.is_file():
        _missing("CICD_REQUIRE_DOCKER", "busybox-static is not installed; run .ci/start-docker.sh")
    return binary
