"""analytics/dora_metrics: DORA's four keys of every repository over the last 90 days
(fourkeys' three months), as numeric metadata per repository (`<repo>/<metric>`, which the
UI plots over materializations), a table with the levels, and charts."""

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from dagster import AssetExecutionContext, AssetKey, AssetsDefinition, MaterializeResult, asset
from dagster import MetadataValue as MV

from assets.common import table
from cicd_dagster.analytics.charts import (
    bar_chart_png,
    markdown_image,
    save_chart,
    time_series_png,
)
from cicd_dagster.analytics.dora import (
    DeliveryEvents,
    DoraMetrics,
    all_dora_metrics,
    daily_deployments,
)
from cicd_dagster.config import ControlConfig
from cicd_dagster.resources import CicdResource

DORA_METRICS_KEY = AssetKey(["analytics", "dora_metrics"])
PERIOD = timedelta(days=90)
COLUMNS = [
    "repository",
    "deployments",
    "per_week",
    "frequency",
    "lead_time_min",
    "lead_time",
    "change_failure_rate",
    "change_failure",
    "time_to_restore_min",
    "time_to_restore",
]


def analytics_dora_assets(config: ControlConfig) -> list[AssetsDefinition]:
    @asset(
        key=DORA_METRICS_KEY,
        group_name="analytics",
        kinds={"pandas"},
        description="DORA's four keys per repository over the last 90 days, with fourkeys' "
        "definitions: deployment frequency, lead time for changes, change failure rate, "
        "time to restore, each with its DORA level.",
    )
    def dora_metrics(context: AssetExecutionContext, cicd: CicdResource) -> MaterializeResult:
        control = cicd.control_config()
        until = datetime.now(UTC)
        results = all_dora_metrics(control, cicd.history(), until - PERIOD, until)
        for metrics, _ in results:
            for note in metrics.notes:
                context.log.warning(f"{metrics.repository}: {note}")
        return MaterializeResult(
            metadata=dora_metadata(results, control.home / "reports" / "analytics")
        )

    return [dora_metrics]


def dora_metadata(
    results: list[tuple[DoraMetrics, DeliveryEvents]], charts_dir: Path
) -> dict[str, Any]:
    """`<repo>/<metric>` numbers (a metric without data is left out, not shown as 0), the
    table of values and levels, and two charts (embedded, and written under charts_dir)."""
    metadata: dict[str, Any] = {"repositories": len(results)}
    rows = []
    for metrics, _ in results:
        numbers = {
            "deployments": metrics.deployment_frequency.count,
            "deployments_per_week": metrics.deployment_frequency.value,
            "lead_time_minutes": metrics.lead_time.value,
            "change_failure_rate": metrics.change_failure_rate.value,
            "time_to_restore_minutes": metrics.time_to_restore.value,
            "incidents": metrics.incidents,
        }
        for name, value in numbers.items():
            if value is not None:
                metadata[f"{metrics.repository}/{name}"] = MV.float(float(value))
        rows.append(_row(metrics))
    metadata["metrics"] = table(pd.DataFrame(rows, columns=COLUMNS), COLUMNS, limit=500)
    if results:
        since, until = results[0][0].since, results[0][0].until
        deployments_png = time_series_png(
            {m.repository: daily_deployments(events, since, until) for m, events in results},
            title="Production deployments per day",
            ylabel="deployments",
        )
        failure_png = bar_chart_png(
            {m.repository: m.change_failure_rate.value for m, _ in results},
            title="Change failure rate (90 days)",
            ylabel="failed / deployments",
        )
        for name, png in (("deployments", deployments_png), ("change_failure_rate", failure_png)):
            path = save_chart(charts_dir, f"dora_{name}", png)
            metadata[f"{name}_chart"] = MV.md(markdown_image(png, name.replace("_", " ")))
            metadata[f"{name}_chart_path"] = MV.path(str(path))
    return metadata


def _row(metrics: DoraMetrics) -> dict[str, object]:
    frequency, lead, failure, restore = (
        metrics.deployment_frequency,
        metrics.lead_time,
        metrics.change_failure_rate,
        metrics.time_to_restore,
    )
    return {
        "repository": metrics.repository,
        "deployments": frequency.count,
        "per_week": frequency.value,
        "frequency": f"{frequency.bucket or ''} ({frequency.level})".lstrip(),
        "lead_time_min": lead.value,
        "lead_time": f"{lead.bucket or ''} ({lead.level})".lstrip(),
        "change_failure_rate": failure.value,
        "change_failure": f"{failure.bucket or ''} ({failure.level})".lstrip(),
        "time_to_restore_min": restore.value,
        "time_to_restore": f"{restore.bucket or ''} ({restore.level})".lstrip(),
    }
