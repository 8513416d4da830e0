"""The local deploy target with real processes: LocalSupervisor, its supervisor process,
and a tiny HTTP service verified with wait_healthy."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from cicd_dagster.deploy.health import ProbeConfig, wait_healthy
from cicd_dagster.deploy.local import LocalSupervisor, free_port
from cicd_dagster.deploy.target import ServiceSpec, ServiceState, SupervisorError
from tests.support import eventually

SERVICE = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        status = 200 if self.path == "/healthz" else 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):
        pass

print("serving on port", os.environ["PORT"], flush=True)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Health).serve_forever()
"""
SERVE = f"exec {shlex.quote(sys.executable)} service.py"
PROBES = ProbeConfig(timeout_s=1.0, interval_s=0.02, max_attempts=250, success_threshold=2)


def process_is_running(pid: int) -> bool:
    # A killed process stays a zombie until its parent reaps it: that is not running.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def recorded_pids(state_dir: Path) -> set[int]:
    """Every pid any state file names, dead or alive."""
    pids = set()
    for path in state_dir.glob("*.json"):
        data = json.loads(path.read_text())
        pids |= {pid for pid in (data["pid"], data["child_pid"]) if pid}
    return pids


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "service.py").write_text(SERVICE)
    return folder


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[LocalSupervisor]:
    """A LocalSupervisor whose slots are all stopped after the test, and any process they
    left killed."""
    local = LocalSupervisor(tmp_path / "services")
    yield local
    if not local.state_dir.exists():
        return
    pids = recorded_pids(local.state_dir)
    for state in local.all():
        local.stop(state.name, timeout_s=5)
    for pid in pids | recorded_pids(local.state_dir):
        if process_is_running(pid):
            with suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)


def spec(
    service_dir: Path, name: str = "shop-api.staging.blue", **overrides: object
) -> ServiceSpec:
    settings: dict[str, object] = {
        "name": name,
        "command": SERVE,
        "cwd": service_dir,
        "env": {"PATH": os.environ["PATH"]},
        "port": free_port(),
        "max_restarts": 3,
        "backoff_s": 0.05,
        **overrides,
    }
    return ServiceSpec(**settings)  # type: ignore[arg-type]


def healthy(state: ServiceState) -> bool:
    return wait_healthy(f"http://127.0.0.1:{state.port}", PROBES).healthy


# --- starting and serving ----------------------------------------------------------------


def test_started_service_is_healthy_in_a_detached_session(
    supervisor: LocalSupervisor, service_dir: Path
) -> None:
    state = supervisor.start(spec(service_dir))
    assert state.status in ("starting", "running")
    assert healthy(state)
    assert state.pid is not None
    running = eventually(lambda: supervisor.status(state.name))
    assert running.status == "running" and running.restarts == 0
    assert running.pid is not None and running.child_pid is not None
    # The supervisor leads a session of its own, and is not this process's child.
    assert os.getsid(running.pid) == running.pid != os.getsid(0)
    assert os.getpgid(running.pid) != os.getpgid(0)
    assert parent_of(running.pid) != os.getpid()
    # The service leads its own process group, apart from the supervisor's.
    assert os.getpgid(running.child_pid) == running.child_pid != running.pid
    assert "serving on port" in supervisor.log_tail(state.name)


def test_service_outlives_the_process_that_deployed_it(
    supervisor: LocalSupervisor, service_dir: Path, tmp_path: Path
) -> None:
    # As when a Dagster run process ends, or is killed with its whole process group.
    slot = spec(service_dir)
    slot_file = tmp_path / "slot.json"
    slot_file.write_text(json.dumps(slot.to_json()))
    deployer_script = textwrap.dedent("""
        import json, sys, time
        from pathlib import Path
        from cicd_dagster.deploy.local import LocalSupervisor
        from cicd_dagster.deploy.target import ServiceSpec
        slot = ServiceSpec.from_json(json.loads(Path(sys.argv[1]).read_text()))
        LocalSupervisor(Path(sys.argv[2])).start(slot)
        print("started", flush=True)
        time.sleep(60)
    """)
    deployer = subprocess.Popen(
        [sys.executable, "-c", deployer_script, str(slot_file), str(supervisor.state_dir)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert deployer.stdout is not None
        assert deployer.stdout.readline().strip() == "started"
    finally:
        os.killpg(deployer.pid, signal.SIGKILL)
        deployer.wait()
    state = supervisor.status(slot.name)
    assert state is not None
    assert healthy(state)
    assert eventually(lambda: supervisor.status(slot.name)).status == "running"


def test_killed_service_is_restarted_and_healthy_again(
    supervisor: LocalSupervisor, service_dir: Path
) -> None:
    state = supervisor.start(spec(service_dir))
    assert healthy(state)
    first = eventually(lambda: supervisor.status(state.name))
    assert first.child_pid is not None
    os.kill(first.child_pid, signal.SIGKILL)

    def restarted() -> ServiceState | None:
        now = supervisor.status(state.name)
        return now if now and now.restarts == 1 and now.status == "running" else None

    again = eventually(restarted)
    assert again.child_pid not in (None, first.child_pid)
    assert again.pid == first.pid
    assert again.exit_code == 128 + signal.SIGKILL
    assert healthy(again)


def test_service_that_keeps_exiting_ends_crashed_with_its_log(
    supervisor: LocalSupervisor, service_dir: Path
) -> None:
    command = "echo booting; echo 'fatal: no config' >&2; exit 3"
    state = supervisor.start(spec(service_dir, command=command, max_restarts=2, backoff_s=0.01))

    def crashed() -> ServiceState | None:
        now = supervisor.status(state.name)
        return now if now and now.status == "crashed" else None

    final = eventually(crashed)
    assert (final.restarts, final.exit_code, final.child_pid) == (2, 3, None)
    # The supervisor gave up and leaves.
    eventually(lambda: (now := supervisor.status(state.name)) and now.pid is None)
    tail = supervisor.log_tail(state.name)
    assert tail.count("fatal: no config") == 3  # the first run and two restarts
    assert "giving up after 2 restarts" in tail


# --- refusals ----------------------------------------------------------------------------


def test_port_already_taken_is_refused_and_nothing_starts(
    supervisor: LocalSupervisor, service_dir: Path
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(SupervisorError, match=f"port {port} on 127.0.0.1 is already in use"):
            supervisor.start(spec(service_dir, port=port))
    assert supervisor.all() == []
    assert not list(supervisor.state_dir.glob("*.log"))


def test_port_of_another_active_slot_is_refused(
    supervisor: LocalSupervisor, service_dir: Path
) -> None:
    # Even while that slot's service is down between restarts and holds no socket.
    blue = supervisor.start(spec(service_dir, command="exit 1", backoff_s=5.0))
    eventually(lambda: (s := supervisor.status(blue.name)) and s.status == "restarting")
    with pytest.raises(SupervisorError, match=f"port {blue.port} is already allocated to slot"):
        supervisor.start(spec(service_dir, name="shop-api.staging.green", port=blue.port))


def test_starting_a_running_slot_again_is_refused(
    supervisor: LocalSupervisor, service_dir: Path
) -> None:
    state = supervisor.start(spec(service_dir))
    with pytest.raises(SupervisorError, match=r"slot shop-api\.staging\.blue is already"):
        supervisor.start(spec(service_dir))
    assert healthy(state)
    assert eventually(lambda: supervisor.status(state.name)).pid == state.pid


def test_slot_names_that_are_not_plain_file_names_are_refused(service_dir: Path) -> None:
    for name in ["../escape", "a/b", "", "blue green"]:
        with pytest.raises(ValueError, match="may only contain"):
            spec(service_dir, name=name)


# --- stopping ----------------------------------------------------------------------------


def test_stop_leaves_no_process_of_the_slot_alive(
    supervisor: LocalSupervisor, service_dir: Path
) -> None:
    # The service puts a helper in the background: it must go too.
    command = f"sleep 300 & echo $! > helper.pid; {SERVE}"
    state = supervisor.start(spec(service_dir, command=command))
    assert healthy(state)
    running = eventually(lambda: supervisor.status(state.name))
    helper = int((service_dir / "helper.pid").read_text())
    pids = [running.pid, running.child_pid, helper]
    assert all(pid is not None and process_is_running(pid) for pid in pids)

    supervisor.stop(state.name)

    assert not [pid for pid in pids if pid is not None and process_is_running(pid)]
    stopped = supervisor.status(state.name)
    assert stopped is not None
    assert (stopped.status, stopped.pid, stopped.child_pid) == ("stopped", None, None)
    assert "stopped" in supervisor.log_tail(state.name)


def test_stop_kills_a_service_that_ignores_sigterm(
    supervisor: LocalSupervisor, service_dir: Path
) -> None:
    # The supervisor is still waiting out its grace period when stop's timeout ends:
    # stop kills both process groups itself.
    state = supervisor.start(spec(service_dir, command=f"trap '' TERM; {SERVE}"))
    assert healthy(state)
    running = eventually(lambda: supervisor.status(state.name))
    supervisor.stop(state.name, timeout_s=0.5)
    assert not process_is_running(running.pid or 0)
    assert not process_is_running(running.child_pid or 0)
    assert eventually(lambda: supervisor.status(state.name)).status == "stopped"


def test_slot_whose_supervisor_died_is_crashed_and_stop_cleans_up(
    supervisor: LocalSupervisor, service_dir: Path
) -> None:
    state = supervisor.start(spec(service_dir))
    assert healthy(state)
    running = eventually(lambda: supervisor.status(state.name))
    assert running.pid is not None and running.child_pid is not None
    os.kill(running.pid, signal.SIGKILL)
    eventually(lambda: not process_is_running(running.pid or 0))

    orphaned = supervisor.status(state.name)
    assert orphaned is not None
    assert (orphaned.status, orphaned.pid, orphaned.child_pid) == (
        "crashed",
        None,
        running.child_pid,
    )
    with pytest.raises(SupervisorError, match="lost its supervisor"):
        supervisor.start(spec(service_dir))

    supervisor.stop(state.name)
    assert not process_is_running(running.child_pid)
    assert eventually(lambda: supervisor.status(state.name)).status == "stopped"


def test_stop_is_idempotent_and_the_slot_can_start_again(
    supervisor: LocalSupervisor, service_dir: Path
) -> None:
    supervisor.stop("never-started")
    slot = spec(service_dir)
    supervisor.start(slot)
    supervisor.stop(slot.name)
    supervisor.stop(slot.name)
    again = supervisor.start(slot)
    assert healthy(again)
    assert [s.name for s in supervisor.all()] == [slot.name]


# --- what the service gets ---------------------------------------------------------------


def test_hostile_env_value_is_never_executed(
    supervisor: LocalSupervisor, service_dir: Path
) -> None:
    hostile = "$(touch PWNED); `touch PWNED`"
    command = f'echo "quoted=$BRANCH"; echo unquoted=$BRANCH; {SERVE}'
    slot = spec(service_dir, command=command, env={"PATH": os.environ["PATH"], "BRANCH": hostile})
    assert healthy(supervisor.start(slot))
    assert not list(service_dir.parent.rglob("PWNED"))
    assert f"quoted={hostile}" in supervisor.log_tail(slot.name)


def test_service_gets_exactly_its_env_plus_port(
    supervisor: LocalSupervisor, service_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CICD_CONTROL_PLANE_SECRET", "not-for-services")
    command = f"env > seen.env; {SERVE}"
    slot = spec(service_dir, command=command, env={"PATH": os.environ["PATH"], "APP_MODE": "x"})
    assert healthy(supervisor.start(slot))
    seen = dict(line.split("=", 1) for line in (service_dir / "seen.env").read_text().splitlines())
    assert seen["PORT"] == str(slot.port)
    assert seen["APP_MODE"] == "x"
    assert "CICD_CONTROL_PLANE_SECRET" not in seen
    # The spec, env included, is not left on disk once the supervisor has read it.
    assert not list(supervisor.state_dir.glob("*.spec"))
