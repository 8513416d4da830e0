"""The history DB's behaviour, on SQLite and (when a server is available) on PostgreSQL."""

import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.orm import Session

from cicd_dagster.store import (
    ArtifactRecord,
    CommitRecord,
    DeploymentRecord,
    FindingRecord,
    GateRecord,
    HistoryStore,
    StageRecord,
)
from cicd_dagster.store.models import Artifact, Base, Commit
from tests.support import control_config

REPO = "demo"
REPO_URL = "https://git.example.com/demo.git"
AUTHORED_AT = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)
MIGRATIONS_DIR = Path(__file__).parents[2] / "cicd_dagster" / "store" / "migrations"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'history.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def store(database_url: str) -> Iterator[HistoryStore]:
    history = HistoryStore(database_url)
    yield history
    history.dispose()


def commit_sha(number: int) -> str:
    return f"{number:040x}"


def commit_record(sha: str, message: str = "Fix the flux capacitor") -> CommitRecord:
    return CommitRecord(
        sha=sha,
        parents=[commit_sha(0)],
        author_name="Ada Lovelace",
        author_email="ada@example.com",
        authored_at=AUTHORED_AT,
        message=message,
    )


def stage_record(name: str, status: str = "success", **fields: Any) -> StageRecord:
    return StageRecord(name=name, status=status, started_at=AUTHORED_AT, duration_s=1.0, **fields)


def record_build(
    history: HistoryStore,
    sha: str,
    *,
    stages: dict[str, str],
    branch: str = "main",
    repository: str = REPO,
) -> None:
    history.record_build(
        repository, sha, ref=f"refs/heads/{branch}", branch=branch, run_id=f"run-{sha[-4:]}"
    )
    for name, status in stages.items():
        history.record_stage(repository, sha, stage_record(name, status))


def cases_frame(names: Sequence[str], status: str = "passed", message: str = "") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "report": "reports/unit.xml",
            "suite": "pytest",
            "classname": "tests.test_flux",
            "name": list(names),
            "file": "tests/test_flux.py",
            "duration_s": 0.25,
            "status": status,
            "message": message,
            "flaky": False,
        }
    )


def benchmark_frame(mean_s: float) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "name": ["test_parse"],
            "fullname": ["tests/bench.py::test_parse"],
            "mean_s": [mean_s],
            "median_s": [mean_s],
            "stddev_s": [0.01],
            "min_s": [mean_s * 0.9],
            "max_s": [mean_s * 1.1],
            "rounds": [20],
        }
    )


def record_performance(
    history: HistoryStore,
    sha: str,
    *,
    mean_s: float,
    status: str = "success",
    gate_passed: bool = True,
    branch: str = "main",
) -> None:
    record_build(history, sha, stages={"source": "success", "build": "success"}, branch=branch)
    history.record_stage(REPO, sha, stage_record("performance", status))
    history.record_benchmarks(REPO, sha, "performance", benchmark_frame(mean_s))
    gate = GateRecord("max_perf_regression", gate_passed, 0.05, 0.1, "worst +5.0%")
    history.record_gates(REPO, sha, "performance", [gate])


def deployment_record(
    environment: str = "dev",
    sha: str = commit_sha(1),
    status: str = "deployed",
    *,
    started_at: datetime = AUTHORED_AT,
    **fields: Any,
) -> DeploymentRecord:
    return DeploymentRecord(
        **{
            "environment": environment,
            "commit_sha": sha,
            "strategy": "blue-green",
            "status": status,
            "version": sha[-7:],
            "previous_version": None,
            "reason": "",
            "started_at": started_at,
        }
        | fields
    )


def run_alembic(url: str, action: str, revision: str) -> None:
    """Run `alembic upgrade/downgrade` to `revision`, as HistoryStore.migrate() configures it."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            config.attributes["connection"] = connection
            getattr(command, action)(config, revision)
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def select_all(url: str, statement: sa.Executable) -> list[Any]:
    """Rows the public API does not return, read in a session of the test's own."""
    engine = sa.create_engine(url)
    try:
        with Session(engine) as session:
            return list(session.scalars(statement))
    finally:
        engine.dispose()


# -- schema ----------------------------------------------------------------------------------


def test_opening_a_sqlite_file_creates_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "control" / "state" / "history.db"
    HistoryStore(f"sqlite:///{path}").dispose()
    assert path.is_file()


def test_migrating_twice_is_a_no_op(database_url: str, store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={"source": "success"})
    store.migrate()
    store.migrate()
    HistoryStore(database_url).dispose()

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert select_all(database_url, sa.text("SELECT version_num FROM alembic_version")) == [head]
    assert list(store.builds()["commit"]) == [commit_sha(1)]


def test_migrated_schema_matches_the_models(database_url: str, store: HistoryStore) -> None:
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as connection:
            differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    finally:
        engine.dispose()
    assert differences == []


def test_opening_a_0001_database_upgrades_it_and_keeps_its_data(database_url: str) -> None:
    run_alembic(database_url, "upgrade", "0001")
    assert "deployments" not in table_names(database_url)
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text("INSERT INTO repositories (id, name, url) VALUES (1, :name, :url)"),
                {"name": REPO, "url": REPO_URL},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO builds (repository_id, commit_sha, ref, branch, run_id,"
                    " created_at, updated_at) VALUES (1, :sha, 'refs/heads/main', 'main',"
                    " 'run-1', :at, :at)"
                ),
                {"sha": commit_sha(1), "at": AUTHORED_AT},
            )
    finally:
        engine.dispose()

    history = HistoryStore(database_url)
    try:
        [build] = history.builds().to_dict("records")
        assert (build["repository"], build["commit"], build["run_id"]) == (
            REPO,
            commit_sha(1),
            "run-1",
        )
        assert build["created_at"] == AUTHORED_AT
        # The new tables work next to the old rows, on the repository recorded before.
        history.record_deployment(REPO, deployment_record())
        history.open_incident(REPO, "dev", commit_sha(1), "probe failed", at=AUTHORED_AT)
        assert list(history.deployments()["repository"]) == [REPO]
        assert list(history.incidents()["repository"]) == [REPO]
        [repository] = select_all(database_url, sa.text("SELECT url FROM repositories"))
        assert repository == REPO_URL
    finally:
        history.dispose()
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert select_all(database_url, sa.text("SELECT version_num FROM alembic_version")) == [head]


def test_downgrading_to_0001_drops_deployments_and_incidents(database_url: str) -> None:
    history = HistoryStore(database_url)
    try:
        record_build(history, commit_sha(1), stages={"source": "success"})
        history.record_deployment(REPO, deployment_record())
    finally:
        history.dispose()

    run_alembic(database_url, "downgrade", "0001")
    tables = table_names(database_url)
    assert {"deployments", "incidents"}.isdisjoint(tables)
    assert {"repositories", "builds"} <= tables

    history = HistoryStore(database_url)
    try:
        assert list(history.builds()["commit"]) == [commit_sha(1)]
        assert history.deployments().empty
    finally:
        history.dispose()


# -- idempotent writes -----------------------------------------------------------------------


def test_re_recording_a_commit_updates_it_and_keeps_unset_timestamps(
    database_url: str, store: HistoryStore
) -> None:
    sha = commit_sha(1)
    detected_at = datetime(2025, 3, 1, 10, tzinfo=UTC)
    store.record_commit(REPO, REPO_URL, commit_record(sha, "first"), detected_at=detected_at)
    store.record_commit(REPO, REPO_URL, commit_record(sha, "amended"))

    [commit] = select_all(database_url, sa.select(Commit))
    assert (commit.message, commit.detected_at, commit.run_requested_at) == (
        "amended",
        detected_at,
        None,
    )


def test_re_recording_a_build_keeps_its_creation_time(store: HistoryStore) -> None:
    sha = commit_sha(1)
    store.record_build(REPO, sha, ref="refs/heads/main", branch="main", run_id="run-1")
    created_at = store.builds()["created_at"].iloc[0]
    store.record_build(REPO, sha, ref="refs/heads/main", branch="main", run_id="run-2")

    builds = store.builds()
    assert list(builds["run_id"]) == ["run-2"]
    assert builds["created_at"].iloc[0] == created_at


def test_re_recording_a_stage_replaces_it_and_keeps_its_test_cases(store: HistoryStore) -> None:
    sha = commit_sha(1)
    record_build(store, sha, stages={"unit": "failed"})
    store.record_test_cases(REPO, sha, "unit", cases_frame(["test_a"]))
    store.record_stage(REPO, sha, stage_record("unit", "success", tests=1, passed=1))

    stages = store.stage_rows(REPO, sha)
    assert stages[["name", "status", "tests"]].to_dict("records") == [
        {"name": "unit", "status": "success", "tests": 1}
    ]
    assert list(store.tests()["name"]) == ["test_a"]


def test_re_recording_test_cases_replaces_them(store: HistoryStore) -> None:
    sha = commit_sha(1)
    record_build(store, sha, stages={"unit": "success", "integration": "success"})
    store.record_test_cases(REPO, sha, "integration", cases_frame(["test_api"]))
    store.record_test_cases(REPO, sha, "unit", cases_frame(["test_a", "test_b", "test_c"]))
    store.record_test_cases(REPO, sha, "unit", cases_frame(["test_a", "test_d"]))

    tests = store.tests()
    assert tests[["stage", "name"]].to_dict("records") == [
        {"stage": "unit", "name": "test_a"},
        {"stage": "unit", "name": "test_d"},
        {"stage": "integration", "name": "test_api"},
    ]


def test_re_recording_gates_replaces_only_that_stages_gates(store: HistoryStore) -> None:
    sha = commit_sha(1)
    record_build(store, sha, stages={"unit": "success", "performance": "success"})
    store.record_gates(
        REPO, sha, "performance", [GateRecord("max_perf_regression", True, 0.0, 0.1, "")]
    )
    store.record_gates(REPO, sha, "unit", [GateRecord("min_pass_rate", False, 0.5, 0.9, "50%")])
    store.record_gates(
        REPO,
        sha,
        "unit",
        [
            GateRecord("min_coverage", True, 0.93, 0.8, "93%"),
            GateRecord("min_pass_rate", True, 1.0, 0.9, "100%"),
        ],
    )

    gates = store.gate_rows(REPO, sha)
    assert gates[["stage", "name", "passed"]].to_dict("records") == [
        {"stage": "unit", "name": "min_coverage", "passed": True},
        {"stage": "unit", "name": "min_pass_rate", "passed": True},
        {"stage": "performance", "name": "max_perf_regression", "passed": True},
    ]


def test_re_recording_benchmarks_replaces_them_and_stores_missing_baselines_as_null(
    store: HistoryStore,
) -> None:
    sha = commit_sha(1)
    record_performance(store, sha, mean_s=2.0)
    store.record_benchmarks(
        REPO, sha, "performance", benchmark_frame(1.0).assign(baseline_mean_s=float("nan"))
    )

    baseline = store.last_green_benchmarks(REPO, "main")
    assert baseline is not None
    [benchmark] = baseline.to_dict("records")
    assert benchmark["mean_s"] == 1.0
    assert pd.isna(benchmark["baseline_mean_s"])
    assert pd.isna(benchmark["regression"])


def test_re_recording_artifacts_upserts_them_by_path(
    database_url: str, store: HistoryStore
) -> None:
    sha = commit_sha(1)
    record_build(store, sha, stages={"build": "success"})
    wheel = ArtifactRecord("dist/demo-1.0-py3-none-any.whl", "a" * 64, 1200)
    store.record_artifacts(
        REPO, sha, [wheel, ArtifactRecord("dist/demo-1.0.tar.gz", "b" * 64, 900)]
    )
    store.record_artifacts(REPO, sha, [ArtifactRecord(wheel.path, "c" * 64, 1300)])

    artifacts = select_all(database_url, sa.select(Artifact).order_by(Artifact.path))
    assert [(a.path, a.sha256[0], a.size_bytes) for a in artifacts] == [
        ("dist/demo-1.0-py3-none-any.whl", "c", 1300),
        ("dist/demo-1.0.tar.gz", "b", 900),
    ]


def test_writes_for_an_unrecorded_build_are_refused(store: HistoryStore) -> None:
    with pytest.raises(LookupError, match="record_build"):
        store.record_stage(REPO, commit_sha(1), stage_record("unit"))
    record_build(store, commit_sha(1), stages={})
    with pytest.raises(LookupError, match="record_stage"):
        store.record_test_cases(REPO, commit_sha(1), "unit", cases_frame(["test_a"]))


def test_unknown_stage_names_and_statuses_are_refused(store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={})
    with pytest.raises(ValueError, match="unknown stage"):
        store.record_stage(REPO, commit_sha(1), stage_record("lint"))
    with pytest.raises(ValueError, match="unknown stage status"):
        store.record_stage(REPO, commit_sha(1), stage_record("unit", "passed"))


def test_test_cases_without_a_required_column_are_refused(store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={"unit": "success"})
    cases = cases_frame(["test_a"]).drop(columns="classname")
    with pytest.raises(ValueError, match="classname"):
        store.record_test_cases(REPO, commit_sha(1), "unit", cases)


def test_5000_test_cases_are_inserted_in_one_batch(store: HistoryStore) -> None:
    # One executemany, not a statement per row: recording stays cheap for big suites.
    sha = commit_sha(1)
    record_build(store, sha, stages={"unit": "success"})
    cases = cases_frame([f"test_{n}" for n in range(5000)])
    inserts: list[bool] = []

    def count_inserts(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("INSERT INTO TEST_CASES"):
            inserts.append(executemany)

    sa.event.listen(store._engine, "before_cursor_execute", count_inserts)
    try:
        store.record_test_cases(REPO, sha, "unit", cases)
    finally:
        sa.event.remove(store._engine, "before_cursor_execute", count_inserts)
    assert len(store.tests()) == 5000
    assert inserts and all(inserts) and len(inserts) <= 5


# -- round trips -----------------------------------------------------------------------------


def test_unicode_and_10k_character_texts_round_trip(database_url: str, store: HistoryStore) -> None:
    sha = commit_sha(1)
    message = "Réparer le flux ✓ 修正 🚀\n\n" + "x" * 10_000
    store.record_commit(REPO, REPO_URL, commit_record(sha, message))
    record_build(store, sha, stages={})
    store.record_stage(REPO, sha, stage_record("unit", "failed", detail=message))
    store.record_test_cases(REPO, sha, "unit", cases_frame(["test_ünïcode"], "failed", message))

    assert select_all(database_url, sa.select(Commit.message)) == [message]
    assert store.stage_rows(REPO, sha)["detail"].iloc[0] == message
    assert store.tests()[["name", "message"]].iloc[0].tolist() == ["test_ünïcode", message]


def test_datetimes_come_back_as_the_same_instant_in_utc(store: HistoryStore) -> None:
    sha = commit_sha(1)
    started_at = datetime(2025, 3, 1, 11, 30, 15, 123456, tzinfo=timezone(timedelta(hours=2)))
    record_build(store, sha, stages={})
    store.record_stage(REPO, sha, StageRecord("unit", "success", started_at, 2.0))

    stored = store.stage_rows(REPO, sha)["started_at"].iloc[0]
    assert stored == started_at
    assert stored.tzinfo is not None and stored.utcoffset() == timedelta(0)


def test_naive_datetimes_are_refused(store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={})
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        store.record_stage(
            REPO, commit_sha(1), StageRecord("unit", "success", datetime(2025, 3, 1), 1.0)
        )


# -- builds() and tests() --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stages", "gate_passed", "status"),
    [
        ({}, True, "running"),
        ({"source": "success"}, True, "running"),
        ({"source": "success", "build": "success"}, True, "success"),
        ({"source": "success", "build": "success", "unit": "skipped"}, True, "success"),
        ({"source": "failed"}, True, "failed"),
        ({"source": "success", "build": "success", "e2e": "failed"}, True, "failed"),
        ({"source": "success", "build": "success", "unit": "success"}, False, "failed"),
    ],
    ids=[
        "no-stages",
        "source-only",
        "built",
        "built-tests-skipped",
        "source-failed",
        "e2e-failed",
        "gate-failed",
    ],
)
def test_build_status_is_failed_on_any_red_stage_or_gate_and_success_once_built(
    store: HistoryStore, stages: dict[str, str], gate_passed: bool, status: str
) -> None:
    sha = commit_sha(1)
    record_build(store, sha, stages=stages)
    store.record_gates(REPO, sha, "unit", [GateRecord("min_pass_rate", gate_passed, 1.0, 0.9, "")])

    assert list(store.builds()["status"]) == [status]


def test_builds_add_up_durations_and_test_stage_counts(store: HistoryStore) -> None:
    sha = commit_sha(1)
    record_build(store, sha, stages={"source": "success", "build": "success"})
    counts = {"passed": 7, "failed": 1, "errors": 1, "skipped": 1}
    store.record_stage(REPO, sha, stage_record("unit", "failed", tests=10, **counts))
    store.record_stage(REPO, sha, stage_record("e2e", "success", tests=1, passed=1))

    [build] = store.builds().to_dict("records")
    assert build["duration_s"] == 4.0
    assert {key: build[key] for key in ("tests", "passed", "failed", "errors", "skipped")} == {
        "tests": 11,
        "passed": 8,
        "failed": 1,
        "errors": 1,
        "skipped": 1,
    }
    assert build["pass_rate"] == pytest.approx(0.8)
    assert (build["repository"], build["commit"], build["ref"], build["branch"]) == (
        REPO,
        sha,
        "refs/heads/main",
        "main",
    )


def test_builds_without_tests_count_zero_and_have_no_pass_rate(store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={"source": "success"})

    [build] = store.builds().to_dict("records")
    assert (build["tests"], build["passed"]) == (0, 0)
    assert pd.isna(build["pass_rate"])


def test_builds_are_newest_first_and_filter_by_since_branch_and_repository(
    store: HistoryStore,
) -> None:
    record_build(store, commit_sha(1), stages={"source": "success"})
    time.sleep(0.01)  # distinct creation times, even on a coarse clock
    record_build(store, commit_sha(2), stages={"source": "success"}, branch="feature")
    time.sleep(0.01)
    record_build(store, commit_sha(3), stages={"source": "success"}, repository="other")

    builds = store.builds()
    assert list(builds["commit"]) == [commit_sha(3), commit_sha(2), commit_sha(1)]
    # An aware `since` in any time zone compares as the same instant.
    since = builds["created_at"].iloc[1].to_pydatetime().astimezone(timezone(timedelta(hours=-5)))
    assert list(store.builds(since=since)["commit"]) == [commit_sha(3), commit_sha(2)]
    assert list(store.builds(branch="main")["commit"]) == [commit_sha(3), commit_sha(1)]
    assert list(store.builds(repository=REPO, branch="main")["commit"]) == [commit_sha(1)]
    assert store.builds(since=datetime.now(UTC) + timedelta(hours=1)).empty


def test_tests_filter_by_since_branch_and_stage(store: HistoryStore) -> None:
    for number, branch in ((1, "main"), (2, "feature")):
        sha = commit_sha(number)
        record_build(store, sha, stages={"unit": "success", "e2e": "success"}, branch=branch)
        store.record_test_cases(REPO, sha, "unit", cases_frame([f"test_unit_{number}"]))
        store.record_test_cases(REPO, sha, "e2e", cases_frame([f"test_e2e_{number}"]))
        time.sleep(0.01)
    newest_created_at = store.builds()["created_at"].iloc[0].to_pydatetime()

    tests = store.tests()
    assert list(tests["name"]) == ["test_unit_2", "test_e2e_2", "test_unit_1", "test_e2e_1"]
    assert list(tests.columns) == [
        "repository",
        "commit",
        "branch",
        "created_at",
        "stage",
        "suite",
        "classname",
        "name",
        "duration_s",
        "status",
        "message",
        "flaky",
    ]
    assert list(store.tests(branch="main")["name"]) == ["test_unit_1", "test_e2e_1"]
    assert list(store.tests(stage="e2e")["name"]) == ["test_e2e_2", "test_e2e_1"]
    assert list(store.tests(since=newest_created_at)["name"]) == ["test_unit_2", "test_e2e_2"]
    assert store.tests(repository="other").empty


# -- last_green_benchmarks() -----------------------------------------------------------------


def test_last_green_benchmarks_are_the_newest_green_performance_run_on_the_branch(
    store: HistoryStore,
) -> None:
    record_performance(store, commit_sha(1), mean_s=1.0)
    record_performance(store, commit_sha(2), mean_s=2.0)
    record_performance(store, commit_sha(3), mean_s=3.0, status="failed")
    record_performance(store, commit_sha(4), mean_s=4.0, gate_passed=False)
    record_performance(store, commit_sha(5), mean_s=5.0, branch="feature")

    baseline = store.last_green_benchmarks(REPO, "main")
    assert baseline is not None
    assert baseline[["name", "mean_s", "rounds"]].to_dict("records") == [
        {"name": "test_parse", "mean_s": 2.0, "rounds": 20}
    ]


def test_last_green_benchmarks_skip_the_commit_being_compared(store: HistoryStore) -> None:
    record_performance(store, commit_sha(1), mean_s=1.0)
    record_performance(store, commit_sha(2), mean_s=2.0)

    baseline = store.last_green_benchmarks(REPO, "main", before_sha=commit_sha(2))
    assert baseline is not None
    assert list(baseline["mean_s"]) == [1.0]


def test_last_green_benchmarks_are_none_without_a_green_run(store: HistoryStore) -> None:
    record_performance(store, commit_sha(1), mean_s=1.0, status="failed")
    record_performance(store, commit_sha(2), mean_s=2.0, branch="feature")

    assert store.last_green_benchmarks(REPO, "main") is None
    assert store.last_green_benchmarks("other", "main") is None


# -- concurrency -----------------------------------------------------------------------------

BUILDS_PER_WRITER = 15
SHARED_SHA = commit_sha(999_999)


def write_builds(url: str, writer: int, start: Event) -> None:
    """One writer process: opens (and so migrates) the store, then records builds."""
    start.wait(timeout=60)
    history = HistoryStore(url)
    try:
        for number in range(BUILDS_PER_WRITER):
            sha = commit_sha(1000 * writer + number)
            history.record_commit(REPO, REPO_URL, commit_record(sha))
            record_build(history, sha, stages={"source": "success", "unit": "success"})
            history.record_test_cases(REPO, sha, "unit", cases_frame(["test_a", "test_b"]))
            # Both writers also upsert the same build and stage.
            record_build(history, SHARED_SHA, stages={"source": "success"})
    finally:
        history.dispose()


def test_two_processes_can_migrate_and_write_at_once(database_url: str) -> None:
    # spawn: a forked child would inherit the parent's pooled connections.
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    writers = [
        context.Process(target=write_builds, args=(database_url, writer, start))
        for writer in (1, 2)
    ]
    for process in writers:
        process.start()
    start.set()
    try:
        for process in writers:
            process.join(timeout=120)
    finally:
        for process in writers:
            if process.is_alive():
                process.kill()
    assert [process.exitcode for process in writers] == [0, 0]

    history = HistoryStore(database_url)
    try:
        assert len(history.builds()) == 2 * BUILDS_PER_WRITER + 1
        assert len(history.tests()) == 2 * BUILDS_PER_WRITER * 2
        assert list(history.stage_rows(REPO, SHARED_SHA)["name"]) == ["source"]
    finally:
        history.dispose()


# -- deployments and incidents ---------------------------------------------------------------

DEPLOYMENT_COLUMNS = [
    "repository",
    "environment",
    "commit",
    "version",
    "previous_version",
    "strategy",
    "status",
    "reason",
    "started_at",
    "finished_at",
    "duration_s",
    "rollback_s",
    "run_id",
    "triggered_by",
    "config_digest",
]


def test_a_deployment_round_trips_with_all_its_fields(store: HistoryStore) -> None:
    started_at = datetime(2025, 3, 1, 12, tzinfo=timezone(timedelta(hours=2)))
    deployment = deployment_record(
        "prod",
        commit_sha(2),
        "rolled_back",
        started_at=started_at,
        version="1.4.0",
        previous_version="1.3.9",
        reason="health probe failed: 3/3 timeouts",
        finished_at=started_at + timedelta(seconds=42.5),
        duration_s=42.5,
        rollback_s=3.25,
        run_id="run-abc",
        triggered_by="sensor:auto_deploy",
        config_digest="c0ffee",
    )
    deployment_id = store.record_deployment(REPO, deployment)

    frame = store.deployments()
    assert list(frame.columns) == DEPLOYMENT_COLUMNS
    [row] = frame.to_dict("records")
    assert row == {
        "repository": REPO,
        "environment": "prod",
        "commit": commit_sha(2),
        "version": "1.4.0",
        "previous_version": "1.3.9",
        "strategy": "blue-green",
        "status": "rolled_back",
        "reason": "health probe failed: 3/3 timeouts",
        "started_at": started_at,
        "finished_at": started_at + timedelta(seconds=42.5),
        "duration_s": 42.5,
        "rollback_s": 3.25,
        "run_id": "run-abc",
        "triggered_by": "sensor:auto_deploy",
        "config_digest": "c0ffee",
    }
    assert row["started_at"].utcoffset() == timedelta(0)
    assert isinstance(deployment_id, int)


def test_a_deployment_without_optional_fields_has_nulls(store: HistoryStore) -> None:
    store.record_deployment(REPO, deployment_record(status="refused", reason="red commit"))

    [row] = store.deployments().to_dict("records")
    assert row["previous_version"] is None and row["run_id"] is None
    assert pd.isna(row["finished_at"])
    assert pd.isna(row["duration_s"]) and pd.isna(row["rollback_s"])
    assert store.deployments()["duration_s"].dtype == "float64"


def test_every_deployment_attempt_is_a_row_of_its_own(store: HistoryStore) -> None:
    first = store.record_deployment(REPO, deployment_record())
    second = store.record_deployment(
        REPO, deployment_record(started_at=AUTHORED_AT + timedelta(minutes=5))
    )

    assert second != first
    assert len(store.deployments()) == 2


def test_recording_a_deployment_creates_an_unknown_repository_without_url(
    database_url: str, store: HistoryStore
) -> None:
    store.record_deployment("fresh", deployment_record())

    assert select_all(database_url, sa.text("SELECT url FROM repositories")) == [None]
    assert list(store.deployments(repository="fresh")["repository"]) == ["fresh"]


def test_deployments_are_newest_first_and_filter_by_repository_environment_and_since(
    store: HistoryStore,
) -> None:
    def at(minutes: int) -> datetime:
        return AUTHORED_AT + timedelta(minutes=minutes)

    store.record_deployment(REPO, deployment_record("dev", commit_sha(1), started_at=at(0)))
    store.record_deployment(REPO, deployment_record("staging", commit_sha(1), started_at=at(10)))
    store.record_deployment("other", deployment_record("dev", commit_sha(9), started_at=at(15)))
    store.record_deployment(REPO, deployment_record("dev", commit_sha(2), started_at=at(20)))
    # Recorded last but started earlier: the order is by start time.
    store.record_deployment(REPO, deployment_record("dev", commit_sha(3), started_at=at(5)))

    def keys(frame: pd.DataFrame) -> list[tuple[str, str, str]]:
        return list(zip(frame["repository"], frame["environment"], frame["commit"], strict=True))

    assert keys(store.deployments()) == [
        (REPO, "dev", commit_sha(2)),
        ("other", "dev", commit_sha(9)),
        (REPO, "staging", commit_sha(1)),
        (REPO, "dev", commit_sha(3)),
        (REPO, "dev", commit_sha(1)),
    ]
    assert list(store.deployments(REPO, "dev")["commit"]) == [
        commit_sha(2),
        commit_sha(3),
        commit_sha(1),
    ]
    assert list(store.deployments(environment="staging")["commit"]) == [commit_sha(1)]
    since = at(10).astimezone(timezone(timedelta(hours=-5)))
    assert keys(store.deployments(since=since)) == [
        (REPO, "dev", commit_sha(2)),
        ("other", "dev", commit_sha(9)),
        (REPO, "staging", commit_sha(1)),
    ]
    assert list(store.deployments(repository=REPO, since=since)["commit"]) == [
        commit_sha(2),
        commit_sha(1),
    ]
    empty = store.deployments(repository="nobody")
    assert empty.empty and list(empty.columns) == DEPLOYMENT_COLUMNS


def test_last_verified_deployment_skips_rolled_back_failed_and_refused_ones(
    store: HistoryStore,
) -> None:
    def at(minutes: int) -> datetime:
        return AUTHORED_AT + timedelta(minutes=minutes)

    store.record_deployment(REPO, deployment_record("prod", commit_sha(1), started_at=at(0)))
    store.record_deployment(REPO, deployment_record("prod", commit_sha(2), started_at=at(10)))
    for minutes, status in ((20, "rolled_back"), (30, "failed"), (40, "refused")):
        store.record_deployment(
            REPO, deployment_record("prod", commit_sha(minutes), status, started_at=at(minutes))
        )
    store.record_deployment(REPO, deployment_record("dev", commit_sha(50), started_at=at(50)))
    store.record_deployment("other", deployment_record("prod", commit_sha(60), started_at=at(60)))

    verified = store.last_verified_deployment(REPO, "prod")
    assert verified is not None
    assert (verified["commit"], verified["status"], verified["started_at"]) == (
        commit_sha(2),
        "deployed",
        at(10),
    )
    assert list(verified.index) == DEPLOYMENT_COLUMNS


def test_last_verified_deployment_is_none_without_a_verified_one(store: HistoryStore) -> None:
    store.record_deployment(REPO, deployment_record("prod", status="rolled_back"))

    assert store.last_verified_deployment(REPO, "prod") is None
    assert store.last_verified_deployment(REPO, "staging") is None
    assert store.last_verified_deployment("other", "prod") is None


def test_unknown_deployment_statuses_are_refused(store: HistoryStore) -> None:
    with pytest.raises(ValueError, match=r"unknown deployment status 'ok'.*'rolled_back'"):
        store.record_deployment(REPO, deployment_record(status="ok"))
    assert store.deployments().empty


def test_opening_an_incident_twice_keeps_one_open_incident(store: HistoryStore) -> None:
    first = store.open_incident(REPO, "prod", commit_sha(1), "probe failed", at=AUTHORED_AT)
    again = store.open_incident(
        REPO, "prod", commit_sha(2), "still failing", at=AUTHORED_AT + timedelta(minutes=1)
    )
    other_environment = store.open_incident(REPO, "dev", None, "probe failed", at=AUTHORED_AT)

    assert again == first
    assert other_environment != first
    [incident] = store.incidents(REPO, "prod").to_dict("records")
    assert (incident["commit"], incident["opened_at"], incident["reason"]) == (
        commit_sha(1),
        AUTHORED_AT,
        "probe failed",
    )
    assert pd.isna(incident["closed_at"]) and pd.isna(incident["duration_s"])


def test_closing_then_opening_again_gives_a_second_incident(store: HistoryStore) -> None:
    first = store.open_incident(REPO, "prod", commit_sha(1), "probe failed", at=AUTHORED_AT)
    assert store.close_incident(REPO, "prod", at=AUTHORED_AT + timedelta(seconds=90))
    assert not store.close_incident(REPO, "prod", at=AUTHORED_AT + timedelta(seconds=95))
    second = store.open_incident(
        REPO, "prod", commit_sha(2), "HTTP 500", at=AUTHORED_AT + timedelta(minutes=10)
    )

    assert second != first
    incidents = store.incidents()
    assert list(incidents.columns) == [
        "repository",
        "environment",
        "commit",
        "opened_at",
        "closed_at",
        "duration_s",
        "reason",
    ]
    assert list(incidents["reason"]) == ["HTTP 500", "probe failed"]
    assert pd.isna(incidents["duration_s"].iloc[0])
    assert incidents["duration_s"].iloc[1] == 90.0
    assert incidents["closed_at"].iloc[1] == AUTHORED_AT + timedelta(seconds=90)


def test_closing_without_an_open_incident_returns_false(
    database_url: str, store: HistoryStore
) -> None:
    assert not store.close_incident("nobody", "prod", at=AUTHORED_AT)
    store.open_incident(REPO, "dev", None, "probe failed", at=AUTHORED_AT)
    assert not store.close_incident(REPO, "prod", at=AUTHORED_AT)

    assert select_all(database_url, sa.text("SELECT name FROM repositories")) == [REPO]
    assert store.incidents()["closed_at"].isna().all()


def test_closing_an_incident_before_it_opened_is_refused(store: HistoryStore) -> None:
    store.open_incident(REPO, "prod", None, "probe failed", at=AUTHORED_AT)
    with pytest.raises(ValueError, match="before the incident opened"):
        store.close_incident(REPO, "prod", at=AUTHORED_AT - timedelta(seconds=1))
    with pytest.raises(ValueError, match="naive datetime"):
        store.close_incident(REPO, "prod", at=datetime(2025, 3, 1, 10))
    assert store.incidents()["closed_at"].isna().all()


def test_incidents_filter_by_repository_and_environment_newest_first(
    store: HistoryStore,
) -> None:
    store.open_incident(REPO, "prod", None, "a", at=AUTHORED_AT)
    store.close_incident(REPO, "prod", at=AUTHORED_AT + timedelta(minutes=1))
    store.open_incident(REPO, "dev", None, "b", at=AUTHORED_AT + timedelta(minutes=2))
    store.open_incident("other", "prod", None, "c", at=AUTHORED_AT + timedelta(minutes=3))
    store.open_incident(REPO, "prod", None, "d", at=AUTHORED_AT + timedelta(minutes=4))

    assert list(store.incidents()["reason"]) == ["d", "c", "b", "a"]
    assert list(store.incidents(REPO)["reason"]) == ["d", "b", "a"]
    assert list(store.incidents(environment="prod")["reason"]) == ["d", "c", "a"]
    assert list(store.incidents(REPO, "prod")["duration_s"].fillna(-1)) == [-1, 60.0]
    empty = store.incidents(repository="nobody")
    assert empty.empty and "duration_s" in empty.columns


# -- security findings -----------------------------------------------------------------------

FINDING_COLUMNS = [
    "repository",
    "commit",
    "branch",
    "source",
    "kind",
    "tool",
    "rule",
    "severity",
    "message",
    "file",
    "line",
    "package",
    "version",
    "suppressed",
    "suppression_reason",
    "found_at",
]
FOUND_AT = datetime(2025, 3, 2, 3, tzinfo=UTC)
ASSERT_USED = FindingRecord("sast", "bandit", "B101", "low", "assert used", "app.py", 3)
LEAKED_TOKEN = FindingRecord(
    "secret", "secrets", "github-token", "high", "ghp_****************", "config.py", 7
)
OLD_JINJA = FindingRecord(
    "dependency",
    "osv",
    "GHSA-h5c8-rqwp-cp95",
    "medium",
    "XSS in xmlattr",
    package="jinja2",
    version="3.1.2",
)
FIRST, SECOND = "a1" * 20, "b2" * 20
GPL = FindingRecord("license", "licenses", "GPL-3.0-only", "high", "denied", package="gnu-thing")


def rule_names(frame: pd.DataFrame) -> list[str]:
    return list(frame["rule"])


def test_a_finding_round_trips_with_all_its_fields(store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={}, branch="release/1.0")
    suppressed = FindingRecord(
        kind="dependency",
        tool="osv",
        rule="PYSEC-2024-1",
        severity="critical",
        message="Überlauf in parse() ✓ " + "x" * 10_000,
        file="requirements.txt",
        line=12,
        package="libfoo",
        version="1.0.0",
        suppressed=True,
        suppression_reason="not reachable from our code",
    )
    written = store.record_findings(REPO, commit_sha(1), "build", [suppressed], found_at=FOUND_AT)

    assert written == [suppressed]
    frame = store.findings()
    assert list(frame.columns) == FINDING_COLUMNS
    [row] = frame.to_dict("records")
    assert row == {
        "repository": REPO,
        "commit": commit_sha(1),
        "branch": "release/1.0",
        "source": "build",
        "found_at": FOUND_AT,
        **dataclasses.asdict(suppressed),
    }


def test_a_finding_without_optional_fields_has_nulls(store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={})
    store.record_findings(REPO, commit_sha(1), "build", [GPL], found_at=FOUND_AT)

    [row] = store.findings().to_dict("records")
    assert (row["file"], row["version"], row["suppression_reason"]) == (None, None, None)
    assert pd.isna(row["line"]) and row["suppressed"] is False


def test_re_recording_build_findings_replaces_them(store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={})
    store.record_findings(REPO, commit_sha(1), "build", [ASSERT_USED, GPL], found_at=FOUND_AT)
    store.record_findings(REPO, commit_sha(1), "build", [LEAKED_TOKEN], found_at=FOUND_AT)
    assert rule_names(store.findings()) == ["github-token"]

    store.record_findings(REPO, commit_sha(1), "build", [], found_at=FOUND_AT)
    assert store.findings().empty


def test_a_rescan_adds_only_new_findings_and_returns_them(store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={})
    store.record_findings(REPO, commit_sha(1), "build", [ASSERT_USED], found_at=FOUND_AT)
    later = FOUND_AT + timedelta(days=30)
    # Already known by its identity, whatever its wording or severity now.
    reworded = dataclasses.replace(ASSERT_USED, severity="medium", message="assert again")

    new = store.record_findings(
        REPO, commit_sha(1), "rescan", [reworded, OLD_JINJA, OLD_JINJA], found_at=later
    )
    assert new == [OLD_JINJA]
    assert store.record_findings(REPO, commit_sha(1), "rescan", [OLD_JINJA], found_at=later) == []

    frame = store.findings()
    assert list(zip(frame["rule"], frame["source"], frame["found_at"], strict=True)) == [
        ("GHSA-h5c8-rqwp-cp95", "rescan", later),
        ("B101", "build", FOUND_AT),
    ]


@pytest.mark.parametrize(
    "changed",
    [
        {"kind": "secret"},
        {"rule": "B102"},
        {"file": "other.py"},
        {"line": 4},
        {"line": None},
        {"package": "jinja2"},
        {"version": "3.1.3"},
    ],
    ids=lambda changed: "-".join(f"{key}={value}" for key, value in changed.items()),
)
def test_a_rescan_finding_differing_in_one_identity_field_is_new(
    store: HistoryStore, changed: dict[str, Any]
) -> None:
    record_build(store, commit_sha(1), stages={})
    store.record_findings(REPO, commit_sha(1), "build", [ASSERT_USED], found_at=FOUND_AT)
    other = dataclasses.replace(ASSERT_USED, **changed)

    assert store.record_findings(REPO, commit_sha(1), "rescan", [other], found_at=FOUND_AT) == [
        other
    ]


def test_re_recording_build_findings_keeps_rescan_findings(store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={})
    store.record_findings(REPO, commit_sha(1), "build", [ASSERT_USED], found_at=FOUND_AT)
    store.record_findings(REPO, commit_sha(1), "rescan", [OLD_JINJA], found_at=FOUND_AT)
    store.record_findings(REPO, commit_sha(1), "build", [GPL], found_at=FOUND_AT)

    assert sorted(zip(store.findings()["source"], rule_names(store.findings()), strict=True)) == [
        ("build", "GPL-3.0-only"),
        ("rescan", "GHSA-h5c8-rqwp-cp95"),
    ]


def test_a_rescan_compares_with_that_commits_findings_only(store: HistoryStore) -> None:
    for number in (1, 2):
        record_build(store, commit_sha(number), stages={})
    store.record_findings(REPO, commit_sha(1), "build", [OLD_JINJA], found_at=FOUND_AT)

    new = store.record_findings(REPO, commit_sha(2), "rescan", [OLD_JINJA], found_at=FOUND_AT)
    assert new == [OLD_JINJA]


def test_findings_of_an_unrecorded_build_are_refused(store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={}, repository="other")
    for source in ("build", "rescan"):
        with pytest.raises(LookupError, match=f"no build of {REPO}@{commit_sha(1)}"):
            store.record_findings(REPO, commit_sha(1), source, [GPL], found_at=FOUND_AT)
    assert store.findings().empty


@pytest.mark.parametrize(
    ("source", "finding", "message"),
    [
        ("build", dataclasses.replace(GPL, kind="licence"), "unknown finding kind 'licence'"),
        ("build", dataclasses.replace(GPL, severity="HIGH"), "unknown finding severity 'HIGH'"),
        ("build", dataclasses.replace(GPL, severity=""), "unknown finding severity ''"),
        ("nightly", GPL, "unknown finding source 'nightly'"),
    ],
    ids=["kind", "severity-case", "severity-empty", "source"],
)
def test_unknown_finding_kinds_severities_and_sources_are_refused(
    store: HistoryStore, source: str, finding: FindingRecord, message: str
) -> None:
    record_build(store, commit_sha(1), stages={})
    with pytest.raises(ValueError, match=message):
        store.record_findings(
            REPO, commit_sha(1), source, [ASSERT_USED, finding], found_at=FOUND_AT
        )
    assert store.findings().empty  # nothing of the batch was written


def test_findings_found_at_a_naive_datetime_are_refused(store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={})
    with pytest.raises(ValueError, match="naive datetime"):
        store.record_findings(REPO, commit_sha(1), "build", [], found_at=datetime(2025, 3, 2))


def test_findings_are_per_newest_build_most_severe_first_and_filter(store: HistoryStore) -> None:
    # Distinct 7-character prefixes (commit_sha() pads with zeros).
    record_build(store, FIRST, stages={})
    record_build(store, SECOND, stages={})
    record_build(store, commit_sha(3), stages={}, repository="other")
    unknown = dataclasses.replace(OLD_JINJA, rule="PYSEC-0000-1", severity="unknown")
    critical = dataclasses.replace(LEAKED_TOKEN, severity="critical")
    later = FOUND_AT + timedelta(days=1)
    store.record_findings(REPO, FIRST, "build", [ASSERT_USED, GPL], found_at=FOUND_AT)
    store.record_findings(REPO, FIRST, "rescan", [unknown], found_at=later)
    store.record_findings(
        REPO, SECOND, "build", [ASSERT_USED, critical, OLD_JINJA], found_at=FOUND_AT
    )
    store.record_findings("other", commit_sha(3), "build", [GPL], found_at=FOUND_AT)

    frame = store.findings()
    assert list(zip(frame["repository"], frame["rule"], strict=True)) == [
        ("other", "GPL-3.0-only"),
        (REPO, "github-token"),
        (REPO, "GHSA-h5c8-rqwp-cp95"),
        (REPO, "B101"),
        (REPO, "PYSEC-0000-1"),  # unknown: the gates treat it as the worst
        (REPO, "GPL-3.0-only"),
        (REPO, "B101"),
    ]
    assert rule_names(store.findings(REPO, commit=FIRST[:7])) == [
        "PYSEC-0000-1",
        "GPL-3.0-only",
        "B101",
    ]
    assert rule_names(store.findings(kind="license")) == ["GPL-3.0-only", "GPL-3.0-only"]
    assert rule_names(store.findings(source="rescan")) == ["PYSEC-0000-1"]
    assert rule_names(store.findings(since=later)) == ["PYSEC-0000-1"]
    # A prefix is matched literally, with no LIKE wildcards.
    assert store.findings(commit="%").empty and store.findings(commit="a_").empty
    empty = store.findings(repository="nobody")
    assert empty.empty and list(empty.columns) == FINDING_COLUMNS


RESCANS = 30


def rescan_repeatedly(url: str, ready: Barrier) -> None:
    """One rescanning process: every rescan finds one more advisory."""
    history = HistoryStore(url)
    ready.wait(timeout=60)  # both processes started and connected: rescan at the same time
    try:
        for number in range(RESCANS):
            advisory = dataclasses.replace(OLD_JINJA, rule=f"GHSA-{number}")
            history.record_findings(REPO, SHARED_SHA, "rescan", [advisory], found_at=FOUND_AT)
    finally:
        history.dispose()


def test_two_processes_rescanning_a_commit_at_once_record_each_finding_once(
    database_url: str, store: HistoryStore
) -> None:
    record_build(store, SHARED_SHA, stages={})
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(2)
    rescans = [context.Process(target=rescan_repeatedly, args=(database_url, ready)) for _ in "ab"]
    for process in rescans:
        process.start()
    try:
        for process in rescans:
            process.join(timeout=120)
    finally:
        for process in rescans:
            if process.is_alive():
                process.kill()
    assert [process.exitcode for process in rescans] == [0, 0]
    assert sorted(rule_names(store.findings())) == sorted(f"GHSA-{n}" for n in range(RESCANS))


def test_deleting_a_build_deletes_its_findings(database_url: str, store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={})
    store.record_findings(REPO, commit_sha(1), "build", [GPL], found_at=FOUND_AT)
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                connection.exec_driver_sql("PRAGMA foreign_keys = ON")
            connection.execute(sa.text("DELETE FROM builds"))
    finally:
        engine.dispose()
    assert select_all(database_url, sa.text("SELECT count(*) FROM findings")) == [0]


# -- artifacts() -----------------------------------------------------------------------------

ARTIFACT_COLUMNS = ["repository", "commit", "branch", "path", "sha256", "size_bytes", "recorded_at"]


def test_artifacts_list_digest_size_path_and_commit_newest_first(store: HistoryStore) -> None:
    record_build(store, commit_sha(1), stages={})
    record_build(store, commit_sha(2), stages={}, branch="dev", repository="other")
    store.record_artifacts(
        REPO,
        commit_sha(1),
        [ArtifactRecord("dist/b.whl", "b" * 64, 20), ArtifactRecord("dist/a.tar.gz", "a" * 64, 10)],
    )
    cutoff = datetime.now(UTC)
    store.record_artifacts(
        "other", commit_sha(2), [ArtifactRecord("app.bin", "c" * 64, 5_000_000_000)]
    )

    frame = store.artifacts()
    assert list(frame.columns) == ARTIFACT_COLUMNS
    assert [tuple(row)[:-1] for row in frame.itertuples(index=False)] == [
        ("other", commit_sha(2), "dev", "app.bin", "c" * 64, 5_000_000_000),
        (REPO, commit_sha(1), "main", "dist/a.tar.gz", "a" * 64, 10),
        (REPO, commit_sha(1), "main", "dist/b.whl", "b" * 64, 20),
    ]
    assert list(store.artifacts(REPO)["path"]) == ["dist/a.tar.gz", "dist/b.whl"]
    assert list(store.artifacts(since=cutoff)["path"]) == ["app.bin"]
    assert (store.artifacts()["recorded_at"].dt.tz is not None) and (
        store.artifacts(since=cutoff)["recorded_at"].iloc[0] >= cutoff
    )
    empty = store.artifacts(repository="nobody")
    assert empty.empty and list(empty.columns) == ARTIFACT_COLUMNS


def test_opening_a_0003_database_dates_its_artifacts_from_their_build(database_url: str) -> None:
    run_alembic(database_url, "upgrade", "0003")
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(
                sa.text("INSERT INTO repositories (id, name, url) VALUES (1, :name, NULL)"),
                {"name": REPO},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO builds (id, repository_id, commit_sha, ref, branch, run_id,"
                    " created_at, updated_at) VALUES (7, 1, :sha, 'refs/heads/main', 'main',"
                    " 'run-1', :at, :updated)"
                ),
                {"sha": commit_sha(1), "at": AUTHORED_AT, "updated": FOUND_AT},
            )
            connection.execute(
                sa.text(
                    "INSERT INTO artifacts (build_id, path, sha256, size_bytes)"
                    " VALUES (7, 'dist/app.whl', :sha256, 42)"
                ),
                {"sha256": "d" * 64},
            )
    finally:
        engine.dispose()

    history = HistoryStore(database_url)
    try:
        [artifact] = history.artifacts().to_dict("records")
        assert (artifact["path"], artifact["recorded_at"]) == ("dist/app.whl", FOUND_AT)
        history.record_findings(REPO, commit_sha(1), "build", [GPL], found_at=FOUND_AT)
    finally:
        history.dispose()

    run_alembic(database_url, "downgrade", "0003")
    assert "findings" not in table_names(database_url)
    assert select_all(database_url, sa.text("SELECT path FROM artifacts")) == ["dist/app.whl"]


# -- the history CLI -------------------------------------------------------------------------


@pytest.mark.slow  # starts the cicd CLI
def test_history_scans_and_artifacts_commands_list_what_the_store_holds(
    tmp_path: Path, database_url: str, store: HistoryStore
) -> None:
    record_build(store, commit_sha(0xA1), stages={})
    record_build(store, commit_sha(0xB2), stages={}, repository="other")
    store.record_findings(
        REPO, commit_sha(0xA1), "build", [LEAKED_TOKEN, ASSERT_USED], found_at=FOUND_AT
    )
    store.record_findings("other", commit_sha(0xB2), "build", [OLD_JINJA], found_at=FOUND_AT)
    store.record_artifacts(REPO, commit_sha(0xA1), [ArtifactRecord("dist/app.whl", "e" * 64, 42)])
    config = control_config(
        tmp_path, {REPO: tmp_path / REPO}, extra=f"history_db: {database_url}\n"
    )

    def cicd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cicd_dagster", "--config", str(config), "history", *args],
            env={key: value for key, value in os.environ.items() if key != "CICD_CONFIG"},
            capture_output=True,
            text=True,
            timeout=120,
        )

    scans = cicd("scans", "--format", "json")
    assert scans.returncode == 0, scans.stderr
    rows = json.loads(scans.stdout)
    assert [(row["repository"], row["rule"], row["severity"]) for row in rows] == [
        ("other", "GHSA-h5c8-rqwp-cp95", "medium"),
        (REPO, "github-token", "high"),
        (REPO, "B101", "low"),
    ]
    assert rows[1]["message"] == LEAKED_TOKEN.message and rows[1]["line"] == 7
    filtered = cicd(
        *("scans", "--repo", REPO, "--commit", commit_sha(0xA1), "--kind", "secret"),
        *("--since", "2025-03-01", "--format", "json"),
    )
    assert [row["rule"] for row in json.loads(filtered.stdout)] == ["github-token"], filtered.stderr

    bad_kind = cicd("scans", "--kind", "virus")
    assert bad_kind.returncode == 2
    assert "--kind 'virus': use one of sast, dependency, license, secret" in bad_kind.stderr

    artifacts = cicd("artifacts", "--repo", REPO, "--format", "json")
    assert artifacts.returncode == 0, artifacts.stderr
    [artifact] = json.loads(artifacts.stdout)
    assert (artifact["commit"], artifact["path"], artifact["sha256"], artifact["size_bytes"]) == (
        commit_sha(0xA1),
        "dist/app.whl",
        "e" * 64,
        42,
    )
    assert "e" * 64 in cicd("artifacts", "--since", "1d").stdout  # a table by default
