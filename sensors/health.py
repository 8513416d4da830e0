"""The deployment-health sensor: watches every live environment on an interval.

Each tick observes every repository x environment with a live version (monitor.observe:
probes of the stable address, tracebacks in the service logs, incidents opened and
closed in the history DB), ends expired blue-green rollback windows, and reports an
AssetObservation on the environment's deployment asset, partition = the live commit,
with numbers the UI plots. It never launches a run; one environment's failure is
reported and the others are still watched.
"""

from dagster import (
    AssetObservation,
    DefaultSensorStatus,
    MetadataValue,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from assets.deploy import deployment_key
from cicd_dagster.config import ControlConfig
from cicd_dagster.deploy.infra import existing_environment
from cicd_dagster.deploy.monitor import Observation, observe
from cicd_dagster.resources import CicdResource

SENSOR_NAME = "deployment_health"


def observation_metadata(observation: Observation) -> dict[str, MetadataValue]:
    metadata: dict[str, MetadataValue] = {
        "health": MetadataValue.text(observation.health),
        "ok_probes": MetadataValue.int(observation.ok_probes),
        "failed_probes": MetadataValue.int(len(observation.probes) - observation.ok_probes),
        "errors": MetadataValue.int(len(observation.errors)),
        "slots_running": MetadataValue.int(observation.slots_running),
        "url": MetadataValue.url(observation.url or ""),
    }
    if observation.latency_ms is not None:
        metadata["latency_ms"] = MetadataValue.float(round(observation.latency_ms, 3))
    return metadata


def deployment_health_sensor(config: ControlConfig) -> SensorDefinition:
    interval = min(environment.health_interval_s for environment in config.environments)

    @sensor(
        name=SENSOR_NAME,
        minimum_interval_seconds=interval,
        default_status=DefaultSensorStatus.RUNNING,
        description="Probes every live environment's stable address, scans service logs "
        "for tracebacks, opens and closes incidents, and records latency and errors.",
    )
    def deployment_health(context: SensorEvaluationContext, cicd: CicdResource) -> SensorResult:
        history = cicd.history()
        events: list[AssetObservation] = []
        lines: list[str] = []
        for repository in config.repositories:
            for environment in config.environments:
                where = f"{repository.name}/{environment.name}"
                try:
                    env = existing_environment(config, repository.name, environment)
                    if env is None or env.current_version() is None:
                        lines.append(f"{where}: not deployed")
                        continue
                    ended = env.end_expired_rollback_window()
                    if ended:
                        context.log.info(f"{where}: rollback window over, stopped {ended}")
                    observation = observe(env, repository.name, history)
                except Exception as error:  # reported; the other environments go on
                    context.log.exception(f"{where}: observation failed")
                    lines.append(f"{where}: observation failed: {type(error).__name__}: {error}")
                    continue
                lines.append(observation.summary())
                events.append(
                    AssetObservation(
                        asset_key=deployment_key(repository, environment),
                        partition=observation.commit_sha,
                        metadata=observation_metadata(observation),
                    )
                )
        return SensorResult(asset_events=events, skip_reason="\n".join(lines) or "nothing to do")

    return deployment_health
