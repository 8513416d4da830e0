"""Performance and usage analytics of real CI runs in a real Dagster instance, and requests
per version counted from a real nginx router's access log."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize

from assets.analytics_performance import (
    BUILD_PERFORMANCE_KEY,
    USAGE_ANALYTICS_KEY,
    analytics_performance_assets,
    instance_performance,
    instance_usage,
)
from cicd_dagster.analytics.usage import router_requests
from cicd_dagster.config import load_control_config
from cicd_dagster.deploy import layout
from cicd_dagster.deploy.router import Backend, NginxRouter
from cicd_dagster.resources import CicdResource
from cicd_dagster.store import HistoryStore
from jobs.inprocess import run_commit
from tests.integration.test_router import NameServer, free_port
from tests.support import commit, control_config, http_get, junit_xml

CICD = [sys.executable, "-m", "cicd_dagster"]
PIPELINE = f"""\
build:
  install: "true"
  cache: [requirements.txt]
  steps: ["mkdir -p dist && echo built > dist/app.txt"]
tests:
  unit:
    run: printf '%s' '{junit_xml(2)}' > "$CICD_REPORTS_DIR/unit.xml"
"""


@pytest.mark.slow
def test_two_ci_runs_give_durations_cache_hits_run_times_and_usage(tmp_path: Path) -> None:
    repo = tmp_path / "app"
    first = commit(repo, {".cicd.yml": PIPELINE, "requirements.txt": "\n"})
    second = commit(repo, {"README": "same dependencies\n"}, "docs: readme")
    config = load_control_config(control_config(tmp_path, {"app": repo}))
    since = datetime.now(UTC) - timedelta(minutes=1)
    for sha in (first, second):
        report = run_commit(config, "app", sha, ref="main", branch="main", stream_logs=False)
        assert report["status"] == "success", report
    until = datetime.now(UTC) + timedelta(seconds=1)
    instance = DagsterInstance.get()
    history = HistoryStore(config.history_db_url)

    performance = instance_performance(instance, config, history, since=since, until=until)
    assert performance.builds["commit"].tolist() == [first, second]
    assert (performance.builds["duration_s"] > 0).all()
    # The second commit keeps requirements.txt: its build finds the env ready.
    cache = performance.cache.set_index("repository")
    assert (cache.loc["app", "installs"], cache.loc["app", "hits"]) == (2, 1)
    jobs = performance.jobs.set_index("job_name")
    assert jobs["runs"].sum() == 2 and jobs["finished"].sum() == 2
    assert (performance.runs["queue_s"] >= 0).all() and (performance.runs["run_s"] > 0).all()
    assert set(performance.stages["stage"]) >= {"source", "build", "unit"}

    usage = instance_usage(instance, config, history, since=since, until=until)
    assert usage.triggers[["kind", "runs"]].to_dict("records") == [{"kind": "cli", "runs": 2}]
    counts = usage.assets.set_index("asset")["count"]
    assert counts["app/build"] == 2 and counts["app/unit_tests"] == 2
    assert usage.repositories.set_index("repository").loc["app", "materializations"] >= 6
    assert usage.summary()["runs"] == 2 and usage.summary()["deployments"] == 0

    cli = subprocess.run(
        [*CICD, "metrics", "performance", "--repo", "app", "--json", "-c", str(config.config_path)],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 0, cli.stderr
    document = json.loads(cli.stdout)
    assert document["summary"]["builds"] == 2 and document["summary"]["cache_hit_rate"] == 0.5
    assert [row["commit"] for row in document["builds"]] == [first, second]

    usage_cli = subprocess.run(
        [*CICD, "metrics", "usage", "-c", str(config.config_path)], capture_output=True, text=True
    )
    assert usage_cli.returncode == 0, usage_cli.stderr
    assert "triggers" in usage_cli.stdout and "app/build" in usage_cli.stdout

    assets = analytics_performance_assets(config)
    cicd = CicdResource(config_path=str(config.config_path))
    assert materialize(assets, resources={"cicd": cicd}, instance=instance).success
    performance_event = instance.get_latest_materialization_event(BUILD_PERFORMANCE_KEY)
    assert performance_event is not None and performance_event.asset_materialization is not None
    metadata = performance_event.asset_materialization.metadata
    assert metadata["builds"].value == 2 and metadata["app/cache_hit_rate"].value == 0.5
    assert metadata["build_durations_chart"].value.startswith("![build durations](data:image/png")
    assert Path(metadata["build_durations_chart_path"].value).read_bytes()[:4] == b"\x89PNG"
    usage_event = instance.get_latest_materialization_event(USAGE_ANALYTICS_KEY)
    assert usage_event is not None and usage_event.asset_materialization is not None
    # The two CLI runs and this one, which carries no trigger tag: a launch like the UI's.
    assert usage_event.asset_materialization.metadata["runs"].value == 3
    history.dispose()


def test_metrics_of_an_empty_history_say_no_data_and_bad_arguments_exit_2(
    tmp_path: Path,
) -> None:
    config = str(control_config(tmp_path, {"app": tmp_path / "app"}))
    empty = subprocess.run(
        [*CICD, "metrics", "performance", "-c", config], capture_output=True, text=True
    )
    assert empty.returncode == 0, empty.stderr
    assert "build_median_s           no data" in empty.stdout
    usage = subprocess.run(
        [*CICD, "metrics", "usage", "--json", "-c", config], capture_output=True, text=True
    )
    assert json.loads(usage.stdout)["summary"]["busiest_hour"] is None
    for args, message in (
        (["performance", "--repo", "nope"], "unknown repository 'nope'"),
        (["usage", "--since", "soon"], "--since 'soon': use 30d, 12h, 45m or an ISO date"),
        (["performance", "--since", "2999-01-01"], "is not in the past"),
    ):
        refused = subprocess.run(
            [*CICD, "metrics", *args, "-c", config], capture_output=True, text=True
        )
        assert refused.returncode == 2, (args, refused.stderr)
        assert message in refused.stderr


def test_requests_through_a_real_router_are_counted_per_version(tmp_path: Path, nginx: str) -> None:
    config = load_control_config(
        control_config(tmp_path, {"app": tmp_path / "app"}, extra="environments:\n  - name: prod\n")
    )
    old, new = NameServer("old"), NameServer("new")
    router = NginxRouter(layout.router_dir(config.home, "app", "prod"), free_port(), nginx=nginx)
    try:
        router.apply([Backend("old", old.port, 100, "1.0.0")])
        for _ in range(3):
            assert http_get(router.url) == "old"
        # Canary: both versions serve, each request logged with the one that answered.
        router.apply([Backend("old", old.port, 50, "1.0.0"), Backend("new", new.port, 50, "1.1.0")])
        answers = [http_get(router.url) for _ in range(20)]
        router.apply([Backend("new", new.port, 100, "1.1.0")])
        answers += [http_get(router.url) for _ in range(2)]
    finally:
        router.stop()
        old.stop()
        new.stop()
    counted = router_requests(config, ["app"]).set_index("version")
    assert counted.loc["1.0.0", "requests"] == 3 + answers.count("old")
    assert counted.loc["1.1.0", "requests"] == answers.count("new")
    assert (counted["environment"] == "prod").all() and counted["errors"].sum() == 0
