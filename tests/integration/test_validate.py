"""`cicd validate`, `cicd history deployments` and usage errors, as a user runs them."""

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from cicd_dagster.config import load_control_config
from cicd_dagster.store import DeploymentRecord, HistoryStore
from tests.support import commit, control_config, git, pipeline_writing_reports

pytestmark = pytest.mark.slow  # each test starts the cicd CLI

CICD = [sys.executable, "-m", "cicd_dagster"]


def validate(config) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CICD_CONFIG": str(config)}
    return subprocess.run([*CICD, "validate"], env=env, capture_output=True, text=True)


def test_valid_control_plane_and_pipelines_pass(tmp_path):
    repo = tmp_path / "app"
    commit(repo, {".cicd.yml": pipeline_writing_reports()})
    done = validate(control_config(tmp_path, {"app": repo}))
    assert done.returncode == 0, done.stderr
    assert "app@main:.cicd.yml" in done.stderr


def test_bad_pipeline_on_a_watched_branch_names_file_line_and_field(tmp_path):
    repo = tmp_path / "app"
    commit(repo, {".cicd.yml": pipeline_writing_reports()})
    git(repo, "checkout", "-q", "-b", "release/2.0")
    commit(repo, {".cicd.yml": "gates:\n  min_pass_rate: lots\n"})
    config = control_config(tmp_path, {"app": repo}, repo_extra='branches: ["main", "release/*"]')
    done = validate(config)
    assert done.returncode == 2
    assert "app@release/2.0:.cicd.yml:2: gates.min_pass_rate" in done.stderr
    assert "app@main:.cicd.yml" in done.stderr  # the good branch is still reported


def test_bad_control_config_exits_2_with_file_and_line(tmp_path):
    config = tmp_path / "cicd.yaml"
    config.write_text("repositories:\n  - name: app\n    url: /x\n    brnaches: [main]\n")
    done = validate(config)
    assert done.returncode == 2
    assert "cicd.yaml:4: repositories[0].brnaches" in done.stderr
    assert 'did you mean "branches"' in done.stderr


def test_malformed_yaml_exits_2(tmp_path):
    config = tmp_path / "cicd.yaml"
    config.write_text("repositories: [\n")
    done = validate(config)
    assert done.returncode == 2
    assert "cicd.yaml:" in done.stderr


def test_unreachable_repository_is_reported_and_others_checked(tmp_path):
    good = tmp_path / "good"
    commit(good, {".cicd.yml": pipeline_writing_reports()})
    config = control_config(tmp_path, {"gone": tmp_path / "vanished", "good": good})
    done = validate(config)
    assert done.returncode == 2
    assert "gone:" in done.stderr
    assert "good@main:.cicd.yml" in done.stderr


def test_history_deployments_lists_attempts_newest_first(tmp_path):
    config = control_config(tmp_path, {"app": tmp_path / "app"})
    history = HistoryStore(load_control_config(config).history_db_url)
    started = datetime.now(UTC) - timedelta(minutes=5)
    for offset, status in enumerate(("deployed", "rolled_back")):
        history.record_deployment(
            "app",
            DeploymentRecord(
                environment="staging",
                commit_sha=f"{offset}" * 40,
                strategy="blue_green",
                status=status,
                version=f"v{offset}",
                previous_version=None,
                reason="health check failed" if status == "rolled_back" else "verified",
                started_at=started + timedelta(minutes=offset),
                duration_s=2.5,
            ),
        )
    env = {**os.environ, "CICD_CONFIG": str(config)}
    done = subprocess.run(
        [*CICD, "history", "deployments", "--env", "staging", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [(r["version"], r["status"]) for r in rows] == [
        ("v1", "rolled_back"),
        ("v0", "deployed"),
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["deploy", "app"], "Missing option '--env'"),
        (["nosuch"], "No such command 'nosuch'"),
        (["history", "builds", "--format", "xml"], "Invalid value for '--format'"),
    ],
)
def test_usage_errors_exit_2_with_the_reason(tmp_path, args, message):
    config = control_config(tmp_path, {"app": tmp_path / "app"})
    done = subprocess.run(
        [*CICD, "--config", str(config), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
