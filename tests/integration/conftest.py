import pytest


@pytest.fixture(autouse=True)
def isolated_dagster_home(tmp_path, monkeypatch):
    """Every test gets its own Dagster instance; nothing leaks between tests."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("CICD_CONFIG", raising=False)
    return home
