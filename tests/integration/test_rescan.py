"""The nightly rescan: a commit deployed clean is found vulnerable once an advisory naming
one of its dependencies is published, through a real CI run, a real deploy behind nginx
and the security_rescan job the schedule runs (started here by `cicd rescan`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cicd_dagster.config import load_control_config
from cicd_dagster.stages.artifact import SBOM_NAME, artifact_store
from cicd_dagster.stages.deploy import environment_for
from cicd_dagster.stages.release import make_release
from cicd_dagster.store import HistoryStore
from jobs.inprocess import deploy_commit_in_process
from tests.integration.test_deploy import SERVICE, SERVICE_CONFIG
from tests.integration.test_security_scan import (
    ci,
    demo_wheel,
    pipeline,
    security_config,
    write_advisory,
)
from tests.support import commit, control_config, tear_down

pytestmark = pytest.mark.slow  # a CI run, a deploy and Dagster jobs

CICD = [sys.executable, "-m", "cicd_dagster"]
PROD = "environments:\n  - name: prod\n    strategy: {type: recreate}\n"


def rescan(config: Path, *args: str) -> tuple[int, dict]:
    done = subprocess.run(
        [*CICD, "rescan", *args, "--json"],
        env={**os.environ, "CICD_CONFIG": str(config)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)["repositories"][0]


def test_rescan_catches_an_advisory_published_after_the_deploy(tmp_path: Path, nginx: str) -> None:
    wheels = demo_wheel(tmp_path)
    advisories = tmp_path / "advisories"
    write_advisory(advisories, "PYSEC-2099-0010", fixed="1.0")  # 1.0 is already fixed
    repo = tmp_path / "app"
    sha = commit(repo, {".cicd.yml": pipeline(wheels) + SERVICE_CONFIG, "service.py": SERVICE})
    config_path = control_config(tmp_path, {"app": repo}, extra=security_config(advisories) + PROD)
    config = load_control_config(config_path)
    assert ci(config_path, sha)["status"] == "success"
    environment = environment_for(config, "app", config.environment("prod"))
    try:
        assert deploy_commit_in_process(config, "app", "prod", sha)["status"] == "deployed"

        code, clean = rescan(config_path)
        assert code == 0, clean
        assert clean["passed"] is True
        assert (clean["commits_rescanned"], clean["new_findings"]) == (1, 0)

        # Published overnight: demo-lib 1.0, live in prod, is affected.
        write_advisory(advisories, "PYSEC-2099-0011", fixed="1.1", severity="CRITICAL")
        code, found = rescan(config_path, "app")
        assert code == 1
        assert found["passed"] is False
        assert found["new_findings"] == 1
        assert found["blocking_findings"] == 1
        assert "PYSEC-2099-0011 critical demo-lib==1.0" in found["detail"]
        assert [(f["commit"], f["where"], f["rule"], f["new"]) for f in found["findings"]] == [
            (sha[:12], "prod (live)", "PYSEC-2099-0011", True)
        ]

        history = HistoryStore(config.history_db_url)
        recorded = history.findings(repository="app", commit=sha, source="rescan")
        assert list(recorded["rule"]) == ["PYSEC-2099-0011"]
        events = history.events(repository="app", kind="security_finding")
        assert len(events) == 1
        event = events.iloc[0]
        assert (event["environment"], event["commit"]) == ("prod", sha)
        assert "PYSEC-2099-0011 critical demo-lib==1.0" in event["message"]
        assert "prod (live)" in event["message"]

        # The next night: still blocked, but nothing new to announce.
        code, again = rescan(config_path)
        assert (code, again["new_findings"], again["blocking_findings"]) == (1, 0, 1)
        assert [f["new"] for f in again["findings"]] == [False]
        assert len(history.events(repository="app", kind="security_finding")) == 1

        # Released, then taken out of prod: a release stays in service, and is rescanned.
        make_release(config, "app", sha, history)
        tear_down(environment)
        code, released = rescan(config_path)
        assert code == 1
        assert [(f["where"], f["new"]) for f in released["findings"]] == [
            ("v0.1.0 (released)", False)
        ]

        # A tampered SBOM is never what gets scanned: the commit is reported unscannable.
        store = artifact_store(config)
        row = next(r for r in store.list("app") if r.commit == sha and r.name == SBOM_NAME)
        blob = store.path(row.digest)
        blob.chmod(0o644)
        blob.write_text(blob.read_text().replace("demo-lib", "demo-lix"))
        code, tampered = rescan(config_path)
        assert code == 1
        assert tampered["unscannable_commits"] == 1
        assert f"{sha[:12]} cannot be rescanned" in tampered["detail"]
        assert SBOM_NAME in tampered["detail"]
        assert len(history.events(repository="app", kind="security_finding")) == 2
    finally:
        tear_down(environment)


def test_rescan_with_nothing_in_service_or_no_advisory_database(tmp_path: Path) -> None:
    repo = tmp_path / "app"
    commit(repo, {".cicd.yml": pipeline(tmp_path)})
    advisories = tmp_path / "advisories"
    write_advisory(advisories, "PYSEC-2099-0012", fixed="1.1")
    config = control_config(tmp_path, {"app": repo}, extra=security_config(advisories) + PROD)
    code, report = rescan(config)
    assert code == 0
    assert (report["commits_rescanned"], report["advisories"]) == (0, 1)
    assert "in 0 commit(s)" in report["detail"]

    bare = control_config(tmp_path, {"app": repo})
    code, report = rescan(bare)
    assert code == 0
    assert "no security.advisory_db configured" in report["detail"]


def test_rescan_of_a_missing_advisory_database_fails_with_its_path(tmp_path: Path) -> None:
    repo = tmp_path / "app"
    commit(repo, {".cicd.yml": pipeline(tmp_path)})
    missing = tmp_path / "no-such-advisories"
    config = control_config(tmp_path, {"app": repo}, extra=security_config(missing))
    code, report = rescan(config)
    assert code == 1
    assert report["passed"] is False
    assert str(missing) in report["detail"]
