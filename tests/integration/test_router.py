"""The nginx router for real: a real nginx in front of real HTTP backends on 127.0.0.1.

Without nginx these tests skip, except under CICD_REQUIRE_NGINX=1 (CI), where a missing
nginx must not pass silently (.ci/install-nginx.sh installs it).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cicd_dagster.deploy import router as router_module
from cicd_dagster.deploy.router import Backend, NginxRouter, RouterError
from tests.support import REQUEST_TIMEOUT_S, TrafficProbe, http_get

SLOW_ANSWER_S = 1.0


class NameServer:
    """A backend answering its own name, with status 200, on every path; /slow answers
    after SLOW_ANSWER_S, setting `slow_request_arrived` when the request comes in."""

    def __init__(self, name: str) -> None:
        body = name.encode()
        self.slow_request_arrived = threading.Event()
        slow_request_arrived = self.slow_request_arrived

        class AnswerName(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/slow":
                    slow_request_arrived.set()
                    time.sleep(SLOW_ANSWER_S)
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep the test output for failures

        self.name = name
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), AnswerName)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        self._stopped = False

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def backend(self, weight: int) -> Backend:
        return Backend(self.name, self.port, weight)

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._server.shutdown()
            self._server.server_close()
            self._thread.join()


def answers(url: str, count: int) -> Counter[str]:
    return Counter(http_get(url) for _ in range(count))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (nothing may reap a daemon's master)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if fields[1] == str(pid):
                found.append(int(entry.name))
    return found


@pytest.fixture
def blue() -> Iterator[NameServer]:
    server = NameServer("blue")
    yield server
    server.stop()


@pytest.fixture
def green() -> Iterator[NameServer]:
    server = NameServer("green")
    yield server
    server.stop()


@pytest.fixture
def router(tmp_path: Path, nginx: str) -> Iterator[NginxRouter]:
    router = NginxRouter(tmp_path / "routers" / "shop-api-prod", free_port(), nginx=nginx)
    yield router
    router.stop()


def test_routes_everything_to_the_only_backend(router: NginxRouter, blue: NameServer) -> None:
    router.apply([blue.backend(100)])

    assert router.running()
    assert answers(router.url + "/any/path?q=1", 20) == Counter({"blue": 20})
    assert router.weights() == {"blue": 100}


def test_switching_versions_drops_no_request(
    router: NginxRouter, blue: NameServer, green: NameServer
) -> None:
    router.apply([blue.backend(100), green.backend(0)])
    probe = TrafficProbe(router.url)
    probe.start()
    try:
        for live, idle in ((green, blue), (blue, green)):
            time.sleep(0.5)
            router.apply([live.backend(100), idle.backend(0)])
        time.sleep(0.5)
    finally:
        probe.finish()

    assert probe.failures == []
    assert set(probe.answers) == {"blue", "green"}
    assert probe.answers[-1] == "blue"
    assert router.weights() == {"blue": 100, "green": 0}


def test_a_switch_lets_in_flight_requests_finish(
    router: NginxRouter, blue: NameServer, green: NameServer
) -> None:
    router.apply([blue.backend(100), green.backend(0)])
    in_flight: list[str] = []
    request = threading.Thread(target=lambda: in_flight.append(http_get(router.url + "/slow")))
    request.start()
    assert blue.slow_request_arrived.wait(REQUEST_TIMEOUT_S)

    router.apply([green.backend(100), blue.backend(0)])
    assert http_get(router.url) == "green"
    request.join()

    assert in_flight == ["blue"]


def test_canary_weights_split_traffic_and_zero_removes_it(
    router: NginxRouter, blue: NameServer, green: NameServer
) -> None:
    router.apply([blue.backend(90), green.backend(10)])
    canary_share = answers(router.url, 400)["green"] / 400
    assert 0.03 <= canary_share <= 0.25, canary_share
    assert router.weights() == {"blue": 90, "green": 10}

    router.apply([blue.backend(90), green.backend(0)])
    assert answers(router.url, 100) == Counter({"blue": 100})
    assert router.weights() == {"blue": 90, "green": 0}


@pytest.mark.parametrize(
    ("name", "port", "weight"),
    [("blue", 0, 100), ("blue", 70000, 100), ("blue;return 200 pwned", 8000, 100), ("b", 1, 101)],
)
def test_invalid_backends_are_refused(name: str, port: int, weight: int) -> None:
    with pytest.raises(RouterError):
        Backend(name, port, weight)


def test_a_pool_without_traffic_is_refused(router: NginxRouter, blue: NameServer) -> None:
    with pytest.raises(RouterError, match="weight above 0"):
        router.apply([blue.backend(0)])
    assert not router.running()


def test_a_config_nginx_rejects_keeps_the_previous_routing(
    router: NginxRouter,
    blue: NameServer,
    green: NameServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    router.apply([blue.backend(100)])
    serving_config = router.config_path.read_bytes()
    render = router_module.render_nginx_config
    monkeypatch.setattr(
        router_module,
        "render_nginx_config",
        lambda *args: render(*args).replace("proxy_pass", "proxy_passs"),
    )

    with pytest.raises(RouterError, match='unknown directive "proxy_passs"'):
        router.apply([green.backend(100)])

    assert router.config_path.read_bytes() == serving_config
    assert router.weights() == {"blue": 100}
    assert answers(router.url, 10) == Counter({"blue": 10})


def test_a_taken_port_is_reported_and_nothing_runs(router: NginxRouter, blue: NameServer) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", router.listen_port))
        squatter.listen()
        with pytest.raises(RouterError, match="Address already in use"):
            router.apply([blue.backend(100)])

    assert not router.running()
    assert not router.config_path.exists()
    assert router.weights() == {}


def test_a_dead_backend_costs_a_retry_not_a_failure(
    router: NginxRouter, blue: NameServer, green: NameServer
) -> None:
    router.apply([blue.backend(50), green.backend(50)])
    green.stop()

    assert answers(router.url, 50) == Counter({"blue": 50})
    # nginx did send requests to the dead backend and went on to the next one.
    tried = [json.loads(line)["upstream_addr"] for line in router.access_log_path.open()]
    assert any(f"127.0.0.1:{green.port}, 127.0.0.1:{blue.port}" in addr for addr in tried)


def test_stop_leaves_no_nginx_process(router: NginxRouter, blue: NameServer) -> None:
    router.apply([blue.backend(100)])
    master = int((router.root / "nginx.pid").read_text())
    processes = [master, *children(master)]
    assert len(processes) >= 2, "expected a master and a worker"

    router.stop()

    assert not any(alive(pid) for pid in processes)
    assert not router.running()
    with pytest.raises(urllib.error.URLError):
        http_get(router.url)
    router.stop()  # idempotent
