"""Housekeeping against real folders and databases: checkouts of a real repository, real
venvs as dependency envs, the artifact store, SQLite and PostgreSQL; and the jobs and
schedules as the Dagster definitions declare them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance

from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.definitions import build_definitions
from cicd_dagster.git import Mirror
from cicd_dagster.housekeeping import clean_workspaces, disk_usage, vacuum_history
from cicd_dagster.locks import file_lock
from cicd_dagster.stages.artifact import artifact_store
from cicd_dagster.store import HistoryStore, StageRecord
from tests.integration.test_retention import backdate, deploy, publish  # noqa: F401 (fixture)
from tests.support import commit, control_config

DAY = 86400.0
ENVIRONMENTS = (
    "environments:\n"
    "  - name: prod\n"
    "    strategy: {type: blue_green}\n"
    "    verify: {interval_s: 0.05, success_threshold: 1}\n"
)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., ControlConfig]:
    """cicd.yaml of one repository `app` (a real git repository) with environment prod."""

    def make(extra: str = "", keep_workspaces: int = 2) -> ControlConfig:
        path = control_config(
            tmp_path,
            {"app": tmp_path / "app"},
            ENVIRONMENTS + extra,
            repo_extra=f"keep_workspaces: {keep_workspaces}",
        )
        return load_control_config(path)

    return make


def checkouts(config: ControlConfig, count: int) -> list[str]:
    """`count` commits of app checked out into their workspaces as the source stage does,
    the oldest used longest ago; returns their shas, oldest first."""
    repo = config.base_dir / "app"
    shas = [commit(repo, {"app.py": f"VERSION = {n}\n"}, f"feat: v{n}") for n in range(count)]
    mirror = Mirror(config.git_dir / "app.git", str(repo))
    mirror.fetch()
    now = datetime.now(UTC).timestamp()
    for age, sha in zip(range(count, 0, -1), shas, strict=True):
        checkout = mirror.checkout(sha, config.workspaces_dir / "app" / sha)
        os.utime(checkout, (now - age * DAY, now - age * DAY))
    return shas


def workspaces(config: ControlConfig) -> set[str]:
    return {path.name for path in (config.workspaces_dir / "app").iterdir() if path.is_dir()}


def make_env(config: ControlConfig, key: str, *, used_days_ago: float, by: list[str]) -> Path:
    """A real venv as the build makes it under home/envs, last used `used_days_ago`, named
    by the build results of the commits `by` (written then)."""
    env_dir = config.envs_dir / "app" / key
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    (env_dir / ".cicd-ready").touch()
    when = datetime.now(UTC).timestamp() - used_days_ago * DAY
    for path in (env_dir / ".cicd-ready", env_dir):
        os.utime(path, (when, when))
    for sha in by:
        result = config.runs_dir / "app" / sha / "results" / "build.json"
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text(json.dumps({"fingerprint": "f", "result": {"env_dir": str(env_dir)}}))
        os.utime(result, (when, when))
    return env_dir


def test_checkouts_beyond_keep_workspaces_go_least_recently_used_first(
    make_config: Callable[..., ControlConfig],
) -> None:
    config = make_config(keep_workspaces=2)
    shas = checkouts(config, 4)
    sizes = {sha: disk_usage(config.workspaces_dir / "app" / sha) for sha in shas}

    result = clean_workspaces(config, now=datetime.now(UTC))

    assert workspaces(config) == set(shas[2:])
    assert [(item.kind, item.path.name) for item in result.removed] == [
        ("workspace", shas[1]),
        ("workspace", shas[0]),
    ]
    assert result.bytes_freed == sizes[shas[0]] + sizes[shas[1]] > 0
    assert {item.reason for item in result.removed} == {"beyond the 2 most recently used checkouts"}
    assert clean_workspaces(config, now=datetime.now(UTC)).removed == []


def test_a_checkout_a_stage_works_in_stays(make_config: Callable[..., ControlConfig]) -> None:
    config = make_config(keep_workspaces=1)
    shas = checkouts(config, 3)
    building = config.runs_dir / "app" / shas[0] / "locks" / "build.lock"
    checking_out = config.workspaces_dir / "app" / f"{shas[1]}.lock"

    with file_lock(building), file_lock(checking_out):
        result = clean_workspaces(config, now=datetime.now(UTC))

    assert workspaces(config) == set(shas)
    assert result.removed == []
    assert {(kept.path.name, kept.reason) for kept in result.kept} == {
        (shas[0], "a stage is running in it"),
        (shas[1], "a stage is running in it"),
    }
    assert {item.path.name for item in clean_workspaces(config, now=datetime.now(UTC)).removed} == {
        shas[0],
        shas[1],
    }


@pytest.mark.slow
def test_what_a_deployed_commit_uses_stays_however_old(
    make_config: Callable[..., ControlConfig],
    deploy: Callable[[ControlConfig, str, str, str], None],  # noqa: F811
) -> None:
    config = make_config("housekeeping: {cache_retention_days: 7}\n", keep_workspaces=1)
    shas = checkouts(config, 3)
    live_env = make_env(config, "live", used_days_ago=300, by=[shas[0]])
    stale_env = make_env(config, "stale", used_days_ago=30, by=[shas[1]])
    fresh_env = make_env(config, "fresh", used_days_ago=2, by=[shas[2]])
    orphan_env = make_env(config, "orphan", used_days_ago=8, by=[])
    stale_size = disk_usage(stale_env)
    deploy(config, "app", "prod", shas[0])

    result = clean_workspaces(config, now=datetime.now(UTC))

    assert workspaces(config) == {shas[0], shas[2]}
    assert sorted(path.name for path in (config.envs_dir / "app").iterdir() if path.is_dir()) == [
        "fresh",
        "live",
    ]
    assert live_env.is_dir() and fresh_env.is_dir()
    assert not stale_env.exists() and not orphan_env.exists()
    envs = {item.path.name: item for item in result.removed if item.kind == "env"}
    assert envs["stale"].reason == "unused for 30 days"
    assert envs["stale"].bytes == stale_size > 0
    assert envs["orphan"].reason == "unused for 8 days"
    assert {(kept.kind, kept.path.name, kept.reason) for kept in result.kept} == {
        ("workspace", shas[0], "live in prod"),
        ("env", "live", "used by a commit live in prod"),
    }


def test_an_env_being_installed_stays(make_config: Callable[..., ControlConfig]) -> None:
    config = make_config()
    env_dir = make_env(config, "installing", used_days_ago=100, by=[])

    with file_lock(env_dir.with_name("installing.lock")):
        assert clean_workspaces(config, now=datetime.now(UTC)).removed == []

    assert env_dir.is_dir()


def test_cleaning_a_home_with_nothing_in_it_removes_nothing(
    make_config: Callable[..., ControlConfig],
) -> None:
    result = clean_workspaces(make_config(), now=datetime.now(UTC))
    assert (result.removed, result.kept, result.bytes_freed) == ([], [], 0)


def fill_and_empty(history: HistoryStore, rows: int) -> None:
    """Record a build with many test cases, then delete them: free pages to reclaim."""
    import pandas as pd

    sha = "b" * 40
    history.record_build("app", sha, ref="main", branch="main", run_id=None)
    history.record_stage(
        "app", sha, StageRecord("unit", "success", datetime.now(UTC), 1.0, tests=rows)
    )
    cases = pd.DataFrame(
        {
            "classname": ["tests.test_big"] * rows,
            "name": [f"test_{n}_{'x' * 200}" for n in range(rows)],
            "status": ["passed"] * rows,
            "message": ["m" * 300] * rows,
        }
    )
    history.record_test_cases("app", sha, "unit", cases)
    history.record_test_cases("app", sha, "unit", cases.iloc[0:0])


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'history.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_vacuum_reclaims_deleted_rows_and_analyzes(database_url: str) -> None:
    history = HistoryStore(database_url)
    fill_and_empty(history, 5000)

    result = vacuum_history(history)

    assert result.backend == sa.make_url(database_url).get_backend_name()
    assert result.bytes_after < result.bytes_before
    assert result.bytes_freed == result.bytes_before - result.bytes_after
    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        if result.backend == "sqlite":
            analyzed = connection.exec_driver_sql("SELECT count(*) FROM sqlite_stat1").scalar()
            assert analyzed
        else:
            stats = connection.exec_driver_sql(
                "SELECT last_vacuum IS NOT NULL AND last_analyze IS NOT NULL "
                "FROM pg_stat_user_tables WHERE relname = 'test_cases'"
            ).scalar()
            assert stats
    engine.dispose()
    # The store works as before: writes take their transactions again.
    history.record_build("app", "c" * 40, ref="main", branch="main", run_id=None)
    assert len(history.builds(repository="app")) == 2
    history.dispose()


def run_job(config: ControlConfig, name: str) -> dict:
    """Run a housekeeping job in-process; its op's output metadata, as plain values."""
    job = build_definitions(config).get_job_def(name)
    result = job.execute_in_process(instance=DagsterInstance.ephemeral())
    assert result.success
    (output,) = [event for event in result.all_events if event.event_type_value == "STEP_OUTPUT"]
    metadata = output.event_specific_data.metadata  # type: ignore[union-attr]
    return {key: getattr(value, "value", value) for key, value in metadata.items()}


def test_the_jobs_report_what_they_removed_and_the_space_freed(
    make_config: Callable[..., ControlConfig],
) -> None:
    config = make_config("artifacts: {retention_days: 30, keep_last: 0}\n", keep_workspaces=1)
    shas = checkouts(config, 2)
    store = artifact_store(config)
    publish(store, "app", "1" * 40, b"an old wheel")
    backdate(store, "app", "1" * 40, 400)

    cleanup = run_job(config, "housekeeping_workspace_cleanup")
    retention = run_job(config, "housekeeping_artifact_retention")
    vacuum = run_job(config, "housekeeping_db_vacuum")

    assert cleanup["workspaces_removed"] == 1
    assert cleanup["bytes_freed"] > 0
    assert [row.data["path"] for row in cleanup["removed"].records] == [
        str(config.workspaces_dir / "app" / shas[0])
    ]
    assert retention["blobs_deleted"] == 3
    assert retention["bytes_freed"] > 0
    assert retention["retention"] == "30 days"
    assert store.list() == []
    assert vacuum["backend"] == "sqlite"
    assert vacuum["bytes_freed"] == max(vacuum["bytes_before"] - vacuum["bytes_after"], 0)


def test_schedules_follow_cicd_yaml_and_null_turns_one_off(
    make_config: Callable[..., ControlConfig],
) -> None:
    config = make_config("housekeeping: {workspace_cleanup: '15 1 * * *', db_vacuum: null}\n")

    defs = build_definitions(config)

    schedules = {
        schedule.name: (schedule.cron_schedule, schedule.execution_timezone, schedule.job_name)
        for schedule in defs.get_repository_def().schedule_defs
        if schedule.name.startswith("housekeeping_")
    }
    assert schedules == {
        "housekeeping_workspace_cleanup_schedule": (
            "15 1 * * *",
            "UTC",
            "housekeeping_workspace_cleanup",
        ),
        "housekeeping_artifact_retention_schedule": (
            "0 4 * * *",
            "UTC",
            "housekeeping_artifact_retention",
        ),
    }
    # Without a schedule the job stays, to be run from the UI.
    assert defs.get_job_def("housekeeping_db_vacuum").name == "housekeeping_db_vacuum"
