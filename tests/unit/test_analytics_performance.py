"""Performance and usage analytics over a real (SQLite) history DB and hand-made frames of
Dagster runs, materializations and router access logs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from cicd_dagster.analytics.performance import (
    BUILD_ENV_COLUMNS,
    RUN_COLUMNS,
    cache_hit_rate,
    job_times,
    performance_report,
    run_times,
)
from cicd_dagster.analytics.usage import (
    UNKNOWN_VERSION,
    busiest_hours,
    count_requests,
    deployment_counts,
    trigger_counts,
)
from cicd_dagster.store import DeploymentRecord, GateRecord, HistoryStore, StageRecord

NOW = datetime.now(UTC)


@pytest.fixture
def history(tmp_path: Path) -> Iterator[HistoryStore]:
    store = HistoryStore(f"sqlite:///{tmp_path / 'history.db'}")
    yield store
    store.dispose()


def _build(
    history: HistoryStore, sha: str, durations: dict[str, float], test_s: float, bench: float
) -> None:
    history.record_build("app", sha, ref="main", branch="main", run_id=None)
    for name, duration in durations.items():
        history.record_stage("app", sha, StageRecord(name, "success", NOW, duration))
    history.record_stage("app", sha, StageRecord("e2e", "not_configured", NOW, 0.0))
    tests = pd.DataFrame(
        {
            "classname": ["t", "t"],
            "name": ["slow", "quick"],
            "duration_s": [test_s, 0.01],
            "status": ["passed", "passed"],
        }
    )
    history.record_test_cases("app", sha, "unit", tests)
    benchmarks = pd.DataFrame(
        {
            "name": ["parse"],
            "fullname": ["bench.py::parse"],
            "mean_s": [bench],
            "median_s": [bench],
            "stddev_s": [0.0],
            "min_s": [bench],
            "max_s": [bench],
            "rounds": [5],
            "baseline_mean_s": [1.0],
            "regression": [bench - 1.0],
        }
    )
    history.record_stage("app", sha, StageRecord("performance", "success", NOW, 2.0))
    history.record_benchmarks("app", sha, "performance", benchmarks)
    history.record_gates(
        "app",
        sha,
        "performance",
        [GateRecord("max_perf_regression", bench - 1.0 <= 0.1, bench - 1.0, 0.1, "")],
    )


def _empty_runs() -> pd.DataFrame:
    return pd.DataFrame(columns=RUN_COLUMNS)


def test_an_empty_history_says_no_data(history: HistoryStore) -> None:
    report = performance_report(
        history,
        since=NOW - timedelta(days=30),
        until=NOW,
        build_envs=pd.DataFrame(columns=BUILD_ENV_COLUMNS),
        runs=_empty_runs(),
    )
    assert report.summary() == {
        "builds": 0,
        "build_median_s": None,
        "build_p90_s": None,
        "cache_hit_rate": None,
        "benchmark_regressions": 0,
        "runs": 0,
        "queue_median_s": None,
        "run_median_s": None,
    }
    assert report.stages.empty and report.slowest_tests.empty and report.jobs.empty


def test_durations_slowest_tests_and_regressions_over_two_windows(history: HistoryStore) -> None:
    _build(history, "a" * 40, {"source": 1.0, "build": 10.0, "unit": 4.0}, 2.0, 1.05)
    since = datetime.now(UTC)
    _build(history, "b" * 40, {"source": 1.0, "build": 20.0, "unit": 6.0}, 3.0, 1.5)
    until = datetime.now(UTC) + timedelta(seconds=1)

    report = performance_report(
        history,
        since=since,
        until=until,
        build_envs=pd.DataFrame(columns=BUILD_ENV_COLUMNS),
        runs=_empty_runs(),
    )

    assert report.builds["commit"].tolist() == ["b" * 40]
    build = report.builds.iloc[0]
    # The stages that ran, performance included; e2e was not configured.
    assert build["duration_s"] == pytest.approx(29.0)
    assert "e2e" not in report.builds.columns and build["build"] == 20.0
    slowest = report.slowest_tests.iloc[0]
    assert (slowest["name"], slowest["mean_s"], slowest["previous_mean_s"]) == ("slow", 3.0, 2.0)
    assert slowest["change"] == pytest.approx(0.5)
    # 50 % slower than its baseline, 10 % allowed: the gate's rule marks it.
    assert report.benchmarks["regressed"].tolist() == [True]
    assert report.summary()["benchmark_regressions"] == 1

    whole = performance_report(
        history,
        since=since - timedelta(hours=1),
        until=until,
        build_envs=pd.DataFrame(columns=BUILD_ENV_COLUMNS),
        runs=_empty_runs(),
    )
    assert whole.benchmarks["regressed"].tolist() == [False, True]
    stages = whole.stages.set_index("stage")
    assert stages.loc["build", "median_s"] == 15.0 and stages.loc["build", "last_s"] == 20.0
    assert "e2e" not in stages.index


def test_cache_hit_rate_per_repository() -> None:
    envs = pd.DataFrame(
        {
            "repository": ["app", "app", "app", "web"],
            "commit": ["a", "b", "c", "d"],
            "env_reused": [False, True, True, False],
            "timestamp": [NOW] * 4,
        }
    )
    rates = cache_hit_rate(envs).set_index("repository")
    assert rates.loc["app", "hits"] == 2 and rates.loc["app", "installs"] == 3
    assert rates.loc["app", "hit_rate"] == pytest.approx(2 / 3)
    assert rates.loc["web", "hit_rate"] == 0.0


def test_queue_and_run_times_leave_out_what_has_not_happened() -> None:
    created = pd.Timestamp(NOW)
    runs = pd.DataFrame(
        {
            "run_id": ["1", "2", "3"],
            "job_name": ["ci", "ci", "ci"],
            "status": ["SUCCESS", "STARTED", "QUEUED"],
            "trigger": ["cli", "ui", "ui"],
            "created_at": [created] * 3,
            "started_at": [created + timedelta(seconds=2), created + timedelta(seconds=4), None],
            "ended_at": [created + timedelta(seconds=12), None, None],
        }
    )
    timed = run_times(runs)
    assert timed["queue_s"].tolist()[:2] == [2.0, 4.0] and pd.isna(timed["queue_s"].iloc[2])
    jobs = job_times(timed).set_index("job_name")
    assert jobs.loc["ci", "runs"] == 3 and jobs.loc["ci", "finished"] == 1
    assert jobs.loc["ci", "queue_median_s"] == 3.0 and jobs.loc["ci", "run_median_s"] == 10.0


def test_triggers_hours_and_deployments_are_counted(history: HistoryStore) -> None:
    at = pd.Timestamp("2024-05-01T09:15:00Z")
    runs = pd.DataFrame(
        {
            "run_id": ["1", "2", "3"],
            "job_name": ["app_ci", "app_ci", "app_deploy_prod"],
            "status": ["SUCCESS"] * 3,
            "trigger": ["sensor:app_commits", "sensor:app_commits", "ui"],
            "created_at": [at, at + timedelta(minutes=5), at + timedelta(hours=5)],
            "started_at": [None] * 3,
            "ended_at": [None] * 3,
        }
    )
    triggers = trigger_counts(runs)
    assert triggers.iloc[0].to_dict() == {
        "kind": "sensor",
        "trigger": "sensor:app_commits",
        "job_name": "app_ci",
        "runs": 2,
    }
    hours = busiest_hours(runs).set_index("hour")["runs"]
    assert len(hours) == 24 and hours[9] == 2 and hours[14] == 1 and hours.sum() == 3

    for environment, status in (("dev", "deployed"), ("dev", "rolled_back"), ("prod", "deployed")):
        history.record_deployment(
            "app",
            DeploymentRecord(environment, "a" * 40, "rolling", status, "a" * 40, None, "", NOW),
        )
    counts = deployment_counts(history.deployments()).set_index("environment")
    assert counts.loc["dev", "deployments"] == 2 and counts.loc["dev", "rolled_back"] == 1
    assert counts.loc["prod", "deployed"] == 1 and counts.loc["prod", "failed"] == 0
    assert deployment_counts(history.deployments(since=NOW + timedelta(days=1))).empty


def test_access_log_lines_are_counted_per_version_and_bad_lines_named(tmp_path: Path) -> None:
    def line(version: str, upstream: str, status: int = 200, time: str = NOW.isoformat()) -> str:
        entry = {"time": time, "status": status, "upstream_addr": upstream, "version": version}
        return json.dumps(entry) + "\n"

    log = tmp_path / "access.log"
    log.write_text(
        line("v1", "127.0.0.1:8001")
        + line("v2", "127.0.0.1:8002", 502)
        + "not json\n"
        # Logged without a version: the port's slot now, or unknown.
        + line("", "127.0.0.1:8001, 127.0.0.1:8002")
        + line("", "127.0.0.1:9999")
        + json.dumps({"status": 200})
        + "\n"
        + line("v1", "127.0.0.1:8001", time="2020-01-01T00:00:00+00:00")
    )
    counted = count_requests(log, {8002: "v2"}, since=NOW - timedelta(days=1))
    assert counted.malformed_lines == [3, 6]
    assert counted.counts.to_dict("records") == [
        {"version": "v2", "requests": 2, "errors": 1},
        {"version": UNKNOWN_VERSION, "requests": 1, "errors": 0},
        {"version": "v1", "requests": 1, "errors": 0},
    ]
