"""The analytics in the UI for real: `cicd ui` on loopback after a little real history.

One CI run of a real commit (launched through the webserver, as a user does) and a file of
fourkeys events imported with `cicd events import`; then the analytics job, launched the
same way. The webserver's GraphQL must give every analytics asset's latest
materialization numeric metadata entries (what the UI plots over materializations) and its
chart (a Markdown image and the PNG's path); a headless Chromium then loads the asset
page, where the chart must render as an image and the numbers show per materialization
(screenshots under the test's tmp dir).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_webserver import (
    BIN,
    LAUNCH_RUN,
    REPO,
    Dagster,
    launch_commit,
    running_ui,
    tail,
    wait_for_run,
)
from tests.support import commit, control_config, pipeline_writing_reports

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(420)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
PAGE_TIMEOUT_MS = 60_000
PNG_DATA_URI = "data:image/png;base64,"
# Per asset: a `<repo>/<metric>` number the UI plots, and the chart's label.
ANALYTICS = {
    "dora_metrics": (f"{REPO}/deployments", "deployments_chart"),
    "test_health": (f"{REPO}/test_runs", "flaky_tests_chart"),
    "build_performance": (f"{REPO}/build_median_s", "build_durations_chart"),
    "usage_analytics": (f"{REPO}/materializations", "busiest_hours_chart"),
}


@dataclass(frozen=True)
class Analytics:
    dagster: Dagster
    run_id: str  # the analytics job's run
    screenshots: Path


def fourkeys_events(now: datetime) -> str:
    """Two changes, their deployment a day later, and an incident it caused, restored."""
    day = timedelta(days=1)
    events = [
        {"id": "c1", "type": "change", "time": now - 4 * day, "sha": "a1" * 20},
        {"id": "c2", "type": "change", "time": now - 3 * day, "sha": "a2" * 20},
        {
            "id": "d1",
            "type": "deployment",
            "time": now - 2 * day,
            "sha": "a2" * 20,
            "changes": ["a1" * 20, "a2" * 20],
        },
        {
            "id": "i1",
            "type": "incident",
            "time": now - 2 * day + timedelta(hours=1),
            "root_cause": "a2" * 20,
            "resolved": now - 2 * day + timedelta(hours=3),
        },
    ]
    return "".join(
        json.dumps({**event, "repository": REPO}, default=lambda moment: moment.isoformat()) + "\n"
        for event in events
    )


ANALYTICS_RUNS = """
query {
  runsOrError(filter: {pipelineName: "analytics"}) {
    __typename
    ... on Runs { results { runId } }
  }
}
"""


def launch_job(dagster: Dagster, job: str) -> str:
    """What "Materialize all" of an unpartitioned job does in the UI: one run of it."""
    params = {"selector": {**dagster.repository_selector, "jobName": job}}
    launched = dagster.graphql(LAUNCH_RUN, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id: str = launched["run"]["runId"]
    return run_id


@pytest.fixture(scope="module")
def analytics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Analytics]:
    base = tmp_path_factory.mktemp("analytics_ui")
    repo = base / "repos" / REPO
    sha = commit(repo, {".cicd.yml": pipeline_writing_reports()}, "feat: first")
    # The repository sensor watches only release/*: the one CI run is the one launched here.
    config = control_config(base, {REPO: repo}, repo_extra='branches: ["release/*"]')
    events = base / "events.jsonl"
    events.write_text(fourkeys_events(datetime.now(UTC)))
    imported = subprocess.run(
        [str(BIN / "cicd"), "--config", str(config), "events", "import", str(events)],
        capture_output=True,
        text=True,
        env={**os.environ, "DAGSTER_HOME": str(base / "unused_dagster_home")},
    )
    assert imported.returncode == 0, imported.stderr
    with running_ui(base, config) as dagster:
        ci = wait_for_run(dagster, launch_commit(dagster, sha))
        assert ci["status"] == "SUCCESS", f"{ci}\n{tail(dagster.log)}"
        # The sensor on new history may have started a refresh on the imported events:
        # let it end first, so that the run launched below materializes last.
        for earlier in dagster.graphql(ANALYTICS_RUNS)["runsOrError"]["results"]:
            wait_for_run(dagster, earlier["runId"])
        run = wait_for_run(dagster, launch_job(dagster, "analytics"))
        assert run["status"] == "SUCCESS", f"{run}\n{tail(dagster.log)}"
        yield Analytics(dagster, run["runId"], base / "screenshots")


LATEST_MATERIALIZATION = """
query($key: AssetKeyInput!) {
  assetOrError(assetKey: $key) {
    __typename
    ... on Asset {
      assetMaterializations(limit: 1) {
        runId
        metadataEntries {
          label
          __typename
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on MarkdownMetadataEntry { mdStr }
          ... on PathMetadataEntry { path }
        }
      }
    }
  }
}
"""


def latest_metadata(dagster: Dagster, name: str) -> tuple[str, dict[str, tuple[str, Any]]]:
    """The latest materialization of analytics/<name>: its run and {label: (type, value)}."""
    asset = dagster.graphql(LATEST_MATERIALIZATION, key={"path": ["analytics", name]})
    found = asset["assetOrError"]
    assert found["__typename"] == "Asset", found
    (latest,) = found["assetMaterializations"]
    values = {
        entry["label"]: (
            entry["__typename"],
            next(
                (entry[f] for f in ("intValue", "floatValue", "mdStr", "path") if f in entry),
                None,
            ),
        )
        for entry in latest["metadataEntries"]
    }
    return latest["runId"], values


@pytest.mark.parametrize("name", sorted(ANALYTICS))
def test_analytics_assets_carry_plotted_numbers_and_a_chart(
    analytics: Analytics, name: str
) -> None:
    run_id, metadata = latest_metadata(analytics.dagster, name)

    assert run_id == analytics.run_id
    plotted, chart = ANALYTICS[name]
    kind, value = metadata[plotted]
    assert kind in ("IntMetadataEntry", "FloatMetadataEntry"), metadata[plotted]
    assert value > 0
    numbers = [label for label, (kind, _) in metadata.items() if kind.endswith("MetadataEntry")]
    assert len(numbers) > 1
    kind, markdown = metadata[chart]
    assert kind == "MarkdownMetadataEntry"
    embedded = markdown.split(PNG_DATA_URI, 1)[1].rstrip(")")
    kind, path = metadata[f"{chart}_path"]
    assert kind == "PathMetadataEntry"
    assert Path(path).read_bytes() == base64.b64decode(embedded)
    assert Path(path).read_bytes().startswith(b"\x89PNG")


def test_dora_numbers_are_those_of_the_imported_events(analytics: Analytics) -> None:
    _, metadata = latest_metadata(analytics.dagster, "dora_metrics")

    assert metadata[f"{REPO}/deployments"] == ("FloatMetadataEntry", 1.0)
    # Changes 2 days and 1 day before their deployment: the median is 1.5 days.
    assert metadata[f"{REPO}/lead_time_minutes"] == ("FloatMetadataEntry", 1.5 * 24 * 60)
    assert metadata[f"{REPO}/change_failure_rate"] == ("FloatMetadataEntry", 1.0)
    # fourkeys: an incident starts no later than its root cause's deployment, an hour
    # before it was reported here; restored two hours after the report.
    assert metadata[f"{REPO}/time_to_restore_minutes"] == ("FloatMetadataEntry", 180.0)


def test_the_asset_page_shows_the_chart_and_the_plots(analytics: Analytics) -> None:
    # CI installs Debian's chromium and Playwright (.ci/run): missing there is a failure.
    assert CHROMIUM.exists() and shutil.which("chromium"), "apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    analytics.screenshots.mkdir(exist_ok=True)
    asset = f"{analytics.dagster.url}/assets/analytics/dora_metrics"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(asset)
            # A fresh instance greets the first visit with a newsletter dialog.
            page.get_by_role("button", name="Skip").click()
            row = page.locator("tr", has_text="deployments_chart").first
            row.get_by_text("[Show Markdown]").click()
            # The latest materialization's Markdown chart, rendered as an image.
            chart = page.locator(f"img[src^='{PNG_DATA_URI}']").first
            chart.wait_for(state="visible")
            assert page.evaluate("(img) => img.naturalWidth > 0", chart.element_handle())
            page.screenshot(path=str(analytics.screenshots / "dora_chart.png"), full_page=True)
            page.keyboard.press("Escape")
            # The numbers of each materialization, as the Events view lists them.
            page.goto(f"{asset}?view=events")
            page.get_by_text(f"Materialized in run {analytics.run_id[:8]}").wait_for()
            for label in (f"{REPO}/deployments", f"{REPO}/lead_time_minutes"):
                assert page.get_by_text(label, exact=True).count() == 1, label
            page.screenshot(path=str(analytics.screenshots / "dora_events.png"), full_page=True)
        finally:
            browser.close()
    for name in ("dora_chart.png", "dora_events.png"):
        assert (analytics.screenshots / name).read_bytes().startswith(b"\x89PNG")
