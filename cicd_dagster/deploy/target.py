"""What a deploy target is: something that runs named service slots (replicas).

Environment (strategies.py) drives a target through ServiceTarget only, so every strategy
works the same on local processes (local.LocalSupervisor) and Docker containers
(docker.DockerTarget).
"""

from __future__ import annotations

import bisect
import re
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

ServiceStatus = Literal["starting", "running", "restarting", "crashed", "stopped"]
# A slot in one of these states is wanted up: its supervisor should be alive.
ACTIVE_STATUSES: frozenset[ServiceStatus] = frozenset({"starting", "running", "restarting"})
MAX_BACKOFF_S = 10.0

_SLOT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class SupervisorError(RuntimeError):
    """A slot cannot be started or stopped; the message says why."""


@dataclass(frozen=True)
class Limits:
    """Resource limits per replica; None is unlimited."""

    memory_mb: int | None = None  # container memory, or RLIMIT_AS of a local process
    cpus: float | None = None  # docker only
    max_open_files: int | None = None  # RLIMIT_NOFILE


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # the slot id; it becomes a file or container name
    command: str  # run with bash -c, trusted like a Makefile line
    cwd: Path  # the release's folder here; local: it runs there; docker: the image's WORKDIR
    env: dict[str, str]  # the service's whole environment (PORT is added)
    port: int
    max_restarts: int = 5
    backoff_s: float = 0.5  # before the first restart; doubles, capped at MAX_BACKOFF_S
    image: str | None = None  # docker: the image to run; local: must be None
    limits: Limits = field(default_factory=Limits)
    labels: dict[str, str] = field(default_factory=dict)  # e.g. repository, environment

    def __post_init__(self) -> None:
        if not _SLOT_NAME.fullmatch(self.name):
            raise ValueError(
                f"service slot name {self.name!r} may only contain letters, digits, '_', "
                "'.' and '-'"
            )
        if not 1 <= self.port <= 65535:
            raise ValueError(f"service {self.name}: port {self.port} is not in 1-65535")
        if self.max_restarts < 0 or self.backoff_s < 0:
            raise ValueError(f"service {self.name}: max_restarts and backoff_s must be >= 0")
        bad = [key for key, value in self.env.items() if not isinstance(value, str)]
        if bad:
            raise ValueError(f"service {self.name}: env values must be strings: {bad}")

    def backoff_before(self, restart: int) -> float:
        """The pause before restart number `restart` (1 for the first)."""
        return float(min(self.backoff_s * 2 ** (restart - 1), MAX_BACKOFF_S))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "cwd": str(self.cwd)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceSpec:
        return cls(**{**data, "cwd": Path(data["cwd"]), "limits": Limits(**data.get("limits", {}))})


@dataclass(frozen=True)
class ServiceState:
    name: str
    pid: int | None  # local: the supervisor's; docker: the container's main process
    child_pid: int | None  # local: the service's (bash -c), leader of its own process group
    port: int
    status: ServiceStatus
    restarts: int
    started_at: str  # ISO 8601, when the slot was started (not reset by restarts)
    log_path: Path  # where the output is kept (docker: the engine's file); read log_since
    exit_code: int | None  # of the service's last exit, shell style (128+N: signal N)
    # Observed, never recorded: docker: the container's image and limits; local: no
    # image, the rlimits of the service process (None while none runs).
    image: str | None = None
    limits: Limits | None = None


@dataclass(frozen=True)
class LogChunk:
    """A slot's output read from a cursor on (cursors are the target's, opaque strings
    that survive the process: local: byte offsets, docker: the engine's timestamps)."""

    data: bytes
    start: str | None  # the cursor it was read from (None: the start of the output)
    marks: tuple[tuple[int, str], ...] = ()
    """(n, cursor) in ascending n: reading from `cursor` gives what follows data[:n]."""

    def cursor_after(self, consumed: int) -> str | None:
        """Where to read next once data[:consumed] is done with: after the last mark
        within it (a line only partly consumed is read again)."""
        index = bisect.bisect_right(self.marks, consumed, key=lambda mark: mark[0])
        return self.marks[index - 1][1] if index else self.start


class ServiceTarget(Protocol):
    """Runs service slots that outlive the process that started them."""

    def start(self, spec: ServiceSpec) -> ServiceState:
        """Start the slot; returns once it is launched (not necessarily healthy).
        SupervisorError if it cannot be."""
        ...

    def stop(self, name: str, timeout_s: float = 10) -> None:
        """Stop the slot and all it runs; a no-op for a stopped or unknown slot."""
        ...

    def status(self, name: str) -> ServiceState | None:
        """The slot's state, None if the target never ran it."""
        ...

    def all(self) -> list[ServiceState]:
        """Every slot the target knows, running or not."""
        ...

    def log_tail(self, name: str, max_lines: int = 40) -> str:
        """The last lines of the slot's output ("" if there is none)."""
        ...

    def log_since(self, name: str, cursor: str | None, max_bytes: int) -> LogChunk:
        """The slot's output (stdout and stderr, across restarts) after `cursor`: about
        max_bytes of it (a target may finish the line that reaches it), with a mark at
        each line end and at its end; empty for an unknown slot."""
        ...


def port_is_free(port: int) -> bool:
    # SO_REUSEADDR as servers set it: lingering TIME_WAIT connections do not count, a
    # listener (on 127.0.0.1 or on all addresses) does.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def check_port(spec: ServiceSpec, slots: Iterable[ServiceState]) -> None:
    """SupervisorError if `spec`'s port belongs to another active slot of the target or
    to anything else listening on 127.0.0.1."""
    for other in slots:
        active = other.status in ACTIVE_STATUSES
        if active and other.name != spec.name and other.port == spec.port:
            raise SupervisorError(f"port {spec.port} is already allocated to slot {other.name}")
    if not port_is_free(spec.port):
        raise SupervisorError(f"port {spec.port} on 127.0.0.1 is already in use")
