"""Monitoring and `cicd infra` of an environment on the docker target, against the real
engine and nginx: tracebacks read from the container's output, a container changed or
replaced by hand, and an environment removed from cicd.yaml while its containers run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import docker
import pandas as pd
import pytest

from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.deploy import infra
from cicd_dagster.deploy.docker import DockerTarget, container_name
from cicd_dagster.deploy.health import probe
from cicd_dagster.deploy.layout import docker_scope
from cicd_dagster.stages.deploy import environment_for
from cicd_dagster.store import HistoryStore
from jobs.inprocess import deploy_commit_in_process, run_commit
from tests.integration.test_monitoring import SERVICE, Daemon, cicd
from tests.support import commit, control_config, eventually, git, http_get, junit_xml
from tests.support import pipeline_writing_reports as pipeline

pytestmark = [pytest.mark.docker, pytest.mark.slow]

DEV = (
    "environments:\n"
    "  - name: dev\n"
    "    health_interval_s: 5\n"
    "    target: {type: docker, memory_mb: 128, max_open_files: 512}\n"
    "    strategy: {type: recreate}\n"
    "    verify: {interval_s: 0.1}\n"
)
MIB = 1024 * 1024


def containers(client: docker.DockerClient, config: ControlConfig) -> list[str]:
    """The names of the containers of the repository's docker scope, running or not."""
    scope = docker_scope(config.home, "app")
    return sorted(
        c.name for c in client.containers.list(all=True, filters={"label": f"cicd.scope={scope}"})
    )


@pytest.fixture
def control(
    tmp_path: Path, nginx: str, base_image: str, docker_client: docker.DockerClient
) -> Iterator[ControlConfig]:
    """app's dev on docker; its containers, routers and release images are removed after."""
    config = load_control_config(control_config(tmp_path, {"app": tmp_path / "app"}, DEV))
    yield config
    infra.down(load_control_config(config.config_path))
    scope = f"cicd.scope={docker_scope(config.home, 'app')}"
    for container in docker_client.containers.list(all=True, filters={"label": scope}):
        container.remove(force=True)
    # Release images are tagged cicd/app:<commit[:12]>-<settings>: those of this repo's commits.
    repo = tmp_path / "app"
    history = git(repo, "rev-list", "--all") if (repo / ".git").is_dir() else ""
    commits = {sha[:12] for sha in history.split()}
    for image in docker_client.images.list(name="cicd/app"):
        for tag in image.tags:
            if tag.split(":")[1].split("-")[0] in commits:
                with suppress(docker.errors.ImageNotFound):
                    docker_client.images.remove(tag, force=True)


def deploy_dev(tmp_path: Path, config: ControlConfig) -> str:
    service = "service: {run: 'exec python3 service.py', health: /healthz}\n"
    sha = commit(
        tmp_path / "app",
        {"service.py": SERVICE, ".cicd.yml": pipeline(junit_xml(2), extra=service)},
    )
    report = run_commit(config, "app", sha, ref="main", branch="main", stream_logs=False)
    assert report["status"] == "success", report
    deployed = deploy_commit_in_process(config, "app", "dev", sha)
    assert deployed["status"] == "deployed", deployed
    return sha


def boom(url: str) -> None:
    """A request that makes the service log a traceback."""
    with pytest.raises(Exception, match="500"):
        http_get(url + "/boom")


def service_errors_once(daemon: Daemon, history: HistoryStore, count: int) -> pd.DataFrame:
    """The service_error events once health ticks have recorded `count` of them (the
    engine stores output a moment after it is written), checked by one more tick."""

    def recorded() -> bool:
        daemon.tick("deployment_health")
        return len(history.events("app", kind="service_error")) >= count

    eventually(recorded)
    daemon.tick("deployment_health")
    errors = history.events("app", kind="service_error")
    assert len(errors) == count
    return errors


def test_tracebacks_in_a_containers_output_are_reported_once_across_ticks(
    tmp_path: Path, control: ControlConfig
) -> None:
    sha = deploy_dev(tmp_path, control)
    env = environment_for(control, "app", control.environment("dev"))
    assert isinstance(env.target, DockerTarget)
    [slot] = env.slots()
    history = HistoryStore(control.history_db_url)
    daemon = Daemon(control)

    boom(env.router.url)
    errors = service_errors_once(daemon, history, 1)
    message = errors.iloc[0]["message"]
    assert message.startswith(f"{slot.name}: ValueError: negative price for order-7\n")
    assert "Traceback (most recent call last):" in message
    assert errors.iloc[0]["commit"] == sha
    # The cursor is the engine's timestamp of the last line read, kept with the state.
    cursors = json.loads((env.state_dir / "monitor.json").read_text())["log_cursors"]
    assert list(cursors) == [slot.name]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", cursors[slot.name])

    # The container restarts (its log goes on): old lines are not reported again.
    state = env.target.status(slot.name)
    assert state is not None and state.pid is not None
    os.kill(state.pid, signal.SIGKILL)
    eventually(lambda: (s := env.target.status(slot.name)) and s.restarts == 1 and s)
    eventually(lambda: probe(env.router.url + "/healthz", timeout_s=1.0).ok)
    boom(env.router.url)
    boom(env.router.url)
    service_errors_once(daemon, history, 3)


def test_a_container_changed_or_replaced_by_hand_drifts_and_apply_repairs_it(
    tmp_path: Path, control: ControlConfig, docker_client: docker.DockerClient, base_image: str
) -> None:
    sha = deploy_dev(tmp_path, control)
    env = environment_for(control, "app", control.environment("dev"))
    [slot] = env.slots()
    name = container_name(docker_scope(control.home, "app"), slot.name)
    release = env.current_release()
    assert release is not None and release.image is not None
    daemon = Daemon(control)
    assert infra.plan(control) == []

    # `docker update` of its memory: the limits drift, the no_drift check fails.
    done = subprocess.run(
        ["docker", "update", "--memory", "96m", "--memory-swap", "96m", name],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    [change] = infra.plan(control)
    assert (change.action, change.resource, change.name) == ("update", "limits", slot.name)
    assert "memory_mb=96" in change.reason and "memory_mb=128" in change.reason
    [evaluation] = daemon.tick("infrastructure_drift").asset_events
    assert not evaluation.passed

    done = cicd(control, "infra", "apply", "--json")
    assert done.returncode == 0, done.stderr
    assert [c["resource"] for c in json.loads(done.stdout)] == ["limits"]
    host = docker_client.containers.get(name).attrs["HostConfig"]
    assert (host["Memory"], host["Ulimits"]) == (
        128 * MIB,
        [{"Name": "nofile", "Soft": 512, "Hard": 512}],
    )
    assert infra.plan(control) == []
    [evaluation] = daemon.tick("infrastructure_drift").asset_events
    assert evaluation.passed

    # Replaced by hand with another image (the labels copied): the image drifts.
    original = docker_client.containers.get(name)
    labels, port = original.labels, int(original.labels["cicd.port"])
    original.remove(force=True)
    docker_client.containers.run(
        base_image,
        ["python3", "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        name=name,
        labels=labels,
        network_mode="host",
        detach=True,
    )
    [change] = infra.plan(control)
    assert (change.action, change.resource, change.name) == ("update", "image", slot.name)
    assert change.reason == f"runs image {base_image}, the release's is {release.image}"
    infra.apply(control)
    assert docker_client.containers.get(name).attrs["Config"]["Image"] == release.image
    assert http_get(env.router.url + "/healthz") == sha
    assert infra.plan(control) == []

    # A container of someone else's under the slot's name: drift, which apply refuses to
    # touch, saying why; once it is gone, apply brings the slot back.
    docker_client.containers.get(name).remove(force=True)
    foreign = docker_client.containers.create(base_image, ["true"], name=name)
    try:
        [change] = infra.plan(control)
        assert (change.action, change.resource) == ("restart", "slot")
        assert "is taken by a container that is not this slot's" in change.reason
        done = cicd(control, "infra", "apply")
        assert done.returncode == 1
        assert f"apply stopped: slot {slot.name}: the container name {name}" in done.stderr
    finally:
        foreign.remove(force=True)
    assert [(c.action, c.resource) for c in infra.plan(control)] == [("create", "slot")]
    infra.apply(control)
    assert infra.plan(control) == []
    assert http_get(env.router.url + "/healthz") == sha


@pytest.mark.parametrize("stop_with", ["apply", "down"])
def test_an_environment_removed_from_cicd_yaml_stops_its_containers(
    tmp_path: Path, control: ControlConfig, docker_client: docker.DockerClient, stop_with: str
) -> None:
    deploy_dev(tmp_path, control)
    [slot] = environment_for(control, "app", control.environment("dev")).slots()
    name = container_name(docker_scope(control.home, "app"), slot.name)
    assert containers(docker_client, control) == [name]

    # dev leaves cicd.yaml; what remains runs locally: docker is found from dev's release.
    control.config_path.write_text(
        control.config_path.read_text().split("environments:")[0] + "environments:\n  - name: qa\n"
    )
    renamed = load_control_config(control.config_path)
    changes = infra.plan(renamed)
    assert [(c.action, c.resource, c.environment) for c in changes if c.is_drift] == [
        ("delete", "environment", "dev")
    ]
    assert slot.name in changes[-1].reason and "router" in changes[-1].reason

    done = cicd(renamed, *(["infra", "apply"] if stop_with == "apply" else ["down"]))
    assert done.returncode == 0, done.stderr
    assert containers(docker_client, control) == []
    assert [c for c in infra.plan(renamed) if c.is_drift] == []
