import os

import pytest

from cicd_dagster.deploy.router import find_nginx


@pytest.fixture(autouse=True)
def isolated_dagster_home(tmp_path, monkeypatch):
    """Every test gets its own Dagster instance; nothing leaks between tests."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("CICD_CONFIG", raising=False)
    return home


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
