"""Approvals against a real git repository and history DB: who may approve which commit,
the `cicd users` and `cicd approve` commands as a user runs them, and the approval sensor
that deploys a waiting commit once it is approved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetKey,
    DagsterEventType,
    DagsterInstance,
    build_sensor_context,
    instance_for_test,
)
from dagster._core.definitions.sensor_definition import SensorExecutionData

from assets.deploy import TRIGGER_TAG
from cicd_dagster.access import add_user, remove_user
from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.definitions import build_definitions
from cicd_dagster.release.approvals import approval_refusal, approval_status, approve
from cicd_dagster.resources import CicdResource
from cicd_dagster.stages.deploy import environment_for
from cicd_dagster.store import DeploymentRecord, HistoryStore
from jobs.inprocess import deploy_commit_in_process
from tests.integration.test_deploy import app_commit, ci
from tests.support import commit, control_config, git, http_get, tear_down

CICD = [sys.executable, "-m", "cicd_dagster"]
ENVIRONMENTS = """\
environments:
  - name: dev
  - name: staging
    approvals: {required: 1}
  - name: prod
    approvals: {required: 2, roles: [release-manager]}
  - name: sandbox
    approvals: {roles: [dev], allow_self_approval: true}
users:
  lead: {roles: [release-manager], email: lead@example.com}
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "app"


@pytest.fixture
def config(tmp_path: Path, repo: Path) -> ControlConfig:
    commit(repo, {"app.py": "v = 0\n"}, "chore: start")
    return load_control_config(control_config(tmp_path, {"app": repo}, ENVIRONMENTS))


@pytest.fixture
def history(config: ControlConfig) -> Iterator[HistoryStore]:
    store = HistoryStore(config.history_db_url)
    yield store
    store.dispose()


def authored(repo: Path, author: str, message: str = "feat: change") -> str:
    """A commit by `author` ("Name <email>")."""
    git(repo, "commit", "--quiet", "--allow-empty", "-m", message, f"--author={author}")
    return git(repo, "rev-parse", "HEAD")


def token_of(config: ControlConfig, history: HistoryStore, name: str, *roles: str) -> str:
    return add_user(config, history, name, roles=list(roles))[1]


def test_release_managers_approve_and_two_distinct_approvals_let_prod_deploy(config, history, repo):
    sha = authored(repo, "Dev Eloper <dev@example.com>")
    lead = token_of(config, history, "lead")  # release-manager from cicd.yaml
    ops = token_of(config, history, "ops", "release-manager")

    assert approval_refusal(config, history, "app", "prod", sha) == (
        "waiting for approval: 0 of 2 (roles: release-manager)"
    )
    first = approve(config, history, "app", "prod", sha[:10], lead)  # an abbreviated sha
    assert (first.approved, first.user, first.commit) == (True, "lead", sha)
    assert first.status == (1, 2, ["lead"])
    assert approval_refusal(config, history, "app", "prod", sha) == (
        "waiting for approval: 1 of 2 (roles: release-manager)"
    )

    again = approve(config, history, "app", "prod", sha, lead)
    assert again.approved
    assert again.reason == f"lead approved {sha[:12]} for prod before"
    assert again.status == (1, 2, ["lead"])  # the same user counts once

    second = approve(config, history, "app", "prod", sha, ops)
    assert second.status == (2, 2, ["lead", "ops"])
    assert approval_refusal(config, history, "app", "prod", sha) is None
    # Approvals are per environment and per commit.
    assert approval_status(history, config, "app", "staging", sha) == (0, 1, [])
    decisions = history.approvals("app", "prod", sha)
    assert list(zip(decisions["user"], decisions["decision"], strict=True)) == [
        ("lead", "approved"),
        ("ops", "approved"),
    ]


def test_refusals_are_recorded_with_the_reason(config, history, repo):
    sha = authored(repo, "Dev Eloper <dev@example.com>")
    dev = token_of(config, history, "dev", "dev")
    removed = token_of(config, history, "gone", "release-manager")
    remove_user(history, "gone")

    cases = [
        (
            dev,
            "prod",
            sha,
            "dev",
            "dev has no role that may approve prod (release-manager; has: dev)",
        ),
        ("cicd_" + "A" * 43, "prod", sha, None, "unknown API token"),
        (removed, "prod", sha, "gone", "user gone was removed"),
        (dev, "dev", sha, "dev", "dev requires no approvals"),
        (dev, "staging", "0" * 40, "dev", f"app has no commit {'0' * 40}"),
    ]
    for token, environment, commit_sha, user, reason in cases:
        outcome = approve(config, history, "app", environment, commit_sha, token)
        assert (outcome.approved, outcome.user, outcome.reason) == (False, user, reason)

    rows = history.approvals("app")
    assert list(rows["decision"]) == ["refused"] * len(cases)
    assert list(rows["reason"]) == [case[-1] for case in cases]
    assert approval_status(history, config, "app", "prod", sha).have == 0


def test_the_author_may_not_approve_their_own_commit_unless_allowed(config, history, repo):
    by_email = authored(repo, "Someone Else <LEAD@example.com>")  # emails match in any case
    by_name = authored(repo, "lead <other@example.com>")
    lead = token_of(config, history, "lead")

    for sha in (by_email, by_name):
        outcome = approve(config, history, "app", "prod", sha, lead)
        assert not outcome.approved
        assert outcome.reason == (
            f"lead authored {sha[:12]} and may not approve their own change "
            "(approvals.allow_self_approval is false for prod)"
        )

    # sandbox allows it.
    dev = add_user(config, history, "dev", roles=["dev"], email="dev@example.com")[1]
    own = authored(repo, "Dev <dev@example.com>")
    assert approve(config, history, "app", "sandbox", own, dev).approved


def test_a_commit_pushed_after_the_mirror_was_made_is_fetched(config, history, repo):
    lead = token_of(config, history, "lead")
    first = authored(repo, "Dev <dev@example.com>")
    assert approve(config, history, "app", "staging", first, lead).approved

    later = authored(repo, "Dev <dev@example.com>")
    assert approve(config, history, "app", "staging", later, lead).approved


def test_approvals_of_a_removed_user_or_a_lost_role_count_no_more(config, history, repo):
    sha = authored(repo, "Dev <dev@example.com>")
    ops = token_of(config, history, "ops", "release-manager")
    qa = token_of(config, history, "qa", "release-manager")
    approve(config, history, "app", "prod", sha, ops)
    approve(config, history, "app", "prod", sha, qa)
    assert approval_status(history, config, "app", "prod", sha).have == 2

    remove_user(history, "ops")
    add_user(config, history, "qa", roles=["dev"])  # qa's role in the DB is replaced

    assert approval_status(history, config, "app", "prod", sha) == (0, 2, [])


# --- the CLI ----------------------------------------------------------------------------


def cicd(
    config: ControlConfig, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {key: value for key, value in os.environ.items() if key != "CICD_TOKEN"}
    return subprocess.run(
        [*CICD, "--config", str(config.config_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environ, **(env or {})},
    )


@pytest.mark.slow  # some twenty runs of the CLI
def test_cli_users_and_approve_with_exit_codes(config, repo):
    sha = authored(repo, "Dev <dev@example.com>")
    added = cicd(config, "users", "add", "ops", "--role", "release-manager", "--role", "qa")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("cicd_") and "\n" not in token
    assert "shown once" in added.stderr and token not in added.stderr

    listed = cicd(config, "users", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["name"], row["roles"], row["tokens"]) == ("ops", "qa,release-manager", 1)
    assert token not in listed.stdout

    by_option = cicd(config, "approve", "app", "--env", "prod", "--commit", sha, "--token", token)
    assert by_option.returncode == 0, by_option.stderr
    assert "approvals: 1 of 2 (ops)" in by_option.stderr
    by_env = cicd(
        config, "approve", "app", "--env", "prod", "--commit", sha, "--json",
        env={"CICD_TOKEN": token},
    )  # fmt: skip
    assert by_env.returncode == 0, by_env.stderr
    outcome = json.loads(by_env.stdout)
    assert (outcome["approved"], outcome["user"], outcome["have"]) == (True, "ops", 1)

    refused = cicd(config, "approve", "app", "--env", "prod", "--commit", sha, "--token", "nope")
    assert refused.returncode == 1
    assert "refused" in refused.stderr and "unknown API token" in refused.stderr

    usage = {
        "no token": ["approve", "app", "--env", "prod", "--commit", sha],
        "empty token": ["approve", "app", "--env", "prod", "--commit", sha, "--token", " "],
        "unknown env": ["approve", "app", "--env", "qa", "--commit", sha, "--token", token],
        "unknown repo": ["approve", "web", "--env", "prod", "--commit", sha, "--token", token],
        "not a sha": ["approve", "app", "--env", "prod", "--commit", "HEAD", "--token", token],
        "bad user name": ["users", "add", "Ops Lead", "--role", "qa"],
        "bad email": ["users", "add", "ops", "--email", "ops"],
        "unknown user": ["users", "remove", "nobody"],
    }
    for case, args in usage.items():
        done = cicd(config, *args)
        assert done.returncode == 2, (case, done.stdout, done.stderr)
        assert "error:" in done.stderr, case

    removed = cicd(config, "users", "remove", "ops")
    assert removed.returncode == 0, removed.stderr
    after = cicd(config, "approve", "app", "--env", "prod", "--commit", sha, "--token", token)
    assert after.returncode == 1
    assert "user ops was removed" in after.stderr

    history = cicd(config, "history", "approvals", "--env", "prod", "--format", "json")
    rows = json.loads(history.stdout)
    assert [(r["user"], r["decision"]) for r in rows] == [
        ("ops", "approved"),
        (None, "refused"),
        ("ops", "refused"),
    ]


# --- the approval sensor ------------------------------------------------------------------


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


def tick(config: ControlConfig, instance: DagsterInstance) -> SensorExecutionData:
    defs = build_definitions(config, stream_logs=False)
    sensor = defs.resolve_sensor_def("app_approvals")
    context = build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        definitions=defs,
        sensor_name=sensor.name,
        resources={"cicd": CicdResource(config_path=str(config.config_path))},
    )
    return sensor.evaluate_tick(context)


def refused_for_approval(history: HistoryStore, config: ControlConfig, sha: str) -> None:
    """What a deployment to staging does when the commit lacks approvals."""
    reason = approval_refusal(config, history, "app", "staging", sha)
    assert reason is not None
    attempt(history, sha, "refused", reason)


def attempt(history: HistoryStore, sha: str, status: str, reason: str = "") -> None:
    history.record_deployment(
        "app",
        DeploymentRecord(
            environment="staging",
            commit_sha=sha,
            strategy="recreate",
            status=status,
            version=sha,
            previous_version=None,
            reason=reason,
            started_at=datetime.now(UTC),
        ),
    )


def test_the_sensor_names_what_waits_and_deploys_it_once_approved(config, history, repo, instance):
    assert tick(config, instance).skip_message == "nothing waits for approval"
    older = authored(repo, "Dev <dev@example.com>")
    sha = authored(repo, "Dev <dev@example.com>")
    history.record_build("app", sha, ref="refs/heads/main", branch="main", run_id=None)
    instance.add_dynamic_partitions("app_commits", [older, sha])
    refused_for_approval(history, config, older)
    refused_for_approval(history, config, sha)
    refused_for_approval(history, config, sha)  # a retry asks nobody again

    waiting = tick(config, instance)

    assert not waiting.run_requests
    line = f"app@{sha[:12]} -> staging: waiting for approval: 0 of 1 (roles: any user)"
    assert waiting.skip_message == line  # the older request is superseded
    assert json.loads(waiting.cursor or "[]") == [line]
    events = history.events("app", kind="approval_requested")
    assert list(zip(events["commit"], events["environment"], strict=True)) == [
        (older, "staging"),
        (sha, "staging"),
    ]

    assert approve(config, history, "app", "staging", sha, token_of(config, history, "a")).approved
    approved = tick(config, instance)

    (request,) = approved.run_requests or []
    assert (request.job_name, request.partition_key) == ("app_deploy_staging", sha)
    assert request.run_key == f"approved:staging:{sha}"
    assert request.tags[TRIGGER_TAG] == "sensor:approvals"
    assert request.tags["cicd/branch"] == "main"
    assert json.loads(approved.cursor or "") == []

    attempt(history, sha, "deployed")
    assert tick(config, instance).skip_message == "nothing waits for approval"


def test_no_approval_sensor_without_environments_requiring_approvals(tmp_path, repo):
    commit(repo, {"app.py": "v = 0\n"})
    path = control_config(tmp_path, {"app": repo}, "environments:\n  - name: dev\n")
    defs = build_definitions(load_control_config(path), stream_logs=False)
    assert not any(sensor.name.endswith("_approvals") for sensor in defs.sensors or [])


# --- enforcement through a real deployment -------------------------------------------------

PROD_WITH_APPROVALS = """\
environments:
  - name: dev
  - name: prod
    approvals: {required: 1, roles: [release-manager]}
users:
  lead: {roles: [release-manager]}
"""


@pytest.fixture
def deploy_control(tmp_path: Path, nginx: str) -> Iterator[ControlConfig]:
    config = load_control_config(
        control_config(tmp_path, {"app": tmp_path / "app"}, PROD_WITH_APPROVALS)
    )
    yield config
    for environment in config.environments:
        tear_down(environment_for(config, "app", environment))


def step_failure_metadata(run_id: str) -> dict[str, Any]:
    (failure,) = DagsterInstance.get().all_logs(run_id, of_type=DagsterEventType.STEP_FAILURE)
    data = failure.dagster_event.step_failure_data.user_failure_data  # type: ignore[union-attr]
    return {key: value.value for key, value in data.metadata.items()}


@pytest.mark.slow  # Dagster jobs, services and nginx
def test_prod_deploys_only_after_the_required_approval(tmp_path, deploy_control):
    config = deploy_control
    history = HistoryStore(config.history_db_url)
    sha = app_commit(tmp_path / "app")  # by Test Author <author@example.com>
    assert ci(config, sha) == "success"
    assert deploy_commit_in_process(config, "app", "dev", sha)["status"] == "deployed"

    waiting = "waiting for approval: 0 of 1 (roles: release-manager)"
    for _ in range(2):
        refused = deploy_commit_in_process(config, "app", "prod", sha)
        assert (refused["status"], refused["reason"]) == ("refused", waiting)
        metadata = step_failure_metadata(refused["run_id"])
        assert (metadata["status"], metadata["approvals"]) == ("refused", "0 of 1")
    requested = history.events("app", kind="approval_requested")
    assert list(zip(requested["environment"], requested["commit"], strict=True)) == [("prod", sha)]

    author = add_user(config, history, "author", roles=["release-manager"])[1]
    add_user(config, history, "author", email="author@example.com")
    assert not approve(config, history, "app", "prod", sha, author).approved  # their own
    lead = add_user(config, history, "lead")[1]
    assert approve(config, history, "app", "prod", sha, lead).approved

    deployed = deploy_commit_in_process(config, "app", "prod", sha)

    assert deployed["status"] == "deployed", deployed
    assert http_get(environment_for(config, "app", config.environment("prod")).router.url) == sha
    event = DagsterInstance.get().get_latest_materialization_event(
        AssetKey(["app", "deployment_prod"])
    )
    assert event is not None and event.asset_materialization is not None
    metadata = event.asset_materialization.metadata
    assert (metadata["approvals"].value, metadata["approvers"].value) == ("1 of 1", "lead")
    attempts = metadata["approval_attempts"].value.records  # type: ignore[attr-defined]
    assert [(row.data["user"], row.data["decision"]) for row in attempts] == [
        ("author", "refused"),
        ("lead", "approved"),
    ]
    history.dispose()
