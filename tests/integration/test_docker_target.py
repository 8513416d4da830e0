"""The docker deploy target with a real Docker engine: DockerTarget's containers, release
images built by build_release_image, and the deploy strategies on containers behind the
real nginx router.

Without a reachable engine (or the base image) these tests skip, except under
CICD_REQUIRE_DOCKER=1 (CI), where .ci/start-docker.sh must have provided both.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path

import docker
import pytest

from cicd_dagster.deploy.docker import (
    APP_DIR,
    DockerTarget,
    ImageBuildError,
    build_release_image,
    container_name,
    release_image_tag,
)
from cicd_dagster.deploy.health import ProbeConfig, wait_healthy
from cicd_dagster.deploy.local import free_port
from cicd_dagster.deploy.router import NginxRouter
from cicd_dagster.deploy.strategies import Environment, Release
from cicd_dagster.deploy.target import Limits, ServiceSpec, ServiceState, SupervisorError
from tests.integration.test_strategies import SERVICE, answers, assert_consistent, deploy
from tests.support import TrafficProbe, commit, eventually

pytestmark = [pytest.mark.docker, pytest.mark.slow]


SERVE = "exec python3 service.py"
PROBES = ProbeConfig(timeout_s=1.0, interval_s=0.05, max_attempts=60, success_threshold=2)
LABELS = {"cicd.repository": "shop-api", "cicd.environment": "prod", "cicd.commit": "c0ffee"}


def healthy(state: ServiceState) -> bool:
    return wait_healthy(f"http://127.0.0.1:{state.port}", PROBES).healthy


def remove_scope(client: docker.DockerClient, scope: str) -> None:
    for container in client.containers.list(all=True, filters={"label": f"cicd.scope={scope}"}):
        container.remove(force=True)


def remove_image(client: docker.DockerClient, tag: str) -> None:
    with suppress(docker.errors.ImageNotFound):
        client.images.remove(tag, force=True)


def output_of(client: docker.DockerClient, image: str, command: str) -> str:
    """What `bash -c command` prints in a throwaway container of `image`."""
    output: bytes = client.containers.run(
        image, ["bash", "-c", command], network_mode="none", remove=True
    )
    return output.decode()


@pytest.fixture(scope="module")
def service_image(
    docker_client: docker.DockerClient, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The image of the test service (tests.integration.test_strategies.SERVICE), built
    with a generated Dockerfile on the base image."""
    folder = tmp_path_factory.mktemp("service")
    (folder / "service.py").write_text(SERVICE)
    tag = f"cicd-test/service:{uuid.uuid4().hex[:12]}"
    yield build_release_image(folder, tag=tag, base_image=base_image, labels=LABELS)
    remove_image(docker_client, tag)


@pytest.fixture
def target(docker_client: docker.DockerClient) -> Iterator[DockerTarget]:
    """A DockerTarget of a scope of its own, whose containers are all removed after."""
    scope = f"test-{uuid.uuid4().hex[:8]}"
    target = DockerTarget(scope)
    yield target
    target.close()
    remove_scope(docker_client, scope)


def spec(image: str, name: str = "prod.v1.0", **overrides: object) -> ServiceSpec:
    settings: dict[str, object] = {
        "name": name,
        "command": SERVE,
        "cwd": Path(APP_DIR),
        "env": {"VERSION": "v1", "MODE": "good"},
        "port": free_port(),
        "max_restarts": 3,
        "image": image,
        "labels": LABELS,
        **overrides,
    }
    return ServiceSpec(**settings)  # type: ignore[arg-type]


# --- DockerTarget --------------------------------------------------------------------------


def test_container_serves_the_slot_with_its_labels_and_logs(
    target: DockerTarget, service_image: str, docker_client: docker.DockerClient
) -> None:
    command = f'echo "in $(pwd) on port $PORT"; {SERVE}'
    state = target.start(spec(service_image, command=command))

    assert state.name == "prod.v1.0" and state.status in ("starting", "running")
    assert healthy(state)
    running = target.status(state.name)
    assert running is not None
    assert (running.status, running.restarts, running.exit_code) == ("running", 0, None)
    assert running.pid is not None and running.log_path.is_file()
    assert running.started_at == state.started_at
    assert (running.image, running.limits) == (service_image, Limits())
    assert target.all() == [running]
    assert f"in /app on port {state.port}" in target.log_tail(state.name)

    container = docker_client.containers.get(container_name(target.scope, state.name))
    assert container.labels == {
        **LABELS,
        "cicd.scope": target.scope,
        "cicd.slot": "prod.v1.0",
        "cicd.port": str(state.port),
    }
    assert container.attrs["Config"]["Cmd"] == ["bash", "-c", command]
    host = container.attrs["HostConfig"]
    assert host["NetworkMode"] == "host"
    assert host["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 3}

    target.stop(state.name, timeout_s=5)
    assert target.status(state.name) is None
    assert target.all() == []
    assert target.log_tail(state.name) == ""
    target.stop(state.name)  # stopping an unknown slot is a no-op
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(container.id)


def test_output_is_read_from_a_cursor_on_across_long_lines_and_both_streams(
    target: DockerTarget, service_image: str, docker_client: docker.DockerClient
) -> None:
    # A 20000-character line: the engine keeps it as parts of one timestamp. (The order
    # of lines written to stdout and stderr at once is the engine's: one stream at a time.)
    command = (
        "echo one; echo two; python3 -c 'print(\"x\" * 20000)'; echo three; "
        "until [ -e /tmp/go ]; do sleep 0.05; done; echo four >&2; exec sleep 600"
    )
    state = target.start(spec(service_image, command=command))
    everything = b"one\ntwo\n" + b"x" * 20000 + b"\nthree\n"
    chunk = eventually(
        lambda: (c := target.log_since(state.name, None, 2**20)).data == everything and c
    )
    assert chunk.start is None
    ends = [end for end, _ in chunk.marks]
    assert {4, 8, 20009, len(everything)} <= set(ends) and ends == sorted(ends)

    after_two = chunk.cursor_after(8)
    assert target.log_since(state.name, after_two, 2**20).data == everything[8:]
    assert target.log_since(state.name, chunk.cursor_after(9), 2**20).data == everything[8:]
    the_end = chunk.cursor_after(len(everything))
    assert target.log_since(state.name, the_end, 2**20).data == b""
    # Bounded: it stops at the line that reaches max_bytes.
    assert target.log_since(state.name, None, 5).data == b"one\ntwo\n"

    container = docker_client.containers.get(container_name(target.scope, state.name))
    container.exec_run(["touch", "/tmp/go"])
    later = eventually(lambda: (c := target.log_since(state.name, the_end, 2**20)).data and c)
    assert later.data == b"four\n" and later.cursor_after(5) > the_end
    # A cursor that is no timestamp of this engine (a local offset) reads from the start;
    # a slot the target does not have has no output.
    assert target.log_since(state.name, "8", 2**20).data == everything + b"four\n"
    unknown = target.log_since("prod.gone.0", the_end, 2**20)
    assert (unknown.data, unknown.cursor_after(0)) == (b"", the_end)


def test_environment_values_never_reach_a_shell(target: DockerTarget, service_image: str) -> None:
    hostile = "$(touch /tmp/pwned); `echo spliced`; '\" && exit 9"
    command = 'printf "%s\\n" "$GREETING"; test ! -e /tmp/pwned && echo clean'
    state = target.start(spec(service_image, command=command, env={"GREETING": hostile}))

    final = eventually(lambda: (s := target.status(state.name)) and s.status == "stopped" and s)
    assert final.exit_code == 0
    assert target.log_tail(state.name).splitlines() == [hostile, "clean"]


def test_killed_container_is_restarted_and_healthy_again(
    target: DockerTarget, service_image: str
) -> None:
    state = target.start(spec(service_image))
    assert healthy(state) and state.pid is not None
    os.kill(state.pid, signal.SIGKILL)

    def restarted() -> ServiceState | None:
        now = target.status(state.name)
        return now if now and now.restarts == 1 and now.status == "running" else None

    again = eventually(restarted)
    assert again.pid not in (None, state.pid)
    assert again.started_at == state.started_at
    assert healthy(again)


def test_container_that_keeps_exiting_ends_crashed_with_its_log(
    target: DockerTarget, service_image: str
) -> None:
    command = "echo booting; echo 'fatal: no config' >&2; exit 3"
    state = target.start(spec(service_image, command=command, max_restarts=2))

    final = eventually(lambda: (s := target.status(state.name)) and s.status == "crashed" and s)
    assert (final.restarts, final.exit_code, final.pid) == (2, 3, None)
    assert target.log_tail(state.name).count("fatal: no config") == 3  # first run, 2 restarts
    # An ended slot can be started again under the same name.
    again = target.start(spec(service_image))
    assert healthy(again)


def test_limits_are_set_on_the_container_and_enforced(
    target: DockerTarget, service_image: str, docker_client: docker.DockerClient
) -> None:
    limits = Limits(memory_mb=64, cpus=0.5, max_open_files=256)
    state = target.start(spec(service_image, command=f"ulimit -n; {SERVE}", limits=limits))
    assert healthy(state)
    host = docker_client.containers.get(container_name(target.scope, state.name)).attrs[
        "HostConfig"
    ]
    assert (host["Memory"], host["MemorySwap"]) == (64 * 2**20, 64 * 2**20)
    assert host["NanoCpus"] == 500_000_000
    assert host["Ulimits"] == [{"Name": "nofile", "Soft": 256, "Hard": 256}]
    assert target.log_tail(state.name).splitlines()[0] == "256"
    running = target.status(state.name)
    assert running is not None and running.limits == limits

    hog = "python3 -c 'block = bytearray(256 * 2**20); print(len(block))'"
    greedy = target.start(
        spec(service_image, "prod.hog.0", command=hog, max_restarts=0, limits=limits)
    )
    final = eventually(lambda: (s := target.status(greedy.name)) and s.status == "crashed" and s)
    assert final.exit_code == 137  # killed by the kernel's OOM killer at 64 MiB
    container = docker_client.containers.get(container_name(target.scope, greedy.name))
    assert container.attrs["State"]["OOMKilled"] is True


def test_missing_image_is_a_clear_error_and_nothing_runs(target: DockerTarget) -> None:
    with pytest.raises(
        SupervisorError, match=r"slot prod.v1.0: image cicd-test/absent:nope is missing"
    ):
        target.start(spec("cicd-test/absent:nope"))
    assert target.all() == []


def test_image_without_bash_ends_crashed_with_the_reason_in_its_log(
    target: DockerTarget, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    (empty / "etc").mkdir(parents=True)
    tag = f"cicd-test/empty:{uuid.uuid4().hex[:8]}"
    with tarfile.open(tmp_path / "empty.tar", "w") as archive:
        archive.add(empty, arcname=".")
    docker_client.api.import_image_from_data((tmp_path / "empty.tar").read_bytes(), repository=tag)
    try:
        state = target.start(spec(tag, max_restarts=0))
        final = eventually(lambda: (s := target.status(state.name)) and s.status == "crashed" and s)
        assert final.exit_code == 127
        assert "exec bash failed: No such file or directory" in target.log_tail(state.name)
    finally:
        target.stop("prod.v1.0")
        remove_image(docker_client, tag)


def test_port_already_taken_or_allocated_is_refused(
    target: DockerTarget, service_image: str
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(SupervisorError, match=f"port {port} on 127.0.0.1 is already in use"):
            target.start(spec(service_image, port=port))
    assert target.all() == []

    blue = target.start(spec(service_image, "prod.blue"))
    with pytest.raises(SupervisorError, match=f"port {blue.port} is already allocated to slot"):
        target.start(spec(service_image, "prod.green", port=blue.port))
    with pytest.raises(SupervisorError, match=r"slot prod.blue is already (starting|running)"):
        target.start(spec(service_image, "prod.blue"))
    assert [state.name for state in target.all()] == ["prod.blue"]


def test_a_container_not_started_by_the_target_is_never_touched(
    target: DockerTarget, service_image: str, docker_client: docker.DockerClient
) -> None:
    name = container_name(target.scope, "prod.v1.0")
    foreign = docker_client.containers.create(service_image, ["true"], name=name)
    try:
        taken = f"the container name {name} is taken by a container that is not this slot's"
        with pytest.raises(SupervisorError, match=taken):
            target.start(spec(service_image))
        with pytest.raises(SupervisorError, match=taken):
            target.stop("prod.v1.0")
        foreign.reload()  # still there
    finally:
        foreign.remove(force=True)


def test_unreachable_engine_is_a_clear_error(tmp_path: Path, service_image: str) -> None:
    def absent_engine() -> docker.DockerClient:
        return docker.DockerClient(base_url=f"unix://{tmp_path}/absent.sock")

    target = DockerTarget("nowhere", client_factory=absent_engine)
    unreachable = r"the Docker engine is unreachable \(\[Errno 2\] No such file or directory\)"
    with pytest.raises(SupervisorError, match=f"cannot start slot prod.v1.0: {unreachable}"):
        target.start(spec(service_image))
    with pytest.raises(SupervisorError, match=f"cannot inspect slot prod.v1.0: {unreachable}"):
        target.status("prod.v1.0")
    with pytest.raises(SupervisorError, match=unreachable):
        target.all()
    folder = tmp_path / "app"
    folder.mkdir()
    with pytest.raises(ImageBuildError, match=f"image cicd-test/x:1: {unreachable}"):
        build_release_image(
            folder, tag="cicd-test/x:1", base_image="cicd-python:3.11", client_factory=absent_engine
        )


# --- release images ------------------------------------------------------------------------


def write_wheel(folder: Path, module: str, text: str) -> Path:
    """A minimal pure-Python wheel of one module, as a build step would leave it."""
    dist_info = f"{module}-1.0.dist-info"
    files = {
        f"{module}.py": text,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    records = []
    for name, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content.encode()).digest()).rstrip(b"=")
        records.append(f"{name},sha256={digest.decode()},{len(content.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*records, f"{dist_info}/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{module}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return wheel


@pytest.fixture
def built_tags(docker_client: docker.DockerClient) -> Iterator[list[str]]:
    """Tags a test builds; removed after it."""
    tags: list[str] = []
    yield tags
    for tag in tags:
        remove_image(docker_client, tag)


def new_tag(built_tags: list[str]) -> str:
    tag = f"cicd-test/release:{uuid.uuid4().hex[:12]}"
    built_tags.append(tag)
    return tag


def test_generated_image_runs_the_checkout_with_its_wheels_and_without_git(
    tmp_path: Path, base_image: str, docker_client: docker.DockerClient, built_tags: list[str]
) -> None:
    checkout = tmp_path / "checkout"
    commit(checkout, {"app.py": "print('app')\n"})
    write_wheel(checkout / "dist", "greeting", "TEXT = 'hello from a wheel'\n")
    tag = new_tag(built_tags)
    lines: list[str] = []

    built = build_release_image(
        checkout,
        tag=tag,
        base_image=base_image,
        wheels=["dist/greeting-1.0-py3-none-any.whl"],
        labels=LABELS,
        log=lines.append,
    )

    assert built == tag
    assert any(line.startswith("Step 1/") and base_image in line for line in lines)
    listing = output_of(
        docker_client, tag, "pwd; ls -A; python -c 'import greeting as g; print(g.TEXT)'"
    )
    assert listing.split() == ["/app", "app.py", "dist", "hello", "from", "a", "wheel"]
    assert docker_client.images.get(tag).labels == LABELS
    assert not list(checkout.glob("*Dockerfile*"))  # nothing was written into the release
    # The same tag again: reused, not rebuilt.
    rebuilt: list[str] = []
    assert build_release_image(checkout, tag=tag, base_image=base_image, log=rebuilt.append) == tag
    assert rebuilt == []


def test_the_repository_dockerfile_is_used(
    tmp_path: Path, base_image: str, docker_client: docker.DockerClient, built_tags: list[str]
) -> None:
    checkout = tmp_path / "checkout"
    commit(
        checkout,
        {
            "Dockerfile": f"FROM {base_image}\nCOPY . /srv\nRUN echo own > /built-by\n",
            "ops/alt.Dockerfile": f"FROM {base_image}\nRUN echo alt > /built-by\n",
            ".dockerignore": "secret.txt\n",
            "secret.txt": "not for images\n",
        },
    )
    own, alternative = new_tag(built_tags), new_tag(built_tags)

    build_release_image(checkout, tag=own, base_image="unused:base")
    build_release_image(
        checkout, tag=alternative, base_image="unused:base", dockerfile="ops/alt.Dockerfile"
    )

    assert output_of(docker_client, own, "cat /built-by; ls -A /srv").split() == [
        "own",
        ".dockerignore",
        "Dockerfile",
        "ops",
    ]
    assert output_of(docker_client, alternative, "cat /built-by") == "alt\n"


@pytest.mark.parametrize(
    ("dockerfile", "error"),
    [
        ("../../etc/passwd", "must be a relative path inside the repository"),
        ("/etc/passwd", "must be a relative path inside the repository"),
        ("ops/../../Dockerfile", "must be a relative path inside the repository"),
        ("escape.Dockerfile", "leads outside the repository"),
        ("missing.Dockerfile", "is not a file of the repository"),
        ("ops", "is not a file of the repository"),
    ],
)
def test_a_dockerfile_outside_the_repository_is_refused(
    tmp_path: Path, dockerfile: str, error: str, built_tags: list[str]
) -> None:
    checkout = tmp_path / "checkout"
    (checkout / "ops").mkdir(parents=True)
    (tmp_path / "outside.Dockerfile").write_text("FROM scratch\n")
    (checkout / "escape.Dockerfile").symlink_to(tmp_path / "outside.Dockerfile")
    tag = new_tag(built_tags)
    with pytest.raises(ImageBuildError, match=rf"image {tag}: dockerfile '.*' {error}"):
        build_release_image(checkout, tag=tag, base_image="unused:base", dockerfile=dockerfile)


def test_a_wheel_outside_the_release_is_refused(tmp_path: Path, built_tags: list[str]) -> None:
    tag = new_tag(built_tags)
    with pytest.raises(
        ImageBuildError, match=r"wheel '\.\./x\.whl' must be a relative path inside"
    ):
        build_release_image(tmp_path, tag=tag, base_image="unused:base", wheels=["../x.whl"])


def test_a_failing_build_names_the_tag_and_the_step(
    tmp_path: Path, base_image: str, built_tags: list[str]
) -> None:
    (tmp_path / "Dockerfile").write_text(f"FROM {base_image}\nRUN echo compiling; exit 7\n")
    tag = new_tag(built_tags)
    lines: list[str] = []
    with pytest.raises(ImageBuildError, match=rf"image {tag}: the build failed at Step 2/2 : RUN"):
        build_release_image(tmp_path, tag=tag, base_image=base_image, log=lines.append)
    assert "compiling" in lines


def test_a_missing_base_image_or_bad_tag_is_a_clear_error(
    tmp_path: Path, docker_client: docker.DockerClient, built_tags: list[str]
) -> None:
    tag = new_tag(built_tags)
    with pytest.raises(ImageBuildError, match="the base image cicd-test/no-base:1 is missing"):
        build_release_image(tmp_path, tag=tag, base_image="cicd-test/no-base:1")
    with pytest.raises(ImageBuildError, match="'Shop API:1' is not a valid image tag"):
        build_release_image(tmp_path, tag="Shop API:1", base_image="cicd-test/no-base:1")


def test_release_image_tags_follow_the_commit_and_the_build_settings() -> None:
    sha = "0123456789abcdef" * 2 + "01234567"
    tag = release_image_tag("Shop_API", sha, base_image="cicd-python:3.11", dockerfile=None)
    assert tag.startswith("cicd/shop-api:0123456789ab-")
    assert tag == release_image_tag("Shop_API", sha, base_image="cicd-python:3.11", dockerfile=None)
    assert tag != release_image_tag("Shop_API", sha, base_image="other:1", dockerfile=None)


# --- strategies on docker, behind the real nginx router ---------------------------------------


def docker_release(image: str, version: str, mode: str = "good") -> Release:
    labels = {**LABELS, "cicd.commit": version}
    env = {"VERSION": version, "MODE": mode}
    return Release(version, SERVE, Path(APP_DIR), env, image=image, labels=labels)


@pytest.fixture
def environment(tmp_path: Path, nginx: str, target: DockerTarget) -> Iterator[Environment]:
    """An environment "prod" on the Docker target; its router is stopped after the test."""
    router = NginxRouter(tmp_path / "router", free_port(), nginx=nginx)
    yield Environment("prod", tmp_path / "env", router, target, PROBES)
    router.stop()


def test_blue_green_on_docker_rolls_back_broken_versions_without_a_failed_request(
    environment: Environment, service_image: str
) -> None:
    assert deploy(environment, docker_release(service_image, "v1"), "blue_green").status == (
        "deployed"
    )
    traffic = TrafficProbe(environment.router.url, max_requests=100_000, max_seconds=60)
    traffic.start()
    try:
        unhealthy = deploy(
            environment, docker_release(service_image, "v2", "unhealthy"), "blue_green"
        )
        good = deploy(environment, docker_release(service_image, "v3"), "blue_green")
        time.sleep(0.3)
    finally:
        traffic.finish()
    # One that falls over right after the switch (its users see errors until then).
    falls_over = deploy(
        environment, docker_release(service_image, "v4", "broken_behind_router"), "blue_green"
    )

    assert unhealthy.status == "rolled_back" and "HTTP 500" in unhealthy.reason, unhealthy
    assert good.status == "deployed" and good.previous_version == "v1", good
    assert traffic.failures == []
    assert set(traffic.answers) == {"v1", "v3"}
    assert falls_over.status == "rolled_back", falls_over
    assert falls_over.reason.startswith("health check through the router failed")
    assert answers(environment) == Counter({"v3": 20})
    assert environment.router.weights() == {"prod.v3.0": 100}
    assert_consistent(environment)
    states = {state.name: state for state in environment.target.all()}
    assert states.keys() == {"prod.v3.0"}


def test_canary_on_docker_aborts_a_flaky_version_with_weight_zero(
    environment: Environment, service_image: str
) -> None:
    deploy(environment, docker_release(service_image, "v1"), "blue_green")

    outcome = deploy(
        environment,
        docker_release(service_image, "v2", "flaky"),
        "canary",
        steps=[10, 50, 100],
        analysis={"min_success_rate": 0.95, "probes_per_step": 20},
    )

    assert outcome.status == "rolled_back", outcome
    assert outcome.reason.startswith("canary analysis failed at")
    assert environment.router.weights() == {"prod.v1.0": 100}
    assert answers(environment) == Counter({"v1": 20})
    assert environment.current_version() == "v1"
    assert_consistent(environment)


# --- the engine stopped mid-deploy ---------------------------------------------------------------


class PrivateEngine:
    """A Docker engine of the test's own, with --live-restore: its images and containers
    under `data_root`, its sockets under `run_root` (short: unix socket paths are)."""

    def __init__(self, data_root: Path, run_root: Path) -> None:
        self.data_root = data_root
        self.run_root = run_root
        self.socket = run_root / "docker.sock"
        self.log = data_root / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started = False  # answered at least once

    def client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=f"unix://{self.socket}")

    def start(self) -> None:
        self._forget_dead_containerd()
        command = [
            shutil.which("dockerd") or "dockerd",
            *("-H", f"unix://{self.socket}", "--pidfile", str(self.run_root / "docker.pid")),
            *("--data-root", str(self.data_root), "--exec-root", str(self.run_root / "exec")),
            "--live-restore",
            *("--bridge=none", "--iptables=false", "--ip-masq=false"),
        ]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            eventually(self._answers, within_s=60)
            self.started = True
        except AssertionError:
            self.kill()
            raise AssertionError(
                f"dockerd did not answer; {self.log}:\n{self.log_tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the engine (its containerd dies with it; the containers do not)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()
        self.process = None

    def shutdown(self) -> None:
        """Remove every container, stop the engine, unmount what it left mounted and
        remove the run folder."""
        try:
            if self.process is None and self.started:
                self.start()  # the one way to end the containers it left running
            if self.process is None:
                return
            with closing(self.client()) as client:
                for container in client.containers.list(all=True):
                    container.remove(force=True)
        finally:
            if self.process is not None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.kill()
            mounts = [
                line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
            ]
            roots = (self.data_root, self.run_root)
            ours = [m for m in mounts if any(Path(m).is_relative_to(root) for root in roots)]
            for mount in sorted(ours, reverse=True):
                subprocess.run(["umount", "-l", mount], check=False)
            shutil.rmtree(self.run_root, ignore_errors=True)

    def import_tiny_image(self, tag: str, busybox: Path, folder: Path) -> None:
        """busybox, with `bash -c` handed to its sh (the target runs `bash -c`)."""
        bin_dir = folder / "bin"
        bin_dir.mkdir(parents=True)
        shutil.copy(busybox, bin_dir / "busybox")
        for applet in ("sh", "httpd", "mkdir", "sleep"):
            (bin_dir / applet).symlink_to("busybox")
        (bin_dir / "bash").write_text('#!/bin/sh\nexec /bin/sh "$@"\n')
        (bin_dir / "bash").chmod(0o755)
        archive = folder.parent / "tiny.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(folder, arcname=".")
        with closing(self.client()) as client:
            client.api.import_image_from_data(archive.read_bytes(), repository=tag)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def _forget_dead_containerd(self) -> None:
        """dockerd takes the containerd of its pid file for running while that pid exists,
        even as a zombie (this machine's init reaps orphans slowly): forget a dead one."""
        pidfile = self.run_root / "exec" / "containerd" / "containerd.pid"
        try:
            stat = Path(f"/proc/{int(pidfile.read_text())}/stat").read_text()
        except (FileNotFoundError, ValueError):
            stat = ""
        if pidfile.exists() and stat.rsplit(")", 1)[-1].split()[:1] in ([], ["Z"]):
            pidfile.unlink()

    def _answers(self) -> bool:
        try:
            with closing(self.client()) as client:
                return bool(client.ping())
        except docker.errors.DockerException:
            return False


@pytest.fixture
def private_engine(
    tmp_path: Path, docker_client: docker.DockerClient, busybox: Path
) -> Iterator[PrivateEngine]:
    data_root = tmp_path / "engine"
    data_root.mkdir()
    engine = PrivateEngine(data_root, Path(tempfile.mkdtemp(prefix="cicd-engine-")))
    try:
        engine.start()
        yield engine
    finally:
        engine.shutdown()


# busybox httpd serves the version at / and an ok at /healthz.
TINY_SERVE = (
    'mkdir -p /tmp/www && echo "$VERSION" > /tmp/www/index.html && echo ok > /tmp/www/healthz '
    '&& exec httpd -f -p "127.0.0.1:$PORT" -h /tmp/www'
)


def test_engine_stopped_mid_deploy_leaves_the_previous_version_serving(
    private_engine: PrivateEngine, busybox: Path, tmp_path: Path, nginx: str
) -> None:
    private_engine.import_tiny_image("tiny:1", busybox, tmp_path / "tiny")
    target = DockerTarget("mid-deploy", client_factory=private_engine.client)
    router = NginxRouter(tmp_path / "router", free_port(), nginx=nginx)
    environment = Environment("prod", tmp_path / "env", router, target, PROBES)

    def release(version: str, command: str) -> Release:
        return Release(version, command, Path("/"), {"VERSION": version}, image="tiny:1")

    try:
        assert deploy(environment, release("v1", TINY_SERVE), "blue_green").status == "deployed"
        assert answers(environment) == Counter({"v1\n": 20})

        def kill_engine_once_v2_runs() -> None:
            with closing(private_engine.client()) as client:
                eventually(
                    lambda: any(
                        container.labels["cicd.slot"].startswith("prod.v2")
                        for container in client.containers.list()
                    )
                )
            private_engine.kill()

        killer = threading.Thread(target=kill_engine_once_v2_runs, daemon=True)
        traffic = TrafficProbe(router.url, max_requests=100_000, max_seconds=60)
        traffic.start()
        killer.start()
        try:
            # v2 takes its time to come up: the engine dies while it is being verified.
            outcome = deploy(environment, release("v2", f"sleep 5; {TINY_SERVE}"), "blue_green")
            killer.join(timeout=60)
            time.sleep(0.3)
        finally:
            traffic.finish()

        assert outcome.status == "failed", outcome
        assert "the Docker engine is unreachable" in outcome.reason
        assert "prod.v2" in outcome.reason
        assert traffic.failures == []
        assert set(traffic.answers) == {"v1\n"}
        assert environment.current_version() == "v1"
        assert router.weights() == {"prod.v1.0": 100}

        # Back up, the engine finds v1's container still running (live restore).
        private_engine.start()
        v1 = target.status("prod.v1.0")
        assert v1 is not None and v1.status == "running"
    finally:
        if private_engine.process is not None:
            environment.down()
        router.stop()
        target.close()
