"""nginx as the stable address of an environment: a weighted upstream over the slots
(blue/green, stable/canary) that the deploy strategies reconfigure while traffic flows.

Each router is its own nginx (master + one worker) with everything under its root folder:
nginx.conf, the pid file, logs, temp dirs and state.json (the weights of the live config).
apply() renders a config, has `nginx -t` validate it before it replaces the running one,
then starts nginx or reloads it gracefully: old workers finish their in-flight requests
while new ones take new connections, and the listening socket never closes, which is the
zero-downtime property. apply() returns once every worker still accepting connections
runs the new config, so traffic follows the new weights from then on.

Process checks read /proc, so this module is Linux-only (like the machines it runs on).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cicd_dagster.locks import file_lock

# The router answers its config generation here, so apply() can tell when the new config
# is live. An exact-match location: only this one path is taken from the services.
GENERATION_PATH = "/__router"
# Debian puts nginx in /usr/sbin, which is not on a non-root user's PATH.
_SBIN_DIRS = "/usr/sbin:/usr/local/sbin"
_BACKEND_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# A version is written into the config as a quoted string: nothing that could end it.
_VERSION = re.compile(r"[A-Za-z0-9_.+:-]+")
# Paths are written into the config as quoted strings; these would end the string, escape
# a character or (in access_log) start a variable.
_UNSAFE_PATH_CHARS = re.compile(r'["\\$\x00-\x1f]')
_NGINX_COMMAND_TIMEOUT_S = 30.0
_LIVE_TIMEOUT_S = 15.0
_STOP_GRACE_S = 10.0
_POLL_INTERVAL_S = 0.05
_ERROR_LOG_TAIL_LINES = 20


class RouterError(Exception):
    """The router refused a configuration or nginx failed; the message carries nginx's
    own output (from `nginx -t`, its start, or its error log)."""


@dataclass(frozen=True)
class Backend:
    """One upstream: a slot of the service listening on 127.0.0.1:port.

    weight is 0..100, relative to the other backends; 0 keeps the backend out of the
    upstream (no traffic) while weights() still reports it. version, when given, is
    written into the access log beside every request the backend answered.
    """

    name: str
    port: int
    weight: int
    version: str = ""

    def __post_init__(self) -> None:
        # The name is written into the nginx config (as a comment) and the logs: keep
        # it to characters that cannot end a line or a directive.
        if not _BACKEND_NAME.fullmatch(self.name):
            raise RouterError(f"backend name {self.name!r} must match [A-Za-z0-9_.-]+")
        if not 1 <= self.port <= 65535:
            raise RouterError(f"backend {self.name}: port {self.port} is not in 1..65535")
        if not 0 <= self.weight <= 100:
            raise RouterError(f"backend {self.name}: weight {self.weight} is not in 0..100")
        if self.version and not _VERSION.fullmatch(self.version):
            raise RouterError(
                f"backend {self.name}: version {self.version!r} must match {_VERSION.pattern}"
            )


def find_nginx(name: str = "nginx") -> str | None:
    """The nginx executable: `name` on PATH, else in the sbin folders; None when absent."""
    return shutil.which(name) or shutil.which(name, path=_SBIN_DIRS)


def render_nginx_config(
    root: Path, listen_port: int, backends: Sequence[Backend], generation: int
) -> str:
    """The complete nginx.conf of a router; backends with weight 0 are left out."""
    active = [backend for backend in backends if backend.weight > 0]
    servers = "\n".join(
        # max_fails=0: nginx never takes a backend out on its own; health decisions belong
        # to the deploy strategy, which sets weights.
        f"        server 127.0.0.1:{backend.port} weight={backend.weight} max_fails=0;"
        f"  # {backend.name}"
        for backend in active
    )
    # The version of the backend that answered: the last address nginx tried.
    versions = "\n".join(
        f'        ~(^|[^0-9.])127[.]0[.]0[.]1:{backend.port}$ "{backend.version}";'
        for backend in active
        if backend.version
    )
    temp = root / "temp"
    # A root master drops its workers to `nobody`, which cannot enter a private (0700)
    # project home to write buffered bodies into the temp dirs. The worker runs as the
    # control plane's own user instead: it only ever listens on 127.0.0.1.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""# Written by cicd-dagster (router generation {generation}); edits are overwritten.
{user}daemon on;
worker_processes 1;
# Old workers left by a reload finish their in-flight requests, but not forever.
worker_shutdown_timeout 30s;
pid {_quoted(root / "nginx.pid")};
error_log {_quoted(root / "error.log")} warn;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {_quoted(temp / "client_body")};
    proxy_temp_path {_quoted(temp / "proxy")};
    fastcgi_temp_path {_quoted(temp / "fastcgi")};
    uwsgi_temp_path {_quoted(temp / "uwsgi")};
    scgi_temp_path {_quoted(temp / "scgi")};

    map $upstream_addr $cicd_backend_version {{
        default "";
{versions}
    }}

    # One JSON object a line; upstream_addr lists every backend tried for the request.
    log_format router escape=json '{{"time":"$time_iso8601","method":"$request_method",'
        '"uri":"$request_uri","status":$status,"request_time":$request_time,'
        '"upstream_addr":"$upstream_addr","upstream_status":"$upstream_status",'
        '"upstream_response_time":"$upstream_response_time","version":"$cicd_backend_version"}}';
    access_log {_quoted(root / "access.log")} router;

    upstream backends {{
{servers}
        keepalive 32;
    }}

    server {{
        listen 127.0.0.1:{listen_port};

        location = {GENERATION_PATH} {{
            access_log off;
            default_type text/plain;
            return 200 "{generation}\\n";
        }}

        location / {{
            proxy_pass http://backends;
            # HTTP/1.1 without "Connection: close" lets upstream connections be reused.
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            # A backend that is down (or overloaded, 502/503) costs a retry, not a failed
            # request: each backend in the pool gets one try.
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries {len(active)};
            # Backends are on loopback: a connect that takes this long is a dead backend.
            proxy_connect_timeout 2s;
        }}
    }}
}}
"""


class NginxRouter:
    """The router of one environment: nginx on 127.0.0.1:listen_port, state under root
    (e.g. home/routers/<repo>-<env>)."""

    def __init__(self, root: Path, listen_port: int, *, nginx: str = "nginx") -> None:
        if not 1 <= listen_port <= 65535:
            raise RouterError(f"router port {listen_port} is not in 1..65535")
        self.root = root.resolve()
        _quoted(self.root)  # fail now, not at the first apply()
        self.listen_port = listen_port
        self._nginx = nginx

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def config_path(self) -> Path:
        return self.root / "nginx.conf"

    @property
    def access_log_path(self) -> Path:
        """JSON lines: time, method, uri, status, request_time, upstream_addr (every
        backend tried, comma-separated), upstream_status, upstream_response_time, version
        (of the backend that answered; empty without one)."""
        return self.root / "access.log"

    @property
    def _state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def _pid_path(self) -> Path:
        return self.root / "nginx.pid"

    @property
    def _error_log_path(self) -> Path:
        return self.root / "error.log"

    def apply(self, backends: Sequence[Backend]) -> None:
        """Route traffic by `backends`' weights. On return, new requests follow them.

        A config that nginx rejects, or that fails to go live, raises RouterError and
        leaves the previous config serving (and on disk)."""
        _check_pool(backends)
        nginx = self._nginx_executable()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "temp").mkdir(exist_ok=True)
        with file_lock(self.root / "router.lock"):
            generation = self._read_state().get("generation", 0) + 1
            text = render_nginx_config(self.root, self.listen_port, backends, generation)
            previous = self.config_path.read_text() if self.config_path.exists() else None
            self._install_config(nginx, text)
            try:
                master = self._master_pid()
                if master is None:
                    self._start(nginx, generation)
                else:
                    self._reload(master, generation)
            except RouterError:
                # The file on disk stays what nginx runs (or would run on its next start).
                if previous is None:
                    self.config_path.unlink()
                else:
                    _write_atomically(self.config_path, previous)
                raise
            state = {"generation": generation, "backends": [asdict(b) for b in backends]}
            _write_atomically(self._state_path, json.dumps(state, indent=2) + "\n")

    def weights(self) -> dict[str, int]:
        """The weight of every backend of the last applied config (0 included)."""
        backends = self._read_state().get("backends", [])
        return {backend["name"]: backend["weight"] for backend in backends}

    def running(self) -> bool:
        return self._master_pid() is not None

    def stop(self) -> None:
        """Quit nginx gracefully (in-flight requests finish), kill it if it lingers.
        Idempotent; the config and state stay for the next apply()."""
        if not self.root.exists():
            return
        with file_lock(self.root / "router.lock"):
            master = self._master_pid()
            if master is None:
                return
            processes = [master, *_children(master)]
            with suppress(ProcessLookupError):
                os.kill(master, signal.SIGQUIT)
            if not _wait_until(lambda: not any(map(_alive, processes)), _STOP_GRACE_S):
                # Workers too: orphaned by a killed master they would keep serving.
                for pid in processes:
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                _wait_until(lambda: not any(map(_alive, processes)), _STOP_GRACE_S)
            self._pid_path.unlink(missing_ok=True)

    def _nginx_executable(self) -> str:
        executable = find_nginx(self._nginx)
        if executable is None:
            raise RouterError(f"nginx executable {self._nginx!r} not found (apt-get install nginx)")
        return executable

    def _command(self, nginx: str, config: Path, *extra: str) -> list[str]:
        # -e: nginx logs to its compiled-in error log until it has read the config;
        # point that at the router's own log too, not /var/log/nginx.
        return [
            nginx,
            "-p",
            f"{self.root}/",
            "-c",
            str(config),
            "-e",
            str(self._error_log_path),
            *extra,
        ]

    def _install_config(self, nginx: str, text: str) -> None:
        """Validate `text` with `nginx -t`, then make it the config by an atomic rename."""
        candidate = self.config_path.with_name("nginx.conf.next")
        candidate.write_text(text)
        tested = self._run(self._command(nginx, candidate, "-t", "-q"))
        if tested.returncode != 0:
            candidate.unlink()
            raise RouterError(f"nginx rejected the router config: {tested.stderr.strip()}")
        candidate.replace(self.config_path)

    def _start(self, nginx: str, generation: int) -> None:
        # nginx binds its port before it daemonizes: a taken port fails this command.
        started = self._run(self._command(nginx, self.config_path))
        if started.returncode != 0:
            raise RouterError(f"nginx did not start: {started.stderr.strip()}")
        self._wait_for_generation(generation)

    def _reload(self, master: int, generation: int) -> None:
        old_workers = _children(master)
        os.kill(master, signal.SIGHUP)
        self._wait_for_generation(generation)
        # A new worker answering is not enough: until an old worker has handled its QUIT
        # it may still accept a connection and route it by the old weights.
        if not _wait_until(
            lambda: not any(_accepting_worker_of(master, pid) for pid in old_workers),
            _LIVE_TIMEOUT_S,
        ):
            raise RouterError(f"old nginx workers kept accepting: {self._error_log_tail()}")

    def _wait_for_generation(self, generation: int) -> None:
        expected = str(generation)
        if not _wait_until(lambda: self._live_generation() == expected, _LIVE_TIMEOUT_S):
            raise RouterError(
                f"router config generation {generation} did not go live on {self.url}: "
                f"{self._error_log_tail()}"
            )

    def _live_generation(self) -> str | None:
        connection = http.client.HTTPConnection("127.0.0.1", self.listen_port, timeout=1.0)
        try:
            connection.request("GET", GENERATION_PATH)
            response = connection.getresponse()
            body = response.read().decode(errors="replace").strip()
            return body if response.status == 200 else None
        except (OSError, http.client.HTTPException):
            return None
        finally:
            connection.close()

    def _master_pid(self) -> int | None:
        """The pid of this router's running nginx master, if there is one."""
        try:
            pid = int(self._pid_path.read_text().strip())
        except (OSError, ValueError):
            return None
        # A stale pid file may name a pid reused by another process.
        if _alive(pid) and _cmdline(pid).startswith("nginx: master process"):
            return pid
        return None

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise RouterError(f"{self._state_path}: unreadable router state: {error}") from error
        return state if isinstance(state, dict) else {}

    def _error_log_tail(self) -> str:
        try:
            lines = self._error_log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no nginx error log)"
        return "\n".join(lines[-_ERROR_LOG_TAIL_LINES:]) or "(nginx error log is empty)"

    def _run(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=_NGINX_COMMAND_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise RouterError(f"{' '.join(command)}: {error}") from error


def _check_pool(backends: Sequence[Backend]) -> None:
    names = [backend.name for backend in backends]
    ports = [backend.port for backend in backends]
    if len(set(names)) != len(names):
        raise RouterError(f"backend names must be unique: {names}")
    if len(set(ports)) != len(ports):
        raise RouterError(f"backend ports must be unique: {ports}")
    if not any(backend.weight > 0 for backend in backends):
        raise RouterError("at least one backend must have a weight above 0")


def _quoted(path: Path) -> str:
    if _UNSAFE_PATH_CHARS.search(str(path)):
        raise RouterError(f"router path {str(path)!r} contains a quote, backslash, $ or control")
    return f'"{path}"'


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL_S)
    return True


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from the state field on (the command name may contain spaces)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    # A daemon's exited master may linger as a zombie if nothing reaps it: that is gone.
    return fields is not None and fields[0] not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace").replace("\0", " ")
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None and fields[1] == str(pid):
                children.append(int(entry.name))
    return children


def _accepting_worker_of(master: int, pid: int) -> bool:
    """Whether `pid` is still a worker of `master` that takes new connections: nginx
    retitles a worker "shutting down" when it closes its listening sockets."""
    fields = _stat_fields(pid)
    return (
        fields is not None
        and fields[0] not in ("Z", "X")
        and fields[1] == str(master)
        and "shutting down" not in _cmdline(pid)
    )
