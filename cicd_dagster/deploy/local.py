"""The `local` deploy target: each service slot runs as a supervised process tree.

A slot (e.g. "shop-api.staging.blue") must keep serving after whoever deployed it has
exited, so it is run by a detached supervisor process (cicd_dagster.deploy.supervise) in
a session of its own, which restarts the service on crash. Everything about a slot lives
in the state folder as files named after it:

    <name>.json   its state, rewritten atomically by the supervisor on every change
    <name>.log    the service's output and the supervisor's own remarks, appended
    <name>.spec   the spec handed to the supervisor (mode 0600: env may hold secrets),
                  deleted by the supervisor as soon as it has read it
    <name>.lock   serializes start and stop of the slot across processes

The folder belongs to one LocalSupervisor: every *.json in it is taken for a slot. A
log's cursors (log_since) are byte offsets: the log is only ever appended to.

Pids are recorded with their start time (from /proc, so this target is Linux only): a pid
the kernel has since given to an unrelated process is never taken for the slot's, and
never signalled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from cicd_dagster.deploy.target import (
    ACTIVE_STATUSES,
    Limits,
    LogChunk,
    ServiceSpec,
    ServiceState,
    SupervisorError,
    check_port,
)
from cicd_dagster.locks import file_lock

_START_TIMEOUT_S = 10.0
_POLL_INTERVAL_S = 0.02
# SIGKILL is not refused, but a process blocked in the kernel dies only when it returns.
_KILL_WAIT_S = 5.0
_LOG_TAIL_BYTES = 64 * 1024
_MIB = 1024 * 1024
# Observed on the running process, never recorded in a state file.
_OBSERVED = ("image", "limits")
# The folder holding the cicd_dagster package, so the supervisor imports the same code.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SlotFiles:
    state: Path
    log: Path
    spec: Path
    lock: Path

    @classmethod
    def of(cls, state_dir: Path, name: str) -> SlotFiles:
        return cls(
            state=state_dir / f"{name}.json",
            log=state_dir / f"{name}.log",
            spec=state_dir / f"{name}.spec",
            lock=state_dir / f"{name}.lock",
        )


class LocalSupervisor:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.resolve()

    def start(self, spec: ServiceSpec) -> ServiceState:
        """Start the slot under a detached supervisor; returns once the supervisor runs."""
        files = SlotFiles.of(self.state_dir, spec.name)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(files.lock):
            self._check_can_start(spec)
            files.state.unlink(missing_ok=True)  # so only the new supervisor's state counts
            spec = replace(spec, cwd=spec.cwd.resolve())
            _write_private(files.spec, json.dumps(spec.to_json()))
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    filter(None, [str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH")])
                ),
            }
            with files.log.open("ab") as log:
                # The launcher detaches the real supervisor and exits at once (see
                # supervise.main), so it is reaped here and no zombie outlives this call.
                # -P: nothing in the state folder (its cwd) can shadow a module.
                launcher = subprocess.Popen(
                    [sys.executable, "-P", "-m", "cicd_dagster.deploy.supervise", str(files.spec)],
                    cwd=self.state_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                exit_code = launcher.wait(timeout=_START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
                exit_code = None
            if exit_code != 0:
                files.spec.unlink(missing_ok=True)
                raise SupervisorError(
                    f"the supervisor of slot {spec.name} failed to start "
                    f"(exit {exit_code}); log {files.log}:\n{self.log_tail(spec.name)}"
                )
            return self._wait_for_state(spec.name)

    def stop(self, name: str, timeout_s: float = 10) -> None:
        """Stop the slot and everything it runs. Stopping a stopped or unknown slot is a
        no-op; a supervisor that is gone or does not exit in time is cleaned up after."""
        files = SlotFiles.of(self.state_dir, name)
        if not files.state.exists():
            return
        deadline = time.monotonic() + timeout_s
        with file_lock(files.lock):
            record = _read_record(files.state)
            supervisor = record.live_pid()
            if supervisor is not None:
                with suppress(ProcessLookupError):
                    os.kill(supervisor, signal.SIGTERM)
                while record.is_ours(supervisor) and time.monotonic() < deadline:
                    time.sleep(_POLL_INTERVAL_S)
                if record.is_ours(supervisor):
                    signal_group(supervisor, signal.SIGKILL)
            # Read again: the supervisor may have replaced its child since.
            record = _read_record(files.state)
            child = record.state.child_pid
            if child is not None and not record.is_reused(child):
                stop_process_group(child, grace_s=max(0.0, deadline - time.monotonic()))
            write_state(
                files.state, replace(record.state, status="stopped", pid=None, child_pid=None)
            )

    def status(self, name: str) -> ServiceState | None:
        """The slot's state as its supervisor last wrote it, corrected by what is alive:
        a slot whose supervisor died is "crashed"; dead pids are None."""
        files = SlotFiles.of(self.state_dir, name)
        if not files.state.exists():
            return None
        return _read_record(files.state).checked()

    def all(self) -> list[ServiceState]:
        return [_read_record(path).checked() for path in sorted(self.state_dir.glob("*.json"))]

    def log_tail(self, name: str, max_lines: int = 40) -> str:
        """The last lines of the slot's log ("" if there is none)."""
        log = SlotFiles.of(self.state_dir, name).log
        try:
            with log.open("rb") as handle:
                handle.seek(max(0, log.stat().st_size - _LOG_TAIL_BYTES))
                text = handle.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-max_lines:])

    def log_since(self, name: str, cursor: str | None, max_bytes: int) -> LogChunk:
        """The slot's log from byte offset `cursor` on (from the start if the log is now
        shorter: it was replaced)."""
        log = SlotFiles.of(self.state_dir, name).log
        offset = int(cursor) if cursor is not None and cursor.isdigit() else 0
        try:
            with log.open("rb") as handle:
                if os.fstat(handle.fileno()).st_size < offset:
                    offset = 0
                handle.seek(offset)
                data = handle.read(max_bytes)
        except FileNotFoundError:
            return LogChunk(b"", cursor)
        ends = [newline.end() for newline in re.finditer(b"\n", data)]
        if data and ends[-1:] != [len(data)]:
            ends.append(len(data))
        return LogChunk(data, str(offset), tuple((end, str(offset + end)) for end in ends))

    def _check_can_start(self, spec: ServiceSpec) -> None:
        if spec.image is not None:
            raise SupervisorError(f"slot {spec.name}: a local target runs no image")
        if spec.limits.cpus is not None:
            raise SupervisorError(f"slot {spec.name}: a local target has no CPU quota")
        if not spec.cwd.is_dir():
            raise SupervisorError(f"service {spec.name}: working directory {spec.cwd} is missing")
        current = self.status(spec.name)
        if current is not None and current.status in ACTIVE_STATUSES:
            raise SupervisorError(
                f"slot {spec.name} is already {current.status} (supervisor pid {current.pid}); "
                "stop it first"
            )
        if current is not None and current.child_pid is not None:
            raise SupervisorError(
                f"slot {spec.name} lost its supervisor but its service (pid "
                f"{current.child_pid}) still runs; stop it first"
            )
        check_port(spec, self.all())

    def _wait_for_state(self, name: str) -> ServiceState:
        state_file = SlotFiles.of(self.state_dir, name).state
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if state_file.exists():
                return _read_record(state_file).checked()
            time.sleep(_POLL_INTERVAL_S)
        raise SupervisorError(
            f"the supervisor of slot {name} did not report within {_START_TIMEOUT_S:g}s; "
            f"log:\n{self.log_tail(name)}"
        )


def free_port() -> int:
    """A currently free ephemeral port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_state(path: Path, state: ServiceState) -> None:
    """Replace the state file atomically, recording each pid's start time with it."""
    data = {
        **{key: value for key, value in asdict(state).items() if key not in _OBSERVED},
        "log_path": str(state.log_path),
        "pid_started": _start_time(state.pid),
        "child_pid_started": _start_time(state.child_pid),
    }
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, indent=2))
    os.replace(temporary, path)


def shell_exit_code(returncode: int) -> int:
    # Popen reports death by signal N as -N; show it as a shell would (128 + N).
    return 128 - returncode if returncode < 0 else returncode


@dataclass(frozen=True)
class _Record:
    """A state file as read: the state plus the start time of each recorded pid."""

    state: ServiceState
    started: dict[int, int | None]

    def is_ours(self, pid: int | None) -> bool:
        """Whether `pid` is alive and still the process recorded under it."""
        if pid is None:
            return False
        current = _start_time(pid)
        return current is not None and current == self.started.get(pid)

    def is_reused(self, pid: int) -> bool:
        """Whether `pid` now belongs to another process (not merely: is gone)."""
        current = _start_time(pid)
        return current is not None and current != self.started.get(pid)

    def live_pid(self) -> int | None:
        return self.state.pid if self.is_ours(self.state.pid) else None

    def checked(self) -> ServiceState:
        supervisor_alive = self.is_ours(self.state.pid)
        status = self.state.status
        if status in ACTIVE_STATUSES and not supervisor_alive:
            status = "crashed"
        child_pid = self.state.child_pid if self.is_ours(self.state.child_pid) else None
        return replace(
            self.state,
            status=status,
            pid=self.state.pid if supervisor_alive else None,
            child_pid=child_pid,
            limits=process_limits(child_pid),
        )


def _read_record(path: Path) -> _Record:
    try:
        data = json.loads(path.read_text())
        pid_started = data.pop("pid_started")
        child_pid_started = data.pop("child_pid_started")
        state = ServiceState(**{**data, "log_path": Path(data["log_path"])})
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SupervisorError(f"unreadable service state file {path}: {error}") from error
    started: dict[int, int | None] = {}
    if state.pid is not None:
        started[state.pid] = pid_started
    if state.child_pid is not None:
        started[state.child_pid] = child_pid_started
    return _Record(state, started)


def process_limits(pid: int | None) -> Limits | None:
    """The rlimits of a live process as Limits (soft values), None if it is gone."""
    if pid is None:
        return None
    try:
        lines = Path(f"/proc/{pid}/limits").read_text().splitlines()
    except OSError:
        return None

    def soft(prefix: str) -> int | None:
        for line in lines:
            if line.startswith(prefix):
                value = line[len(prefix) :].split()[0]
                return None if value == "unlimited" else int(value)
        return None

    address_space = soft("Max address space")
    return Limits(
        memory_mb=address_space // _MIB if address_space is not None else None,
        max_open_files=soft("Max open files"),
    )


def _start_time(pid: int | None) -> int | None:
    """The start time of a live process in clock ticks since boot, None if there is no
    such process or it is a zombie."""
    if pid is None:
        return None
    try:
        # Fields after the command name, which is in parentheses and may hold anything.
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    state, start_time = fields[0], fields[19]  # fields 3 and 22 of proc_pid_stat(5)
    return None if state in ("Z", "X") else int(start_time)


def signal_group(process_group: int, signum: int) -> None:
    # The group may already be empty: nothing left to signal.
    with suppress(ProcessLookupError):
        os.killpg(process_group, signum)


def process_group_alive(process_group: int) -> bool:
    """Whether any process of the group is alive. Zombies do not count: a killed process
    orphaned to an init that is slow to reap it holds nothing any more."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended while we looked
        if fields[0] not in ("Z", "X") and int(fields[2]) == process_group:
            return True
    return False


def stop_process_group(process_group: int, grace_s: float) -> None:
    """SIGTERM the group, SIGKILL whatever is left of it after `grace_s`, and return once
    none of it is alive (or after _KILL_WAIT_S for a process stuck in the kernel)."""
    signal_group(process_group, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while process_group_alive(process_group) and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL_S)
    signal_group(process_group, signal.SIGKILL)
    deadline = time.monotonic() + _KILL_WAIT_S
    while process_group_alive(process_group) and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL_S)


def _write_private(path: Path, text: str) -> None:
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
