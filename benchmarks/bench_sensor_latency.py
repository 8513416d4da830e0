"""(c) Commit-to-run-requested latency with the Dagster daemon running.

Starts `dagster-daemon run` (its own process group) on a temporary control plane whose one
repository is polled every `poll_interval_s` = 5 s (the minimum cicd.yaml allows), waits
until the repository sensor has requested the run of the first commit (the daemon is
then warm), then makes K commits, each a random 1..poll_interval s after the previous
commit's run appeared, and measures for each the time from the commit to the creation of
its run in the Dagster instance. The runs execute (the pipeline is a trivial test stage);
the script waits for them, then stops the daemon with SIGINT to its process group,
SIGKILL after a timeout, and kills by pid anything still running from its scratch folder.

Three clocks per commit, all against the wall-clock time `git commit` returned:
  created   the run record's create_timestamp in the instance (the figure)
  observed  when this script first saw the run, polling every 0.2 s (an upper bound)
  detected  the sensor tick's cicd/detected_at tag (just before the run is created)
The daemon's log also gives the times of the sensor's ticks (to the second), which show
how far the actual polling period strays from poll_interval_s.

    .venv/bin/python benchmarks/bench_sensor_latency.py [--commits 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import signal
import subprocess
import sys
import time
from contextlib import suppress
from datetime import datetime
from pathlib import Path
from typing import Any

from _common import (
    ROOT,
    VENV_BIN,
    git,
    init_repository,
    kill_group,
    loadavg,
    median,
    metadata,
    print_table,
    scratch_dir,
    tool_env,
    write_control_config,
    write_results,
)

DEFAULT_POLL_INTERVAL_S = 5  # the minimum cicd.yaml accepts
PARTITION_TAG = "dagster/partition"
DETECTED_AT_TAG = "cicd/detected_at"
CHEAP_PIPELINE = """\
# Cheap on purpose: this repository measures how fast a commit becomes a run.
tests:
  unit:
    run: >-
      printf '<testsuite><testcase classname="bench" name="ok"/></testsuite>\\n'
      > "$CICD_REPORTS_DIR/unit.xml"
"""


OVERRIDE_MODULE = """\
\"\"\"Experiment: cicd's definitions, the sensors' minimum_interval_seconds overridden.\"\"\"
import os
from pathlib import Path

from cicd_dagster.config import load_control_config
from cicd_dagster.definitions import build_definitions

config = load_control_config(Path(os.environ["CICD_CONFIG"]))
for repository in config.repositories:
    # Past cicd.yaml's validation (which allows 5 s at least) on purpose.
    repository.__dict__["poll_interval_s"] = int(os.environ["BENCH_MIN_INTERVAL_S"])
defs = build_definitions(config)
"""


def workspace_yaml(path: Path, min_interval_override: int | None) -> Path:
    if min_interval_override is None:
        target = "  - python_module:\n      module_name: cicd_dagster.definitions\n"
    else:
        (path.parent / "bench_defs.py").write_text(OVERRIDE_MODULE)
        target = "  - python_file:\n      relative_path: bench_defs.py\n"
    path.write_text(f"load_from:\n{target}      attribute: defs\n      working_directory: {ROOT}\n")
    return path


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


def processes_using(folder: Path) -> list[int]:
    """Pids (other than this one) whose environment mentions `folder`: the daemon, its
    code server, run workers and their steps (which start their own sessions)."""
    needle = str(folder).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            zombie = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
            if not zombie and needle in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue  # gone, or not ours to read
    return pids


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TICK = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \+0000 - dagster\.daemon\.SensorDaemon - INFO - "
    r"Checking for new runs for sensor"
)


def tick_intervals(daemon_log: str) -> list[float]:
    """Seconds between consecutive evaluations of the sensor, from the daemon's log."""
    moments = [
        datetime.fromisoformat(match[1]).timestamp()
        for line in daemon_log.splitlines()
        if (match := _TICK.match(_ANSI.sub("", line)))
    ]
    return [round(b - a, 1) for a, b in itertools.pairwise(moments)]


class Daemon:
    def __init__(self, scratch: Path, env: dict[str, str], workspace: Path) -> None:
        self.scratch = scratch
        self.log_path = scratch / "daemon.log"
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [str(VENV_BIN / "dagster-daemon"), "run", "-w", str(workspace)],
            cwd=scratch,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float) -> dict[str, Any]:
        """SIGINT to the group, SIGKILL after `timeout_s`, then any straggler by pid."""
        started = time.monotonic()
        kill_group(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout=timeout_s)
            how = "SIGINT"
        except subprocess.TimeoutExpired:
            how = "SIGKILL"
        kill_group(self.process.pid, signal.SIGKILL)  # the rest of the group, if any
        self.process.wait()
        stragglers = {pid: command_line(pid) for pid in processes_using(self.scratch)}
        for pid in stragglers:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while processes_using(self.scratch) and time.monotonic() < deadline:
            time.sleep(0.1)  # SIGKILL is delivered asynchronously
        self._log.close()
        return {
            "stopped_by": how,
            "stop_s": round(time.monotonic() - started, 2),
            "stragglers_killed": stragglers,
            "left_running": processes_using(self.scratch),
        }

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def wait_for_run(instance: Any, sha: str, daemon: Daemon, timeout_s: float) -> tuple[Any, float]:
    from dagster import RunsFilter

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        records = instance.get_run_records(RunsFilter(tags={PARTITION_TAG: sha}), limit=1)
        if records:
            return records[0], time.time()
        if not daemon.alive():
            raise RuntimeError(f"the daemon exited:\n{daemon.log_tail()}")
        time.sleep(0.2)
    raise RuntimeError(f"no run for {sha[:12]} within {timeout_s:.0f} s:\n{daemon.log_tail()}")


def wait_for_runs_to_finish(instance: Any, shas: list[str], timeout_s: float) -> dict[str, str]:
    from dagster import DagsterRunStatus, RunsFilter

    done = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}
    deadline = time.time() + timeout_s
    statuses: dict[str, str] = {}
    while time.time() < deadline:
        statuses = {}
        for sha in shas:
            records = instance.get_run_records(RunsFilter(tags={PARTITION_TAG: sha}), limit=1)
            statuses[sha] = records[0].dagster_run.status.value if records else "NONE"
        if all(status in {s.value for s in done} for status in statuses.values()):
            break
        time.sleep(1)
    return statuses


def measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from dagster import DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    repo = scratch / "repo"
    repo.mkdir()
    (repo / ".cicd.yml").write_text(CHEAP_PIPELINE)
    (repo / "counter.txt").write_text("0\n")
    first_sha = init_repository(repo)
    config = write_control_config(scratch, "latency", repo, poll_interval_s=args.poll_interval)
    dagster_home = scratch / "dagster-home"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = tool_env(
        scratch,
        uv_cache=scratch / "uv-cache",
        DAGSTER_HOME=str(dagster_home),
        CICD_CONFIG=str(config),
    )
    if args.min_interval_override is not None:
        env["BENCH_MIN_INTERVAL_S"] = str(args.min_interval_override)
    workspace = workspace_yaml(scratch / "workspace.yaml", args.min_interval_override)
    rng = random.Random(args.seed)

    started = time.time()
    daemon = Daemon(scratch, env, workspace)
    instance = None
    samples: list[dict[str, Any]] = []
    shas = [first_sha]
    try:
        instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home)))
        print(f"daemon pid {daemon.process.pid}; waiting for the sensor's first run (warm-up)")
        _, seen = wait_for_run(instance, first_sha, daemon, args.startup_timeout)
        warmup_s = seen - started
        print(f"   daemon up, first commit's run requested after {warmup_s:.1f} s")

        for index in range(args.commits):
            pause = rng.uniform(1, args.poll_interval)
            time.sleep(pause)
            (repo / "counter.txt").write_text(f"{index + 1}\n")
            git("commit", "--quiet", "-am", f"bench commit {index + 1}", cwd=repo)
            committed = time.time()
            sha = git("rev-parse", "HEAD", cwd=repo)
            shas.append(sha)
            record, seen = wait_for_run(instance, sha, daemon, args.commit_timeout)
            detected = record.dagster_run.tags.get(DETECTED_AT_TAG)
            sample = {
                "sha": sha,
                "paused_before_commit_s": round(pause, 2),
                "created_s": round(record.create_timestamp.timestamp() - committed, 3),
                "observed_s": round(seen - committed, 3),
                "detected_s": round(datetime.fromisoformat(detected).timestamp() - committed, 3)
                if detected
                else None,
                "run_id": record.dagster_run.run_id,
            }
            samples.append(sample)
            print(
                f"   commit {index + 1} {sha[:12]}: created {sample['created_s']:5.2f} s, "
                f"observed {sample['observed_s']:5.2f} s, detected {sample['detected_s']} s"
            )

        print("waiting for the runs the daemon launched to finish")
        statuses = wait_for_runs_to_finish(instance, shas, args.run_timeout)
    finally:
        if instance is not None:
            instance.dispose()
        stop = daemon.stop(args.stop_timeout)
        print(
            f"daemon stopped by {stop['stopped_by']} in {stop['stop_s']} s; "
            f"stragglers killed: {stop['stragglers_killed'] or 'none'}; "
            f"left running: {stop['left_running'] or 'none'}"
        )

    def stats(key: str) -> dict[str, float | None]:
        values = [s[key] for s in samples if s[key] is not None]
        return {
            "median": round(median(values), 3) if values else None,
            "max": round(max(values), 3) if values else None,
            "min": round(min(values), 3) if values else None,
        }

    ticks = tick_intervals(daemon.log_path.read_text(errors="replace"))
    return {
        "poll_interval_s": args.poll_interval,
        "sensor_tick_intervals_s": ticks,
        "sensor_tick_interval": {
            "median": median(ticks) if ticks else None,
            "max": max(ticks) if ticks else None,
        },
        "commits": args.commits,
        "seed": args.seed,
        "daemon_warmup_s": round(warmup_s, 2),
        "samples": samples,
        "created": stats("created_s"),
        "observed": stats("observed_s"),
        "detected": stats("detected_s"),
        "run_statuses": statuses,
        "daemon": stop,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commits", type=int, default=3, help="measured commits (default 3)")
    parser.add_argument(
        "--poll-interval",
        type=int,
        default=DEFAULT_POLL_INTERVAL_S,
        help="poll_interval_s of the repository (default 5, the minimum)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the pauses between commits")
    parser.add_argument("--startup-timeout", type=float, default=180)
    parser.add_argument("--commit-timeout", type=float, default=60)
    parser.add_argument("--run-timeout", type=float, default=300)
    parser.add_argument("--stop-timeout", type=float, default=30)
    parser.add_argument(
        "--min-interval-override",
        type=int,
        help="experiment: give the sensor this minimum_interval_seconds instead of "
        "poll_interval_s (results go to sensor_latency[_pollN]_override.json)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()

    results: dict[str, Any] = {
        **metadata(),
        "benchmark": "commit to run requested, dagster-daemon running",
        "sensor_min_interval_override_s": args.min_interval_override,
        "loadavg_start": loadavg(),
    }
    with scratch_dir("cicd-bench-sensor-", keep=args.keep) as scratch:
        results.update(measure(args, scratch))
    results["loadavg_end"] = loadavg()

    print(
        f"\n(c) commit -> run created, poll_interval_s = {args.poll_interval} "
        f"({args.commits} commits; seconds)"
    )
    if args.min_interval_override is not None:
        print(f"    EXPERIMENT: sensor minimum_interval_seconds = {args.min_interval_override}")
    print_table(
        ["clock", "median", "max", "min"],
        [
            [name, results[name]["median"], results[name]["max"], results[name]["min"]]
            for name in ("created", "observed", "detected")
        ],
    )
    ticks = results["sensor_tick_interval"]
    print(
        f"sensor ticks (daemon log, 1 s resolution): median {ticks['median']} s, "
        f"max {ticks['max']} s apart"
    )
    print("run statuses:", ", ".join(sorted(set(results["run_statuses"].values()))))
    name = "sensor_latency"
    if args.poll_interval != DEFAULT_POLL_INTERVAL_S:
        name += f"_poll{args.poll_interval}"
    if args.min_interval_override is not None:
        name += "_override"
    write_results(name, results)
    return 0 if not results["daemon"]["left_running"] else 1


if __name__ == "__main__":
    sys.exit(main())
