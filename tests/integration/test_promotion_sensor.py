"""The promotion sensor against a real Dagster instance, a real git repository (its
default branch comes from the remote) and a real history DB holding CI results."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dagster import DagsterInstance, RunRequest, build_sensor_context, instance_for_test
from dagster._core.definitions.sensor_definition import SensorExecutionData

from assets.deploy import TRIGGER_TAG
from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.definitions import build_definitions
from cicd_dagster.resources import CicdResource
from cicd_dagster.store import DeploymentRecord, HistoryStore, StageRecord
from tests.support import commit, control_config

ENVIRONMENTS = (
    "environments:\n"
    "  - name: dev\n"
    "    auto_deploy: true\n"
    "  - name: staging\n"
    "    auto_deploy: true\n"
    "  - name: prod\n"
)
PASSED = dict.fromkeys(("source", "build", "unit", "integration", "e2e", "performance"), "success")


@pytest.fixture
def config(tmp_path: Path) -> ControlConfig:
    commit(tmp_path / "shop", {"app.py": "v = 1\n"})
    return load_control_config(control_config(tmp_path, {"shop": tmp_path / "shop"}, ENVIRONMENTS))


@pytest.fixture
def instance() -> Iterator[DagsterInstance]:
    with instance_for_test() as instance:
        yield instance


def built(
    config: ControlConfig,
    instance: DagsterInstance,
    sha: str,
    *,
    branch: str = "main",
    stages: dict[str, str] = PASSED,
) -> str:
    """Record a CI build of `sha` as the CI assets do, and its partition."""
    history = HistoryStore(config.history_db_url)
    history.record_build("shop", sha, ref=f"refs/heads/{branch}", branch=branch, run_id=None)
    for name, status in stages.items():
        history.record_stage(
            "shop", sha, StageRecord(name, status, started_at=datetime.now(UTC), duration_s=0.1)
        )
    instance.add_dynamic_partitions("shop_commits", [sha])
    return sha


def deployed(config: ControlConfig, environment: str, sha: str, status: str = "deployed") -> None:
    HistoryStore(config.history_db_url).record_deployment(
        "shop",
        DeploymentRecord(
            environment=environment,
            commit_sha=sha,
            strategy="recreate",
            status=status,
            version=sha,
            previous_version=None,
            reason="",
            started_at=datetime.now(UTC),
        ),
    )


def tick(config: ControlConfig, instance: DagsterInstance) -> SensorExecutionData:
    defs = build_definitions(config, stream_logs=False)
    sensor = defs.resolve_sensor_def("shop_promotion")
    context = build_sensor_context(
        instance=instance,
        instance_ref=instance.get_ref(),
        definitions=defs,
        sensor_name=sensor.name,
        # The daemon binds the Definitions' resources; a test context is given them.
        resources={"cicd": CicdResource(config_path=str(config.config_path))},
    )
    return sensor.evaluate_tick(context)


def requested(data: SensorExecutionData) -> dict[str, RunRequest]:
    """job name -> its run request; at most one per job."""
    requests = list(data.run_requests or [])
    by_job = {str(request.job_name): request for request in requests}
    assert len(by_job) == len(requests)
    return by_job


def test_the_newest_green_commit_of_the_default_branch_is_requested_once(config, instance):
    older = built(config, instance, "a" * 40)
    built(config, instance, "b" * 40, stages={**PASSED, "unit": "failed"})  # red
    built(config, instance, "c" * 40, branch="feature")  # not the default branch

    first = requested(tick(config, instance))

    assert set(first) == {"shop_deploy_dev"}
    request = first["shop_deploy_dev"]
    assert (request.partition_key, request.run_key) == (older, f"dev:{older}")
    assert request.tags[TRIGGER_TAG] == "sensor:promotion"
    # The same run key on the next tick: the daemon launches it once.
    assert requested(tick(config, instance))["shop_deploy_dev"].run_key == f"dev:{older}"

    newest = built(config, instance, "d" * 40)
    assert requested(tick(config, instance))["shop_deploy_dev"].partition_key == newest


def test_each_environment_promotes_what_the_previous_one_verified(config, instance):
    sha = built(config, instance, "a" * 40)
    deployed(config, "dev", sha)

    after_dev = requested(tick(config, instance))

    # dev attempted it already; staging takes it; prod has no auto_deploy.
    assert set(after_dev) == {"shop_deploy_staging"}
    assert after_dev["shop_deploy_staging"].run_key == f"staging:{sha}"

    deployed(config, "staging", sha, status="rolled_back")
    data = tick(config, instance)
    assert not data.run_requests
    assert f"{sha[:12]} was already attempted" in str(data.skip_message)


def test_a_commit_whose_tests_still_run_is_waited_for_not_skipped(config, instance):
    built(config, instance, "a" * 40)
    running = built(config, instance, "b" * 40, stages={"source": "success", "build": "success"})

    data = tick(config, instance)

    assert not data.run_requests
    assert f"{running[:12]} has no unit, integration, e2e, performance test report" in str(
        data.skip_message
    )


def test_staging_waits_for_a_commit_verified_in_dev(config, instance):
    sha = built(config, instance, "a" * 40)
    deployed(config, "dev", sha, status="rolled_back")

    data = tick(config, instance)

    assert not data.run_requests
    assert "staging: no green commit verified in dev" in str(data.skip_message)


def test_without_auto_deploy_there_is_no_promotion_sensor(tmp_path):
    commit(tmp_path / "shop", {"app.py": "v = 1\n"})
    plain = "environments:\n  - name: dev\n"
    config = load_control_config(control_config(tmp_path, {"shop": tmp_path / "shop"}, plain))
    names = {sensor.name for sensor in build_definitions(config).sensors or []}
    assert "shop_promotion" not in names
