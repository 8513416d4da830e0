"""Flaky tests found through real CI runs of a real repository, and quarantine at the gate."""

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import materialize

from assets.analytics_flaky import TEST_HEALTH_KEY, analytics_flaky_assets
from cicd_dagster.analytics.flaky import collect_test_health
from cicd_dagster.config import load_control_config
from cicd_dagster.resources import CicdResource
from cicd_dagster.store import HistoryStore
from jobs.inprocess import run_commit
from tests.support import commit, control_config

pytestmark = pytest.mark.slow  # each test runs Dagster jobs

CICD = [sys.executable, "-m", "cicd_dagster"]

# A test runner in miniature: test_timing fails on the first run of each commit (it leaves a
# marker keyed by the commit) and passes on every later one; test_steady always passes, and
# test_broken fails when BROKEN is set. Writes JUnit XML and exits 1 on failures, as pytest.
RUNNER = """\
import os, pathlib, sys

marker = pathlib.Path(os.environ["MARKERS"]) / os.environ["CICD_COMMIT_SHA"]
first_run = not marker.exists()
marker.touch()
failing = {"test_timing": first_run, "test_broken": bool(os.environ.get("BROKEN"))}
cases = "".join(
    f'<testcase classname="tests.test_app" name="{name}">'
    + ('<failure message="boom"/>' if failed else "")
    + "</testcase>"
    for name, failed in {"test_steady": False, **failing}.items()
)
report = pathlib.Path(os.environ["CICD_REPORTS_DIR"]) / "unit.xml"
report.write_text(f'<testsuite name="unit">{cases}</testsuite>')
sys.exit(1 if any(failing.values()) else 0)
"""


def pipeline(markers: Path, extra: str = "", broken: bool = False) -> str:
    env = f"env: {{MARKERS: '{markers}'" + (", BROKEN: '1'" if broken else "") + "}\n"
    return f"tests:\n  unit:\n    run: python run_tests.py\n{extra}{env}"


def ci(config_path: Path, sha: str) -> dict:
    config = load_control_config(config_path)
    return run_commit(config, "app", sha, ref="main", branch="main", stream_logs=False)


def gate(report: dict) -> dict:
    return next(g for g in report["gates"] if g["name"] == "unit.min_pass_rate")


def test_a_test_that_fails_then_passes_on_a_rerun_is_found_flaky(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    repo = tmp_path / "app"
    steady = commit(repo, {"run_tests.py": RUNNER, ".cicd.yml": pipeline(markers)})
    config_path = control_config(tmp_path, {"app": repo})
    assert ci(config_path, steady)["status"] == "failed"
    assert ci(config_path, steady)["status"] == "success"  # the re-run passes

    control = load_control_config(config_path)
    history = HistoryStore(control.history_db_url)
    recorded = history.tests("app").set_index("name")
    # History keeps the last run's outcome, and that the test passed and failed here.
    assert recorded.loc["test_timing", ["status", "flaky"]].tolist() == ["passed", True]
    assert recorded.loc["test_steady", ["status", "flaky"]].tolist() == ["passed", False]

    health = collect_test_health(control, history, datetime.now(UTC) - timedelta(days=1))
    ranking = health.ranking
    assert ranking["test"].tolist() == ["tests.test_app::test_timing"]
    assert ranking.loc[0, ["runs", "flips", "flip_rate"]].tolist() == [2, 1, 1.0]
    assert ranking.loc[0, "commits"] == [steady]
    (app,) = health.repositories
    assert (app.tests, app.flaky, app.worst_flip_rate) == (3, 1, 1.0)

    done = subprocess.run(
        [*CICD, "--config", str(config_path), "metrics", "flaky", "--repo", "app", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["summary"] == {"flaky_tests": 1, "worst_flip_rate": 1.0, "stale_quarantine": 0}
    assert [(t["test"], t["commits"]) for t in document["tests"]] == [
        ("tests.test_app::test_timing", [steady])
    ]

    result = materialize(
        analytics_flaky_assets(control),
        resources={"cicd": CicdResource(config_path=str(config_path))},
    )
    (materialization,) = result.asset_materializations_for_node("analytics__test_health")
    assert materialization.asset_key == TEST_HEALTH_KEY
    metadata = materialization.metadata
    assert metadata["flaky_tests"].value == 1
    assert metadata["app/worst_flip_rate"].value == 1.0
    assert Path(metadata["flaky_tests_chart_path"].value).read_bytes().startswith(b"\x89PNG")


def test_quarantine_lets_the_gate_pass_and_still_reports_the_failure(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    repo = tmp_path / "app"
    quarantine = '  quarantine: ["tests.test_app::test_tim*", "tests.gone::*"]\n'
    sha = commit(repo, {"run_tests.py": RUNNER, ".cicd.yml": pipeline(markers, quarantine)})
    config_path = control_config(tmp_path, {"app": repo})

    report = ci(config_path, sha)
    assert report["status"] == "success"
    assert report["stages"]["unit"]["status"] == "success"
    assert report["stages"]["unit"]["failed"] == 1
    assert gate(report)["passed"] is True
    assert gate(report)["detail"] == (
        "2 of 2 tests passed (100.0%; minimum 100.0%); "
        "1 quarantined failure: tests.test_app::test_timing"
    )
    control = load_control_config(config_path)
    history = HistoryStore(control.history_db_url)
    recorded = history.tests("app").set_index("name")
    assert recorded.loc["test_timing", "status"] == "failed"  # still failed in history

    (app,) = collect_test_health(
        control, history, datetime.now(UTC) - timedelta(days=1)
    ).repositories
    assert app.quarantine == ("tests.test_app::test_tim*", "tests.gone::*")
    assert app.stale_quarantine == ("tests.gone::*",)


def test_a_failure_outside_the_quarantine_still_fails_the_gate(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    repo = tmp_path / "app"
    quarantine = '  quarantine: ["tests.test_app::test_timing"]\n'
    files = {"run_tests.py": RUNNER, ".cicd.yml": pipeline(markers, quarantine, broken=True)}
    report = ci(control_config(tmp_path, {"app": repo}), commit(repo, files))
    assert report["status"] == "failed"
    assert gate(report)["passed"] is False
    assert gate(report)["detail"].startswith("1 of 2 tests passed (50.0%; minimum 100.0%); ")
    assert "1 quarantined failure: tests.test_app::test_timing" in gate(report)["detail"]
