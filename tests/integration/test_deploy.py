"""The promotion chain for the local target: CI-green commits deployed dev -> staging
through the deployment assets, behind real nginx routers, and refusals with the reason.

Without nginx these tests skip, except under CICD_REQUIRE_NGINX=1 (CI).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.stages.artifact import PROVENANCE_NAME, artifact_store
from cicd_dagster.stages.deploy import environment_for
from cicd_dagster.store import HistoryStore
from cicd_dagster.workspace import CommitWorkspace
from jobs.inprocess import deploy_commit_in_process, run_commit
from tests.support import (
    TrafficProbe,
    commit,
    control_config,
    http_get,
    junit_xml,
    pipeline_writing_reports,
    tear_down,
)

pytestmark = pytest.mark.slow  # Dagster jobs, services and nginx

CICD = [sys.executable, "-m", "cicd_dagster"]
ENVIRONMENTS = (
    "environments:\n"
    "  - name: dev\n"
    "    strategy: {type: blue_green}\n"
    "  - name: staging\n"
    "    strategy: {type: canary}\n"
)
# Answers its commit sha on every path but /env/NAME, which answers that variable; the
# build's venv python runs it.
SERVICE = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = os.environ["CICD_COMMIT_SHA"]

class Service(BaseHTTPRequestHandler):
    def do_GET(self):
        name = self.path.removeprefix("/env/")
        body = (os.environ.get(name, "") if name != self.path else VERSION).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

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
def make_control(tmp_path: Path, nginx: str) -> Iterator[Callable[[str], ControlConfig]]:
    """Writes cicd.yaml with these environments (again: a change of config) and loads it;
    every environment is stopped after the test."""
    made: list[ControlConfig] = []

    def make(environments: str) -> ControlConfig:
        path = control_config(tmp_path, {"app": tmp_path / "app"}, environments)
        made.append(load_control_config(path))
        return made[-1]

    yield make
    for config in made:
        for environment in config.environments:
            tear_down(environment_for(config, "app", environment))


@pytest.fixture
def control(make_control: Callable[[str], ControlConfig]) -> ControlConfig:
    """A control plane with dev (blue-green) and staging (canary)."""
    return make_control(ENVIRONMENTS)


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
    assert f"{newer[:12]} was never verified in dev" in skipped["reason"]
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


def test_only_signed_artifacts_deploy(tmp_path, control):
    """A release whose artifact changed after signing, or whose stored provenance was
    tampered with, is refused with the reason; the environment keeps what it runs."""
    repo = tmp_path / "app"
    good = app_commit(repo)
    assert ci(control, good) == "success"
    assert deploy_commit_in_process(control, "app", "dev", good)["status"] == "deployed"

    changed = app_commit(repo, message="feat: changed after signing")
    assert ci(control, changed) == "success"
    built = CommitWorkspace.for_commit(control, "app", changed).checkout / "dist" / "app.txt"
    built.write_text("not what was signed\n")
    refused = deploy_commit_in_process(control, "app", "dev", changed)
    assert refused["status"] == "refused"
    assert "is not the signed dist/app.txt" in refused["reason"]

    forged = app_commit(repo, message="feat: forged provenance")
    assert ci(control, forged) == "success"
    store = artifact_store(control)
    row = next(r for r in store.list("app") if r.commit == forged and r.name == PROVENANCE_NAME)
    blob = store.path(row.digest)
    blob.chmod(0o644)
    blob.write_bytes(blob.read_bytes().replace(b'"payload": "', b'"payload": "e30'))
    refused = deploy_commit_in_process(control, "app", "dev", forged)
    assert refused["status"] == "refused"
    assert "has no provenance that verifies" in refused["reason"]
    assert serves(control, "dev") == {good}


TOKEN, PASSWORD, NEW_PASSWORD = "tok-9f8e7d6c5b4a", "pw-1a2b3c4d5e", "pw-rotated-6f7g"
CONFIGURED = (
    "environments:\n"
    "  - name: dev\n"
    "    strategy: {type: blue_green}\n"
    "    env: {GREETING: %s}\n"
    "    secrets:\n"
    "      API_TOKEN: {env: TEST_APP_API_TOKEN}\n"
    "      DB_PASSWORD: {file: db-password}\n"
)


def files_holding(folder: Path, text: str) -> list[Path]:
    return [
        path for path in folder.rglob("*") if path.is_file() and text.encode() in path.read_bytes()
    ]


def test_secrets_reach_only_the_service_and_a_config_change_alone_redeploys(
    tmp_path, make_control, monkeypatch, isolated_dagster_home
):
    monkeypatch.setenv("TEST_APP_API_TOKEN", TOKEN)
    (tmp_path / "db-password").write_text(PASSWORD + "\n")
    control = make_control(CONFIGURED % "hello")
    sha = app_commit(tmp_path / "app")
    assert ci(control, sha) == "success"
    url = environment_for(control, "app", control.environment("dev")).router.url

    first = deploy_commit_in_process(control, "app", "dev", sha)

    assert first["status"] == "deployed", first
    assert [http_get(f"{url}/env/{name}") for name in ("API_TOKEN", "DB_PASSWORD", "GREETING")] == [
        TOKEN,
        PASSWORD,
        "hello",
    ]
    for secret in (TOKEN, PASSWORD):
        assert files_holding(control.home, secret) == []  # state, specs, logs, history DB
        assert files_holding(isolated_dagster_home, secret) == []  # runs, events, metadata
    assert len(first["config_digest"]) == 64

    again = cicd(control, "deploy", "app", "--env", "dev", "--commit", sha, "--json")
    assert again.returncode == 0, again.stderr
    assert (json.loads(again.stdout)["status"], json.loads(again.stdout)["reason"]) == (
        "deployed",
        "already live",
    )

    (tmp_path / "db-password").write_text(NEW_PASSWORD + "\n")  # a rotated secret alone
    rotated = cicd(control, "deploy", "app", "--env", "dev", "--commit", sha, "--json")
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["config_digest"] != first["config_digest"]
    assert http_get(f"{url}/env/DB_PASSWORD") == NEW_PASSWORD

    make_control(CONFIGURED % "bonjour")  # a changed setting alone
    changed = cicd(control, "deploy", "app", "--env", "dev", "--commit", sha, "--json")
    assert changed.returncode == 0, changed.stderr
    assert http_get(f"{url}/env/GREETING") == "bonjour"

    monkeypatch.delenv("TEST_APP_API_TOKEN")
    refused = cicd(control, "deploy", "app", "--env", "dev", "--commit", sha)
    assert refused.returncode == 1
    assert "secret API_TOKEN (env:TEST_APP_API_TOKEN): the variable is not set" in refused.stderr
    assert http_get(f"{url}/env/GREETING") == "bonjour"

    rows = HistoryStore(control.history_db_url).deployments(repository="app")
    assert sorted(rows["status"]) == ["deployed", "deployed", "deployed", "refused"]
    assert rows["config_digest"].dropna().nunique() == 3
    for secret in (TOKEN, PASSWORD, NEW_PASSWORD):
        assert files_holding(control.home, secret) == []


def test_cicd_rollback_switches_back_to_the_standby_slot_without_dropping_a_request(
    tmp_path, control
):
    repo = tmp_path / "app"
    v1 = app_commit(repo, message="feat: one")
    v2 = app_commit(repo, message="feat: two")
    assert ci(control, v1) == ci(control, v2) == "success"
    dev = environment_for(control, "app", control.environment("dev"))
    assert deploy_commit_in_process(control, "app", "dev", v1)["status"] == "deployed"
    assert deploy_commit_in_process(control, "app", "dev", v2)["status"] == "deployed"
    # Promotion needs the commit verified in dev at some time, not dev's latest.
    assert deploy_commit_in_process(control, "app", "staging", v1)["status"] == "deployed"
    [standby] = [slot for slot in dev.slots() if slot.version == v1]

    traffic = TrafficProbe(dev.router.url, max_requests=100_000, max_seconds=60)
    traffic.start()
    try:
        done = cicd(control, "rollback", "app", "--env", "dev", "--json")
    finally:
        traffic.finish()

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["status"], report["commit"], report["previous_version"]) == (
        "deployed",
        v1,
        v2,
    )
    assert traffic.failures == [] and traffic.answers[-1] == v1
    assert serves(control, "dev") == {v1}
    assert [(s.name, s.port) for s in dev.slots() if s.weight] == [(standby.name, standby.port)]
    history = HistoryStore(control.history_db_url)
    latest = history.deployments(repository="app", environment="dev").iloc[0]
    assert (latest["triggered_by"], latest["strategy"]) == ("cli:rollback", "blue_green")
    events = history.events(repository="app")
    assert list(events["kind"]) == ["deployed"] * 4
    assert list(events["commit"]) == [v1, v2, v1, v1]

    # A missing artifact (release folder and checkout gone) is refused; v1 keeps serving.
    shutil.rmtree(control.home / "releases" / "app" / v2)
    shutil.rmtree(CommitWorkspace.for_commit(control, "app", v2).checkout)
    missing = deploy_commit_in_process(control, "app", "dev", v2)
    assert missing["status"] == "refused"
    assert "missing artifact" in missing["reason"]
    assert serves(control, "dev") == {v1}
