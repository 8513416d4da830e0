"""Issue 5's "done when", from the command line as a user runs it: the demo shop goes
Stage -> QA -> Prod with a required approval; the wrong people cannot approve; it gets a
tagged release with changelog, notes and report; and the notifications reach a webhook
and an SMTP server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cicd_dagster.demo import create_demo_repository
from tests.servers import Mailbox, Webhook
from tests.support import git

pytestmark = pytest.mark.slow

CICD = [sys.executable, "-m", "cicd_dagster"]
FAST_VERIFY = "    verify: {interval_s: 0.2, success_threshold: 2}\n"


def control_file(folder: Path, webhook: Webhook, mailbox: Mailbox) -> Path:
    path = folder / "cicd.yaml"
    path.write_text(
        "home: .cicd\n"
        "repositories:\n"
        "  - name: demo\n"
        "    url: ./demo-repo\n"
        "environments:\n"
        "  - name: staging\n"
        "    strategy: {type: blue_green}\n"
        "    qa: true\n" + FAST_VERIFY + "  - name: prod\n"
        "    strategy: {type: blue_green}\n"
        "    approvals: {required: 1, roles: [release-manager]}\n" + FAST_VERIFY + "users:\n"
        "  alice: {roles: [release-manager], email: alice@example.com}\n"
        "notifications:\n"
        f"  - {{type: webhook, url: '{webhook.url}',"
        " events: [approval_requested, deployed, released]}\n"
        f"  - {{type: smtp, url: '{mailbox.url}', to: [team@example.com],"
        " events: [approval_requested, released]}\n"
    )
    return path


def cicd(config: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "CICD_TOKEN"}
    if token is not None:
        env["CICD_TOKEN"] = token
    return subprocess.run(
        [*CICD, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def refused(done: subprocess.CompletedProcess[str], reason: str) -> None:
    assert done.returncode == 1, done.stderr
    assert reason in done.stderr + done.stdout


def new_user(config: Path, name: str, *options: str) -> str:
    token = ok(cicd(config, "users", "add", name, *options)).strip()
    assert token.startswith("cicd_")
    return token


def test_the_demo_is_released_through_qa_and_an_approval(
    tmp_path: Path, nginx: str, webhook: Webhook, mailbox: Mailbox
) -> None:
    config = control_file(tmp_path, webhook, mailbox)
    repo = tmp_path / "demo-repo"
    create_demo_repository(repo)
    try:
        run = json.loads(ok(cicd(config, "run", "demo", "--json")))
        sha = run["commit"]

        # Stage, then QA against it.
        ok(cicd(config, "deploy", "demo", "--env", "staging"))
        qa = json.loads(ok(cicd(config, "qa", "demo", "--env", "staging", "--json")))
        assert qa["status"] == "success", qa

        # Prod waits for an approval.
        refused(
            cicd(config, "deploy", "demo", "--env", "prod", "--commit", sha),
            "waiting for approval: 0 of 1",
        )

        # The wrong people cannot approve: no role, the commit's own author, an unknown
        # token, a removed user.
        alice = new_user(config, "alice", "--role", "release-manager")
        bob = new_user(config, "bob", "--role", "developer")
        author = new_user(
            config, "dana", "--role", "release-manager", "--email", "demo@example.com"
        )
        approve = ("approve", "demo", "--env", "prod", "--commit", sha)
        refused(cicd(config, *approve, "--token", bob), "release-manager")
        refused(cicd(config, *approve, token=author), "own")
        refused(cicd(config, *approve, token="cicd_" + "x" * 43), "unknown")
        ok(cicd(config, "users", "remove", "bob"))
        refused(cicd(config, *approve, token=bob), "removed")
        refused(
            cicd(config, "deploy", "demo", "--env", "prod", "--commit", sha),
            "waiting for approval: 0 of 1",
        )

        ok(cicd(config, *approve, token=alice))
        prod = json.loads(ok(cicd(config, "deploy", "demo", "--env", "prod", "--json")))
        assert (prod["status"], prod["commit"]) == ("deployed", sha)

        # The release: version, tag pushed to the repository, changelog, notes, report.
        release = json.loads(ok(cicd(config, "release", "demo", "--json")))
        assert (release["version"], release["previous"], release["commit"]) == (
            "0.1.0",
            None,
            sha,
        )
        assert release["commits"]
        assert git(repo, "cat-file", "-t", release["tag"]).strip() == "tag"  # annotated
        assert git(repo, "rev-parse", f"{release['tag']}^{{commit}}").strip() == sha
        assert "## " in release["changelog"]
        for path in (release["notes"]["markdown"], release["notes"]["html"], release["report"]):
            assert Path(path).is_file(), path
        assert "0.1.0" in Path(release["report"]).read_text()
        releases = json.loads(ok(cicd(config, "history", "releases", "--format", "json")))
        assert [(r["version"], r["commit"]) for r in releases] == [("0.1.0", sha)]

        # Everyone who should know is told.
        ok(cicd(config, "notify", "deliver"))
        kinds = [hook["json"]["cicd"]["kind"] for hook in webhook.received]
        assert {"approval_requested", "deployed", "released"} <= set(kinds)
        subjects = [str(message["Subject"]) for message in mailbox.messages()]
        assert any("0.1.0" in subject or "released" in subject for subject in subjects), subjects
        assert all(message["To"] == "team@example.com" for message in mailbox.messages())
    finally:
        ok(cicd(config, "down"))
