"""Assembles the Definitions: one partition set, asset group, CI job and sensor per repository,
plus a deployment asset and deploy job per environment (and a QA asset and job where
qa: true), the nightly security rescan, the housekeeping jobs and the analytics.

The configuration comes from cicd.yaml (CICD_CONFIG, default ./cicd.yaml); this module
only wires what assets/, jobs/ and sensors/ build.
"""

import os
from pathlib import Path

from dagster import Definitions

from assets import ci_assets, deployment_assets, drift_checks, qa_assets
from assets.analytics import analytics_assets
from assets.partitions import commit_partitions
from assets.release import release_asset
from assets.rescan import rescan_asset
from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.resources import CicdResource
from jobs import ci_job, deploy_job, qa_job, release_job, rescan_job, rescan_schedule
from jobs.analytics import analytics_job, analytics_schedule, analytics_sensor
from jobs.housekeeping import housekeeping_jobs, housekeeping_schedules
from sensors.approvals import approval_sensors
from sensors.drift import drift_sensor
from sensors.health import deployment_health_sensor
from sensors.notifications import notification_sensor, run_failure_event_sensor
from sensors.promotion import promotion_sensors
from sensors.repository import repository_sensor


def config_path() -> Path:
    return Path(os.environ.get("CICD_CONFIG", "cicd.yaml")).resolve()


def build_definitions(config: ControlConfig, *, stream_logs: bool = True) -> Definitions:
    assets, jobs, sensors = [], [], []
    for repository in config.repositories:
        partitions = commit_partitions(repository)
        job = ci_job(repository, partitions)
        assets.extend(ci_assets(repository, partitions))
        jobs.append(job)
        assets.extend(deployment_assets(repository, partitions, config.environments))
        deploy_jobs = [deploy_job(repository, env, partitions) for env in config.environments]
        jobs.extend(deploy_jobs)
        assets.extend(qa_assets(repository, partitions, config.environments))
        qa_jobs = [qa_job(repository, env, partitions) for env in config.environments if env.qa]
        jobs.extend(qa_jobs)
        sensors.extend(promotion_sensors(repository, config.environments, deploy_jobs, qa_jobs))
        sensors.extend(approval_sensors(repository, config.environments, deploy_jobs))
        sensors.append(repository_sensor(repository, job, partitions))
        assets.append(rescan_asset(repository))
        assets.append(release_asset(repository, partitions, config.environments))
        jobs.append(release_job(repository, partitions))
    rescan = rescan_job()
    jobs.append(rescan)
    housekeeping = housekeeping_jobs()
    assets.extend(analytics_assets(config))
    analytics = analytics_job()
    jobs.append(analytics)
    sensors.append(analytics_sensor(analytics))
    if config.environments:
        sensors += [deployment_health_sensor(config), drift_sensor(config)]
    # Failed runs are recorded as events always, and delivered where channels are configured.
    sensors.append(run_failure_event_sensor())
    if config.notifications:
        sensors.append(notification_sensor(config))
    return Definitions(
        assets=assets,
        asset_checks=drift_checks(config),
        jobs=[*jobs, *housekeeping],
        schedules=[
            rescan_schedule(config, rescan),
            *housekeeping_schedules(config, housekeeping),
            analytics_schedule(analytics),
        ],
        sensors=sensors,
        resources={
            "cicd": CicdResource(config_path=str(config.config_path), stream_logs=stream_logs)
        },
    )


def __getattr__(name: str) -> Definitions:
    # Loaded lazily so that importing this module (the CLI does) reads no file.
    if name == "defs":
        return build_definitions(load_control_config(config_path()))
    raise AttributeError(name)
