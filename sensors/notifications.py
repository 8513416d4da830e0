"""The notification sensors: one turns failed runs into `failed` events, the other delivers
the events of the history DB to the channels of cicd.yaml (notify.deliver).

Neither launches runs. A channel that is down is recorded in the deliveries table and
tried again with backoff; it never fails a tick, a run or another channel.
"""

from datetime import UTC, datetime

import pandas as pd
from dagster import (
    DagsterEventType,
    DefaultSensorStatus,
    RunFailureSensorContext,
    SensorDefinition,
    SensorEvaluationContext,
    SkipReason,
    run_failure_sensor,
    sensor,
)
from dagster._core.storage.tags import PARTITION_NAME_TAG

from cicd_dagster.config import ControlConfig
from cicd_dagster.notify import channels_for, deliver
from cicd_dagster.resources import CicdResource

DELIVERY_SENSOR_NAME = "notifications"
FAILURE_SENSOR_NAME = "run_failure_events"
DELIVERY_INTERVAL_S = 15
# Run tags of the CI and deploy jobs (jobs/__init__.py).
REPOSITORY_TAG = "cicd/repository"
ENVIRONMENT_TAG = "cicd/environment"
# What of a step's error goes into the event (webhook texts and mails stay readable).
_MAX_ERROR_CHARS = 1500


def notification_sensor(config: ControlConfig) -> SensorDefinition:
    channels = channels_for(config.notifications)

    @sensor(
        name=DELIVERY_SENSOR_NAME,
        minimum_interval_seconds=DELIVERY_INTERVAL_S,
        default_status=DefaultSensorStatus.RUNNING,
        description="Delivers events (failed runs, deployments, rollbacks, releases, "
        "approval requests, security findings) to "
        + ", ".join(channel.description for channel in channels)
        + "; retries with backoff and records every delivery.",
    )
    def notifications(context: SensorEvaluationContext, cicd: CicdResource) -> SkipReason:
        try:
            outcomes = deliver(cicd.history(), channels)
        except Exception as error:  # the history DB: reported, tried again next tick
            context.log.exception("notification delivery failed")
            return SkipReason(f"delivery failed: {type(error).__name__}: {error}")
        for outcome in outcomes:
            if outcome.status == "sent":
                context.log.info(outcome.describe())
            else:
                context.log.warning(outcome.describe())
        sent = sum(outcome.status == "sent" for outcome in outcomes)
        failed = [outcome.describe() for outcome in outcomes if outcome.status != "sent"]
        return SkipReason("\n".join([f"{sent} sent", *failed]) if outcomes else "nothing to send")

    return notifications


def run_failure_event_sensor() -> SensorDefinition:
    # All code locations: `cicd run` and `cicd deploy` execute in-process, with no code
    # location of their own; the repository tag tells this control plane's runs apart.
    @run_failure_sensor(
        name=FAILURE_SENSOR_NAME,
        monitor_all_code_locations=True,
        default_status=DefaultSensorStatus.RUNNING,
        description="Records a `failed` event for each failed run of a repository's jobs.",
    )
    def run_failure_events(context: RunFailureSensorContext, cicd: CicdResource) -> SkipReason:
        run = context.dagster_run
        repository = run.tags.get(REPOSITORY_TAG)
        if repository is None:
            return SkipReason(f"run {run.run_id} of {run.job_name} is of no repository")
        environment = run.tags.get(ENVIRONMENT_TAG)
        commit = run.tags.get(PARTITION_NAME_TAG)
        history = cicd.history()
        record = context.instance.get_run_record_by_id(run.run_id)
        started = record.create_timestamp if record is not None else datetime.now(UTC)
        told = history.events(repository=repository, since=started)
        if commit and environment and _mentions(told, environment, commit):
            # The deployment recorded its own `failed` or `rolled_back` event.
            return SkipReason(f"run {run.run_id}: its deployment already told of it")
        history.record_event(
            repository,
            "failed",
            _failure_message(context, repository, commit),
            environment=environment,
            commit_sha=commit,
        )
        return SkipReason(f"recorded the failure of run {run.run_id}")

    return run_failure_events


def _mentions(events: pd.DataFrame, environment: str, commit: str) -> bool:
    same = events[(events["environment"] == environment) & (events["commit"] == commit)]
    return bool(same["kind"].isin(["failed", "rolled_back"]).any())


def _failure_message(context: RunFailureSensorContext, repository: str, commit: str | None) -> str:
    run = context.dagster_run
    subject = f"{repository}@{commit[:12]}" if commit else repository
    lines = [f"{run.job_name} failed for {subject} (run {run.run_id})"]
    for step_failure in context.get_step_failure_events():
        if step_failure.event_type != DagsterEventType.STEP_FAILURE:
            continue
        data = step_failure.step_failure_data
        error = data.error
        while error is not None and error.cause is not None:  # to the user's own exception
            error = error.cause
        if data.user_failure_data is not None and data.user_failure_data.description:
            detail = data.user_failure_data.description  # a Failure raised by an asset
        else:
            detail = error.message.strip() if error is not None else "no error recorded"
        lines.append(f"{step_failure.step_key}: {detail[:_MAX_ERROR_CHARS]}")
    if len(lines) == 1 and context.failure_event.message:
        lines.append(context.failure_event.message[:_MAX_ERROR_CHARS])
    return "\n".join(lines)
