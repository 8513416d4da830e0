"""Monitoring, `cicd status`, `cicd infra` and drift against a real deployed environment:
a local service behind a real nginx, killed and changed by hand, repaired by apply.

Sensors are evaluated as the daemon does (evaluate_tick), and their asset events are
reported to the Dagster instance, as the daemon does too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pandas as pd
import pytest
from dagster import (
    AssetCheckEvaluation,
    AssetCheckKey,
    AssetKey,
    AssetObservation,
    DagsterInstance,
    Definitions,
    build_sensor_context,
)
from dagster._core.definitions.sensor_definition import SensorExecutionData

from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.definitions import build_definitions
from cicd_dagster.deploy import infra
from cicd_dagster.deploy.local import process_group_alive
from cicd_dagster.stages.deploy import environment_for
from cicd_dagster.store import HistoryStore
from jobs.inprocess import deploy_commit_in_process, run_commit
from tests.integration.test_deploy import CICD
from tests.support import commit, control_config, http_get, junit_xml, pipeline_writing_reports

# Answers /healthz; /boom logs a traceback (to stderr, the slot's log) and answers 500.
SERVICE = """\
import os
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def price(order):
    raise ValueError(f"negative price for {order}")


class Service(BaseHTTPRequestHandler):
    def do_GET(self):
        status, body = 200, os.environ["CICD_COMMIT_SHA"].encode()
        if self.path == "/boom":
            try:
                price("order-7")
            except ValueError:
                traceback.print_exc()
                status = 500
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Service).serve_forever()
"""
DEV = (
    "environments:\n"
    "  - name: dev\n"
    "    health_interval_s: 5\n"
    "    strategy: {type: recreate}\n"
    "    verify: {interval_s: 0.1}\n"
)


def cicd(config: ControlConfig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CICD, "--config", str(config.config_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def pids_of(config: ControlConfig) -> list[int]:
    """Every process the project runs: supervisors, services, nginx masters."""
    pids = []
    for folder in (config.home / "services").glob("*"):
        for state in folder.glob("*.json"):
            data = json.loads(state.read_text())
            pids += [pid for pid in (data["pid"], data["child_pid"]) if pid]
    for pid_file in (config.home / "routers").glob("*/nginx.pid"):
        pids.append(int(pid_file.read_text()))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@pytest.fixture
def control(tmp_path: Path, nginx: str) -> Iterator[ControlConfig]:
    """dev deployed with a green commit; everything the project started is stopped after."""
    config = load_control_config(control_config(tmp_path, {"app": tmp_path / "app"}, DEV))
    yield config
    infra.down(config)
    for pid in pids_of(config):  # a test that failed half-way leaves nothing behind
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def deploy_dev(tmp_path: Path, config: ControlConfig) -> str:
    pipeline = pipeline_writing_reports(
        junit_xml(2), extra="service: {run: 'exec python service.py', health: /healthz}\n"
    )
    sha = commit(tmp_path / "app", {"service.py": SERVICE, ".cicd.yml": pipeline})
    report = run_commit(config, "app", sha, ref="main", branch="main", stream_logs=False)
    assert report["status"] == "success", report
    deployed = deploy_commit_in_process(config, "app", "dev", sha)
    assert deployed["status"] == "deployed", deployed
    return sha


class Daemon:
    """Evaluates sensors as the daemon does and reports their asset events."""

    def __init__(self, config: ControlConfig) -> None:
        self.defs: Definitions = build_definitions(config, stream_logs=False)
        self.instance = DagsterInstance.get()
        self.cursors: dict[str, str | None] = {}

    def tick(self, name: str) -> SensorExecutionData:
        sensor = self.defs.resolve_sensor_def(name)
        context = build_sensor_context(
            instance=self.instance,
            cursor=self.cursors.get(name),
            definitions=self.defs,
            sensor_name=name,
            resources=self.defs.resources,
        )
        data = sensor.evaluate_tick(context)
        assert not data.run_requests  # watching never launches runs
        for event in data.asset_events:
            self.instance.report_runless_asset_event(event)
        self.cursors[name] = data.cursor
        return data

    def check_passed(self, check: AssetCheckKey) -> bool | None:
        history = self.instance.event_log_storage.get_asset_check_execution_history(check, 1)
        if not history:
            return None
        evaluation = history[0].event.dagster_event.event_specific_data
        return bool(evaluation.passed)


def kill_by_hand(config: ControlConfig) -> list[int]:
    """SIGKILL the dev slot's supervisor and service, as an operator might."""
    env = environment_for(config, "app", config.environment("dev"))
    [slot] = env.slots()
    state = env.target.status(slot.name)
    assert state is not None and state.pid and state.child_pid
    os.kill(state.pid, signal.SIGKILL)
    os.killpg(state.child_pid, signal.SIGKILL)
    for _ in range(200):
        if not process_group_alive(state.child_pid) and not alive(state.pid):
            break
        time.sleep(0.05)
    return [state.pid, state.child_pid]


@pytest.mark.slow
def test_a_killed_slot_opens_an_incident_drifts_and_apply_repairs_it(tmp_path, control):
    sha = deploy_dev(tmp_path, control)
    history = HistoryStore(control.history_db_url)
    daemon = Daemon(control)
    deployment = AssetKey(["app", "deployment_dev"])
    no_drift = AssetCheckKey(deployment, "no_drift")
    assert infra.plan(control) == []
    # The deploy job leaves the check to the drift sensor (it plans every environment).
    assert daemon.check_passed(no_drift) is None
    daemon.tick("infrastructure_drift")
    assert daemon.check_passed(no_drift) is True

    # Healthy: an observation with numbers on the live commit's partition.
    data = daemon.tick("deployment_health")
    [observation] = data.asset_events
    assert isinstance(observation, AssetObservation)
    assert (observation.asset_key, observation.partition) == (deployment, sha)
    assert observation.metadata["health"].value == "healthy"
    assert observation.metadata["ok_probes"].value == 3
    assert observation.metadata["latency_ms"].value > 0
    assert "app/dev healthy" in (data.skip_message or "")
    assert len(history.probes("app", "dev")) == 3
    [evaluation] = daemon.tick("infrastructure_drift").asset_events
    assert isinstance(evaluation, AssetCheckEvaluation) and evaluation.passed
    assert daemon.check_passed(no_drift) is True

    # A traceback in the service's log: one service_error event, not repeated.
    url = environment_for(control, "app", control.environment("dev")).router.url
    with pytest.raises(Exception, match="500"):
        http_get(url + "/boom")
    daemon.tick("deployment_health")
    daemon.tick("deployment_health")
    errors = history.events("app", kind="service_error")
    assert len(errors) == 1
    assert (
        errors.iloc[0]["message"].splitlines()[0].endswith("ValueError: negative price for order-7")
    )
    assert errors.iloc[0]["commit"] == sha

    # Killed by hand: the plan, the drift check, an incident, the status all say so.
    kill_by_hand(control)
    [change] = infra.plan(control)
    assert (change.action, change.resource, change.environment) == ("restart", "slot", "dev")
    [evaluation] = daemon.tick("infrastructure_drift").asset_events
    assert not evaluation.passed
    assert evaluation.metadata["changes"].value == 1
    assert daemon.check_passed(no_drift) is False
    daemon.tick("infrastructure_drift")  # still drifting: no second event
    drift_events = history.events("app", kind="drift")
    assert len(drift_events) == 1 and "restart slot" in drift_events.iloc[0]["message"]

    data = daemon.tick("deployment_health")
    [observation] = data.asset_events
    assert observation.metadata["health"].value == "down"
    assert observation.metadata["ok_probes"].value == 0
    incidents = history.incidents("app", "dev")
    assert len(incidents) == 1 and incidents.iloc[0]["commit"] == sha
    assert pd.isna(incidents.iloc[0]["closed_at"])
    first_failing = history.probes("app", "dev").query("not ok")["at"].min()
    assert incidents.iloc[0]["opened_at"] == first_failing
    done = cicd(control, "status", "--json")
    assert done.returncode == 0, done.stderr
    [status] = json.loads(done.stdout)
    assert (status["health"], status["incident_since"] is not None) == ("down", True)
    assert (status["slots_running"], status["replicas"]) == (0, 1)

    # cicd infra plan: exit 1 with the change; apply repairs; plan is empty again.
    done = cicd(control, "infra", "plan", "--json")
    assert done.returncode == 1, done.stderr
    assert [c["resource"] for c in json.loads(done.stdout)] == ["slot"]
    done = cicd(control, "infra", "apply", "--json")
    assert done.returncode == 0, done.stderr
    assert [c["action"] for c in json.loads(done.stdout)] == ["restart"]
    done = cicd(control, "infra", "plan")
    assert done.returncode == 0, done.stderr
    assert "no changes" in done.stderr
    assert http_get(url) == sha

    # Recovery closes the incident (time to restore) and the check passes again.
    data = daemon.tick("deployment_health")
    assert data.asset_events[0].metadata["health"].value == "healthy"
    incidents = history.incidents("app", "dev")
    assert len(incidents) == 1
    assert incidents.iloc[0]["duration_s"] >= 0
    kinds = list(history.events("app")["kind"])
    assert kinds.count("incident_opened") == 1 and kinds.count("incident_closed") == 1
    [evaluation] = daemon.tick("infrastructure_drift").asset_events
    assert evaluation.passed
    assert daemon.check_passed(no_drift) is True
    assert len(history.events("app", kind="drift")) == 1

    done = cicd(control, "status", "--json")
    [status] = json.loads(done.stdout)
    assert set(status) == {
        "repository",
        "environment",
        "health",
        "commit",
        "version",
        "url",
        "since",
        "strategy",
        "target",
        "replicas",
        "slots_running",
        "incident_since",
        "incident_reason",
    }
    assert status["repository"] == "app" and status["environment"] == "dev"
    assert (status["health"], status["commit"], status["version"]) == ("healthy", sha, sha)
    assert (status["url"], status["strategy"], status["target"]) == (url, "recreate", "local")
    assert status["since"] is not None and status["incident_since"] is None
    done = cicd(control, "history", "incidents", "--format", "json")
    [row] = json.loads(done.stdout)
    assert row["commit"] == sha and row["closed_at"] is not None


@pytest.mark.slow
def test_an_environment_removed_from_cicd_yaml_shows_as_delete_and_down_stops_all(
    tmp_path, control
):
    sha = deploy_dev(tmp_path, control)
    pids = pids_of(control)
    assert len(pids) == 3 and all(map(alive, pids))  # supervisor, service, nginx

    # dev leaves cicd.yaml while it runs: the plan deletes it.
    control.config_path.write_text(control.config_path.read_text().replace("name: dev", "name: qa"))
    renamed = load_control_config(control.config_path)
    changes = infra.plan(renamed)
    assert ("delete", "environment", "dev") in [
        (c.action, c.resource, c.environment) for c in changes
    ]

    done = cicd(renamed, "status", "--json")
    assert done.returncode == 0, done.stderr
    [status] = json.loads(done.stdout)
    assert (status["environment"], status["health"], status["commit"]) == (
        "qa",
        "not_deployed",
        None,
    )
    assert sha not in done.stdout

    done = cicd(renamed, "down")
    assert done.returncode == 0, done.stderr
    assert "slot dev." in done.stderr and "router" in done.stderr
    assert not any(map(alive, pids))
    assert [c for c in infra.plan(renamed) if c.is_drift] == []


def test_plan_on_an_empty_home_provisions_and_apply_is_idempotent(tmp_path):
    config = load_control_config(control_config(tmp_path, {"app": tmp_path / "app"}, DEV))
    done = cicd(config, "infra", "plan", "--json")
    assert done.returncode == 1, done.stderr
    planned = json.loads(done.stdout)
    assert [(c["action"], c["resource"], c["drift"]) for c in planned] == [
        ("create", "folder", False),
        ("create", "port", False),
    ]
    assert not (config.home / "routers").exists()  # planning made nothing

    done = cicd(config, "infra", "apply")
    assert done.returncode == 0, done.stderr
    assert (config.home / "environments" / "app" / "dev").is_dir()
    port = (config.home / "routers" / "app-dev" / "port").read_text()
    assert infra.plan(config) == []
    assert infra.apply(config) == []
    assert (config.home / "routers" / "app-dev" / "port").read_text() == port

    done = cicd(config, "status")
    assert done.returncode == 0, done.stderr
    assert "not deployed" in done.stdout
    done = cicd(config, "down")
    assert done.returncode == 0 and "nothing was running" in done.stderr
