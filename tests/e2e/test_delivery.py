"""The whole delivery flow from the command line, as a user runs it: the demo shop goes
dev -> staging -> prod (blue-green, rolling, canary) on the local and the Docker target,
a broken version rolls back by itself while a probe loop sees no failed request at the
stable address, and `cicd status` and `cicd history deployments` show it all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cicd_dagster.demo import create_demo_repository
from tests.support import TrafficProbe, commit, git, http_get

pytestmark = pytest.mark.slow

CICD = [sys.executable, "-m", "cicd_dagster"]
STRATEGIES = {"dev": "blue_green", "staging": "rolling", "prod": "canary"}
# A change the tests are happy with but the environments are not: the app now needs a
# setting that CI's e2e test sets and no environment defines, so it exits at startup.
BROKEN_APP_PATCH = (
    "    args = parser.parse_args()\n",
    "    args = parser.parse_args()\n"
    '    os.environ["SHOP_PAYMENT_URL"]  # new: the payment service\n',
)


def control_file(folder: Path, target: str) -> Path:
    environments = "".join(
        f"  - name: {name}\n"
        f"    target: {{type: {target}}}\n"
        f"    strategy: {{type: {strategy}, replicas: 2}}\n"
        f"    env: {{SHOP_ENVIRONMENT: {name}}}\n"
        "    verify: {interval_s: 0.2, success_threshold: 2, rollback_window_s: 600}\n"
        + ("    qa: true\n" if name == "staging" else "")
        for name, strategy in STRATEGIES.items()
    )
    path = folder / "cicd.yaml"
    path.write_text(
        "home: .cicd\n"
        "repositories:\n"
        "  - name: demo\n"
        "    url: ./demo-repo\n"
        f"environments:\n{environments}"
    )
    return path


def cicd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CICD, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def cicd_json(config: Path, *args: str) -> object:
    done = cicd(config, *args)
    assert done.returncode in (0, 1), done.stderr
    return json.loads(done.stdout)


def break_the_app(repo: Path) -> str:
    app = repo / "shop" / "app.py"
    text = app.read_text().replace("import argparse\n", "import argparse\nimport os\n")
    old, new = BROKEN_APP_PATCH
    e2e = repo / "tests" / "e2e" / "test_api.py"
    test_text = e2e.read_text().replace(
        '[sys.executable, "-m", "shop.app", "--port", str(port)]',
        '[sys.executable, "-m", "shop.app", "--port", str(port)],\n'
        '        env={**os.environ, "SHOP_PAYMENT_URL": "http://127.0.0.1:9"},',
    )
    test_text = test_text.replace("import json\n", "import json\nimport os\n", 1)
    return commit(
        repo,
        {"shop/app.py": text.replace(old, new), "tests/e2e/test_api.py": test_text},
        "feat: pay through the payment service",
    )


@pytest.fixture(params=["local", pytest.param("docker", marks=pytest.mark.docker)])
def delivery(request: pytest.FixtureRequest, tmp_path: Path, nginx: str) -> Iterator[Path]:
    if request.param == "docker":
        request.getfixturevalue("base_image")
    config = control_file(tmp_path, request.param)
    create_demo_repository(tmp_path / "demo-repo")
    yield config
    done = cicd(config, "down")
    assert done.returncode == 0, done.stderr


def test_the_demo_goes_to_prod_and_a_broken_version_rolls_back(delivery: Path) -> None:
    config = delivery
    repo = config.parent / "demo-repo"
    good = git(repo, "rev-parse", "HEAD")

    run = cicd_json(config, "run", "demo", "--json")
    assert isinstance(run, dict) and run["status"] == "success", run
    for environment, strategy in STRATEGIES.items():
        deployed = cicd_json(config, "deploy", "demo", "--env", environment, "--json")
        assert isinstance(deployed, dict)
        assert (deployed["status"], deployed["commit"], deployed["strategy"]) == (
            "deployed",
            good,
            strategy,
        ), deployed
        assert '"status": "ok"' in http_get(deployed["url"] + "/healthz")
        if environment == "staging":  # Stage -> QA -> Prod: the demo's QA suite
            qa = cicd_json(config, "qa", "demo", "--env", "staging", "--json")
            assert isinstance(qa, dict)
            assert (qa["status"], qa["commit"], qa["failed"]) == ("success", good, 0), qa

    broken = break_the_app(repo)
    assert cicd_json(config, "run", "demo", "--json")["status"] == "success"  # type: ignore[index]
    status = cicd_json(config, "status", "--json")
    assert isinstance(status, list)
    dev_url = next(row["url"] for row in status if row["environment"] == "dev")
    probe = TrafficProbe(dev_url + "/healthz", max_seconds=120)
    probe.start()
    try:
        attempt = cicd_json(config, "deploy", "demo", "--env", "dev", "--commit", broken, "--json")
    finally:
        probe.finish()
    assert isinstance(attempt, dict)
    assert attempt["status"] == "rolled_back", attempt
    assert "health check" in attempt["reason"], attempt
    assert attempt["rollback_s"] is not None
    assert probe.answers and probe.failures == []

    status = cicd_json(config, "status", "--json")
    assert isinstance(status, list)
    by_environment = {row["environment"]: row for row in status if row["repository"] == "demo"}
    assert set(by_environment) == set(STRATEGIES)
    for row in by_environment.values():
        assert (row["commit"], row["health"]) == (good, "healthy"), row
        assert row["url"].startswith("http://127.0.0.1:")

    history = cicd_json(config, "history", "deployments", "--repo", "demo", "--format", "json")
    assert isinstance(history, list)
    outcomes = [(row["environment"], row["commit"], row["status"]) for row in history]
    assert outcomes[0] == ("dev", broken, "rolled_back")
    assert sorted(outcomes[1:]) == sorted((env, good, "deployed") for env in STRATEGIES)
    assert all(row["duration_s"] > 0 for row in history)
    assert os.path.exists(config.parent / ".cicd" / "history.db")
