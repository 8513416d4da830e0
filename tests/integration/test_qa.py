"""Stage -> QA -> Prod: a repository's QA suite run against the commit live in staging,
behind a real nginx router, and prod refusing a commit whose QA there has not passed.

Without nginx these tests skip, except under CICD_REQUIRE_NGINX=1 (CI).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.stages.deploy import environment_for, unfit_build
from cicd_dagster.store import HistoryStore
from jobs.inprocess import deploy_commit_in_process, qa_commit_in_process
from tests.integration.test_deploy import SERVICE, SERVICE_CONFIG, ci, cicd
from tests.support import commit, control_config, junit_xml, pipeline_writing_reports, tear_down

pytestmark = pytest.mark.slow  # Dagster jobs, services and nginx

ENVIRONMENTS = "environments:\n  - name: staging\n    qa: true\n  - name: prod\n"
# The QA suite: asks the environment's stable address what it serves and writes one JUnit
# case, passed when that is the commit under QA (the service answers its sha).
QA_SCRIPT = """\
import os, sys, urllib.request

opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
answer = opener.open(os.environ["CICD_TARGET_URL"], timeout=5).read().decode()
expected = os.environ["CICD_COMMIT_SHA"] if sys.argv[1] == "pass" else "another version"
ok = answer == expected and os.environ["CICD_ENVIRONMENT"] == "staging"
failure = "" if ok else f'<failure message="served {answer}"/>'
case = f'<testcase classname="qa" name="serves_the_commit">{failure}</testcase>'
with open(os.path.join(os.environ["CICD_REPORTS_DIR"], "qa.xml"), "w") as report:
    report.write(f'<testsuite name="qa">{case}</testsuite>')
sys.exit(0 if ok else 1)
"""


def qa_commit(repo: Path, qa: str = "python qa.py pass", timeout_s: float = 60) -> str:
    """A green commit of the test service whose QA suite runs `qa`."""
    pipeline = pipeline_writing_reports(
        junit_xml(2), extra=SERVICE_CONFIG + f"qa: {{run: '{qa}', timeout_s: {timeout_s}}}\n"
    )
    files = {"service.py": SERVICE, "qa.py": QA_SCRIPT, ".cicd.yml": pipeline}
    return commit(repo, files, "feat: change")


@pytest.fixture
def control(tmp_path: Path, nginx: str) -> Iterator[ControlConfig]:
    """staging (qa: true) -> prod; every environment is stopped after the test."""
    config = load_control_config(control_config(tmp_path, {"app": tmp_path / "app"}, ENVIRONMENTS))
    yield config
    for environment in config.environments:
        tear_down(environment_for(config, "app", environment))


def to_staging(control: ControlConfig, sha: str) -> None:
    assert ci(control, sha) == "success"
    staging = deploy_commit_in_process(control, "app", "staging", sha)
    assert staging["status"] == "deployed", staging


def qa_stage(control: ControlConfig, sha: str) -> dict[str, object]:
    stages = HistoryStore(control.history_db_url).stage_rows("app", sha)
    rows = stages[stages["name"] == "qa"]
    assert len(rows) == 1
    return dict(rows.iloc[0])


def test_prod_takes_a_commit_only_after_its_qa_in_staging_passed(tmp_path, control):
    good = qa_commit(tmp_path / "app")
    to_staging(control, good)

    early = deploy_commit_in_process(control, "app", "prod", good)
    assert early["status"] == "refused"
    assert f"qa in staging has not passed for {good[:12]}: it has not run" in early["reason"]

    done = cicd(control, "qa", "app", "--env", "staging", "--json")  # the live commit
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    staging_url = environment_for(control, "app", control.environment("staging")).router.url
    assert (report["status"], report["commit"], report["url"]) == ("success", good, staging_url)
    assert (report["tests"], report["passed"], report["failed"]) == (1, 1, 0)
    assert [(gate["name"], gate["passed"]) for gate in report["gates"]] == [("min_pass_rate", True)]
    assert qa_stage(control, good)["status"] == "success"
    assert HistoryStore(control.history_db_url).tests(repository="app", stage="qa")[
        "name"
    ].tolist() == ["serves_the_commit"]

    prod = deploy_commit_in_process(control, "app", "prod", good)
    assert prod["status"] == "deployed", prod

    # A newer commit in staging: QA of the old one would judge the wrong version.
    newer = qa_commit(tmp_path / "app")
    to_staging(control, newer)
    refused = cicd(control, "qa", "app", "--env", "staging", "--commit", good, "--json")
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["status"] == "refused"
    assert (
        f"{good[:12]} is not live in staging (staging runs {newer[:12]})"
        in (json.loads(refused.stdout)["detail"])
    )
    assert qa_stage(control, good)["status"] == "success"  # the refusal recorded nothing
    assert "has not run" in deploy_commit_in_process(control, "app", "prod", newer)["reason"]

    # QA only runs where cicd.yaml says so: a usage error elsewhere.
    elsewhere = cicd(control, "qa", "app", "--env", "prod")
    assert elsewhere.returncode == 2
    assert "prod does not run QA" in elsewhere.stderr


def test_a_failed_qa_suite_keeps_the_commit_out_of_prod_with_the_reason(tmp_path, control):
    sha = qa_commit(tmp_path / "app", qa="python qa.py fail")
    to_staging(control, sha)

    report = qa_commit_in_process(control, "app", "staging", sha)

    assert report["status"] == "failed", report
    assert (report["tests"], report["failed"]) == (1, 1)
    assert report["gates"][0]["passed"] is False
    refused = deploy_commit_in_process(control, "app", "prod", sha)
    assert refused["status"] == "refused"
    assert (
        f"qa in staging has not passed for {sha[:12]}: in staging at http://127.0.0.1:"
        in (refused["reason"])
    )
    assert "0 of 1 tests passed" in refused["reason"]
    # QA is not CI: the commit stays green (staging may take it again, e.g. a rollback).
    history = HistoryStore(control.history_db_url)
    assert unfit_build(history, "app", sha) is None
    assert history.builds(repository="app")["status"].tolist() == ["success"]


def test_a_qa_suite_that_times_out_fails(tmp_path, control):
    sha = qa_commit(tmp_path / "app", qa="sleep 30", timeout_s=1)
    to_staging(control, sha)

    done = cicd(control, "qa", "app", "--env", "staging")

    assert done.returncode == 1
    assert "test command timed out after" in done.stderr
    assert "s: sleep 30" in done.stderr
    assert qa_stage(control, sha)["status"] == "failed"
    refused = deploy_commit_in_process(control, "app", "prod", sha)
    assert "timed out" in refused["reason"]


def test_a_repository_without_a_qa_suite_passes_qa_once_it_ran(tmp_path, control):
    pipeline = pipeline_writing_reports(junit_xml(2), extra=SERVICE_CONFIG)
    sha = commit(tmp_path / "app", {"service.py": SERVICE, ".cicd.yml": pipeline})
    to_staging(control, sha)

    report = qa_commit_in_process(control, "app", "staging", sha)

    assert report["status"] == "success", report
    assert "has no QA suite" in report["detail"]
    assert qa_stage(control, sha)["status"] == "not_configured"
    assert deploy_commit_in_process(control, "app", "prod", sha)["status"] == "deployed"
