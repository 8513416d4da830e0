"""Run one step of a pipeline: a bash command from the repository's .cicd.yml.

The command text is trusted like a Makefile; untrusted values (branch names, commit
messages, secrets) reach it only through the environment, never by being spliced into it.
Output is streamed line by line through the secret masker into the step's log, with
memory bounded however much (or however long a line) the step prints.
"""

from __future__ import annotations

import codecs
import getpass
import os
import re
import select
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from cicd_dagster.sandbox import StepSandbox

MASK = "***"
# Shorter values are not masked: hiding every "a" or "on" would mangle the whole log while
# protecting nothing (a secret that short is guessable anyway).
MIN_SECRET_LENGTH = 4
# A "line" longer than this (a progress bar redrawn with \r, a minified file) is cut into
# pieces so that memory stays bounded; a secret straddling a cut is not masked.
MAX_LINE_CHARS = 64 * 1024
_READ_CHUNK_BYTES = 64 * 1024
_KILL_GRACE_S = 5.0
# After SIGKILL only a process that left the step's process group (setsid) can still hold
# the output pipe; stop waiting for it rather than hang.
_ESCAPED_WRITER_WAIT_S = 1.0
_POLL_INTERVAL_S = 0.1


class SecretMasker:
    def __init__(self, secrets: Iterable[str]) -> None:
        values = set()
        for secret in secrets:
            # Output is masked a line at a time, so a multi-line secret (a PEM key) is
            # also masked line by line.
            for value in (secret, *secret.splitlines()):
                if len(value) >= MIN_SECRET_LENGTH:
                    values.add(value)
        # One alternation, longest first: a secret containing another is masked whole.
        self._pattern = (
            re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))
            if values
            else None
        )

    def mask(self, text: str) -> str:
        return self._pattern.sub(MASK, text) if self._pattern else text


@dataclass(frozen=True)
class StepResult:
    command: str
    exit_code: int | None  # None when the step was killed for running out of time
    duration_s: float
    timed_out: bool
    log_tail: str  # the last lines of output, masked
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class _LineSink:
    """Turns output bytes into masked lines, each written to the log, handed to `on_line`
    and kept in a bounded tail."""

    def __init__(
        self,
        log: TextIO,
        masker: SecretMasker | None,
        on_line: Callable[[str], None] | None,
        tail_lines: int,
    ) -> None:
        self._log = log
        self._masker = masker
        self._on_line = on_line
        self.tail: deque[str] = deque(maxlen=tail_lines)
        # Incremental: a UTF-8 character split across two reads still decodes.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""

    def feed(self, data: bytes) -> None:
        text = self._partial + self._decoder.decode(data)
        *lines, self._partial = text.split("\n")
        while len(self._partial) > MAX_LINE_CHARS:
            lines.append(self._partial[:MAX_LINE_CHARS])
            self._partial = self._partial[MAX_LINE_CHARS:]
        for line in lines:
            self.emit(line.removesuffix("\r"))
        self._log.flush()  # once per read, so the log can be followed while the step runs

    def finish(self) -> None:
        self._partial += self._decoder.decode(b"", final=True)
        if self._partial:
            self.emit(self._partial)
            self._partial = ""
        self._log.flush()

    def emit(self, line: str) -> None:
        # Masking whole lines is what catches a secret written in several pieces.
        masked = self._masker.mask(line) if self._masker else line
        self._log.write(masked + "\n")
        self.tail.append(masked)
        if self._on_line:
            self._on_line(masked)


def run_step(
    command: str,
    *,
    cwd: Path,
    env: Mapping[str, str],
    timeout_s: float,
    log_path: Path,
    masker: SecretMasker | None = None,
    on_line: Callable[[str], None] | None = None,
    tail_lines: int = 40,
    sandbox: StepSandbox | None = None,
) -> StepResult:
    """Run `command` with `bash -e -o pipefail` in `cwd` with exactly `env`, inside
    `sandbox` when given (then a step that cannot be isolated fails, see sandbox.py).

    The step owns its process group. On timeout the whole group gets SIGTERM, then SIGKILL
    after a grace. When bash exits, background processes it left behind are stopped too,
    so nothing outlives its step or holds the output pipe open (which would stall it).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"$ {masker.mask(command) if masker else command}\n")
        sink = _LineSink(log, masker, on_line, tail_lines)
        process = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", command],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=sandbox.preexec if sandbox else None,
        )
        assert process.stdout is not None  # stdout=PIPE
        try:
            timed_out = _stream_until_done(process, process.stdout.fileno(), sink, timeout_s)
            sink.finish()
            if timed_out:
                sink.emit(f"step timed out after {timeout_s:g} s")
        finally:
            # Also on an error here (on_line raising): no process may outlive the step.
            _signal_group(process.pid, signal.SIGKILL)
            process.stdout.close()
            process.wait()
    return StepResult(
        command=command,
        exit_code=None if timed_out else _shell_exit_code(process.returncode),
        duration_s=time.monotonic() - started,
        timed_out=timed_out,
        log_tail="\n".join(sink.tail),
        log_path=log_path,
    )


def _stream_until_done(
    process: subprocess.Popen[bytes], output_fd: int, sink: _LineSink, timeout_s: float
) -> bool:
    """Stream output until bash has exited and the pipe is closed, stopping the process
    group once bash exits or time runs out; True when time ran out."""
    deadline = time.monotonic() + timeout_s
    timed_out = False
    terminated_at: float | None = None  # when the group was sent SIGTERM
    killed_at: float | None = None
    output_open = True
    while output_open or process.poll() is None:
        now = time.monotonic()
        if terminated_at is None:
            if process.poll() is not None or now >= deadline:
                timed_out = process.poll() is None
                _signal_group(process.pid, signal.SIGTERM)
                terminated_at = now
        elif killed_at is None:
            if now >= terminated_at + _KILL_GRACE_S:
                _signal_group(process.pid, signal.SIGKILL)
                killed_at = now
        elif now >= killed_at + _ESCAPED_WRITER_WAIT_S:
            break
        if output_open:
            readable, _, _ = select.select([output_fd], [], [], _POLL_INTERVAL_S)
            if readable:
                data = os.read(output_fd, _READ_CHUNK_BYTES)
                output_open = bool(data)  # b"": every writer is gone
                sink.feed(data)
        else:  # bash closed its output but still runs
            time.sleep(_POLL_INTERVAL_S)
    return timed_out


def _signal_group(process_group: int, signum: int) -> None:
    # The group may already be empty: nothing left to stop.
    with suppress(ProcessLookupError):
        os.killpg(process_group, signum)


def _shell_exit_code(returncode: int) -> int:
    # Popen reports death by signal N as -N; show it as a shell would (128 + N).
    return 128 - returncode if returncode < 0 else returncode


def base_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The minimal environment a step gets, plus `extra`. Nothing else of the control
    plane's own environment (its credentials, say) reaches a step unless named in `extra`.
    """
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": os.path.expanduser("~"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": tempfile.gettempdir(),
    }
    with suppress(KeyError, OSError):  # a uid without a passwd entry has no name
        env["USER"] = getpass.getuser()
    # How this machine reaches package indexes (CA bundles, proxies, pip/uv settings) is
    # the machine's, not a secret, and installs fail without it.
    env.update(
        (name, value)
        for name, value in os.environ.items()
        if name in _NETWORK_SETTINGS or name.startswith(("PIP_", "UV_"))
    )
    env.update(extra or {})
    return env


_NETWORK_SETTINGS = frozenset(
    {
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    }
)
