"""(a) `cicd run` against the same commands in a plain shell script.

For each project (the embedded demo, and the test suite of more-itertools' sdist) this
times a cold `cicd run REPO --json` and a by-hand bash script that runs the commands of
the same .cicd.yml: clone, `uv venv`, install, build steps, every test stage. Both start
cold (no venv, no checkout, no cached stage result) but share one warm uv cache, so
downloads do not dominate. The control plane itself is warm, as in an installation that
has built before: its Dagster instance, history DB and git mirror exist (an untimed
warm-up run creates them). Runs alternate between the two, N times each; the figure is
median(cicd) / median(by hand).

It also checks that the test counts `cicd run --json` reports equal what pytest itself
printed in its closing line in the by-hand run.

    .venv/bin/python benchmarks/bench_cli_vs_shell.py [--runs 3] [--project demo ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from _common import (
    PYTHON,
    Timed,
    add_project_arguments,
    loadavg,
    make_demo_repository,
    make_more_itertools_repository,
    median,
    metadata,
    print_table,
    pytest_closing_line,
    pytest_totals,
    reset_control_plane,
    run_cicd,
    scratch_dir,
    step_env,
    timed_run,
    tool_env,
    uv_bin,
    write_control_config,
    write_results,
)

TEST_STAGES = ("unit", "integration", "e2e", "performance")
COUNT_FIELDS = ("tests", "passed", "failed", "errors", "skipped")


def hand_script(repo: Path) -> str:
    """A bash script running the commands of `repo`'s .cicd.yml as a person would."""
    from cicd_dagster.config import load_pipeline_config

    pipeline = load_pipeline_config(repo / ".cicd.yml")

    def chain(commands: list[str]) -> str:
        # `&&` rather than `set -e`: -e is ignored inside a group whose status is tested.
        return " && ".join(f"{{ {command}\n}}" for command in commands) or "true"

    lines = [
        "#!/usr/bin/env bash",
        f"# {repo.name} by hand: the commands of its .cicd.yml, no control plane.",
        "# usage: hand.sh REPO_URL WORK_DIR PYTHON UV",
        "set -uo pipefail",
        "shopt -s nullglob globstar",
        "repo=$1 work=$2 python=$3 uv=$4",
        'stamp() { echo "$1 $(date +%s.%N) ${2:-0}" >> "$work/times"; }',
        'mkdir -p "$work/logs" "$work/artifacts"',
        "stamp start",
        'git clone --quiet "$repo" "$work/src" || exit 90',
        'cd "$work/src"',
        "stamp source",
        '"$uv" venv --quiet --seed --python "$python" "$work/venv" || exit 91',
        'export VIRTUAL_ENV="$work/venv" PATH="$work/venv/bin:$(dirname "$uv"):$PATH"',
        'export CICD_WORKSPACE="$work/src" CICD_ARTIFACTS_DIR="$work/artifacts"',
        'export CICD_REPORTS_DIR="$work/reports/build"',
        "(",
        chain([*pipeline.build.install, *pipeline.build.steps]),
        ') > "$work/logs/build.log" 2>&1 || exit 92',
    ]
    for pattern in pipeline.build.artifacts:
        lines.append(f'for f in {pattern}; do cp "$f" "$work/artifacts/"; done')
    lines.append("stamp build")
    for stage, config in pipeline.tests.stages().items():
        if config is None:
            continue
        lines += [
            f'mkdir -p "$work/reports/{stage}"',
            f'( export CICD_REPORTS_DIR="$work/reports/{stage}"',
            chain(config.run),
            f') > "$work/logs/{stage}.log" 2>&1',
            f"stamp {stage} $?",
        ]
    return "\n".join(lines) + "\n"


def run_hand(
    script: Path, repo: Path, work: Path, env: dict[str, str], timeout_s: float
) -> tuple[Timed, dict[str, Any]]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    result = timed_run(
        ["bash", str(script), str(repo), str(work), PYTHON, uv_bin()],
        env=env,
        cwd=work,
        timeout_s=timeout_s,
    )
    if result.returncode != 0:
        log = work / "logs" / "build.log"
        tail = log.read_text()[-3000:] if log.exists() else result.stderr
        raise RuntimeError(f"by-hand script failed ({result.returncode}):\n{tail}")
    stamps: dict[str, tuple[float, int]] = {}
    for line in (work / "times").read_text().splitlines():
        label, moment_text, status_text = line.split()
        stamps[label] = (float(moment_text), int(status_text))
    phases: dict[str, Any] = {}
    previous = stamps["start"][0]
    for label, (moment, exit_code) in stamps.items():
        if label == "start":
            continue
        phases[label] = {"duration_s": round(moment - previous, 3), "exit_code": exit_code}
        previous = moment
    for stage in TEST_STAGES:
        log = work / "logs" / f"{stage}.log"
        if stage in phases and log.exists():
            closing = pytest_closing_line(log.read_text())
            phases[stage]["pytest_closing_line"] = closing[0] if closing else None
            phases[stage]["pytest_counts"] = closing[1] if closing else None
    shutil.rmtree(work, ignore_errors=True)
    return result, phases


def compare_counts(report: dict[str, Any], phases: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for stage in TEST_STAGES:
        cicd = report["stages"][stage]
        if stage not in phases:
            continue
        counts = phases[stage].get("pytest_counts") or {}
        pytest = pytest_totals(counts)
        reported = {key: cicd.get(key) for key in COUNT_FIELDS}
        rows.append(
            {
                "stage": stage,
                "pytest_closing_line": phases[stage].get("pytest_closing_line"),
                "pytest": pytest,
                "cicd": reported,
                "equal": reported == pytest,
            }
        )
    return rows


def bench_project(
    name: str, scratch: Path, args: argparse.Namespace, uv_cache: Path
) -> dict[str, Any]:
    repo = scratch / "repos" / name
    version = None
    if name == "demo":
        make_demo_repository(repo)
    else:
        version = make_more_itertools_repository(repo, scratch, args.more_itertools_version)
    script = scratch / f"hand-{name}.sh"
    script.write_text(hand_script(repo))
    plane = scratch / f"plane-{name}"
    config = write_control_config(plane, name, repo)
    cicd_env = tool_env(scratch, uv_cache=uv_cache, bytecode_cache=not args.no_bytecode_cache)
    hand_env = step_env(uv_cache)
    work = scratch / f"hand-work-{name}"

    print(f"\n== {name}: warm-up (untimed: fills the uv cache, creates the control plane)")
    warm_hand, _ = run_hand(script, repo, work, hand_env, args.timeout)
    warm_cicd = run_cicd(config, name, cicd_env, args.timeout)
    print(f"   by hand {warm_hand.seconds:.1f} s, cicd (new home) {warm_cicd.seconds:.1f} s")

    cicd_runs: list[dict[str, Any]] = []
    hand_runs: list[dict[str, Any]] = []
    for index in range(args.runs):
        order = ("cicd", "hand") if index % 2 == 0 else ("hand", "cicd")
        for which in order:
            if which == "cicd":
                reset_control_plane(plane / ".cicd")
                result = run_cicd(config, name, cicd_env, args.timeout)
                report = json.loads(result.stdout)
                stages = report["stages"]
                cicd_runs.append(
                    {
                        "seconds": round(result.seconds, 3),
                        "status": report["status"],
                        "stage_seconds": {k: v["duration_s"] for k, v in stages.items()},
                        "reused_stages": [k for k, v in stages.items() if v.get("reused")],
                        "report": report,
                    }
                )
                print(f"   run {index + 1}: cicd    {result.seconds:6.1f} s  {report['status']}")
            else:
                result, phases = run_hand(script, repo, work, hand_env, args.timeout)
                hand_runs.append({"seconds": round(result.seconds, 3), "phases": phases})
                print(f"   run {index + 1}: by hand {result.seconds:6.1f} s")

    cicd_median = median([r["seconds"] for r in cicd_runs])
    hand_median = median([r["seconds"] for r in hand_runs])
    stage_sum = median([sum(r["stage_seconds"].values()) for r in cicd_runs])
    counts = compare_counts(cicd_runs[-1]["report"], hand_runs[-1]["phases"])
    for run in cicd_runs[:-1]:
        run.pop("report")  # one full report in the results is enough
    return {
        "project": name,
        "more_itertools_version": version,
        "pipeline": (repo / ".cicd.yml").read_text(),
        "by_hand_script": script.read_text(),
        "runs": args.runs,
        "cicd_seconds": [r["seconds"] for r in cicd_runs],
        "by_hand_seconds": [r["seconds"] for r in hand_runs],
        "cicd_median_s": round(cicd_median, 3),
        "by_hand_median_s": round(hand_median, 3),
        "ratio": round(cicd_median / hand_median, 3),
        "cicd_stage_seconds_median_sum": round(stage_sum, 3),
        "cicd_outside_stages_median_s": round(cicd_median - stage_sum, 3),
        "warmup": {"by_hand_s": round(warm_hand.seconds, 3), "cicd_new_home_s": warm_cicd.seconds},
        "cold_check_no_stage_reused": all(not r["reused_stages"] for r in cicd_runs),
        "counts": counts,
        "counts_equal": all(row["equal"] for row in counts),
        "cicd_runs": cicd_runs,
        "by_hand_runs": hand_runs,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each (default 3)")
    add_project_arguments(parser)
    args = parser.parse_args()
    projects = args.project or ["demo", "more-itertools"]

    results: dict[str, Any] = {
        **metadata(),
        "benchmark": "cicd run vs the same commands by hand",
        "bytecode_cache": not args.no_bytecode_cache,
        "loadavg_start": loadavg(),
        "projects": {},
    }
    with scratch_dir("cicd-bench-shell-", keep=args.keep) as scratch:
        uv_cache = scratch / "uv-cache"
        for name in projects:
            results["projects"][name] = bench_project(name, scratch, args, uv_cache)
    results["loadavg_end"] = loadavg()

    print("\n(a) cicd run vs by hand (wall-clock seconds, medians of", args.runs, "runs)")
    print_table(
        ["project", "cicd", "by hand", "ratio", "cicd stages", "cicd outside stages"],
        [
            [
                name,
                p["cicd_median_s"],
                p["by_hand_median_s"],
                f"{p['ratio']:.2f}x",
                p["cicd_stage_seconds_median_sum"],
                p["cicd_outside_stages_median_s"],
            ]
            for name, p in results["projects"].items()
        ],
    )
    print("\ntest counts: pytest's closing line (by hand) vs `cicd run --json`")
    rows = []
    for name, p in results["projects"].items():
        for row in p["counts"]:
            pytest, cicd = row["pytest"], row["cicd"]
            rows.append(
                [
                    name,
                    row["stage"],
                    row["pytest_closing_line"],
                    "/".join(str(pytest[k]) for k in ("tests", "passed", "skipped")),
                    "/".join(str(cicd[k]) for k in ("tests", "passed", "skipped")),
                    "yes" if row["equal"] else "NO",
                ]
            )
    print_table(["project", "stage", "pytest said", "pytest t/p/s", "cicd t/p/s", "equal"], rows)
    suffix = "_no_bytecode_cache" if args.no_bytecode_cache else ""
    write_results("cli_vs_shell" + suffix, results)
    ok = all(
        p["counts_equal"] and p["cold_check_no_stage_reused"] for p in results["projects"].values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
