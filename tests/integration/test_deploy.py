"""The promotion chain for the local target: CI-green commits deployed dev -> staging
through the deployment assets, behind real nginx routers, and refusals with the reason.

Without nginx these tests skip, except under CICD_REQUIRE_NGINX=1 (CI).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.stages.deploy import environment_for
from jobs.inprocess import deploy_commit_in_process, run_commit
from tests.support import commit, control_config, http_get, junit_xml, pipeline_writing_reports

pytestmark = pytest.mark.slow  # Dagster jobs, services and nginx

CICD = [sys.executable, "-m", "cicd_dagster"]
ENVIRONMENTS = (
    "environments:\n"
    "  - name: dev\n"
    "    strategy: {type: blue_green}\n"
    "  - name: staging\n"
    "    strategy: {type: canary}\n"
)
# Answers its commit sha on every path; the build's venv python runs it.
SERVICE = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = os.environ["CICD_COMMIT_SHA"].encode()

class Service(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(VERSION)))
        self.end_headers()
        self.wfile.write(VERSION)

    def log_message(self, format, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Service).serve_forever()
"""
SERVICE_CONFIG = "service: {run: 'exec python service.py', health: /healthz}\n"


def app_commit(repo: Path, *, green: bool = True, message: str = "feat: change") -> str:
    report = junit_xml(2) if green else junit_xml(1, failed=1)
    pipeline = pipeline_writing_reports(report, extra=SERVICE_CONFIG)
    return commit(repo, {"service.py": SERVICE, ".cicd.yml": pipeline}, message)


@pytest.fixture
def control(tmp_path: Path, nginx: str) -> Iterator[ControlConfig]:
    """A control plane with dev and staging; both are stopped after the test."""
    config = load_control_config(control_config(tmp_path, {"app": tmp_path / "app"}, ENVIRONMENTS))
    yield config
    for environment in config.environments:
        env = environment_for(config, "app", environment)
        env.down()
        for state in env.target.all():
            env.target.stop(state.name, timeout_s=5)
            for pid in (state.pid, state.child_pid):
                if pid is not None:
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        env.router.stop()


def cicd(config: ControlConfig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CICD, "--config", str(config.config_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def ci(config: ControlConfig, sha: str) -> str:
    report = run_commit(config, "app", sha, ref="main", branch="main", stream_logs=False)
    return str(report["status"])


def serves(config: ControlConfig, environment: str) -> set[str]:
    url = environment_for(config, "app", config.environment(environment)).router.url
    return {http_get(url) for _ in range(5)}


def test_green_commit_is_promoted_and_bad_deploys_are_refused(tmp_path, control):
    repo = tmp_path / "app"
    good = app_commit(repo)
    assert ci(control, good) == "success"

    dev = deploy_commit_in_process(control, "app", "dev", good)
    assert dev["status"] == "deployed", dev
    assert dev["strategy"] == "blue_green"
    assert serves(control, "dev") == {good}

    # The CLI's default commit for staging is dev's verified one.
    done = cicd(control, "deploy", "app", "--env", "staging", "--json")
    assert done.returncode == 0, done.stderr
    staging = json.loads(done.stdout)
    assert (staging["status"], staging["commit"], staging["strategy"]) == (
        "deployed",
        good,
        "canary",
    )
    assert serves(control, "staging") == {good}
    # The stable address stays the same across deploys.
    assert (
        staging["url"] == environment_for(control, "app", control.environment("staging")).router.url
    )

    red = app_commit(repo, green=False, message="fix: oops")
    assert ci(control, red) == "failed"
    refused = deploy_commit_in_process(control, "app", "dev", red)
    assert refused["status"] == "refused"
    assert f"{red[:12]} is red" in refused["reason"]
    assert serves(control, "dev") == {good}

    newer = app_commit(repo, message="feat: newer")
    assert ci(control, newer) == "success"
    skipped = deploy_commit_in_process(control, "app", "staging", newer)
    assert skipped["status"] == "refused"
    assert "not the verified deployment of dev" in skipped["reason"]
    assert serves(control, "staging") == {good}

    done = cicd(control, "history", "deployments", "--format", "json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    outcomes = sorted((row["environment"], row["commit"], row["status"]) for row in rows)
    assert outcomes == sorted(
        [
            ("dev", good, "deployed"),
            ("staging", good, "deployed"),
            ("dev", red, "refused"),
            ("staging", newer, "refused"),
        ]
    )


def test_cli_deploy_exits_1_when_refused_and_down_stops_the_environment(tmp_path, control):
    sha = app_commit(tmp_path / "app")  # never built: no CI, so refused
    done = cicd(control, "deploy", "app", "--env", "dev")
    assert done.returncode == 1, done.stderr
    assert "refused" in done.stderr
    assert f"{sha[:12]} has no build" in done.stderr

    assert ci(control, sha) == "success"
    assert deploy_commit_in_process(control, "app", "dev", sha)["status"] == "deployed"
    done = cicd(control, "down", "app", "--env", "dev")
    assert done.returncode == 0, done.stderr
    env = environment_for(control, "app", control.environment("dev"))
    assert env.slots() == []
    assert not any(s.status in ("starting", "running") for s in env.target.all())
