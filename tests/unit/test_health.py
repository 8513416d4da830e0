"""cicd_dagster.deploy.health against a real HTTP server whose answers each test scripts."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cicd_dagster.deploy.health import HealthResult, Probe, ProbeConfig, probe, wait_healthy


@dataclass(frozen=True)
class Answer:
    status: int = 200
    delay_s: float = 0.0  # how long the server waits before answering


Script = Callable[[int], Answer]  # request number (1 for the first) -> the answer to give


class ScriptedServer:
    """An HTTP server on 127.0.0.1 answering request n with script(n); records paths."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.paths: list[str] = []
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.paths.append(self.path)
                    answer = owner.script(len(owner.paths))
                time.sleep(answer.delay_s)
                body = b"ok" if 200 <= answer.status < 300 else b"not ok"
                self.send_response(answer.status)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Location", "/elsewhere")
                self.end_headers()
                # A probe that timed out has hung up: nothing to answer.
                with suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True  # a deliberately slow answer must not block close
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # A short poll interval: shutdown() waits for the serving loop to notice it.
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


@pytest.fixture
def serve() -> Iterator[Callable[[Script], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(script: Script) -> ScriptedServer:
        servers.append(ScriptedServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def no_sleep(seconds: float) -> None:
    pass


def fast(**overrides: object) -> ProbeConfig:
    settings: dict[str, object] = {"timeout_s": 2.0, "interval_s": 0.0, "max_attempts": 10}
    return ProbeConfig(**{**settings, **overrides})  # type: ignore[arg-type]


def always(status: int) -> Script:
    return lambda n: Answer(status)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- one probe ---------------------------------------------------------------------------


def test_probe_of_a_2xx_answer_is_ok(serve: Callable[[Script], ScriptedServer]) -> None:
    server = serve(always(204))
    result = probe(server.url + "/healthz", timeout_s=2.0)
    assert (result.ok, result.status, result.error) == (True, 204, None)
    assert result.latency_ms > 0


@pytest.mark.parametrize("status", [500, 404, 302])
def test_probe_of_a_non_2xx_answer_fails_with_the_status(
    serve: Callable[[Script], ScriptedServer], status: int
) -> None:
    # A redirect is not followed: the service itself must say it is healthy.
    server = serve(always(status))
    result = probe(server.url + "/healthz", timeout_s=2.0)
    assert (result.ok, result.status, result.error) == (False, status, f"HTTP {status}")
    assert server.paths == ["/healthz"]


def test_probe_of_a_closed_port_is_connection_refused() -> None:
    result = probe(f"http://127.0.0.1:{closed_port()}/healthz", timeout_s=2.0)
    assert (result.ok, result.status, result.error) == (False, None, "connection refused")


def test_probe_answered_after_its_timeout_fails(serve: Callable[[Script], ScriptedServer]) -> None:
    server = serve(lambda n: Answer(200, delay_s=1.0))
    result = probe(server.url + "/healthz", timeout_s=0.05)
    assert (result.ok, result.status, result.error) == (False, None, "timed out after 0.05s")


def test_probe_of_a_malformed_url_fails_instead_of_raising() -> None:
    result = probe("ftp://127.0.0.1/healthz", timeout_s=1.0)
    assert result.ok is False
    assert result.error is not None and "not an http(s) URL" in result.error


# --- waiting for health ------------------------------------------------------------------


def test_healthy_service_passes_after_threshold_probes(
    serve: Callable[[Script], ScriptedServer],
) -> None:
    server = serve(always(200))
    result = wait_healthy(server.url + "/", fast(path="healthz"), sleep=no_sleep)
    assert result.healthy
    assert (result.attempts, len(result.probes)) == (3, 3)
    assert result.reason == "3 consecutive 2xx after 3 attempts"
    assert server.paths == ["/healthz"] * 3
    assert result.latency_p50_ms is not None and result.latency_p95_ms is not None
    assert result.latency_p50_ms <= result.latency_p95_ms


def test_service_that_becomes_healthy_after_some_requests(
    serve: Callable[[Script], ScriptedServer],
) -> None:
    server = serve(lambda n: Answer(503 if n <= 4 else 200))
    result = wait_healthy(server.url, fast(), sleep=no_sleep)
    assert result.healthy
    assert result.attempts == 7
    assert [p.status for p in result.probes] == [503] * 4 + [200] * 3
    assert result.reason == "3 consecutive 2xx after 7 attempts"


def test_service_answering_500_is_never_healthy(serve: Callable[[Script], ScriptedServer]) -> None:
    server = serve(always(500))
    result = wait_healthy(server.url, fast(max_attempts=5), sleep=no_sleep)
    assert not result.healthy
    assert result.attempts == 5
    assert result.reason == "never healthy: last error HTTP 500 after 5 attempts"
    assert (result.latency_p50_ms, result.latency_p95_ms) == (None, None)


def test_flapping_service_needs_consecutive_successes(
    serve: Callable[[Script], ScriptedServer],
) -> None:
    # ok ok fail ok ok ok: four successes by the fifth request, but not three in a row.
    pattern = [200, 200, 500, 200, 200, 200]
    server = serve(lambda n: Answer(pattern[n - 1]))
    result = wait_healthy(server.url, fast(), sleep=no_sleep)
    assert result.healthy
    assert result.attempts == 6


def test_service_alternating_ok_and_fail_is_never_healthy(
    serve: Callable[[Script], ScriptedServer],
) -> None:
    server = serve(lambda n: Answer(200 if n % 2 else 500))
    result = wait_healthy(server.url, fast(success_threshold=2, max_attempts=8), sleep=no_sleep)
    assert not result.healthy
    assert result.attempts == 8
    assert result.reason == "never healthy: last error HTTP 500 after 8 attempts"
    assert result.latency_p50_ms is not None  # the ok probes are still measured


def test_attempts_running_out_mid_streak_say_so(
    serve: Callable[[Script], ScriptedServer],
) -> None:
    server = serve(lambda n: Answer(500 if n <= 2 else 200))
    result = wait_healthy(server.url, fast(max_attempts=4), sleep=no_sleep)
    assert not result.healthy
    assert result.reason == "never healthy: only 2 of 3 consecutive 2xx after 4 attempts"


def test_slow_service_is_not_healthy(serve: Callable[[Script], ScriptedServer]) -> None:
    server = serve(lambda n: Answer(200, delay_s=1.0))
    result = wait_healthy(
        server.url, fast(timeout_s=0.05, max_attempts=2, success_threshold=1), sleep=no_sleep
    )
    assert not result.healthy
    assert result.reason == "never healthy: last error timed out after 0.05s after 2 attempts"


def test_closed_port_is_never_healthy() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = wait_healthy(url, fast(max_attempts=3), sleep=no_sleep)
    assert not result.healthy
    assert result.reason == "never healthy: last error connection refused after 3 attempts"


def test_waits_the_interval_between_attempts_only(
    serve: Callable[[Script], ScriptedServer],
) -> None:
    server = serve(always(500))
    pauses: list[float] = []
    wait_healthy(server.url, fast(interval_s=0.25, max_attempts=4), sleep=pauses.append)
    assert pauses == [0.25, 0.25, 0.25]


def test_stop_aborts_waiting_with_the_reason(serve: Callable[[Script], ScriptedServer]) -> None:
    server = serve(always(500))
    checks = iter([False, False, True])
    result = wait_healthy(server.url, fast(), stop=lambda: next(checks), sleep=no_sleep)
    assert not result.healthy
    assert result.attempts == 2
    assert result.reason == "stopped by caller after 2 attempts (last error HTTP 500)"
    assert len(server.paths) == 2


# --- configuration and statistics --------------------------------------------------------


def test_threshold_above_max_attempts_is_refused() -> None:
    with pytest.raises(ValueError, match="success_threshold"):
        ProbeConfig(success_threshold=5, max_attempts=4)


def test_latency_percentiles_use_ok_probes_by_nearest_rank() -> None:
    probes = [Probe(True, 200, float(ms), None) for ms in range(1, 21)]
    probes.append(Probe(False, None, 5000.0, "timed out after 2s"))
    result = HealthResult(True, len(probes), probes, "")
    assert (result.latency_p50_ms, result.latency_p95_ms) == (10.0, 19.0)
