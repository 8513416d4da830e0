"""(b) Re-running an already-built commit with unchanged inputs.

For each project: one cold `cicd run REPO --json` (no build env, checkout or stored stage
result; warm uv cache and control plane, as in bench_cli_vs_shell.py), then N re-runs of
the same commit. Reported: re-run time against the first run, and for every re-run
whether each configured stage says "reused": true, whether any step log under
home/runs/<repo>/<sha>/logs/ grew (a step ran again), and whether the checkout was
cloned again. For scale, the floor of any `cicd` process: starting Python and importing
the CLI and Dagster.

    .venv/bin/python benchmarks/bench_rerun.py [--reruns 3] [--project demo ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from _common import (
    PYTHON,
    add_project_arguments,
    loadavg,
    make_demo_repository,
    make_more_itertools_repository,
    median,
    metadata,
    print_table,
    reset_control_plane,
    run_cicd,
    scratch_dir,
    timed_run,
    tool_env,
    write_control_config,
    write_results,
)


def snapshot(home: Path, name: str, sha: str) -> dict[str, Any]:
    """What a re-executed step would change: its log, its stored result, the checkout."""
    run_dir = home / "runs" / name / sha
    checkout = home / "workspaces" / name / sha
    files = {
        str(path.relative_to(run_dir)): [path.stat().st_size, path.stat().st_mtime_ns]
        for folder in ("logs", "results")
        for path in sorted((run_dir / folder).glob("*"))
        if path.is_file()
    }
    git_dir = checkout / ".git"
    return {
        "files": files,
        "checkout_inode": git_dir.stat().st_ino if git_dir.exists() else None,
    }


def diff(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    changed = sorted(
        name
        for name in set(before["files"]) | set(after["files"])
        if before["files"].get(name) != after["files"].get(name)
    )
    return {
        "logs_changed": [n for n in changed if n.startswith("logs/")],
        "results_changed": [n for n in changed if n.startswith("results/")],
        "checkout_recloned": before["checkout_inode"] != after["checkout_inode"],
    }


def import_floor(env: dict[str, str], cwd: Path, times: int) -> float:
    """Seconds to start Python and import what `cicd run` imports, before any work."""
    code = "import cicd_dagster.cli, jobs.inprocess"
    return median(
        [
            timed_run([PYTHON, "-c", code], env=env, cwd=cwd, timeout_s=120).seconds
            for _ in range(times)
        ]
    )


def bench_project(
    name: str, scratch: Path, args: argparse.Namespace, uv_cache: Path
) -> dict[str, Any]:
    repo = scratch / "repos" / name
    if name == "demo":
        make_demo_repository(repo)
    else:
        make_more_itertools_repository(repo, scratch, args.more_itertools_version)
    plane = scratch / f"plane-{name}"
    home = plane / ".cicd"
    config = write_control_config(plane, name, repo)
    env = tool_env(scratch, uv_cache=uv_cache, bytecode_cache=not args.no_bytecode_cache)

    print(f"\n== {name}: warm-up run (untimed: uv cache, control plane, bytecode)")
    run_cicd(config, name, env, args.timeout)
    reset_control_plane(home)

    first = run_cicd(config, name, env, args.timeout)
    first_report = json.loads(first.stdout)
    sha = first_report["commit"]
    print(f"   first run  {first.seconds:6.1f} s  {first_report['status']}")
    before = snapshot(home, name, sha)

    reruns: list[dict[str, Any]] = []
    for index in range(args.reruns):
        result = run_cicd(config, name, env, args.timeout)
        report = json.loads(result.stdout)
        after = snapshot(home, name, sha)
        changes = diff(before, after)
        before = after
        not_reused = [
            stage
            for stage, s in report["stages"].items()
            if not s.get("reused") and s["status"] != "not_configured"
        ]
        reruns.append(
            {
                "seconds": round(result.seconds, 3),
                "status": report["status"],
                "stages_not_reporting_reused": not_reused,
                **changes,
                "stages": report["stages"],
            }
        )
        print(
            f"   re-run {index + 1}   {result.seconds:6.1f} s  not reused: {not_reused or '-'}"
            f"  logs grown: {changes['logs_changed'] or '-'}"
            f"  checkout re-cloned: {changes['checkout_recloned']}"
        )

    floor = import_floor(env, plane, args.reruns)
    rerun_median = median([r["seconds"] for r in reruns])
    return {
        "project": name,
        "commit": sha,
        "first_s": round(first.seconds, 3),
        "first_stages": first_report["stages"],
        "rerun_seconds": [r["seconds"] for r in reruns],
        "rerun_median_s": round(rerun_median, 3),
        "ratio": round(rerun_median / first.seconds, 3),
        "import_floor_s": round(floor, 3),
        "rerun_above_floor_s": round(rerun_median - floor, 3),
        "every_stage_reused": all(not r["stages_not_reporting_reused"] for r in reruns),
        "test_and_build_stages_reused": all(
            set(r["stages_not_reporting_reused"]) <= {"source"} for r in reruns
        ),
        "logs_unchanged": all(not r["logs_changed"] for r in reruns),
        "results_unchanged": [r["results_changed"] for r in reruns],
        "checkout_recloned": [r["checkout_recloned"] for r in reruns],
        "reruns": reruns,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reruns", type=int, default=3, help="timed re-runs (default 3)")
    add_project_arguments(parser)
    args = parser.parse_args()
    projects = args.project or ["demo", "more-itertools"]

    results: dict[str, Any] = {
        **metadata(),
        "benchmark": "re-run of an already-built commit, unchanged inputs",
        "bytecode_cache": not args.no_bytecode_cache,
        "loadavg_start": loadavg(),
        "projects": {},
    }
    with scratch_dir("cicd-bench-rerun-", keep=args.keep) as scratch:
        uv_cache = scratch / "uv-cache"
        for name in projects:
            results["projects"][name] = bench_project(name, scratch, args, uv_cache)
    results["loadavg_end"] = loadavg()

    print(f"\n(b) re-run of a built commit (wall-clock seconds; re-run = median of {args.reruns})")
    print_table(
        [
            "project",
            "first",
            "re-run",
            "ratio",
            "import floor",
            "stages not 'reused'",
            "step logs grew",
            "checkout re-cloned",
        ],
        [
            [
                name,
                p["first_s"],
                p["rerun_median_s"],
                f"{p['ratio']:.2f}",
                p["import_floor_s"],
                ",".join(sorted({s for r in p["reruns"] for s in r["stages_not_reporting_reused"]}))
                or "-",
                "no" if p["logs_unchanged"] else "YES",
                ",".join("yes" if c else "no" for c in p["checkout_recloned"]),
            ]
            for name, p in results["projects"].items()
        ],
    )
    write_results("rerun" + ("_no_bytecode_cache" if args.no_bytecode_cache else ""), results)
    ok = all(
        p["test_and_build_stages_reused"] and p["logs_unchanged"]
        for p in results["projects"].values()
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
