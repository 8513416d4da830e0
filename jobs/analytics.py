"""The analytics job (every asset of the `analytics` group), refreshed hourly by a schedule
and, sooner, by a sensor when the history DB has new deployments, incidents (opened or
closed) or imported events since the last request."""

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleDefinition,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    in_process_executor,
    sensor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from assets.analytics import GROUP
from cicd_dagster.resources import CicdResource

ANALYTICS_JOB = "analytics"
# The sensor looks at one small query: often enough that a deployment shows up in the
# metrics within a minute, rarely enough to cost nothing.
SENSOR_INTERVAL_S = 60


def analytics_job() -> UnresolvedAssetJobDefinition:
    return define_asset_job(
        name=ANALYTICS_JOB,
        selection=AssetSelection.groups(GROUP),
        description="Refresh the analytics: DORA metrics, performance, flaky tests, usage.",
        executor_def=in_process_executor,
    )


def analytics_schedule(job: UnresolvedAssetJobDefinition) -> ScheduleDefinition:
    return ScheduleDefinition(
        name=f"{ANALYTICS_JOB}_schedule",
        cron_schedule="0 * * * *",
        execution_timezone="UTC",
        job=job,
        default_status=DefaultScheduleStatus.RUNNING,
        description="Refreshes the analytics every hour.",
    )


def analytics_sensor(job: UnresolvedAssetJobDefinition) -> SensorDefinition:
    @sensor(
        name=f"{ANALYTICS_JOB}_on_new_history",
        job=job,
        minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=DefaultSensorStatus.RUNNING,
        description="Refreshes the analytics when a deployment or incident is recorded, an "
        "incident closes or events are imported.",
    )
    def analytics_on_new_history(
        context: SensorEvaluationContext, cicd: CicdResource
    ) -> SensorResult | SkipReason:
        marker = cicd.history().delivery_marker()
        if marker == context.cursor:
            return SkipReason("no new deployments, incidents or imported events")
        # The marker as run key: a tick that sees the same history never runs it twice.
        return SensorResult(run_requests=[RunRequest(run_key=marker)], cursor=marker)

    return analytics_on_new_history
