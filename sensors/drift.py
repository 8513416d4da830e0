"""The drift sensor: infra.plan on an interval, reported as the no_drift check of every
deployment asset (failed while a process or container is gone or changed by hand,
passed again after `cicd infra apply`), and a drift event when drift is first seen.

The cursor keeps each environment's drift of the last tick, so an event is recorded
for what is new only.
"""

import json

from dagster import (
    AssetCheckEvaluation,
    AssetCheckSeverity,
    DefaultSensorStatus,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from assets.deploy import deployment_key
from assets.drift import NO_DRIFT, drift_metadata, drift_of
from cicd_dagster.config import ControlConfig
from cicd_dagster.deploy.infra import Change, plan
from cicd_dagster.resources import CicdResource

SENSOR_NAME = "infrastructure_drift"


def _describe(change: Change) -> str:
    return f"{change.action} {change.resource} {change.name}: {change.reason}"


def drift_sensor(config: ControlConfig) -> SensorDefinition:
    interval = min(environment.health_interval_s for environment in config.environments)

    @sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=interval,
        default_status=DefaultSensorStatus.RUNNING,
        description="Compares what runs with cicd.yaml (cicd infra plan) and reports the "
        "no_drift check of every deployment asset.",
    )
    def infrastructure_drift(
        context: SensorEvaluationContext, cicd: CicdResource
    ) -> SensorResult | SkipReason:
        try:
            changes = plan(config)
        except Exception as error:  # an unreadable state file, say: reported, tried again
            context.log.exception("infra plan failed")
            return SkipReason(f"infra plan failed: {type(error).__name__}: {error}")
        seen: dict[str, list[str]] = json.loads(context.cursor) if context.cursor else {}
        drift_by_place: dict[tuple[str, str], list[Change]] = {}
        for change in changes:
            if change.is_drift:
                drift_by_place.setdefault((change.repository, change.environment), []).append(
                    change
                )
        evaluations = []
        for repository in config.repositories:
            for environment in config.environments:
                drift = drift_of(changes, repository.name, environment.name)
                evaluations.append(
                    AssetCheckEvaluation(
                        asset_key=deployment_key(repository, environment),
                        check_name=NO_DRIFT,
                        passed=not drift,
                        severity=AssetCheckSeverity.ERROR,
                        metadata=drift_metadata(drift),
                    )
                )
        history = cicd.history()
        current: dict[str, list[str]] = {}
        lines = []
        for (repository_name, environment_name), drift in sorted(drift_by_place.items()):
            key = f"{repository_name}/{environment_name}"
            current[key] = sorted(_describe(change) for change in drift)
            lines += [f"{key}: {line}" for line in current[key]]
            new = [line for line in current[key] if line not in seen.get(key, [])]
            if new:
                history.record_event(
                    repository_name,
                    "drift",
                    "\n".join(new),
                    environment=environment_name,
                )
        return SensorResult(
            asset_events=evaluations,
            cursor=json.dumps(current, sort_keys=True),
            skip_reason="\n".join(lines) or "no drift",
        )

    return infrastructure_drift
