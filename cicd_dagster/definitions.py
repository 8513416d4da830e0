"""Assembles the Definitions: one partition set, asset group, CI job and sensor per repository,
plus a deployment asset and deploy job per environment, and the nightly security rescan.

The configuration comes from cicd.yaml (CICD_CONFIG, default ./cicd.yaml); this module
only wires what assets/, jobs/ and sensors/ build.
"""

import os
from pathlib import Path

from dagster import Definitions

from assets import ci_assets, deployment_assets, drift_checks
from assets.partitions import commit_partitions
from assets.rescan import rescan_asset
from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.resources import CicdResource
from jobs import ci_job, deploy_job, rescan_job, rescan_schedule
from sensors.drift import drift_sensor
from sensors.health import deployment_health_sensor
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
        sensors.extend(promotion_sensors(repository, config.environments, deploy_jobs))
        sensors.append(repository_sensor(repository, job, partitions))
        assets.append(rescan_asset(repository))
    rescan = rescan_job()
    jobs.append(rescan)
    if config.environments:
        sensors += [deployment_health_sensor(config), drift_sensor(config)]
    return Definitions(
        assets=assets,
        asset_checks=drift_checks(config),
        jobs=jobs,
        schedules=[rescan_schedule(config, rescan)],
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
