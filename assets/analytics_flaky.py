"""analytics/test_health: the flaky tests of every repository and the state of their
quarantine, over the last 30 days of recorded test runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dagster import AssetKey, AssetsDefinition, MaterializeResult, MetadataValue, asset

from assets.common import table
from cicd_dagster.analytics.charts import bar_chart_png, markdown_image, save_chart
from cicd_dagster.analytics.flaky import TestHealth, collect_test_health
from cicd_dagster.config import ControlConfig
from cicd_dagster.resources import CicdResource

TEST_HEALTH_KEY = AssetKey(["analytics", "test_health"])
# The window every refresh covers; longer trends are the UI's plots of the metadata.
PERIOD = timedelta(days=30)
_RANKING_COLUMNS = ["repository", "stage", "test", "runs", "flips", "flip_rate"]
_RANKING_COLUMNS += ["commits", "first_seen", "last_seen", "last_status", "quarantined"]
_CHARTED = 10


def analytics_flaky_assets(config: ControlConfig) -> list[AssetsDefinition]:
    @asset(
        key=TEST_HEALTH_KEY,
        group_name="analytics",
        kinds={"pandas"},
        description="Flaky tests (passed and failed on the same commit) ranked by flip rate, "
        "and stale quarantine entries, over the last 30 days.",
    )
    def test_health(cicd: CicdResource) -> MaterializeResult:
        control = cicd.control_config()
        health = collect_test_health(control, cicd.history(), datetime.now(UTC) - PERIOD)
        charts_dir = control.home / "reports" / "analytics"
        return MaterializeResult(metadata=health_metadata(health, charts_dir))

    return [test_health]


def health_metadata(health: TestHealth, charts_dir: Path) -> dict[str, Any]:
    """Numbers the UI plots (all repositories, then <repo>/<metric>; a worst flip rate only
    where there is a flaky test), the ranking as a table and the flakiest tests' flip rates
    as a chart (embedded, and written under charts_dir)."""
    ranking = health.ranking
    metadata: dict[str, Any] = {
        "flaky_tests": len(ranking),
        "quarantined_flaky_tests": int(ranking["quarantined"].sum()),
        "stale_quarantine_entries": sum(len(r.stale_quarantine) for r in health.repositories),
    }
    if len(ranking):
        metadata["worst_flip_rate"] = float(ranking["flip_rate"].max())
    for repository in health.repositories:
        metadata[f"{repository.repository}/flaky_tests"] = repository.flaky
        metadata[f"{repository.repository}/test_runs"] = repository.runs
        if repository.worst_flip_rate is not None:
            metadata[f"{repository.repository}/worst_flip_rate"] = repository.worst_flip_rate
    shown = ranking.assign(
        commits=ranking["commits"].map(lambda shas: ", ".join(s[:12] for s in shas))
    )
    metadata["ranking"] = table(shown, _RANKING_COLUMNS)
    metadata["quarantine"] = MetadataValue.md(_quarantine_summary(health))
    flakiest = ranking.head(_CHARTED)
    png = bar_chart_png(
        dict(
            zip(flakiest["repository"] + "/" + flakiest["test"], flakiest["flip_rate"], strict=True)
        ),
        title=f"Flip rate of the {_CHARTED} flakiest tests",
        ylabel="flips / (runs - 1)",
    )
    path = save_chart(charts_dir, "flaky_tests", png)
    metadata["flaky_tests_chart"] = MetadataValue.md(markdown_image(png, "flaky tests"))
    metadata["flaky_tests_chart_path"] = MetadataValue.path(str(path))
    return metadata


def _quarantine_summary(health: TestHealth) -> str:
    lines = ["| repository | commit | entries | stale |", "|---|---|---|---|"]
    for repository in health.repositories:
        commit = (repository.quarantine_commit or "")[:12]
        if repository.quarantine_error:
            lines.append(
                f"| {repository.repository} | {commit} | unreadable: "
                f"{repository.quarantine_error} | |"
            )
            continue
        entries = ", ".join(f"`{e}`" for e in repository.quarantine) or "none"
        stale = ", ".join(f"`{e}`" for e in repository.stale_quarantine) or "none"
        lines.append(f"| {repository.repository} | {commit} | {entries} | {stale} |")
    return "\n".join(lines)
