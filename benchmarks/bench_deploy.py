"""(d) A blue-green deploy and a rollback through the engine, against the same by hand.

A small HTTP service (stdlib http.server, answering its version on every path, /healthz
included) goes from v1 to v2 and back behind nginx, two ways:

- the engine: `Environment.deploy(v2, blue_green)` on a LocalSupervisor target with an
  NginxRouter, then `Environment.rollback(v1)` while v1 still runs at weight 0 (the
  rollback window);
- by hand, a bash script: start v2 with its PORT, poll /healthz with curl until it answers
  success_threshold times in a row (the engine's interval between polls), rewrite the
  nginx upstream, `nginx -t`, `nginx -s reload`, then curl the router until it answers
  v2; the rollback is the upstream rewrite, `nginx -t`, reload and curl for v1.

Each run starts from v1 deployed the same way (untimed) in a fresh environment. Both
sides get the same probe settings (verify's defaults of cicd.yaml unless overridden).
During every timed deploy and rollback a separate process sends sequential GETs through
the router (tests.support.TrafficProbe) and counts failed requests, expected 0. One
untimed warm-up run of each side comes first; then N runs each, alternating which side
goes first. The figures are medians and median(engine) / median(by hand).

    .venv/bin/python benchmarks/bench_deploy.py [--runs 3] [--interval 0.5] [--success-threshold 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from _common import (
    PYTHON,
    ROOT,
    loadavg,
    median,
    metadata,
    print_table,
    scratch_dir,
    timed_run,
    write_results,
)

from cicd_dagster.config import StrategyConfig, VerifyConfig
from cicd_dagster.deploy.health import ProbeConfig
from cicd_dagster.deploy.local import LocalSupervisor, free_port
from cicd_dagster.deploy.router import NginxRouter, find_nginx
from cicd_dagster.deploy.strategies import DeployOutcome, Environment, Release

# tests/ is not an installed package: the tests' tear-down (and TrafficProbe, in the traffic
# process) come from the project root.
sys.path.append(str(ROOT))
from tests.support import tear_down

T = TypeVar("T")

SERVICE = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = os.environ["VERSION"].encode()

class Service(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(VERSION)))
        self.end_headers()
        self.wfile.write(VERSION)

    def log_message(self, format, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Service).serve_forever()
"""

# The by-hand router: nginx with the proxy settings of the engine's router (keepalive
# upstream connections, a retry on a dead backend), the upstream in a file of its own.
HAND_NGINX_CONFIG = """\
{user}daemon on;
worker_processes 1;
pid "{root}/nginx.pid";
error_log "{root}/error.log" warn;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path "{root}/temp/client_body";
    proxy_temp_path "{root}/temp/proxy";
    fastcgi_temp_path "{root}/temp/fastcgi";
    uwsgi_temp_path "{root}/temp/uwsgi";
    scgi_temp_path "{root}/temp/scgi";
    access_log off;
    upstream app {{
        include "{root}/upstream.conf";
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502 http_503;
            proxy_connect_timeout 2s;
        }}
    }}
}}
"""

HAND_SCRIPT = r"""#!/usr/bin/env bash
# A blue-green deploy by hand.
# usage: hand.sh deploy VERSION PORT   start VERSION on PORT, wait until healthy, switch to it
#        hand.sh switch VERSION PORT   point the router at PORT, where VERSION already runs
# env: WORK (holds app/ and router/), PYTHON, NGINX_BIN, ROUTER_PORT, THRESHOLD, INTERVAL,
#      TIMEOUT, MAX_ATTEMPTS. Prints "<phase> <epoch seconds>" lines.
set -euo pipefail
mode=$1 version=$2 port=$3
cd "$WORK"
stamp() { echo "$1 $(date +%s.%N)"; }
r=$WORK/router
# (not $NGINX: nginx reads that variable itself, as inherited sockets)
nginx_() { "$NGINX_BIN" -p "$r/" -c "$r/nginx.conf" -e "$r/error.log" "$@"; }
get() { curl --noproxy '*' -fsS --max-time "$TIMEOUT" "$@"; }
stamp start
if [ "$mode" = deploy ]; then
    PORT=$port VERSION=$version "$PYTHON" app/service.py >> "logs/$version.log" 2>&1 &
    echo $! >> pids
    ok=0
    for ((attempt = 1; attempt <= MAX_ATTEMPTS; attempt++)); do
        if get -o /dev/null "http://127.0.0.1:$port/healthz" 2>/dev/null; then
            ok=$((ok + 1))
            [ "$ok" -ge "$THRESHOLD" ] && break
        else
            ok=0
        fi
        sleep "$INTERVAL"
    done
    [ "$ok" -ge "$THRESHOLD" ] || { echo "$version never healthy on $port" >&2; exit 1; }
    stamp healthy
fi
echo "server 127.0.0.1:$port max_fails=0;  # $version" > router/upstream.conf
nginx_ -t -q
if [ -s router/nginx.pid ] && kill -0 "$(cat router/nginx.pid)" 2>/dev/null; then
    nginx_ -s reload
else
    nginx_
fi
stamp switched
# Through the router until it answers the new version: old workers may take a request
# or two until they have handled the reload.
for ((attempt = 1; attempt <= 200; attempt++)); do
    [ "$(get "http://127.0.0.1:$ROUTER_PORT/" 2>/dev/null || true)" = "$version" ] && break
    sleep 0.05
done
[ "$attempt" -le 200 ] || { echo "the router never answered $version" >&2; exit 1; }
stamp answered
echo "router_attempts $attempt"
"""

# Sequential GETs through the router in a process of its own (so that they compete with
# neither side for this process's GIL): "ready" once the first has come back, then on
# until stdin closes; prints what it saw as JSON.
TRAFFIC = """\
import collections, json, sys, time
from tests.support import TrafficProbe
probe = TrafficProbe(sys.argv[1], max_requests=10**8, max_seconds=float(sys.argv[2]))
probe.start()
while not (probe.answers or probe.failures or not probe.is_alive()):
    time.sleep(0.01)
print("ready", flush=True)
sys.stdin.read()
probe.finish()
print(json.dumps({"requests": len(probe.answers) + len(probe.failures),
                  "failures": probe.failures[:20], "failed": len(probe.failures),
                  "answers": collections.Counter(probe.answers)}))
"""
TRAFFIC_SETTLE_S = 0.3  # traffic flows this long before and after each timed action

BLUE_GREEN = StrategyConfig(type="blue_green")
_EVENT = re.compile(r"^\s*(?P<at>[\d.]+)s (?P<text>.*)$")


class Traffic:
    """The traffic process, around one timed action."""

    def __init__(self, url: str, timeout_s: float) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [PYTHON, "-c", TRAFFIC, url, str(timeout_s)],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.timeout_s = timeout_s

    def __enter__(self) -> Traffic:
        assert self.process.stdout is not None
        try:
            if self.process.stdout.readline().strip() != "ready":
                raise RuntimeError("the traffic process did not start")
            time.sleep(TRAFFIC_SETTLE_S)
        except BaseException:
            self._kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._kill()

    def _kill(self) -> None:
        if self.process.poll() is None:  # result() never ran: the action failed
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def result(self) -> dict[str, Any]:
        time.sleep(TRAFFIC_SETTLE_S)
        stdout, _ = self.process.communicate("", timeout=self.timeout_s)
        if self.process.returncode != 0:
            raise RuntimeError(f"the traffic process failed ({self.process.returncode})")
        data: dict[str, Any] = json.loads(stdout)
        return data


def with_traffic(url: str, timeout_s: float, action: Callable[[], T]) -> tuple[T, dict[str, Any]]:
    with Traffic(url, timeout_s) as traffic:
        value = action()
        return value, traffic.result()


def probe_config(args: argparse.Namespace) -> ProbeConfig:
    """What `cicd deploy` probes with, from cicd.yaml's verify defaults (overridable)."""
    verify = VerifyConfig()
    return ProbeConfig(
        timeout_s=verify.timeout_s,
        interval_s=args.interval if args.interval is not None else verify.interval_s,
        max_attempts=verify.max_attempts,
        success_threshold=args.success_threshold or verify.success_threshold,
    )


# --- the engine ---------------------------------------------------------------------------


def release(app: Path, version: str) -> Release:
    env = {"PATH": os.environ["PATH"], "VERSION": version}
    return Release(version, f"exec {shlex.quote(PYTHON)} service.py", app, env)


def phases(outcome: DeployOutcome) -> dict[str, float | None]:
    """When (s after the deploy began) the new slot was healthy on its own port, the
    router switched, and the switch was verified through the router."""
    found: dict[str, float | None] = {"healthy": None, "switched": None, "answered": None}
    for event in outcome.events:
        match = _EVENT.match(event)
        if match is None:
            continue
        text, at = match["text"], float(match["at"])
        if " healthy: " in text and found["healthy"] is None:
            found["healthy"] = at
        elif text.startswith("route ") and found["switched"] is None:
            found["switched"] = at
        elif " verified through " in text:
            found["answered"] = at
    return found


def engine_run(folder: Path, app: Path, probe: ProbeConfig, timeout_s: float) -> dict[str, Any]:
    router = NginxRouter(folder / "router", free_port(), nginx=find_nginx() or "nginx")
    environment = Environment(
        name="bench",
        state_dir=folder / "env",
        router=router,
        target=LocalSupervisor(folder / "services"),
        probe=probe,
    )
    v1, v2 = release(app, "v1"), release(app, "v2")
    try:
        setup = environment.deploy(v1, BLUE_GREEN)
        if setup.status != "deployed":
            raise RuntimeError(f"engine: v1 not deployed: {setup.reason}\n{setup.events}")

        def timed(action: Callable[[], DeployOutcome]) -> tuple[float, DeployOutcome]:
            started = time.perf_counter()
            outcome = action()
            return time.perf_counter() - started, outcome

        (deploy_s, deploy), deploy_traffic = with_traffic(
            router.url, timeout_s, lambda: timed(lambda: environment.deploy(v2, BLUE_GREEN))
        )
        (rollback_s, rollback), rollback_traffic = with_traffic(
            router.url, timeout_s, lambda: timed(lambda: environment.rollback(v1))
        )
        return {
            "deploy_s": round(deploy_s, 3),
            "rollback_s": round(rollback_s, 3),
            "deploy_status": deploy.status,
            "rollback_status": rollback.status,
            "rollback_reused_standby": any("reuse " in e for e in rollback.events),
            "deploy_phases": phases(deploy),
            "rollback_phases": phases(rollback),
            "deploy_traffic": deploy_traffic,
            "rollback_traffic": rollback_traffic,
            "deploy_events": deploy.events,
            "rollback_events": rollback.events,
        }
    finally:
        tear_down(environment)


# --- by hand ------------------------------------------------------------------------------


def hand_run(
    folder: Path, app: Path, script: Path, probe: ProbeConfig, timeout_s: float
) -> dict[str, Any]:
    root = folder / "router"
    (root / "temp").mkdir(parents=True)
    (folder / "logs").mkdir()
    (folder / "app").symlink_to(app)
    router_port = free_port()
    user = "user root;\n" if os.geteuid() == 0 else ""  # as the engine's router does
    (root / "nginx.conf").write_text(
        HAND_NGINX_CONFIG.format(user=user, root=root, port=router_port)
    )
    env = {
        **os.environ,
        "WORK": str(folder),
        "PYTHON": PYTHON,
        "NGINX_BIN": find_nginx() or "nginx",
        "ROUTER_PORT": str(router_port),
        "THRESHOLD": str(probe.success_threshold),
        "INTERVAL": str(probe.interval_s),
        "TIMEOUT": str(probe.timeout_s),
        "MAX_ATTEMPTS": str(probe.max_attempts),
    }
    url = f"http://127.0.0.1:{router_port}"
    port_v1, port_v2 = free_port(), free_port()

    def hand(mode: str, version: str, port: int) -> tuple[float, dict[str, float]]:
        result = timed_run(
            ["bash", str(script), mode, version, str(port)],
            env=env,
            cwd=folder,
            timeout_s=timeout_s,
        )
        if result.returncode != 0:
            raise RuntimeError(f"by hand: {mode} {version} failed:\n{result.stderr[-2000:]}")
        stamps = {}
        for line in result.stdout.splitlines():
            label, value = line.split()
            stamps[label] = float(value)
        start = stamps.pop("start")
        attempts = stamps.pop("router_attempts")
        marks = {label: round(moment - start, 3) for label, moment in stamps.items()}
        return result.seconds, {**marks, "router_attempts": attempts}

    try:
        hand("deploy", "v1", port_v1)
        (deploy_s, deploy), deploy_traffic = with_traffic(
            url, timeout_s, lambda: hand("deploy", "v2", port_v2)
        )
        (rollback_s, rollback), rollback_traffic = with_traffic(
            url, timeout_s, lambda: hand("switch", "v1", port_v1)
        )
        return {
            "deploy_s": round(deploy_s, 3),
            "rollback_s": round(rollback_s, 3),
            "deploy_phases": deploy,
            "rollback_phases": rollback,
            "deploy_traffic": deploy_traffic,
            "rollback_traffic": rollback_traffic,
        }
    finally:
        pids = folder / "pids"
        for pid in pids.read_text().split() if pids.exists() else []:
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        # The router's own stop: SIGQUIT to the master in root/nginx.pid, then SIGKILL to
        # whatever of it lingers.
        NginxRouter(root, router_port).stop()


# --- the benchmark ------------------------------------------------------------------------


def measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    probe = probe_config(args)
    app = scratch / "app"
    app.mkdir()
    (app / "service.py").write_text(SERVICE)
    script = scratch / "hand.sh"
    script.write_text(HAND_SCRIPT)
    # As in the other benchmarks: bytecode under the scratch folder (the supervisors are
    # Python processes), not compiled afresh in every one because the shell sets
    # PYTHONDONTWRITEBYTECODE.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")

    sides: dict[str, Callable[[Path], dict[str, Any]]] = {
        "engine": lambda folder: engine_run(folder, app, probe, args.timeout),
        "by_hand": lambda folder: hand_run(folder, app, script, probe, args.timeout),
    }
    runs: dict[str, list[dict[str, Any]]] = {"engine": [], "by_hand": []}
    warmup: dict[str, Any] = {}
    for index in range(args.runs + 1):
        order = ("engine", "by_hand") if index % 2 == 0 else ("by_hand", "engine")
        for side in order:
            folder = scratch / f"{side}-{index}"
            folder.mkdir()
            run = sides[side](folder)
            label = "warm-up" if index == 0 else f"run {index}"
            print(
                f"   {label:8} {side:8} deploy {run['deploy_s']:5.2f} s  rollback "
                f"{run['rollback_s']:5.2f} s  failed requests "
                f"{run['deploy_traffic']['failed']}/{run['rollback_traffic']['failed']}"
            )
            if index == 0:
                warmup[side] = run
            else:
                runs[side].append(run)

    summary: dict[str, Any] = {}
    for action in ("deploy", "rollback"):
        engine = median([r[f"{action}_s"] for r in runs["engine"]])
        by_hand = median([r[f"{action}_s"] for r in runs["by_hand"]])
        summary[action] = {
            "engine_seconds": [r[f"{action}_s"] for r in runs["engine"]],
            "by_hand_seconds": [r[f"{action}_s"] for r in runs["by_hand"]],
            "engine_median_s": round(engine, 3),
            "by_hand_median_s": round(by_hand, 3),
            "ratio": round(engine / by_hand, 2),
            "engine_phases_median_s": median_phases(
                [r[f"{action}_phases"] for r in runs["engine"]]
            ),
            "by_hand_phases_median_s": median_phases(
                [r[f"{action}_phases"] for r in runs["by_hand"]]
            ),
            **{
                f"{side}_{key}": sum(r[f"{action}_traffic"][key] for r in runs[side])
                for side in runs
                for key in ("requests", "failed")
            },
        }
    engine_ok = all(
        r["deploy_status"] == "deployed"
        and r["rollback_status"] == "deployed"
        and r["rollback_reused_standby"]
        for r in [*runs["engine"], warmup["engine"]]
    )
    return {
        "probe": asdict(probe),
        "nginx": subprocess.run(
            [find_nginx() or "nginx", "-v"], capture_output=True, text=True, check=False
        ).stderr.strip(),
        "runs": args.runs,
        **summary,
        "engine_ok": engine_ok,
        "warmup": warmup,
        "engine_runs": runs["engine"],
        "by_hand_runs": runs["by_hand"],
        "service": SERVICE,
        "by_hand_script": HAND_SCRIPT,
        "by_hand_nginx_config": HAND_NGINX_CONFIG,
    }


def median_phases(marks: list[dict[str, Any]]) -> dict[str, float | None]:
    labels = {label for mark in marks for label in mark}
    return {
        label: round(median([m[label] for m in marks if m.get(label) is not None]), 3)
        for label in sorted(labels)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each (default 3)")
    parser.add_argument(
        "--interval",
        type=float,
        help="seconds between health probes, both sides (default: verify's, 0.5)",
    )
    parser.add_argument(
        "--success-threshold",
        type=int,
        help="consecutive 2xx a new version needs, both sides (default: verify's, 3)",
    )
    parser.add_argument("--timeout", type=float, default=120, help="seconds per deploy")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    if find_nginx() is None:
        parser.error("nginx is not installed (.ci/install-nginx.sh)")

    results: dict[str, Any] = {
        **metadata(),
        "benchmark": "blue-green deploy and rollback: engine vs by hand",
        "loadavg_start": loadavg(),
    }
    with scratch_dir("cicd-bench-deploy-", keep=args.keep) as scratch:
        results.update(measure(args, scratch))
    results["loadavg_end"] = loadavg()

    probe = probe_config(args)
    print(
        f"\n(d) deploy and rollback, engine vs by hand (seconds, medians of {args.runs} runs; "
        f"probes every {probe.interval_s:g} s, {probe.success_threshold} in a row)"
    )
    rows = []
    for action, label in (
        ("deploy", "blue-green deploy v1 -> v2"),
        ("rollback", "rollback v2 -> v1"),
    ):
        s = results[action]
        rows.append(
            [
                label,
                s["engine_median_s"],
                s["by_hand_median_s"],
                f"{s['ratio']:.2f}x",
                f"{s['engine_failed']}/{s['engine_requests']}",
                f"{s['by_hand_failed']}/{s['by_hand_requests']}",
            ]
        )
    print_table(
        ["action", "engine", "by hand", "ratio", "engine failed/requests", "by hand failed/req."],
        rows,
    )
    defaults = VerifyConfig()
    default_probes = (probe.interval_s, probe.success_threshold) == (
        defaults.interval_s,
        defaults.success_threshold,
    )
    name = (
        "deploy"
        if default_probes
        else (f"deploy_interval{probe.interval_s:g}_threshold{probe.success_threshold}")
    )
    write_results(name, results)
    failed = results["deploy"]["engine_failed"] + results["rollback"]["engine_failed"]
    return 0 if results["engine_ok"] and failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
