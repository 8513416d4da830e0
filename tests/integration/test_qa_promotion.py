"""The promotion sensor with a QA environment: QA of what goes live there is requested
once, and the next environment takes only a commit whose QA passed (a real Dagster
instance, git repository and history DB, as in test_promotion_sensor.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.definitions import build_definitions
from cicd_dagster.store import HistoryStore, StageRecord
from tests.integration import test_promotion_sensor as promotion_tests
from tests.integration.test_promotion_sensor import built, deployed, requested, tick
from tests.support import commit, control_config

instance = promotion_tests.instance  # a fixture: a Dagster instance for the test

ENVIRONMENTS = (
    "environments:\n"
    "  - name: dev\n"
    "    auto_deploy: true\n"
    "  - name: staging\n"
    "    auto_deploy: true\n"
    "    qa: true\n"
    "  - name: prod\n"
    "    auto_deploy: true\n"
)


@pytest.fixture
def config(tmp_path: Path) -> ControlConfig:
    commit(tmp_path / "shop", {"app.py": "v = 1\n"})
    return load_control_config(control_config(tmp_path, {"shop": tmp_path / "shop"}, ENVIRONMENTS))


def qa_done(config: ControlConfig, sha: str, status: str) -> None:
    HistoryStore(config.history_db_url).record_stage(
        "shop",
        sha,
        StageRecord("qa", status, started_at=datetime.now(UTC), duration_s=0.1, detail="why"),
    )


def test_qa_runs_once_for_the_commit_live_in_staging_and_gates_prod(config, instance):
    sha = built(config, instance, "a" * 40)
    deployed(config, "dev", sha)
    deployed(config, "staging", sha)

    waiting = requested(tick(config, instance))

    assert set(waiting) == {"shop_qa_staging"}  # prod waits for QA
    assert (waiting["shop_qa_staging"].partition_key, waiting["shop_qa_staging"].run_key) == (
        sha,
        f"qa:staging:{sha}",
    )

    qa_done(config, sha, "failed")
    data = tick(config, instance)
    assert not data.run_requests  # QA ran (`cicd qa` runs it again); prod still waits
    assert "prod: no green commit verified in staging that passed QA there" in str(
        data.skip_message
    )

    qa_done(config, sha, "success")
    assert set(requested(tick(config, instance))) == {"shop_deploy_prod"}


def test_the_qa_environment_gets_a_job_and_a_sensor_without_auto_deploy(tmp_path):
    commit(tmp_path / "shop", {"app.py": "v = 1\n"})
    plain = "environments:\n  - name: staging\n    qa: true\n  - name: prod\n"
    config = load_control_config(control_config(tmp_path, {"shop": tmp_path / "shop"}, plain))
    defs = build_definitions(config, stream_logs=False)
    assert defs.resolve_job_def("shop_qa_staging") is not None
    sensor = defs.resolve_sensor_def("shop_promotion")
    assert sensor.description == "Runs QA of what goes live in staging."
