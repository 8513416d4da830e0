"""The supervisor of one local service slot: `python -m cicd_dagster.deploy.supervise SPEC`.

Started by LocalSupervisor.start with its output appended to the slot's log. It detaches
into a session of its own, runs the service with `bash -c` in a process group of its own
(environment: exactly the spec's env plus PORT), restarts it with exponential backoff when
it exits, up to max_restarts, and on SIGTERM/SIGINT stops the service's whole group and
exits. Every change is written to the slot's state file.

One thread: signal handlers only set a flag, and signal.set_wakeup_fd wakes the single
wait of the loop on any signal, SIGCHLD included, so no event is lost between a check and
the wait.
"""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
from contextlib import suppress
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from cicd_dagster.deploy.local import (
    SlotFiles,
    now_iso,
    shell_exit_code,
    stop_process_group,
    write_state,
)
from cicd_dagster.deploy.target import Limits, ServiceSpec, ServiceState

# How long the service gets to exit after SIGTERM before its group is SIGKILLed; below
# LocalSupervisor.stop's default timeout, so a normal stop never needs its fallback.
CHILD_STOP_GRACE_S = 5.0
# The loop wakes at least this often even if a wake-up were somehow missed.
_MAX_WAIT_S = 1.0


def apply_limits(limits: Limits) -> None:
    """Set the rlimits of the calling process (run in the service's child before exec)."""
    if limits.memory_mb is not None:
        size = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
    if limits.max_open_files is not None:
        count = limits.max_open_files
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


class _Supervisor:
    def __init__(self, spec: ServiceSpec, files: SlotFiles) -> None:
        self.spec = spec
        self.files = files
        self.stop_requested = False
        self.bash = shutil.which("bash") or "/bin/bash"
        self.state = ServiceState(
            name=spec.name,
            pid=os.getpid(),
            child_pid=None,
            port=spec.port,
            status="starting",
            restarts=0,
            started_at=now_iso(),
            log_path=files.log,
            exit_code=None,
        )
        self.wake_read, wake_write = os.pipe()
        os.set_blocking(self.wake_read, False)
        os.set_blocking(wake_write, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        # A handler, even one doing nothing, is what makes SIGCHLD reach the wakeup fd.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def run(self) -> int:
        self._update(status="starting")
        while not self.stop_requested:
            child = self._spawn()
            if child is not None:
                self._update(status="running", child_pid=child.pid)
                while child.poll() is None and not self.stop_requested:
                    self._wait(_MAX_WAIT_S)
                if self.stop_requested:
                    self._stop_child(child)
                    break
                exit_code: int | None = shell_exit_code(child.returncode)
                # Leftovers of the service (a server it put in the background) would hold
                # its port and keep the next start from binding it.
                stop_process_group(child.pid, grace_s=0)
                self._say(f"service exited with {exit_code}")
            else:
                exit_code = None
            if self.state.restarts >= self.spec.max_restarts:
                self._say(f"giving up after {self.state.restarts} restarts")
                self._update(status="crashed", child_pid=None, exit_code=exit_code)
                return 1
            restart = self.state.restarts + 1
            delay = self.spec.backoff_before(restart)
            self._say(f"restart {restart}/{self.spec.max_restarts} in {delay:g}s")
            self._update(status="restarting", child_pid=None, exit_code=exit_code, restarts=restart)
            deadline = time.monotonic() + delay
            while not self.stop_requested and time.monotonic() < deadline:
                self._wait(deadline - time.monotonic())
        self._say("stopped")
        self._update(status="stopped", child_pid=None)
        return 0

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        try:
            child = subprocess.Popen(
                [self.bash, "-c", self.spec.command],
                cwd=self.spec.cwd,
                env={**self.spec.env, "PORT": str(self.spec.port)},
                stdin=subprocess.DEVNULL,  # stdout and stderr: this process's, the log
                process_group=0,
                # preexec_fn is safe here: the supervisor has a single thread.
                preexec_fn=lambda: apply_limits(self.spec.limits),
            )
        except OSError as error:  # the working directory vanished, say
            self._say(f"cannot start the service: {error}")
            return None
        self._say(f"service started, pid {child.pid}")
        return child

    def _stop_child(self, child: subprocess.Popen[bytes]) -> None:
        stop_process_group(child.pid, CHILD_STOP_GRACE_S)
        self.state = replace(self.state, exit_code=shell_exit_code(child.wait()))

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True

    def _wait(self, timeout_s: float) -> None:
        """Until a signal arrives or `timeout_s` passes."""
        select.select([self.wake_read], [], [], max(0.0, timeout_s))
        try:
            while os.read(self.wake_read, 512):
                pass
        except BlockingIOError:
            pass

    def _update(self, **changes: Any) -> None:
        self.state = replace(self.state, **changes)
        try:
            write_state(self.files.state, self.state)
        except OSError as error:
            # A full disk must not end supervision of a service that still serves.
            self._say(f"cannot write the state file: {error}")

    def _say(self, message: str) -> None:
        with suppress(OSError):  # the log's disk may be full too
            print(f"[supervisor {now_iso()}] {self.spec.name}: {message}", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m cicd_dagster.deploy.supervise SPEC_FILE", file=sys.stderr)
        return 2
    spec_file = Path(argv[0])
    try:
        spec = ServiceSpec.from_json(json.loads(spec_file.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"supervise: cannot load the service spec {spec_file}: {error}", file=sys.stderr)
        return 2
    # The env may hold secrets: from now on they live only in memory.
    spec_file.unlink(missing_ok=True)
    # Detach: this launcher exits at once and is reaped by its starter; the supervisor is
    # re-parented to init (which reaps it whenever it ends) and leads a new session, so it
    # outlives its starter and no signal meant for the starter's group reaches it.
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    return _Supervisor(spec, SlotFiles.of(spec_file.parent, spec.name)).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
