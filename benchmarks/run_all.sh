#!/usr/bin/env bash
# Runs the six benchmarks one after the other (never in parallel: they would disturb
# each other's timings). Each prints a table and writes benchmarks/results/<name>.json.
#   RUNS=5 COMMITS=5 bash benchmarks/run_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
runs=${RUNS:-3}
commits=${COMMITS:-3}
status=0
# Each script bounds its own runs; `timeout` is the backstop (SIGTERM lets a script
# clean up its scratch folder and daemon, SIGKILL follows a minute later).
bench() {
    echo "=== $*"
    timeout --kill-after=60 "$1" "$python" "${@:2}" || status=1
    echo
}
bench 2400 benchmarks/bench_cli_vs_shell.py --runs "$runs"
bench 1200 benchmarks/bench_rerun.py --reruns "$runs"
bench 900 benchmarks/bench_sensor_latency.py --commits "$commits"
bench 600 benchmarks/bench_deploy.py --runs "$runs"
bench 900 benchmarks/bench_security.py --runs "$runs"
bench 2400 benchmarks/bench_history_scale.py --runs "$runs"
exit "$status"
