"""Deploy strategies for real: supervised service processes behind a real nginx router.

Without nginx these tests skip, except under CICD_REQUIRE_NGINX=1 (CI), where a missing
nginx must not pass silently (.ci/install-nginx.sh installs it).
"""

from __future__ import annotations

import os
import shlex
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cicd_dagster.config import StrategyConfig
from cicd_dagster.deploy.health import ProbeConfig
from cicd_dagster.deploy.local import LocalSupervisor, free_port
from cicd_dagster.deploy.router import NginxRouter, RouterError
from cicd_dagster.deploy.strategies import DeployOutcome, Environment, Release
from tests.support import TrafficProbe, http_get, tear_down

# MODE good: 200 and VERSION on every path. unhealthy: /healthz answers 500.
# flaky: /healthz is fine, but every odd-numbered other request answers 500 (half of
# them, deterministically, so the canary's first request fails). broken_behind_router:
# healthy when asked directly, 500 to whatever comes through the router (as a version
# that falls over right after the switch).
SERVICE = """\
import itertools, os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE, VERSION = os.environ["MODE"], os.environ["VERSION"].encode()
requests = itertools.count(1)

class Service(BaseHTTPRequestHandler):
    def do_GET(self):
        if MODE == "broken_behind_router" and "X-Forwarded-For" in self.headers:
            status = 500
        elif self.path == "/healthz":
            status = 500 if MODE == "unhealthy" else 200
        else:
            status = 500 if MODE == "flaky" and next(requests) % 2 else 200
        self.send_response(status)
        self.send_header("Content-Length", str(len(VERSION)))
        self.end_headers()
        self.wfile.write(VERSION)

    def log_message(self, format, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Service).serve_forever()
"""
SERVE = f"exec {shlex.quote(sys.executable)} service.py"
PROBES = ProbeConfig(timeout_s=1.0, interval_s=0.02, max_attempts=50, success_threshold=2)


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "service.py").write_text(SERVICE)
    return folder


@pytest.fixture
def make_environment(tmp_path: Path, nginx: str) -> Iterator[Callable[..., Environment]]:
    """Makes environments "prod" (Environment's keyword options passed on, `port` for the
    router); their slots and routers are all stopped after the test."""
    made: list[Environment] = []

    def make(port: int | None = None, **options: Any) -> Environment:
        folder = tmp_path / f"env{len(made)}"
        router = NginxRouter(folder / "router", port or free_port(), nginx=nginx)
        supervisor = LocalSupervisor(folder / "services")
        made.append(Environment("prod", folder / "state", router, supervisor, PROBES, **options))
        return made[-1]

    yield make
    for env in made:
        tear_down(env)


@pytest.fixture
def environment(make_environment: Callable[..., Environment]) -> Environment:
    return make_environment()


def release(service_dir: Path, version: str, mode: str = "good", **fields: Any) -> Release:
    env = {"PATH": os.environ["PATH"], "VERSION": version, "MODE": mode}
    return Release(version, SERVE, service_dir, env, **fields)


def answers(environment: Environment, count: int = 20) -> Counter[str]:
    return Counter(http_get(environment.router.url) for _ in range(count))


def active_slots(environment: Environment) -> set[str]:
    return {
        state.name
        for state in environment.target.all()
        if state.status in ("starting", "running", "restarting")
    }


def assert_consistent(environment: Environment) -> None:
    """The state names exactly the slots that run, and the router routes by its weights."""
    slots = environment.slots()
    assert {slot.name for slot in slots} == active_slots(environment)
    assert environment.router.weights() == {slot.name: slot.weight for slot in slots}


def deploy(
    environment: Environment, rel: Release, strategy: str, **settings: object
) -> DeployOutcome:
    return environment.deploy(rel, StrategyConfig.model_validate({"type": strategy, **settings}))


def test_blue_green_and_rollback_drop_no_request(
    environment: Environment, service_dir: Path
) -> None:
    v1 = release(service_dir, "v1")
    assert deploy(environment, v1, "blue_green").status == "deployed"
    traffic = TrafficProbe(environment.router.url)
    traffic.start()
    try:
        time.sleep(0.3)
        to_v2 = deploy(environment, release(service_dir, "v2"), "blue_green")
        time.sleep(0.3)
        assert answers(environment) == Counter({"v2": 20})
        back_to_v1 = environment.rollback(v1)
        time.sleep(0.3)
    finally:
        traffic.finish()

    assert traffic.failures == []
    assert to_v2.status == "deployed", to_v2
    assert to_v2.previous_version == "v1"
    assert back_to_v1.status == "deployed", back_to_v1
    assert back_to_v1.previous_version == "v2"
    assert any("reuse prod.v1.0" in event for event in back_to_v1.events)
    assert set(traffic.answers) == {"v1", "v2"}
    assert traffic.answers[-1] == "v1"
    assert answers(environment) == Counter({"v1": 20})
    assert environment.current_version() == "v1"
    # The old slot stays, without traffic, for the rollback window.
    assert environment.router.weights() == {"prod.v1.0": 100, "prod.v2.0": 0}
    assert_consistent(environment)


def test_a_rollback_whose_standby_slot_died_starts_a_new_one(
    environment: Environment, service_dir: Path
) -> None:
    v1 = release(service_dir, "v1")
    deploy(environment, v1, "blue_green")
    deploy(environment, release(service_dir, "v2"), "blue_green")
    environment.target.stop("prod.v1.0")  # the rollback window's slot, gone by hand

    outcome = environment.rollback(v1)

    assert outcome.status == "deployed", outcome
    assert any("starting a new slot instead" in event for event in outcome.events)
    assert environment.router.weights() == {"prod.v1.0": 100, "prod.v2.0": 0}
    assert answers(environment) == Counter({"v1": 20})
    assert_consistent(environment)


def test_blue_green_to_an_unhealthy_version_keeps_the_old_one_serving(
    environment: Environment, service_dir: Path
) -> None:
    deploy(environment, release(service_dir, "v1"), "blue_green")
    traffic = TrafficProbe(environment.router.url)
    traffic.start()
    try:
        outcome = deploy(environment, release(service_dir, "v2", "unhealthy"), "blue_green")
    finally:
        traffic.finish()

    assert outcome.status == "rolled_back", outcome
    assert "health check" in outcome.reason and "HTTP 500" in outcome.reason
    assert outcome.rollback_s is not None and outcome.events
    assert traffic.failures == []
    assert set(traffic.answers) == {"v1"}
    assert environment.current_version() == "v1"
    assert [slot.version for slot in environment.slots()] == ["v1"]
    assert_consistent(environment)


def test_blue_green_that_fails_after_the_switch_switches_back(
    environment: Environment, service_dir: Path
) -> None:
    deploy(environment, release(service_dir, "v1"), "blue_green")

    outcome = deploy(environment, release(service_dir, "v2", "broken_behind_router"), "blue_green")

    assert outcome.status == "rolled_back", outcome
    assert outcome.reason.startswith("health check through the router failed")
    assert outcome.rollback_s is not None and 0 < outcome.rollback_s < outcome.duration_s
    assert environment.router.weights() == {"prod.v1.0": 100}
    assert answers(environment) == Counter({"v1": 20})
    assert environment.current_version() == "v1"
    assert_consistent(environment)


def test_canary_with_a_bad_version_aborts_at_the_first_step(
    environment: Environment, service_dir: Path
) -> None:
    deploy(environment, release(service_dir, "v1"), "blue_green")
    # The canary gets 2 of the 20 analysis requests at 10 % (nginx's weighted round robin
    # is deterministic) and fails one of them: 95 %, below a 99 % threshold.
    outcome = deploy(
        environment,
        release(service_dir, "v2", "flaky"),
        "canary",
        analysis={"min_success_rate": 0.99},
    )

    assert outcome.status == "rolled_back", outcome
    assert "failed at 10%" in outcome.reason and "success rate 95.00%" in outcome.reason
    assert not any("canary at 50%" in event for event in outcome.events)
    assert environment.router.weights() == {"prod.v1.0": 100}
    assert answers(environment) == Counter({"v1": 20})
    assert environment.current_version() == "v1"
    assert_consistent(environment)
    # The state keeps the releases (their env too) for recreate: readable by the owner only.
    assert (environment.state_dir / "state.json").stat().st_mode & 0o777 == 0o600


def test_canary_with_a_good_version_is_promoted(
    environment: Environment, service_dir: Path
) -> None:
    deploy(environment, release(service_dir, "v1"), "blue_green")

    outcome = deploy(environment, release(service_dir, "v2"), "canary")

    assert outcome.status == "deployed", outcome
    assert [event for event in outcome.events if "canary at" in event][-1].split()[3] == "100%:"
    assert environment.router.weights() == {"prod.v2.0": 100}
    assert active_slots(environment) == {"prod.v2.0"}
    assert answers(environment) == Counter({"v2": 20})
    assert_consistent(environment)


def test_blue_green_and_canary_keep_the_replica_count_and_a_rollback_brings_all_back(
    environment: Environment, service_dir: Path
) -> None:
    v1 = release(service_dir, "v1")
    assert deploy(environment, v1, "blue_green", replicas=2).status == "deployed"
    assert environment.router.weights() == {"prod.v1.0": 100, "prod.v1.1": 100}

    v2 = release(service_dir, "v2")
    assert deploy(environment, v2, "blue_green", replicas=2).status == "deployed"
    assert environment.router.weights() == {
        "prod.v2.0": 100,
        "prod.v2.1": 100,
        "prod.v1.0": 0,
        "prod.v1.1": 0,
    }
    traffic = TrafficProbe(environment.router.url)
    traffic.start()
    try:
        back = environment.rollback(v1, replicas=2)
    finally:
        traffic.finish()
    assert back.status == "deployed", back
    # Both standby replicas come back by weights alone: no new slot, no failed request.
    assert sum("reuse prod.v1." in event for event in back.events) == 2
    assert not any(" start prod." in event for event in back.events)
    assert traffic.failures == []
    assert answers(environment) == Counter({"v1": 20})

    v3 = release(service_dir, "v3")
    outcome = deploy(environment, v3, "canary", replicas=2, steps=[50, 100])
    assert outcome.status == "deployed", outcome
    # One canary through the steps, its second replica started before taking all traffic.
    assert environment.router.weights() == {"prod.v3.0": 100, "prod.v3.1": 100}
    assert answers(environment) == Counter({"v3": 20})
    assert_consistent(environment)


def test_rolling_replaces_replicas_and_stops_at_the_first_bad_one(
    environment: Environment, service_dir: Path
) -> None:
    first = deploy(environment, release(service_dir, "v1"), "rolling", replicas=3)
    assert first.status == "deployed", first
    good = deploy(environment, release(service_dir, "v2"), "rolling", replicas=3)

    assert good.status == "deployed", good
    assert active_slots(environment) == {"prod.v2.0", "prod.v2.1", "prod.v2.2"}
    assert answers(environment, 30) == Counter({"v2": 30})
    assert_consistent(environment)

    bad = deploy(environment, release(service_dir, "v3", "unhealthy"), "rolling", replicas=3)

    assert bad.status == "rolled_back", bad
    assert bad.reason.startswith("replica 1 of 3: health check")
    assert sum("start prod.v3" in event for event in bad.events) == 1
    assert environment.router.weights() == {f"prod.v2.{n}": 100 for n in range(3)}
    assert answers(environment, 30) == Counter({"v2": 30})
    assert environment.current_version() == "v2"
    assert_consistent(environment)


def test_rolling_that_fails_midway_restores_the_old_replicas(
    environment: Environment, service_dir: Path, tmp_path: Path
) -> None:
    deploy(environment, release(service_dir, "v1"), "rolling", replicas=2)
    # v2 serves once: its second replica finds the marker and answers /healthz 500.
    marker = tmp_path / "started-once"
    command = f"if [ -e {marker} ]; then export MODE=unhealthy; fi; touch {marker}; {SERVE}"
    v2 = Release("v2", command, service_dir, release(service_dir, "v2").env)

    outcome = deploy(environment, v2, "rolling", replicas=2)

    assert outcome.status == "rolled_back", outcome
    assert outcome.reason.startswith("replica 2 of 2")
    assert environment.router.weights() == {"prod.v1.0": 100, "prod.v1.1": 100}
    assert answers(environment) == Counter({"v1": 20})
    assert_consistent(environment)


def test_recreate_replaces_and_restores_the_previous_release(
    environment: Environment, service_dir: Path
) -> None:
    assert deploy(environment, release(service_dir, "v1"), "recreate").status == "deployed"
    good = deploy(environment, release(service_dir, "v2"), "recreate")
    assert good.status == "deployed", good
    assert answers(environment) == Counter({"v2": 20})

    bad = deploy(environment, release(service_dir, "v3", "unhealthy"), "recreate")

    assert bad.status == "rolled_back", bad
    assert bad.rollback_s is not None and bad.rollback_s > 0
    assert "health check" in bad.reason
    assert answers(environment) == Counter({"v2": 20})
    assert environment.current_version() == "v2"
    assert [slot.version for slot in environment.slots()] == ["v2"]
    assert_consistent(environment)


def test_a_router_that_refuses_the_switch_fails_the_deploy_and_keeps_the_old_version(
    environment: Environment, service_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deploy(environment, release(service_dir, "v1"), "blue_green")

    def refuse(backends: object) -> None:
        raise RouterError("nginx rejected the router config: test")

    monkeypatch.setattr(environment.router, "apply", refuse)
    outcome = deploy(environment, release(service_dir, "v2"), "blue_green")

    assert outcome.status == "failed", outcome
    assert outcome.reason == "RouterError: nginx rejected the router config: test"
    assert answers(environment) == Counter({"v1": 20})
    assert environment.current_version() == "v1"
    assert_consistent(environment)


def test_a_first_deploy_that_never_gets_healthy_fails_and_starts_no_router(
    environment: Environment, service_dir: Path
) -> None:
    outcome = deploy(environment, release(service_dir, "v1", "unhealthy"), "blue_green")

    assert outcome.status == "failed", outcome
    assert outcome.previous_version is None and outcome.rollback_s is None
    assert not environment.router.running()
    assert environment.current_version() is None
    assert environment.slots() == [] and active_slots(environment) == set()


def test_two_deploys_at_once_run_one_after_the_other(
    environment: Environment, service_dir: Path
) -> None:
    deploy(environment, release(service_dir, "v1"), "blue_green")
    outcomes: dict[str, DeployOutcome] = {}

    def deploy_version(version: str) -> None:
        outcomes[version] = deploy(environment, release(service_dir, version), "blue_green")

    threads = [threading.Thread(target=deploy_version, args=(v,)) for v in ("v2", "v3")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert {outcome.status for outcome in outcomes.values()} == {"deployed"}
    # Serialised: the second deploy saw the first one's version as the current one.
    first, second = sorted(outcomes.values(), key=lambda o: o.previous_version != "v1")
    assert first.previous_version == "v1"
    assert second.previous_version == first.version
    assert environment.current_version() == second.version
    assert answers(environment) == Counter({second.version: 20})
    assert_consistent(environment)


def test_probes_ask_the_release_health_page(environment: Environment, service_dir: Path) -> None:
    # /healthz answers 500 in this mode; the release says its health page is /ready.
    ready = release(service_dir, "v1", "unhealthy", health_path="/ready")

    outcome = deploy(environment, ready, "blue_green")

    assert outcome.status == "deployed", outcome
    assert answers(environment) == Counter({"v1": 20})


SMOKE = (
    'echo "smoke of $VERSION with token $TOKEN"; '
    f'{shlex.quote(sys.executable)} -c "import os, urllib.request; '
    "urllib.request.urlopen(os.environ['URL'] + '/checkout')\"; "
    '[ "$VERSION" = v1 ] || { echo "checkout is wrong"; exit 3; }'
)


def test_a_failing_smoke_test_rolls_back_with_its_masked_output(
    make_environment: Callable[..., Environment], service_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TEST_SMOKE_TOKEN", "s3cret-token-value")
    environment = make_environment(smoke=SMOKE, smoke_timeout_s=30)
    secrets = {"TOKEN": "env:TEST_SMOKE_TOKEN"}
    assert deploy(
        environment, release(service_dir, "v1", secrets=secrets), "blue_green"
    ).status == ("deployed")
    traffic = TrafficProbe(environment.router.url)
    traffic.start()
    try:
        outcome = deploy(environment, release(service_dir, "v2", secrets=secrets), "blue_green")
    finally:
        traffic.finish()

    assert outcome.status == "rolled_back", outcome
    assert outcome.reason.startswith("smoke test of prod.v2.0 exited 3")
    assert "smoke of v2 with token ***" in outcome.reason
    assert "checkout is wrong" in outcome.reason
    assert "s3cret-token-value" not in outcome.reason
    assert traffic.failures == [] and set(traffic.answers) == {"v1"}
    assert environment.current_version() == "v1"
    assert_consistent(environment)


def test_a_secret_that_cannot_be_read_starts_nothing_and_names_its_reference(
    environment: Environment, service_dir: Path, tmp_path: Path
) -> None:
    deploy(environment, release(service_dir, "v1"), "blue_green")
    missing = tmp_path / "no-such-secret"
    v2 = release(service_dir, "v2", secrets={"DB_PASSWORD": f"file:{missing}"})

    outcome = deploy(environment, v2, "blue_green")

    assert outcome.status == "rolled_back", outcome
    assert f"secret DB_PASSWORD (file:{missing}): cannot read the file" in outcome.reason
    assert active_slots(environment) == {"prod.v1.0"}
    assert answers(environment) == Counter({"v1": 20})


def test_a_rollback_window_of_zero_stops_the_old_slot_after_the_switch(
    make_environment: Callable[..., Environment], service_dir: Path
) -> None:
    environment = make_environment(rollback_window_s=0)
    deploy(environment, release(service_dir, "v1"), "blue_green")

    outcome = deploy(environment, release(service_dir, "v2"), "blue_green")

    assert outcome.status == "deployed", outcome
    assert environment.router.weights() == {"prod.v2.0": 100}
    assert active_slots(environment) == {"prod.v2.0"}
    assert_consistent(environment)


def test_the_standby_slot_is_stopped_once_its_rollback_window_expires(
    make_environment: Callable[..., Environment], service_dir: Path
) -> None:
    environment = make_environment(rollback_window_s=600)
    v1 = release(service_dir, "v1")
    deploy(environment, v1, "blue_green")
    deploy(environment, release(service_dir, "v2"), "blue_green")
    [standby] = [slot for slot in environment.slots() if slot.weight == 0]
    assert standby.name == "prod.v1.0" and standby.standby_since is not None

    assert environment.end_expired_rollback_window(now=standby.standby_since + 599) == []
    assert environment.in_rollback_window(v1)
    assert environment.end_expired_rollback_window(now=standby.standby_since + 600) == ["prod.v1.0"]

    assert not environment.in_rollback_window(v1)
    assert environment.router.weights() == {"prod.v2.0": 100}
    assert active_slots(environment) == {"prod.v2.0"}
    assert answers(environment) == Counter({"v2": 20})
    assert_consistent(environment)
    # A rollback after the window starts a new slot of v1.
    back = environment.rollback(v1)
    assert back.status == "deployed", back
    assert not any("reuse" in event for event in back.events)
    assert answers(environment) == Counter({"v1": 20})


def test_a_router_port_taken_by_another_process_fails_the_first_deploy_cleanly(
    make_environment: Callable[..., Environment], service_dir: Path
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        environment = make_environment(port=squatter.getsockname()[1])

        outcome = deploy(environment, release(service_dir, "v1"), "blue_green")

    assert outcome.status == "failed", outcome
    assert outcome.reason.startswith("RouterError")
    assert environment.current_version() is None
    assert environment.slots() == [] and active_slots(environment) == set()
