"""Release and quality reports rendered from a history DB that real CI runs filled.

Three commits of a real repository, committed two days ago, go through the CI job (green,
red with a test that passed on a rerun, green); the deployments, approvals, findings and
releases a later part of delivery writes are recorded through the store as those parts
do. The HTML is read back with lxml: the sections, the numbers (DORA metrics, flaky tests
and durations included), and markup from commit messages and test names shown as text,
never run.
"""

from __future__ import annotations

import html
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import lxml.html
import pytest
from dagster import DagsterInstance

from assets.analytics_performance import build_env_records
from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.quality import render_quality_report
from cicd_dagster.release.report import ReleaseNotFound, render_release_report
from cicd_dagster.store import DeploymentRecord, FindingRecord, HistoryStore
from cicd_dagster.store.history import ReleaseRecord
from jobs.inprocess import run_commit
from tests.support import commit, control_config, junit_xml, pipeline_writing_reports

CICD = [sys.executable, "-m", "cicd_dagster"]
HOSTILE_FIX = "fix: <script>alert('fix')</script> & escape </td> in totals"
HOSTILE_FEAT = 'feat: <img src=x onerror="alert(1)"> add refunds'
HOSTILE_TEST_MESSAGE = "expected <b>3</b> got <script>alert(2)</script>"
HOSTILE_FLAKY_TEST = "flaky <img src=x onerror=alert(4)>"
ENVIRONMENTS = "environments:\n  - name: staging\n  - name: prod\n"
# How long before the CI runs the commits were made: the lead time of their deployment.
COMMITTED_BEFORE = timedelta(days=2)


@dataclass(frozen=True)
class Delivery:
    config: ControlConfig
    history: HistoryStore
    first: str
    red: str
    released: str
    dagster_home: Path


def _ci(config: ControlConfig, sha: str) -> dict:
    return run_commit(config, "app", sha, ref="main", branch="main", stream_logs=False)


@pytest.fixture(scope="module")
def delivery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Delivery]:
    """0.1.0 at a green commit, a red commit (one of its tests passed on a rerun), 0.2.0 at
    a green commit with one test more; the second release deployed to staging and prod (a
    rollback on the way), approved once and refused once, with a finding from a rescan and
    an incident in prod."""
    folder = tmp_path_factory.mktemp("reports")
    repo = folder / "app"
    dagster_home = folder / "dagster"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DAGSTER_HOME", str(dagster_home))
        committed = datetime.now(UTC) - COMMITTED_BEFORE
        patch.setenv("GIT_COMMITTER_DATE", committed.isoformat(timespec="seconds"))
        dagster_home.mkdir()
        (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        config = load_control_config(control_config(folder, {"app": repo}, extra=ENVIRONMENTS))
        first = commit(repo, {".cicd.yml": pipeline_writing_reports(junit_xml(3))}, "feat: orders")
        # Surefire's marker of a test that failed, then passed on a rerun.
        flaky = (
            f'<testcase classname="t" name="{html.escape(HOSTILE_FLAKY_TEST)}" time="0.5">'
            '<flakyFailure message="timed out"/></testcase>'
        )
        red_unit = (
            junit_xml(2, failed=1)
            .replace("boom 0", html.escape(HOSTILE_TEST_MESSAGE))
            .replace("</testsuite>", f"{flaky}</testsuite>")
        )
        red = commit(repo, {".cicd.yml": pipeline_writing_reports(red_unit)}, HOSTILE_FIX)
        released = commit(repo, {".cicd.yml": pipeline_writing_reports(junit_xml(4))}, HOSTILE_FEAT)
        reports = [_ci(config, sha) for sha in (first, red, released)]
    assert [report["status"] for report in reports] == ["success", "failed", "success"]
    history = HistoryStore(config.history_db_url)
    now = datetime.now(UTC)
    history.record_release(
        "app",
        ReleaseRecord("0.1.0", "v0.1.0", first, None, "initial", False, 1, "- orders", now),
    )
    changelog = (
        f"## Features\n\n- {HOSTILE_FEAT[6:]} ({released[:7]})\n\n## Fixes\n\n- {HOSTILE_FIX[5:]}\n"
    )
    history.record_release(
        "app",
        ReleaseRecord("0.2.0", "v0.2.0", released, "0.1.0", "minor", False, 2, changelog, now),
    )
    for environment, status, duration, rollback in (
        ("staging", "rolled_back", 4.0, 1.5),
        ("staging", "deployed", 3.0, None),
        ("prod", "deployed", 6.0, None),
    ):
        history.record_deployment(
            "app",
            DeploymentRecord(
                environment=environment,
                commit_sha=released,
                strategy="blue_green",
                status=status,
                version=released,
                previous_version=first,
                reason="health check failed" if status == "rolled_back" else "verified",
                started_at=now,
                finished_at=now + timedelta(seconds=duration),
                duration_s=duration,
                rollback_s=rollback,
                triggered_by="ops-lead",
            ),
        )
    history.record_approval(
        "app", "prod", released, user="mallory", decision="refused", reason="lacks the role", at=now
    )
    history.record_approval(
        "app", "prod", released, user="ops-lead", decision="approved", reason="", at=now
    )
    history.record_findings(
        "app",
        released,
        "rescan",
        [
            FindingRecord(
                kind="dependency",
                tool="osv",
                rule="GHSA-1234",
                severity="high",
                message="<script>alert(3)</script> in jinja2",
                package="jinja2",
                version="2.0",
            )
        ],
        found_at=now,
    )
    opened = history.open_incident("app", "prod", released, "probe failed", at=now)
    assert opened
    history.close_incident("app", "prod", at=now + timedelta(seconds=90))
    yield Delivery(config, history, first, red, released, dagster_home)
    history.dispose()


def page(path: Path) -> lxml.html.HtmlElement:
    return lxml.html.fromstring(path.read_text(encoding="utf-8"))


def squash(node: lxml.html.HtmlElement) -> str:
    """The text of an element with its whitespace runs made single spaces."""
    return " ".join("".join(node.itertext()).split())


def text(document: lxml.html.HtmlElement, xpath: str) -> str:
    found = document.xpath(xpath)
    assert found, f"nothing at {xpath}"
    return " ".join(squash(node) for node in found)


def table_rows(document: lxml.html.HtmlElement, table_xpath: str) -> list[list[str]]:
    return [
        [squash(cell) for cell in row.xpath("./td")]
        for row in document.xpath(f"{table_xpath}/tbody/tr")
    ]


def assert_nothing_runs(document: lxml.html.HtmlElement) -> None:
    """No script, no event handler attribute, no element a commit message could have made."""
    assert document.xpath("//script") == []
    assert document.xpath("//img") == []
    assert document.xpath("//@*[starts-with(name(), 'on')]") == []


@pytest.mark.slow
def test_the_release_report_shows_changes_tests_findings_deployments_and_approvals(
    delivery: Delivery,
) -> None:
    path = render_release_report(delivery.config, delivery.history, "app", "0.2.0")

    assert path == delivery.config.home / "reports" / "app" / "release-0.2.0.html"
    document = page(path)
    assert text(document, "//h1") == "app 0.2.0"
    assert text(document, "//*[@id='version']//*[@class='value']") == "0.2.0"
    assert text(document, "//*[@id='previous-version']//*[@class='value']") == "0.1.0"
    assert text(document, "//*[@id='commit-count']//*[@class='value']") == "2"
    changes = text(document, "//section[@id='changes']")
    assert text(document, "//section[@id='changes']//h3") == "Features Fixes"
    assert HOSTILE_FEAT[6:] in changes  # the markup, shown as text
    assert HOSTILE_FIX[5:] in changes
    unit = table_rows(document, "//table[@id='test-stages']")[0]
    assert unit[0] == "unit"
    assert unit[2] == "4 (+1)"  # tests, against 3 at 0.1.0
    assert unit[3:7] == ["4", "0", "0", "0"]
    assert unit[7] == "100.0 %"
    assert unit[-1].startswith("success, 3 tests, 100.0 %")
    changes_since = text(document, "//ul[@id='test-changes']")
    assert "added: 1, removed: 0" in changes_since
    trend = table_rows(document, "//table[@id='trend']")
    assert [row[1] for row in trend] == [
        s[:12] for s in (delivery.first, delivery.red, delivery.released)
    ]
    assert [row[2] for row in trend] == ["success", "failed", "success"]
    assert [row[4] for row in trend] == ["100.0 %", "75.0 %", "100.0 %"]
    assert len(document.xpath("//section[@id='tests']//svg")) == 2
    assert document.xpath("//table[@id='failing-tests']") == []
    findings = table_rows(document, "//table[@id='findings-by-severity']")
    assert findings == [["high", "1", "0"]]
    assert "<script>alert(3)</script> in jinja2" in text(document, "//table[@id='finding-list']")
    deployments = table_rows(document, "//section[@id='deployments']//table")
    assert [(row[1], row[3], row[4]) for row in deployments] == [
        ("staging", "rolled back", "4.0 s"),
        ("staging", "deployed", "3.0 s"),
        ("prod", "deployed", "6.0 s"),
    ]
    assert deployments[0][5] == "1.5 s"
    approvals = table_rows(document, "//section[@id='approvals']//table")
    assert [(row[1], row[2], row[3]) for row in approvals] == [
        ("prod", "mallory", "refused"),
        ("prod", "ops-lead", "approved"),
    ]
    assert_nothing_runs(document)


@pytest.mark.slow
def test_the_quality_report_counts_builds_failures_gates_findings_and_deployments(
    delivery: Delivery,
) -> None:
    since = datetime.now(UTC) - timedelta(days=30)
    path = render_quality_report(delivery.config, delivery.history, "app", since)

    document = page(path)
    cards = {
        card.get("id"): text(card, ".//*[@class='value']")
        for card in document.xpath("//*[@class='card']")
    }
    assert cards == {
        "builds": "3",
        "succeeded": "2",
        "failed": "1",
        "tests-run": "11",
        "pass-rate": "90.9 %",
        "median-duration": cards["median-duration"],
        "deployments": "3",
        "rollbacks": "1",
        "incidents": "1",
        "open-findings": "1",
        # Durations and the cache are asserted in the analytics test.
        "timed-builds": "3",
        "build-median": cards["build-median"],
        "build-p90": cards["build-p90"],
        "benchmark-regressions": "0",
    }
    periods = table_rows(document, "//table[@id='periods']")
    assert [row[1:5] for row in periods] == [["3", "2", "1", "11"]]
    assert len(document.xpath("//section[@id='builds']//svg")) == 2
    failing = table_rows(document, "//section[@id='failing-tests']//table")
    assert [(row[0], row[1], row[2], row[3]) for row in failing] == [("unit", "t.bad0", "1", "1")]
    assert HOSTILE_TEST_MESSAGE in failing[0][5]
    gates = table_rows(document, "//section[@id='gates']//table")
    assert [(row[0], row[1], row[2]) for row in gates] == [("unit.min_pass_rate", "1", "3")]
    assert table_rows(document, "//table[@id='findings-by-severity']") == [["high", "1", "0"]]
    environments = table_rows(document, "//table[@id='deployments-by-environment']")
    assert sorted((row[0], row[1], row[2], row[3]) for row in environments) == [
        ("prod", "1", "1", "0"),
        ("staging", "2", "1", "1"),
    ]
    assert [row[1] for row in table_rows(document, "//table[@id='rollbacks']")] == ["staging"]
    incidents = table_rows(document, "//section[@id='incidents']//table")
    assert [(row[0], row[3]) for row in incidents] == [("prod", "1 min 30 s")]
    assert_nothing_runs(document)


@pytest.mark.slow
def test_the_quality_report_shows_dora_metrics_flaky_tests_and_durations(
    delivery: Delivery,
) -> None:
    # Later than everything the fixture recorded (the incident closed 90 s after it).
    now = datetime.now(UTC) + timedelta(minutes=5)
    since = now - timedelta(days=30)
    instance = DagsterInstance.from_config(str(delivery.dagster_home))
    build_envs = build_env_records(instance, delivery.config, since)

    path = render_quality_report(
        delivery.config, delivery.history, "app", since, now=now, build_envs=build_envs
    )

    document = page(path)
    assert text(document, "//section[@id='dora']/h2") == "DORA metrics (prod)"
    dora = {
        row.get("id"): [squash(cell) for cell in row.xpath("./td")]
        for row in document.xpath("//table[@id='dora-metrics']/tbody/tr")
    }
    assert list(dora) == [
        "deployment-frequency",
        "lead-time",
        "change-failure-rate",
        "time-to-restore",
    ]
    # One deployment in 30 days; its bucket depends on the weekday, as fourkeys' does.
    assert dora["deployment-frequency"][1:3] == ["0.23 per week", "1 deployments on 1 days"]
    # The three commits it brought were made two days before it went live.
    assert dora["lead-time"][1].startswith("48 h")
    assert dora["lead-time"][2:] == ["median of 3 changes", "one week", "high"]
    # Its commit caused the incident: the one deployment failed.
    assert dora["change-failure-rate"][1:] == ["100.0 %", "1 of 1 deployments", "46-60%", "low"]
    assert dora["time-to-restore"][1:] == [
        "1 min 0 s",  # whole minutes, as fourkeys counts
        "median of 1 restored, of 1 incidents",
        "one day",
        "elite",
    ]
    assert len(document.xpath("//section[@id='dora']//svg")) == 1

    flaky = table_rows(document, "//table[@id='flaky-ranking']")
    assert [row[:6] for row in flaky] == [
        ["1", "unit", f"t::{HOSTILE_FLAKY_TEST}", "2", "1", "100.0 %"]
    ]
    assert flaky[0][6] == delivery.red[:12]
    assert flaky[0][8:] == ["passed", "no"]
    assert len(document.xpath("//section[@id='flaky']//svg")) == 1

    cards = {
        card.get("id"): text(card, ".//*[@class='value']")
        for card in document.xpath("//section[@id='performance']//*[@class='card']")
    }
    assert cards["timed-builds"] == "3"
    assert cards["build-median"] != "no data"
    assert cards["benchmark-regressions"] == "0"
    assert cards["cache-hit-rate"] == "0.0 %"  # nothing to reuse: no dependencies declared
    assert text(document, "//p[@id='cache']").startswith("0 of 3 builds")
    stages = table_rows(document, "//table[@id='stage-durations']")
    assert [(row[0], row[1]) for row in stages] == [
        ("source", "3"),
        ("build", "3"),
        ("unit", "3"),
        ("security_scan", "3"),
        ("sbom", "3"),
        ("artifact", "2"),  # not after the red unit stage
    ]
    assert len(document.xpath("//section[@id='performance']//svg")) == 1
    assert "No benchmark ran in this period." in text(document, "//section[@id='performance']")
    slowest = table_rows(document, "//section[@id='slowest-tests']//table")
    assert slowest[0][:3] == ["unit", f"t.{HOSTILE_FLAKY_TEST}", "500 ms"]
    assert slowest[0][3:5] == ["", ""]  # the window before had no run: no change to tell
    assert_nothing_runs(document)


def test_reports_of_an_empty_history_say_there_is_no_data(tmp_path: Path) -> None:
    config = load_control_config(control_config(tmp_path, {"app": tmp_path / "app"}))
    history = HistoryStore(config.history_db_url)
    now = datetime.now(UTC)
    output = tmp_path / "out" / "quality.html"

    path = render_quality_report(config, history, "app", now - timedelta(days=7), output=output)

    assert path == output
    document = page(path)
    assert text(document, "//*[@id='builds']//*[@class='value']") == "0"
    assert text(document, "//*[@id='pass-rate']//*[@class='value']") == "n/a"
    for section, message in {
        "builds": "No builds in this period.",
        "failing-tests": "No test failed in this period.",
        "gates": "No gate failed in this period.",
        "findings": "No security finding in this period.",
        "deployments": "No deployment in this period.",
        "incidents": "No incident in this period.",
        "flaky": "No test ran in this period: no data on flaky tests.",
        "dora": "No production deployment in this period.",
    }.items():
        assert text(document, f"//section[@id='{section}']//*[@class='empty']") == message
    assert document.xpath("//section[@id='dora']/h2")[0].text == "DORA metrics"  # no env
    levels = table_rows(document, "//table[@id='dora-metrics']")
    assert [(row[1], row[4]) for row in levels] == [("no data", "no data")] * 4
    assert text(document, "//*[@id='build-median']//*[@class='value']") == "no data"
    assert document.xpath("//*[@id='cache-hit-rate']") == []  # no instance records given
    assert [squash(node) for node in document.xpath("//section[@id='performance']/p")] == [
        "No timed stage in this period.",
        "No benchmark ran in this period.",
        "Cache hit rate not shown: it needs the Dagster instance's build records "
        "(cicd report quality reads them).",
    ]
    assert document.xpath("//svg") == []

    with pytest.raises(ReleaseNotFound, match=r"app has no release '1\.0\.0' \(latest: none\)"):
        render_release_report(config, history, "app", "1.0.0")
    history.dispose()


def test_a_release_never_built_tested_or_deployed_still_reads(tmp_path: Path) -> None:
    config = load_control_config(control_config(tmp_path, {"app": tmp_path / "app"}))
    history = HistoryStore(config.history_db_url)
    history.record_release(
        "app",
        ReleaseRecord(
            "1.0.0", "v1.0.0", "a" * 40, None, "initial", False, 0, "", datetime.now(UTC)
        ),
    )

    document = page(render_release_report(config, history, "app", "1.0.0"))

    assert text(document, "//*[@id='previous-version']//*[@class='value']") == "none"
    for section, message in {
        "changes": "The release has no changelog.",
        "tests": "No CI build of this commit is recorded: no test results.",
        "findings": "No security finding was recorded for this commit.",
        "deployments": "This commit was never deployed.",
        "approvals": "No approval was given or refused for this commit.",
    }.items():
        assert text(document, f"//section[@id='{section}']//*[@class='empty']") == message
    history.dispose()


def test_a_version_that_is_no_file_name_is_refused(tmp_path: Path) -> None:
    config = load_control_config(control_config(tmp_path, {"app": tmp_path / "app"}))
    history = HistoryStore(config.history_db_url)
    with pytest.raises(ValueError, match="is not a version"):
        render_release_report(config, history, "app", "../../etc/passwd")
    history.dispose()


@pytest.mark.slow
def test_cicd_report_prints_the_paths_and_refuses_bad_arguments(
    delivery: Delivery, tmp_path: Path
) -> None:
    config = str(delivery.config.config_path)
    output = tmp_path / "quality.html"
    quality = subprocess.run(
        # The CLI reads the cache hit rate from the instance the CI runs wrote to.
        [
            *CICD,
            "report",
            "quality",
            "--repo",
            "app",
            "--since",
            "7d",
            "--output",
            str(output),
            "-c",
            config,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "DAGSTER_HOME": str(delivery.dagster_home)},
    )
    assert quality.returncode == 0, quality.stderr
    assert quality.stdout == f"{output}\n"
    written = page(output)
    assert text(written, "//*[@id='builds']//*[@class='value']") == "3"
    assert text(written, "//p[@id='cache']").startswith("0 of 3 builds")

    release = subprocess.run(
        [*CICD, "report", "release", "app", "0.1.0", "-c", config], capture_output=True, text=True
    )
    assert release.returncode == 0, release.stderr
    assert Path(release.stdout.strip()).name == "release-0.1.0.html"

    for args, message in (
        (["release", "app", "9.9.9"], "app has no release '9.9.9' (latest: 0.2.0, 0.1.0)"),
        (["release", "nope", "0.1.0"], "unknown repository 'nope'"),
        (["quality", "--since", "soon"], "--since 'soon': use 30d, 12h, 45m or an ISO date"),
        (["quality", "--since", "2999-01-01"], "--since '2999-01-01' is not in the past"),
    ):
        refused = subprocess.run(
            [*CICD, "report", *args, "-c", config], capture_output=True, text=True
        )
        assert refused.returncode == 2, (args, refused.stderr)
        assert message in refused.stderr
        assert refused.stdout == ""
