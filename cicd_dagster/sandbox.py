"""Keep the control plane's secrets out of reach of the build steps it runs.

A step runs the watched repository's code as the control plane's own user. In its
sandbox the signing key folder is an empty, read-only tmpfs and other secret files read
as /dev/null, in a private mount namespace (nothing mounted there reaches the host). The
step also gets its own PID namespace with its own /proc: otherwise
/proc/<pid of the control plane>/root would show it the host's files. CAP_SYS_ADMIN is
dropped from its bounding set so that a root step cannot unmount the hiding mounts.
When the step's first process (bash, PID 1 of its namespace) exits, the kernel kills
everything it left behind. As PID 1, bash ignores a timeout's SIGTERM (the processes it
started get it); the SIGKILL after the grace stops it.

As root the namespaces are created directly; otherwise inside a new user namespace that
maps only the own uid and gid, which needs unprivileged user namespaces.

What this does not stop: a step with root's other powers (raw disks, kernel modules) or
with access to the Docker socket (`docker run -v /:/host`) can still reach any file.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:  # only the standard library at run time: tests run this module as nobody
    from cicd_dagster.config import ControlConfig

# <sched.h>, <sys/mount.h>, <linux/prctl.h>, <linux/capability.h>
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWPID = 0x20000000
_MS_RDONLY = 0x1
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_PR_CAPBSET_DROP = 24
_CAP_SYS_ADMIN = 21

SANDBOX_FAILED_EXIT = 125
"""Exit status of a step that never started because its sandbox could not be set up
(the reason is in the step's log)."""

# Loaded before any fork: the child only calls into it.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = [ctypes.c_int]
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.prctl.argtypes = [
    ctypes.c_int,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
    ctypes.c_ulong,
]


@dataclass(frozen=True)
class StepSandbox:
    """What a step must not see: folders (shown empty and read-only, so nothing can be
    planted in them either; each must exist) and files (shown as /dev/null when they exist).
    """

    hidden_dirs: tuple[Path, ...] = ()
    hidden_files: tuple[Path, ...] = ()

    def preexec(self) -> None:
        """For subprocess.Popen(preexec_fn=..., start_new_session=True): isolate the child.

        On failure the child writes the reason to its stderr and exits
        SANDBOX_FAILED_EXIT: a step never runs unisolated by accident. The child stays
        in the step's process group as a relay that waits for the step (PID 1 of the new
        PID namespace) and exits with its status.
        """
        _run_or_exit(self._enter_namespaces)
        step = os.fork()
        if step != 0:
            _relay_exit_status(step)
        _run_or_exit(_enter_own_proc)

    def _enter_namespaces(self) -> None:
        uid, gid = os.getuid(), os.getgid()
        try:
            _unshare(_CLONE_NEWNS | _CLONE_NEWPID)
        except PermissionError:  # not privileged here: a user namespace makes it so
            _unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWPID)
            _write_proc("/proc/self/setgroups", "deny")
            _write_proc("/proc/self/uid_map", f"{uid} {uid} 1")
            _write_proc("/proc/self/gid_map", f"{gid} {gid} 1")
        # Without this the mounts below would propagate to the host's mount namespace.
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE)
        for folder in self.hidden_dirs:
            flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
            _mount("tmpfs", str(folder), "tmpfs", flags, "mode=0500,size=4k")
        for file in self.hidden_files:
            if os.path.exists(file):
                _mount("/dev/null", str(file), None, _MS_BIND)


def _enter_own_proc() -> None:
    """In the step, PID 1 of its namespace: a /proc showing only its own processes, and
    no CAP_SYS_ADMIN (which could unmount that /proc or the hiding mounts)."""
    _mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    if _libc.prctl(_PR_CAPBSET_DROP, _CAP_SYS_ADMIN, 0, 0, 0) != 0:
        raise _os_error("prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN)")


def _run_or_exit(setup: Callable[[], None]) -> None:
    try:
        setup()
    except OSError as error:
        os.write(2, f"step not started: it could not be isolated: {error}\n".encode())
        os._exit(SANDBOX_FAILED_EXIT)


def _relay_exit_status(step: int) -> NoReturn:
    """The rest of the sandbox's first process: wait for the step, exit as it did. Its
    descriptors are closed so that only the step holds the output pipe (and Popen's
    exec-status pipe, which tells Popen the step started)."""
    try:
        os.closerange(0, os.sysconf("SC_OPEN_MAX"))
        _, status = os.waitpid(step, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)  # killed by signal N: 128 + N, as bash says
    finally:
        os._exit(SANDBOX_FAILED_EXIT)


def _unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        raise _os_error(f"unshare({flags:#x})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    if (
        _libc.mount(
            source.encode() if source else None,
            os.fsencode(target),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        )
        != 0
    ):
        raise _os_error(f"mount {source or ''} on {target}")


def _write_proc(path: str, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY)
    try:
        os.write(descriptor, text.encode())
    finally:
        os.close(descriptor)


def _os_error(call: str) -> OSError:
    number = ctypes.get_errno()
    return OSError(number, f"{call}: {os.strerror(number)}")


@cache
def isolation_unavailable() -> str | None:
    """Why steps cannot be isolated on this machine, or None when they can. Found out once
    per process by isolating a `true`."""
    probe = subprocess.run(
        ["true"],
        preexec_fn=StepSandbox().preexec,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )
    if probe.returncode == 0:
        return None
    reason = probe.stdout.decode(errors="replace").strip()
    return reason.removeprefix("step not started: it could not be isolated: ") or (
        f"an isolated `true` exited {probe.returncode}"
    )


def hidden_paths(config: ControlConfig) -> StepSandbox:
    """The secrets of this control plane a step must not touch: home/keys, which holds the
    default signing key and the HMAC key of deployment config digests (created 0700 if
    missing: a step could otherwise plant a key in it), and a signing key configured
    elsewhere."""
    keys = config.home / "keys"
    keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    configured = config.security.signing_key
    return StepSandbox(
        hidden_dirs=(keys.resolve(),),
        hidden_files=(configured,)
        if configured is not None and not configured.resolve().is_relative_to(keys.resolve())
        else (),
    )


def sandbox_for(config: ControlConfig) -> StepSandbox | None:
    """The sandbox of this control plane's steps; None when isolation_unavailable()."""
    return None if isolation_unavailable() is not None else hidden_paths(config)
