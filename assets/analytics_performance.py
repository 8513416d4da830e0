"""analytics/build_performance and analytics/usage_analytics: performance trends and usage
over every repository, from the history DB and this Dagster instance's own records."""

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    AssetsDefinition,
    DagsterInstance,
    EventLogRecord,
    MaterializeResult,
    MetadataValue,
    RunsFilter,
    asset,
)

from assets.common import table
from assets.deploy import TRIGGER_TAG
from cicd_dagster.analytics.charts import (
    bar_chart_png,
    markdown_image,
    save_chart,
    time_series_png,
)
from cicd_dagster.analytics.performance import (
    BUILD_ENV_COLUMNS,
    RUN_COLUMNS,
    PerformanceReport,
    performance_report,
)
from cicd_dagster.analytics.usage import MATERIALIZATION_COLUMNS, UsageReport, usage_report
from cicd_dagster.config import ControlConfig
from cicd_dagster.resources import CicdResource
from cicd_dagster.store import HistoryStore

BUILD_PERFORMANCE_KEY = AssetKey(["analytics", "build_performance"])
USAGE_ANALYTICS_KEY = AssetKey(["analytics", "usage_analytics"])
# The period every refresh covers; trends over longer spans are the UI's plots of metadata.
PERIOD = timedelta(days=30)
_PAGE = 1000


def run_records(instance: DagsterInstance, since: datetime) -> pd.DataFrame:
    """The runs created at or after `since` (RUN_COLUMNS), with what triggered each:
    cicd/trigger (the CLI, our sensors), else Dagster's sensor, schedule or backfill tag,
    else "ui" (a launch from the UI carries none of them)."""
    rows = []
    cursor = None
    while True:
        page = instance.get_run_records(RunsFilter(created_after=since), limit=_PAGE, cursor=cursor)
        for record in page:
            run = record.dagster_run
            rows.append(
                {
                    "run_id": run.run_id,
                    "job_name": run.job_name,
                    "status": run.status.value,
                    "trigger": _trigger(run.tags),
                    "created_at": record.create_timestamp,
                    "started_at": _moment(record.start_time),
                    "ended_at": _moment(record.end_time),
                }
            )
        if len(page) < _PAGE:
            break
        cursor = page[-1].dagster_run.run_id
    frame = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for column in ("created_at", "started_at", "ended_at"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def materialization_records(
    instance: DagsterInstance, config: ControlConfig, since: datetime
) -> pd.DataFrame:
    """Every asset materialization since `since` (MATERIALIZATION_COLUMNS); repository is
    the key's prefix for a repository's assets, None for the others (analytics/...)."""
    repositories = {repository.name for repository in config.repositories}
    rows = []
    for key in instance.get_asset_keys():
        owner = key.path[0] if len(key.path) > 1 and key.path[0] in repositories else None
        rows += [
            {"asset": key.to_user_string(), "repository": owner, "timestamp": record.timestamp}
            for record in _materializations(instance, key, since)
        ]
    frame = pd.DataFrame(rows, columns=MATERIALIZATION_COLUMNS)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], unit="s", utc=True)
    return frame


def build_env_records(
    instance: DagsterInstance, config: ControlConfig, since: datetime
) -> pd.DataFrame:
    """Each build materialization since `since` (BUILD_ENV_COLUMNS): whether its dependency
    env was reused (the build asset's env_reused metadata)."""
    rows = []
    for repository in config.repositories:
        for record in _materializations(instance, AssetKey([repository.name, "build"]), since):
            materialization = record.asset_materialization
            assert materialization is not None
            reused = materialization.metadata.get("env_reused")
            if reused is None:
                continue
            rows.append(
                {
                    "repository": repository.name,
                    "commit": materialization.partition,
                    "env_reused": bool(reused.value),
                    "timestamp": record.timestamp,
                }
            )
    frame = pd.DataFrame(rows, columns=BUILD_ENV_COLUMNS)
    frame["env_reused"] = frame["env_reused"].astype(bool)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], unit="s", utc=True)
    return frame


def instance_performance(
    instance: DagsterInstance,
    config: ControlConfig,
    history: HistoryStore,
    *,
    since: datetime,
    until: datetime,
    repository: str | None = None,
) -> PerformanceReport:
    """The performance report of the period, with this instance's builds and runs."""
    return performance_report(
        history,
        since=since,
        until=until,
        build_envs=build_env_records(instance, config, since),
        runs=run_records(instance, since),
        repository=repository,
    )


def instance_usage(
    instance: DagsterInstance,
    config: ControlConfig,
    history: HistoryStore,
    *,
    since: datetime,
    until: datetime,
    repository: str | None = None,
) -> UsageReport:
    """The usage report of the period, with this instance's runs and materializations."""
    return usage_report(
        config,
        history,
        since=since,
        until=until,
        runs=run_records(instance, since),
        materializations=materialization_records(instance, config, since),
        repository=repository,
    )


ReportT = TypeVar("ReportT")


def _last_period(
    context: AssetExecutionContext,
    cicd: CicdResource,
    report_of: Callable[..., ReportT],
    metadata_of: Callable[[ReportT, Path], dict[str, Any]],
) -> MaterializeResult:
    """The report of the last PERIOD from this instance and the history, as metadata with
    its charts under home/reports/analytics."""
    until = datetime.now(UTC)
    control = cicd.control_config()
    report = report_of(context.instance, control, cicd.history(), since=until - PERIOD, until=until)
    return MaterializeResult(metadata=metadata_of(report, control.home / "reports" / "analytics"))


def analytics_performance_assets(config: ControlConfig) -> list[AssetsDefinition]:
    @asset(
        key=BUILD_PERFORMANCE_KEY,
        group_name="analytics",
        kinds={"pandas"},
        description="Build and stage durations, slowest tests, benchmark regressions, "
        "dependency cache hit rate, queue and run times, over the last 30 days.",
    )
    def build_performance(context: AssetExecutionContext, cicd: CicdResource) -> MaterializeResult:
        return _last_period(context, cicd, instance_performance, performance_metadata)

    @asset(
        key=USAGE_ANALYTICS_KEY,
        group_name="analytics",
        kinds={"pandas"},
        description="Who triggers what, materializations per asset and repository, the "
        "busiest hours, deployments per environment, requests per version, over 30 days.",
    )
    def usage_analytics(context: AssetExecutionContext, cicd: CicdResource) -> MaterializeResult:
        return _last_period(context, cicd, instance_usage, usage_metadata)

    return [build_performance, usage_analytics]


def performance_metadata(report: PerformanceReport, charts_dir: Path) -> dict[str, Any]:
    """Numeric headline figures (the UI plots them over materializations; a figure without
    data is left out rather than shown as 0) and tables; per repository as <repo>/<metric>."""
    metadata: dict[str, Any] = {
        name: value for name, value in report.summary().items() if value is not None
    }
    for repository, builds in report.builds.groupby("repository"):
        median = builds["duration_s"].median()
        metadata[f"{repository}/build_median_s"] = round(float(median), 3)
    cache = report.cache
    for repository, rate in zip(cache["repository"], cache["hit_rate"], strict=True):
        metadata[f"{repository}/cache_hit_rate"] = round(float(rate), 4)
    metadata["stages"] = table(report.stages, report.stages.columns)
    metadata["slowest_tests"] = table(report.slowest_tests, report.slowest_tests.columns)
    regressions = report.benchmarks[report.benchmarks["regressed"]]
    metadata["benchmark_regressions_table"] = table(regressions, _BENCHMARK_COLUMNS)
    metadata["jobs"] = table(report.jobs, report.jobs.columns)
    durations = {
        str(repository): builds.set_index("created_at")["duration_s"]
        for repository, builds in report.builds.groupby("repository")
    }
    png = time_series_png(durations, title="Build duration per commit", ylabel="seconds")
    metadata.update(_chart(charts_dir, "build_durations", png))
    return metadata


def usage_metadata(report: UsageReport, charts_dir: Path) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        name: value for name, value in report.summary().items() if value is not None
    }
    for record in report.repositories.to_dict("records"):
        metadata[f"{record['repository']}/materializations"] = int(record["materializations"])
    for record in report.deployments.to_dict("records"):
        label = f"{record['repository']}/{record['environment']}/deployments"
        metadata[label] = int(record["deployments"])
    metadata["triggers"] = table(report.triggers, report.triggers.columns)
    metadata["assets"] = table(report.assets, report.assets.columns)
    metadata["hours"] = table(report.hours, report.hours.columns)
    metadata["deployments_table"] = table(report.deployments, report.deployments.columns)
    metadata["requests_per_version"] = table(report.requests, report.requests.columns)
    counts = zip(report.hours["hour"], report.hours["runs"], strict=True)
    hours = {f"{hour:02d}": float(runs) for hour, runs in counts}
    png = bar_chart_png(hours, title="Runs per hour of day (UTC)", ylabel="runs")
    metadata.update(_chart(charts_dir, "busiest_hours", png))
    return metadata


def _chart(charts_dir: Path, name: str, png: bytes) -> dict[str, Any]:
    """The chart embedded in the metadata, and the path of its PNG under charts_dir."""
    path = save_chart(charts_dir, name, png)
    return {
        f"{name}_chart": MetadataValue.md(markdown_image(png, name.replace("_", " "))),
        f"{name}_chart_path": MetadataValue.path(str(path)),
    }


_BENCHMARK_COLUMNS = ["repository", "commit", "created_at", "name", "mean_s", "regression"]
_BENCHMARK_COLUMNS += ["threshold"]


def _trigger(tags: Mapping[str, str]) -> str:
    if TRIGGER_TAG in tags:
        return tags[TRIGGER_TAG]
    if "dagster/sensor_name" in tags:
        return f"sensor:{tags['dagster/sensor_name']}"
    if "dagster/schedule_name" in tags:
        return f"schedule:{tags['dagster/schedule_name']}"
    if "dagster/backfill" in tags:
        return "backfill"
    return "ui"


def _moment(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def _materializations(
    instance: DagsterInstance, key: AssetKey, since: datetime
) -> list[EventLogRecord]:
    records: list[EventLogRecord] = []
    cursor = None
    while True:
        result = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=key, after_timestamp=since.timestamp()),
            limit=_PAGE,
            cursor=cursor,
        )
        records += result.records
        if not result.has_more:
            return records
        cursor = result.cursor
