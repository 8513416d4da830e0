"""HTTP health verification: is a freshly deployed service answering, and how fast?

A deployment counts only after `success_threshold` consecutive 2xx answers, so a service
that answers once and then falls over is not taken for healthy. Probes use http.client
directly: no proxy from the environment and no redirect following, because a probe of
127.0.0.1 must reach the service itself and judge its own answer.
"""

from __future__ import annotations

import http.client
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

# Enough of the body to complete the exchange; a health page is not worth reading whole.
_MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class ProbeConfig:
    path: str = "/healthz"
    timeout_s: float = 2.0  # per socket operation (connect, send, each read)
    interval_s: float = 0.5
    max_attempts: int = 60
    success_threshold: int = 3

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.interval_s < 0:
            raise ValueError("probe timeout_s must be > 0 and interval_s >= 0")
        if not 1 <= self.success_threshold <= self.max_attempts:
            raise ValueError(
                f"probe success_threshold ({self.success_threshold}) must be between 1 and "
                f"max_attempts ({self.max_attempts})"
            )


@dataclass(frozen=True)
class Probe:
    ok: bool
    status: int | None  # None when no HTTP answer came back
    latency_ms: float
    error: str | None


@dataclass(frozen=True)
class HealthResult:
    healthy: bool
    attempts: int
    probes: list[Probe]
    reason: str

    @property
    def latency_p50_ms(self) -> float | None:
        return _percentile([p.latency_ms for p in self.probes if p.ok], 50)

    @property
    def latency_p95_ms(self) -> float | None:
        return _percentile([p.latency_ms for p in self.probes if p.ok], 95)


def probe(url: str, timeout_s: float) -> Probe:
    """One GET of `url`: ok on a 2xx answer; any failure becomes a short error text."""
    started = time.perf_counter()
    status: int | None = None
    error: str | None = None
    try:
        status = _get_status(url, timeout_s)
        if not 200 <= status < 300:
            error = f"HTTP {status}"
    except ConnectionRefusedError:
        error = "connection refused"
    except TimeoutError:
        error = f"timed out after {timeout_s:g}s"
    except http.client.HTTPException as exc:
        error = f"bad HTTP response: {type(exc).__name__}"
    except (OSError, ValueError) as exc:  # unreachable host, reset connection, bad URL
        error = str(exc) or type(exc).__name__
    latency_ms = (time.perf_counter() - started) * 1000
    return Probe(ok=error is None, status=status, latency_ms=latency_ms, error=error)


def wait_healthy(
    base_url: str,
    config: ProbeConfig,
    *,
    stop: Callable[[], bool] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> HealthResult:
    """Probe `base_url` + config.path until success_threshold consecutive probes are ok,
    or max_attempts have been made, or `stop()` says to give up (the process died, say)."""
    url = base_url.rstrip("/") + "/" + config.path.lstrip("/")
    probes: list[Probe] = []
    consecutive_ok = 0
    for attempt in range(1, config.max_attempts + 1):
        if stop is not None and stop():
            return HealthResult(
                False,
                len(probes),
                probes,
                f"stopped by caller after {_attempts(len(probes))}{_last_error(probes)}",
            )
        result = probe(url, config.timeout_s)
        probes.append(result)
        consecutive_ok = consecutive_ok + 1 if result.ok else 0
        if consecutive_ok >= config.success_threshold:
            return HealthResult(
                True,
                attempt,
                probes,
                f"{consecutive_ok} consecutive 2xx after {_attempts(attempt)}",
            )
        if attempt < config.max_attempts:
            sleep(config.interval_s)
    if consecutive_ok:  # the attempts ran out in the middle of a healthy streak
        detail = f"only {consecutive_ok} of {config.success_threshold} consecutive 2xx"
    else:
        detail = f"last error {probes[-1].error}"
    return HealthResult(
        False, len(probes), probes, f"never healthy: {detail} after {_attempts(len(probes))}"
    )


def _get_status(url: str, timeout_s: float) -> int:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    connection_class = (
        http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    )
    connection = connection_class(parts.hostname, parts.port, timeout=timeout_s)
    try:
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        connection.request("GET", target, headers={"Connection": "close"})
        response = connection.getresponse()
        response.read(_MAX_BODY_BYTES)
        return response.status
    finally:
        connection.close()


def _percentile(values: list[float], percent: float) -> float | None:
    # Nearest rank: always a latency that was actually measured.
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]


def _attempts(count: int) -> str:
    return f"{count} attempt{'' if count == 1 else 's'}"


def _last_error(probes: list[Probe]) -> str:
    errors = [p.error for p in probes if p.error]
    return f" (last error {errors[-1]})" if errors else ""
