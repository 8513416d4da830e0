"""The `docker` deploy target: each service slot runs as a container of the release's image.

Containers run on the host network (the engine runs with --bridge=none; services bind
127.0.0.1 like local ones, so the same nginx router reaches both), with a restart policy
(on-failure, at most max_restarts; the engine backs off between restarts, starting at
100 ms and doubling, so spec.backoff_s is not used) and the spec's limits. Everything
about a slot is on the container: its labels say which target (cicd.scope), slot
(cicd.slot) and port (cicd.port) it is, next to the caller's (repository, environment,
commit). An engine started with --live-restore keeps the containers running while it is
down, so a deploy interrupted by the engine leaves the previous version serving.

A slot's output is read through the engine (it may keep it in any log driver), with the
engine's timestamp of each line: a log cursor is the timestamp of the last line read.
(The engine stamps stdout and stderr lines apiece before it stores them, so a line of
one stream stored within microseconds after a later-stamped line of the other, and read
in between, would be passed over; the engine's own `since` has the same limit.)

build_release_image builds the image a release runs: the repository's Dockerfile, or a
generated one on a base image that copies the checkout to /app and installs the build's
wheels into a venv.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from hashlib import sha256
from pathlib import Path, PurePosixPath
from typing import Any

import docker
import requests
from docker import DockerClient
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import LogConfig, Ulimit
from docker.utils.build import match_tag, tar

from cicd_dagster.deploy.target import (
    ACTIVE_STATUSES,
    Limits,
    LogChunk,
    ServiceSpec,
    ServiceState,
    ServiceStatus,
    SupervisorError,
    check_port,
)

ClientFactory = Callable[[], DockerClient]

SCOPE_LABEL = "cicd.scope"
SLOT_LABEL = "cicd.slot"
PORT_LABEL = "cicd.port"
APP_DIR = "/app"  # where a generated image holds the release's checkout
_VENV = "/opt/venv"  # where a generated image installs the release's wheels
_LOG_CONFIG = LogConfig(type="json-file", config={"max-size": "10m", "max-file": "3"})
# Never in a build context, whatever the repository's .dockerignore says.
_ALWAYS_IGNORED = [".git"]
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")
# The engine's log timestamps (RFC 3339, UTC, always 9 decimals): they sort as text.
_LOG_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z")
_MIB = 1024 * 1024


class ImageBuildError(RuntimeError):
    """A release image cannot be built; the message names the tag and the cause."""


def container_name(scope: str, slot: str) -> str:
    """The container of `slot` in `scope`: a valid, engine-wide unique container name."""
    return _NAME_UNSAFE.sub("-", f"cicd-{scope}-{slot}")


class DockerTarget:
    """Runs the slots of one scope (e.g. a repository of one cicd home) as containers.

    `client_factory` connects to the engine; it is called on first use, so an unreachable
    engine is a SupervisorError of the call that needed it, not of the constructor.
    """

    def __init__(self, scope: str, client_factory: ClientFactory = docker.from_env) -> None:
        self.scope = scope
        self._client_factory = client_factory
        self._client: DockerClient | None = None

    def start(self, spec: ServiceSpec) -> ServiceState:
        """Create and start the slot's container; returns once it is started."""
        if spec.image is None:
            raise SupervisorError(f"slot {spec.name}: a docker target needs an image to run")
        name = container_name(self.scope, spec.name)
        with self._engine(spec.name, "start"):
            self._clear_name(spec.name, name)
            check_port(spec, self.all())
            try:
                container = self._engine_client().containers.create(
                    spec.image,
                    command=["bash", "-c", spec.command],
                    name=name,
                    labels={
                        **spec.labels,
                        SCOPE_LABEL: self.scope,
                        SLOT_LABEL: spec.name,
                        PORT_LABEL: str(spec.port),
                    },
                    environment={**spec.env, "PORT": str(spec.port)},
                    # The image's WORKDIR: spec.cwd is the release's folder on this machine.
                    network_mode="host",
                    # An init as pid 1 passes SIGTERM on (a service as pid 1 would ignore
                    # it) and reaps orphans.
                    init=True,
                    restart_policy=_restart_policy(spec.max_restarts),
                    log_config=_LOG_CONFIG,
                    **_limits(spec),
                )
            except ImageNotFound as error:
                raise SupervisorError(
                    f"slot {spec.name}: image {spec.image} is missing on the Docker engine "
                    "(build the release's image first)"
                ) from error
            try:
                container.start()
            except APIError as error:
                container.remove(force=True)
                raise SupervisorError(
                    f"slot {spec.name}: container {name} of image {spec.image} did not start: "
                    f"{error.explanation or error}"
                ) from error
            container.reload()
            return self._state(container.attrs)

    def stop(self, name: str, timeout_s: float = 10) -> None:
        """Stop and remove the slot's container; a no-op for an unknown slot."""
        with self._engine(name, "stop"):
            container = self._container(name)
            if container is None:
                return
            container.stop(timeout=math.ceil(timeout_s))
            container.remove(force=True)

    def status(self, name: str) -> ServiceState | None:
        with self._engine(name, "inspect"):
            container = self._container(name)
            return None if container is None else self._state(container.attrs)

    def all(self) -> list[ServiceState]:
        with self._engine("*", "list"):
            containers = self._engine_client().containers.list(
                all=True, filters={"label": f"{SCOPE_LABEL}={self.scope}"}, ignore_removed=True
            )
            return sorted(
                (self._state(container.attrs) for container in containers),
                key=lambda state: state.name,
            )

    def log_tail(self, name: str, max_lines: int = 40) -> str:
        """The last lines of the container's output, stdout and stderr interleaved."""
        with self._engine(name, "read the log of"):
            container = self._container(name)
            if container is None:
                return ""
            output: bytes = container.logs(stdout=True, stderr=True, tail=max_lines)
            return output.decode("utf-8", errors="replace").rstrip("\n")

    def log_since(self, name: str, cursor: str | None, max_bytes: int) -> LogChunk:
        """The container's output after the timestamp `cursor`, a mark after each line
        (the engine splits lines over 16 KiB in parts of one timestamp: a mark inside
        such a line resumes after all of it)."""
        if cursor is not None and not _LOG_TIMESTAMP.fullmatch(cursor):
            cursor = None  # not this target's (the slot ran on another): from the start
        with self._engine(name, "read the log of"):
            container = self._container(name)
            if container is None:
                return LogChunk(b"", cursor)
            frames = container.logs(
                stdout=True,
                stderr=True,
                timestamps=True,
                stream=True,
                follow=False,
                # Whole seconds: the lines of cursor's second up to it are skipped below.
                since=_epoch_second(cursor) if cursor is not None else None,
            )
            data = bytearray()
            marks: list[tuple[int, str]] = []
            try:
                for frame in frames:
                    stamp, _, line = frame.partition(b" ")
                    timestamp = stamp.decode("ascii", errors="replace")
                    if cursor is not None and timestamp <= cursor:
                        continue
                    data += line
                    marks.append((len(data), timestamp))
                    if len(data) >= max_bytes:
                        break
            finally:
                frames.close()
        return LogChunk(bytes(data), cursor, tuple(marks))

    def close(self) -> None:
        """Close the connection to the engine (a later call opens a new one)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def _engine_client(self) -> DockerClient:
        if self._client is None:
            self._client = self._client_factory()
        return self._client

    @contextmanager
    def _engine(self, slot: str, action: str) -> Iterator[None]:
        """Engine failures as SupervisorError naming the slot and the cause."""
        try:
            yield
        except APIError as error:
            raise SupervisorError(
                f"cannot {action} slot {slot}: the Docker engine refused: "
                f"{error.explanation or error}"
            ) from error
        except (DockerException, requests.RequestException) as error:
            raise SupervisorError(
                f"cannot {action} slot {slot}: the Docker engine is unreachable "
                f"({_os_cause(error)})"
            ) from error

    def _container(self, slot: str) -> Any | None:
        """The slot's container, None if there is none; SupervisorError if its name is
        held by a container this target did not start (it is never touched)."""
        name = container_name(self.scope, slot)
        try:
            container = self._engine_client().containers.get(name)
        except NotFound:
            return None
        labels = container.labels
        if labels.get(SCOPE_LABEL) != self.scope or labels.get(SLOT_LABEL) != slot:
            raise SupervisorError(
                f"slot {slot}: the container name {name} is taken by a container that is "
                "not this slot's"
            )
        return container

    def _clear_name(self, slot: str, name: str) -> None:
        """Remove an ended container of the slot; refuse if it is active."""
        container = self._container(slot)
        if container is None:
            return
        state = self._state(container.attrs)
        if state.status in ACTIVE_STATUSES:
            raise SupervisorError(
                f"slot {slot} is already {state.status} (container {name}); stop it first"
            )
        container.remove(force=True)

    def _state(self, attrs: dict[str, Any]) -> ServiceState:
        labels = attrs["Config"]["Labels"]
        state = attrs["State"]
        running = state["Running"] and not state["Restarting"]
        return ServiceState(
            name=labels[SLOT_LABEL],
            pid=state["Pid"] or None,
            child_pid=None,
            port=int(labels[PORT_LABEL]),
            status=_status(state),
            restarts=attrs["RestartCount"],
            # Creation, not State.StartedAt: the slot's start, not reset by restarts.
            started_at=_iso_seconds(attrs["Created"]),
            log_path=Path(attrs["LogPath"]),
            # The engine resets ExitCode when the container runs again.
            exit_code=None if running or state["Status"] == "created" else state["ExitCode"],
            image=attrs["Config"]["Image"],
            limits=_container_limits(attrs["HostConfig"]),
        )


def _os_cause(error: BaseException) -> str:
    """The OS error wrapped in docker-py's, requests' and urllib3's exceptions (e.g.
    "[Errno 111] Connection refused"), or the error itself if there is none."""
    pending: list[object] = [error]
    while pending:
        item = pending.pop(0)
        if isinstance(item, OSError) and item.errno is not None:
            return str(item)
        if isinstance(item, BaseException):
            pending += [*item.args, item.__cause__, item.__context__]
    return str(error)


def _status(state: dict[str, Any]) -> ServiceStatus:
    status = state["Status"]
    if status == "created":
        return "starting"
    if status in ("running", "restarting"):
        return "restarting" if state["Restarting"] else "running"
    if status in ("exited", "dead"):
        return "stopped" if state["ExitCode"] == 0 else "crashed"
    return "stopped"  # paused or being removed: up to whoever did that, not serving


def _restart_policy(max_restarts: int) -> dict[str, Any]:
    # The engine reads on-failure with a count of 0 as "restart for ever".
    if max_restarts == 0:
        return {"Name": "no"}
    return {"Name": "on-failure", "MaximumRetryCount": max_restarts}


def _limits(spec: ServiceSpec) -> dict[str, Any]:
    limits = spec.limits
    options: dict[str, Any] = {}
    if limits.memory_mb is not None:
        memory = limits.memory_mb * 1024 * 1024
        options |= {"mem_limit": memory, "memswap_limit": memory}  # no swap on top
    if limits.cpus is not None:
        options["nano_cpus"] = round(limits.cpus * 1e9)
    if limits.max_open_files is not None:
        count = limits.max_open_files
        options["ulimits"] = [Ulimit(name="nofile", soft=count, hard=count)]
    return options


def _container_limits(host: dict[str, Any]) -> Limits:
    """The limits in force on a container (as `docker update` may have changed them)."""
    memory = host.get("Memory") or 0
    nano_cpus = host.get("NanoCpus") or 0
    open_files = [u["Soft"] for u in host.get("Ulimits") or [] if u["Name"] == "nofile"]
    return Limits(
        memory_mb=memory // _MIB if memory else None,
        cpus=nano_cpus / 1e9 if nano_cpus else None,
        max_open_files=open_files[0] if open_files else None,
    )


def _epoch_second(timestamp: str) -> int:
    """The whole second of an engine log timestamp, as the engine's `since` takes it."""
    second = datetime.strptime(timestamp[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return int(second.timestamp())


def _iso_seconds(timestamp: str) -> str:
    return datetime.fromisoformat(timestamp).astimezone(UTC).isoformat(timespec="seconds")


# --- release images ----------------------------------------------------------------------


def release_image_tag(
    repository: str, commit: str, *, base_image: str, dockerfile: str | None
) -> str:
    """The tag of a commit's image built with these settings: a rebuild with the same ones
    reuses it, a change of base image or Dockerfile makes a new one."""
    settings = sha256(json.dumps([base_image, dockerfile]).encode()).hexdigest()[:12]
    name = re.sub(r"[^a-z0-9]+", "-", repository.lower()).strip("-") or "release"
    return f"cicd/{name}:{commit[:12]}-{settings}"


def build_release_image(
    context_dir: Path,
    *,
    tag: str,
    base_image: str,
    dockerfile: str | None = None,
    wheels: Sequence[str] = (),
    labels: dict[str, str] | None = None,
    log: Callable[[str], None] | None = None,
    client_factory: ClientFactory = docker.from_env,
) -> str:
    """Build the image `tag` of the release in `context_dir` (its checkout) and return the
    tag; an existing image of that tag is reused as it is.

    The Dockerfile is `dockerfile` (a path inside the folder), else the folder's own
    Dockerfile, else a generated one: FROM base_image, the folder in /app (the working
    dir), and `wheels` (paths inside the folder) installed with pip, offline, into a venv
    on PATH. The build context never holds .git. Build output goes to `log` line by line.
    """
    if not match_tag(tag):
        raise ImageBuildError(f"{tag!r} is not a valid image tag")
    context = context_dir.resolve()
    if not context.is_dir():
        raise ImageBuildError(f"image {tag}: the release folder {context_dir} is missing")
    if dockerfile is None and (context / "Dockerfile").is_file():
        dockerfile = "Dockerfile"
    if dockerfile is not None:
        dockerfile_name = _inside(context, dockerfile, tag, "dockerfile")
        generated = None
    else:
        installed = [_inside(context, wheel, tag, "wheel") for wheel in wheels]
        dockerfile_name = ".cicd-generated.Dockerfile"
        generated = _generated_dockerfile(base_image, installed)
    try:
        client = client_factory()
        try:
            client.images.get(tag)
            return tag
        except ImageNotFound:
            pass
        if generated is not None:
            try:
                client.images.get(base_image)
            except ImageNotFound as error:
                raise ImageBuildError(
                    f"image {tag}: the base image {base_image} is missing on the Docker engine "
                    "(.ci/start-docker.sh builds cicd-python:3.11; or set target.base_image)"
                ) from error
        ignored = [*_dockerignore(context), *_ALWAYS_IGNORED]
        if generated is not None:
            # The context then gets a .dockerignore of docker-py's making: not a release file.
            ignored.append(".dockerignore")
        build_context = tar(str(context), exclude=ignored, dockerfile=(dockerfile_name, generated))
        with build_context:
            _stream_build(
                client.api.build(
                    fileobj=build_context,
                    custom_context=True,
                    tag=tag,
                    dockerfile=dockerfile_name,
                    labels=labels or {},
                    rm=True,
                    forcerm=True,
                    decode=True,
                ),
                tag,
                log,
            )
    except APIError as error:
        raise ImageBuildError(
            f"image {tag}: the Docker engine refused the build: {error.explanation or error}"
        ) from error
    except (DockerException, requests.RequestException) as error:
        raise ImageBuildError(
            f"image {tag}: the Docker engine is unreachable ({_os_cause(error)})"
        ) from error
    return tag


def _inside(context: Path, relative: str, tag: str, what: str) -> str:
    """`relative` as a path inside `context` (POSIX, symlinks resolved), or ImageBuildError."""
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts:
        raise ImageBuildError(
            f"image {tag}: {what} {relative!r} must be a relative path inside the repository "
            "(no absolute path, no '..')"
        )
    real = (context / path).resolve()
    if not real.is_relative_to(context):
        raise ImageBuildError(
            f"image {tag}: {what} {relative!r} leads outside the repository (to {real})"
        )
    if not real.is_file():
        raise ImageBuildError(f"image {tag}: {what} {relative!r} is not a file of the repository")
    return real.relative_to(context).as_posix()


def _generated_dockerfile(base_image: str, wheels: list[str]) -> str:
    lines = [f"FROM {base_image}", f"COPY . {APP_DIR}", f"WORKDIR {APP_DIR}"]
    if wheels:
        # Exec form (JSON arrays): file names from the repository never meet a shell.
        pip = [f"{_VENV}/bin/pip", "install", "--no-index", "--no-deps", "--no-cache-dir"]
        lines += [
            "RUN " + json.dumps(["python3", "-m", "venv", _VENV]),
            "RUN " + json.dumps([*pip, *(f"{APP_DIR}/{wheel}" for wheel in wheels)]),
            f"ENV VIRTUAL_ENV={_VENV} PATH={_VENV}/bin:$PATH",
        ]
    return "\n".join(lines) + "\n"


def _dockerignore(context: Path) -> list[str]:
    """The repository's own .dockerignore patterns, if it has one."""
    try:
        text = (context / ".dockerignore").read_text()
    except FileNotFoundError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _stream_build(
    chunks: Iterator[dict[str, Any]], tag: str, log: Callable[[str], None] | None
) -> None:
    """Pass the build's output on to `log`; ImageBuildError naming the step that failed."""
    step = "the start of the build"
    for chunk in chunks:
        text = chunk.get("stream", "")
        for line in text.splitlines():
            if line.startswith("Step "):
                step = line
            if log is not None and line.strip():
                log(line)
        if "error" in chunk:
            raise ImageBuildError(f"image {tag}: the build failed at {step}: {chunk['error']}")
