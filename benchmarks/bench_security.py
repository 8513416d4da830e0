"""(e) The supply-chain stages of one commit against the same by hand.

The commit: a copy of this project's own `cicd_dagster/` package (plus a small HTTP
service to deploy) as a git repository. Its build installs, offline from the machine's uv
cache, every distribution of this project's .venv that the cache holds at the same
version (`uv pip install --offline --no-deps -r requirements.txt`, about 110), and packs
the package into dist/app-src.tar.gz, the build's artifact. The advisory database is a
folder of generated OSV advisories (5 000 by default, about the size of the public PyPI
advisory database; JSON, or YAML as that database has them with `--format yaml`), each
naming one of the installed distributions with one to three ranges and a version list;
all but a few (`--matching`, severity LOW or MODERATE) miss the installed version. The
control plane: `security.fail_on: critical` so bandit's findings in cicd-dagster itself
(high at most) leave the commit green and deployable, one `prod` environment with the
recreate strategy behind nginx. One CI run (`jobs.inprocess.run_commit`, untimed) builds
the commit, then, timed in this process with `time.perf_counter`:

1. security_scan: `run_security_scan` with a forced StageContext (no cached scan is
   reused: bandit, the secret scanner, the environment's distributions, the advisory
   folder and the licences are all read again), against a bash script doing what a user
   would run for SAST and an inventory: `python -m bandit -r . -f sarif -o x.sarif` in the
   checkout and `python -m pip list --format json --path <site-packages>` of the build
   environment.
2. sbom + artifact: `run_sbom` (forced) then `publish_artifacts` into an emptied
   artifact store (so it stores and signs rather than finding it all done), against a
   bash script: the same `pip list` as the SBOM's stand-in, `sha256sum` of the artifact
   and that inventory into SHA256SUMS, `cp` of all three into a folder, and
   `openssl pkeyutl -sign -rawin` of SHA256SUMS with an ed25519 key made in scratch.
3. The commit deployed to prod (local target, nginx; untimed, torn down afterwards):
   `rescan_in_service` of the repository (provenance verified, the stored SBOM read, its
   libraries matched against the advisory folder, findings recorded) against the full
   forced security_scan of the same commit, alternating.
The parts of each stage (bandit, advisory loading, SBOM building, signing...) are timed
by rebinding those names in the stage's module to timing wrappers while it runs.

One untimed warm-up of each side first; then N runs each, alternating which side goes
first. Medians, and median(stage) / median(by hand). Bytecode goes to a pycache in scratch
for both sides (see benchmarks/README.md).

    .venv/bin/python benchmarks/bench_security.py [--runs 3] [--advisories 5000]
        [--matching 20] [--format yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from _common import (
    PYTHON,
    ROOT,
    init_repository,
    loadavg,
    median,
    metadata,
    print_table,
    scratch_dir,
    step_env,
    timed_run,
    uv_bin,
    write_results,
)

sys.path.insert(0, str(ROOT))

from packaging.version import Version
from ruamel.yaml import YAML

import cicd_dagster.stages.artifact as artifact_stage
import cicd_dagster.stages.rescan as rescan_stage
import cicd_dagster.stages.security as security_stage
from cicd_dagster.config import load_control_config
from cicd_dagster.deploy.router import find_nginx
from cicd_dagster.stages.artifact import (
    artifact_store,
    publish_artifacts,
    run_sbom,
)
from cicd_dagster.stages.build import load_build
from cicd_dagster.stages.context import StageContext
from cicd_dagster.stages.deploy import environment_for
from cicd_dagster.stages.rescan import rescan_in_service
from cicd_dagster.stages.security import run_security_scan
from cicd_dagster.stages.source import pipeline_at
from cicd_dagster.store import HistoryStore
from jobs.inprocess import deploy_commit_in_process, run_commit
from tests.integration.test_deploy import SERVICE, SERVICE_CONFIG
from tests.support import junit_xml, tear_down

REPOSITORY = "app"
# The parts of each stage timed separately: names looked up in the stage's module.
SCAN_PARTS = (
    "run_bandit",
    "scan_secrets",
    "resolved_dependencies",
    "load_advisories",
    "dependency_findings",
    "check_licenses",
)
PUBLISH_PARTS = ("resolved_dependencies", "build_sbom", "sign")
RESCAN_PARTS = ("load_advisories", "verify_commit", "sbom_libraries", "dependency_findings")
PIPELINE = """\
build:
  install: uv pip install --quiet --offline --no-deps -r requirements.txt
  steps: ["mkdir -p dist && tar -czf dist/app-src.tar.gz cicd_dagster service.py"]
  artifacts: ["dist/*.tar.gz"]
tests:
  unit:
    run: printf '%s' '{report}' > "$CICD_REPORTS_DIR/unit.xml"
"""
CONTROL = """\
home: .cicd
repositories:
  - name: {repository}
    url: {url}
security:
  advisory_db: {advisories}
  fail_on: critical
environments:
  - name: prod
    strategy: {{type: recreate}}
"""
SCAN_BY_HAND = """\
set -euo pipefail
cd "$CHECKOUT"
python -m bandit -r . -f sarif -o "$OUT/bandit.sarif" --quiet || [ $? -eq 1 ]
python -m pip list --format json --path "$SITE_PACKAGES" > "$OUT/inventory.json"
"""
PUBLISH_BY_HAND = """\
set -euo pipefail
cd "$OUT"
python -m pip list --format json --path "$SITE_PACKAGES" > inventory.json
cp "$ARTIFACT" .
sha256sum "$(basename "$ARTIFACT")" inventory.json > SHA256SUMS
mkdir -p "$STORE"
cp "$(basename "$ARTIFACT")" inventory.json SHA256SUMS "$STORE"/
openssl pkeyutl -sign -inkey "$KEY" -rawin -in SHA256SUMS -out "$STORE/SHA256SUMS.sig"
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each side")
    parser.add_argument("--advisories", type=int, default=5000, help="advisories generated")
    parser.add_argument("--matching", type=int, default=20, help="of which affect the env")
    parser.add_argument(
        "--format",
        choices=["json", "yaml"],
        default="json",
        help="advisory files as OSV JSON, or YAML as in pypa/advisory-database",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per by-hand run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    if find_nginx() is None:
        parser.error("nginx is needed for the rescan part; run .ci/install-nginx.sh")

    with scratch_dir("bench-security-", keep=args.keep) as scratch:
        uv_cache = Path(subprocess.check_output([uv_bin(), "cache", "dir"], text=True).strip())
        prepare_process_environment(scratch, uv_cache)
        requirements = cached_requirements(scratch, uv_cache)
        advisories = scratch / "advisories"
        write_advisories(advisories, requirements, args.advisories, args.matching, args.format)
        repo = scratch / REPOSITORY
        sha = make_checkout(repo, requirements)
        control = scratch / "control"
        control.mkdir()
        (control / "cicd.yaml").write_text(
            CONTROL.format(repository=REPOSITORY, url=json.dumps(str(repo)), advisories=advisories)
        )
        config = load_control_config(control / "cicd.yaml")
        started = time.perf_counter()
        report = run_commit(config, REPOSITORY, sha, ref="main", branch="main", stream_logs=False)
        first_run_s = time.perf_counter() - started
        if report["status"] != "success":
            raise RuntimeError(f"the CI run of the commit failed:\n{json.dumps(report, indent=2)}")
        print(f"CI run of {sha[:12]}: {first_run_s:.1f} s", file=sys.stderr)

        ctx = StageContext.for_commit(
            config, REPOSITORY, sha, ref="main", branch="main", force=True
        )
        pipeline = pipeline_at(config, config.repository(REPOSITORY), sha)
        build = load_build(ctx, pipeline)
        site_packages = site_packages_of(build.env_dir)
        by_hand_env = {
            **step_env(uv_cache),
            # bandit and pip from this project's venv (the build env has no bandit).
            "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPYCACHEPREFIX": os.environ["PYTHONPYCACHEPREFIX"],
            "SITE_PACKAGES": str(site_packages),
        }

        def scan() -> dict[str, Any]:
            with timed_parts(security_stage, SCAN_PARTS) as parts:
                started = time.perf_counter()
                result = run_security_scan(ctx, pipeline, build, today=date.today())
                seconds = time.perf_counter() - started
            return {
                "seconds": seconds,
                "parts": dict(parts),
                "findings": _count_by_kind(result.findings),
                "dependencies": result.dependencies,
                "advisories": result.advisories,
                "reused": result.reused,
            }

        def scan_by_hand() -> dict[str, Any]:
            out = fresh(scratch / "by-hand-scan")
            env = {**by_hand_env, "CHECKOUT": str(ctx.workspace.checkout), "OUT": str(out)}
            result = bash(SCAN_BY_HAND, env, scratch, args.timeout)
            inventory = json.loads((out / "inventory.json").read_text())
            sarif = json.loads((out / "bandit.sarif").read_text())
            results = sum(len(run.get("results", [])) for run in sarif["runs"])
            return {"seconds": result, "distributions": len(inventory), "bandit_results": results}

        scan_rows = alternate(args.runs, scan, scan_by_hand)

        history = HistoryStore(config.history_db_url)
        key = scratch / "by-hand-key.pem"
        subprocess.run(
            ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True
        )

        def publish() -> dict[str, Any]:
            shutil.rmtree(artifact_store(config).root, ignore_errors=True)
            with timed_parts(artifact_stage, PUBLISH_PARTS) as parts:
                started = time.perf_counter()
                sbom = run_sbom(ctx, pipeline)
                sbom_s = time.perf_counter() - started
                outcome = publish_artifacts(
                    ctx,
                    pipeline,
                    history,
                    invocation_id=str(uuid.uuid4()),
                    started_on=datetime.now(UTC),
                )
                seconds = time.perf_counter() - started
            return {
                "seconds": seconds,
                "parts": dict(parts),
                "sbom_s": sbom_s,
                "artifact_s": seconds - sbom_s,
                "sbom_components": sbom.summary.component_count,
                "stored": [record.path for record in outcome.stored],
                "reused": sbom.reused or outcome.reused,
            }

        def publish_by_hand() -> dict[str, Any]:
            out = fresh(scratch / "by-hand-publish")
            store = scratch / "by-hand-store"
            shutil.rmtree(store, ignore_errors=True)
            (artifact,) = build.artifacts
            env = {
                **by_hand_env,
                "OUT": str(out),
                "STORE": str(store),
                "KEY": str(key),
                "ARTIFACT": str(ctx.workspace.artifacts_dir / artifact.path),
            }
            seconds = bash(PUBLISH_BY_HAND, env, scratch, args.timeout)
            return {"seconds": seconds, "stored": sorted(p.name for p in store.iterdir())}

        publish_rows = alternate(args.runs, publish, publish_by_hand)

        environment = environment_for(config, REPOSITORY, config.environment("prod"))
        try:
            deployed = deploy_commit_in_process(config, REPOSITORY, "prod", sha)
            if deployed["status"] != "deployed":
                raise RuntimeError(f"the deploy failed: {deployed}")

            def rescan() -> dict[str, Any]:
                now = datetime.now(UTC)
                with timed_parts(rescan_stage, RESCAN_PARTS) as parts:
                    started = time.perf_counter()
                    result = rescan_in_service(
                        config, history, REPOSITORY, now=now, today=now.date()
                    )
                    seconds = time.perf_counter() - started
                (commit,) = result.commits
                return {
                    "seconds": seconds,
                    "parts": dict(parts),
                    "error": commit.error,
                    "dependencies": commit.dependencies,
                    "findings": len(commit.findings),
                    "new": len(commit.new),
                    "advisories": result.advisories,
                }

            rescan_rows = alternate(args.runs, rescan, scan)
        finally:
            tear_down(environment)

        results = summarise(scan_rows, publish_rows, rescan_rows)
        write_results(
            "security" if args.format == "json" else f"security_{args.format}",
            {
                **metadata(),
                "runs": args.runs,
                "checkout": {
                    "python_files": sum(1 for _ in (repo / "cicd_dagster").rglob("*.py")),
                    "distributions_installed": len(requirements),
                    "advisories": args.advisories,
                    "matching_advisories": args.matching,
                    "advisory_format": args.format,
                },
                "first_ci_run_s": round(first_run_s, 2),
                "loadavg_after": loadavg(),
                "scan_by_hand_script": SCAN_BY_HAND,
                "publish_by_hand_script": PUBLISH_BY_HAND,
                **results,
                "raw": {"scan": scan_rows, "publish": publish_rows, "rescan": rescan_rows},
            },
        )
    return 0


# --- the measured commit ---------------------------------------------------------------------


def prepare_process_environment(scratch: Path, uv_cache: Path) -> None:
    """This process hosts the stages: its own Dagster instance in scratch (run_commit puts
    it under the control plane's home), the machine's uv cache for the offline install,
    and a bytecode cache for the Python processes both sides start (as _common.tool_env)."""
    for name in ("DAGSTER_HOME", "CICD_CONFIG", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV"):
        os.environ.pop(name, None)
    os.environ["UV_CACHE_DIR"] = str(uv_cache)
    os.environ["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")


def cached_requirements(scratch: Path, uv_cache: Path) -> list[str]:
    """name==version of this project's .venv distributions that the uv cache holds (an
    offline install of one missing would fail the whole install)."""
    listed = subprocess.run(
        [PYTHON, "-m", "pip", "list", "--format", "json", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    )
    probe = scratch / "probe-env"
    subprocess.run([uv_bin(), "venv", "--quiet", str(probe)], check=True)
    env = {**os.environ, "VIRTUAL_ENV": str(probe), "UV_CACHE_DIR": str(uv_cache)}
    cached = []
    for item in json.loads(listed.stdout):
        requirement = f"{item['name']}=={item['version']}"
        # A real install: a dry run resolves from cached index pages without the wheel.
        installed = subprocess.run(
            [uv_bin(), "pip", "install", "--offline", "--no-deps", requirement],
            env=env,
            capture_output=True,
        )
        if installed.returncode == 0:
            cached.append(requirement)
    shutil.rmtree(probe)
    if len(cached) < 20:
        raise RuntimeError(f"only {len(cached)} distributions in the uv cache {uv_cache}")
    return cached


def make_checkout(repo: Path, requirements: list[str]) -> str:
    shutil.copytree(
        ROOT / "cicd_dagster",
        repo / "cicd_dagster",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    (repo / "service.py").write_text(SERVICE)
    (repo / "requirements.txt").write_text("\n".join(requirements) + "\n")
    (repo / ".cicd.yml").write_text(PIPELINE.format(report=junit_xml(3)) + SERVICE_CONFIG)
    return init_repository(repo, "cicd_dagster as an application")


def write_advisories(
    folder: Path, requirements: list[str], count: int, matching: int, suffix: str
) -> None:
    """`count` OSV records in the pypa/advisory-database layout (one folder per package),
    each naming an installed distribution; `matching` of them affect its version."""
    yaml = YAML()
    installed = [tuple(r.split("==")) for r in requirements]
    chosen = random.Random(4)
    hits = set(chosen.sample(range(count), min(matching, count)))
    for index in range(count):
        name, version = installed[index % len(installed)]
        advisory_id = f"PYSEC-2099-{index:05d}"
        if index in hits:
            ranges = [_range("0", _above(version, 1))]
            severity = chosen.choice(["LOW", "MODERATE"])
        else:
            ranges = [_range("0", _below(version))]
            for step in range(chosen.randint(0, 2)):
                ranges.append(_range(_above(version, 2 * step + 1), _above(version, 2 * step + 2)))
            severity = chosen.choice(["LOW", "MODERATE", "HIGH", "CRITICAL"])
        record = {
            "schema_version": "1.6.0",
            "id": advisory_id,
            "aliases": [f"CVE-2099-{index:05d}", f"GHSA-{index:04x}-bench-0000"],
            "summary": f"{name}: generated advisory {index}",
            "details": "Generated for the benchmark. " * 8,
            "modified": "2026-01-01T00:00:00Z",
            "published": "2025-06-01T00:00:00Z",
            "affected": [
                {
                    "package": {"ecosystem": "PyPI", "name": name, "purl": f"pkg:pypi/{name}"},
                    "ranges": ranges,
                    "versions": [_below(version), f"{_below(version)}.post1"],
                }
            ],
            "references": [{"type": "WEB", "url": f"https://example.com/{advisory_id}"}],
            "database_specific": {"severity": severity},
        }
        target = folder / name.lower() / f"{advisory_id}.{suffix}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if suffix == "yaml":
            yaml.dump(record, target)
        else:
            target.write_text(json.dumps(record, indent=2))


def _range(introduced: str, fixed: str) -> dict[str, Any]:
    return {"type": "ECOSYSTEM", "events": [{"introduced": introduced}, {"fixed": fixed}]}


def _below(version: str) -> str:
    """A version lower than `version` (0.0.0.dev0 below 0.0.0)."""
    release = list(Version(version).release)
    for index, part in enumerate(release):
        if part > 0:
            return ".".join(map(str, [*release[:index], part - 1, 99]))
    return "0.0.0.dev0"


def _above(version: str, by: int) -> str:
    return f"{Version(version).release[0] + by}.0"


def site_packages_of(env_dir: Path) -> Path:
    scheme = sysconfig.get_paths(vars={"base": str(env_dir), "platbase": str(env_dir)})
    return Path(scheme["purelib"])


# --- timing ------------------------------------------------------------------------------------


@contextmanager
def timed_parts(module: ModuleType, names: tuple[str, ...]) -> Iterator[dict[str, float]]:
    """Seconds spent in each named function of `module` while the block runs: the names
    are rebound to timing wrappers that call the originals, and restored afterwards."""
    spent: dict[str, float] = defaultdict(float)
    originals = {name: getattr(module, name) for name in names}

    def wrap(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - started

        return timed

    for name, function in originals.items():
        setattr(module, name, wrap(name, function))
    try:
        yield spent
    finally:
        for name, function in originals.items():
            setattr(module, name, function)


def alternate(
    runs: int, first: Callable[[], dict[str, Any]], second: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """One untimed warm-up of each, then `runs` of each, alternating which goes first."""
    rows: dict[str, Any] = {"warmup": [first(), second()], "a": [], "b": []}
    for index in range(runs):
        order = [("a", first), ("b", second)]
        for label, measure in order if index % 2 == 0 else reversed(order):
            rows[label].append(measure())
            print(f"  {measure.__name__}: {rows[label][-1]['seconds']:.2f} s", file=sys.stderr)
    return rows


def bash(script: str, env: dict[str, str], cwd: Path, timeout_s: float) -> float:
    result = timed_run(["bash", "-c", script], env=env, cwd=cwd, timeout_s=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"by-hand script failed ({result.returncode}):\n{result.stderr}")
    return result.seconds


def fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def _count_by_kind(findings: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for finding in findings:
        counts[finding.kind] += 1
    return dict(counts)


# --- report ------------------------------------------------------------------------------------


def summarise(scan: dict[str, Any], publish: dict[str, Any], rescan: dict[str, Any]) -> dict:
    def seconds(rows: list[dict[str, Any]], key: str = "seconds") -> float:
        return round(median([row[key] for row in rows]), 3)

    stage_s, by_hand_s = seconds(scan["a"]), seconds(scan["b"])

    def parts_of(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, float]:
        return {
            name: round(median([row["parts"].get(name, 0.0) for row in rows]), 3) for name in names
        }

    parts = parts_of(scan["a"], SCAN_PARTS)
    publish_s, publish_by_hand_s = seconds(publish["a"]), seconds(publish["b"])
    rescan_s, full_scan_s = seconds(rescan["a"]), seconds(rescan["b"])
    summary = {
        "security_scan": {
            "stage_s": stage_s,
            "by_hand_s": by_hand_s,
            "ratio": round(stage_s / by_hand_s, 2),
            "parts_s": parts,
            "bandit_share": round(parts["run_bandit"] / stage_s, 2),
            "findings": scan["a"][-1]["findings"],
        },
        "sbom_artifact": {
            "stages_s": publish_s,
            "sbom_s": seconds(publish["a"], "sbom_s"),
            "artifact_s": seconds(publish["a"], "artifact_s"),
            "by_hand_s": publish_by_hand_s,
            "ratio": round(publish_s / publish_by_hand_s, 2),
            "parts_s": parts_of(publish["a"], PUBLISH_PARTS),
        },
        "rescan": {
            "rescan_s": rescan_s,
            "full_scan_s": full_scan_s,
            "ratio": round(rescan_s / full_scan_s, 3),
            "parts_s": parts_of(rescan["a"], RESCAN_PARTS),
            "findings": rescan["a"][-1]["findings"],
        },
    }
    print()
    print_table(
        ["measured", "cicd", "compared with", "seconds", "ratio"],
        [
            [
                "security_scan (forced)",
                stage_s,
                "bandit + pip list",
                by_hand_s,
                f"{stage_s / by_hand_s:.2f}x",
            ],
            [
                "sbom + artifact",
                publish_s,
                "sha256sum, cp, openssl",
                publish_by_hand_s,
                f"{publish_s / publish_by_hand_s:.2f}x",
            ],
            [
                "rescan_in_service",
                rescan_s,
                "full security_scan",
                full_scan_s,
                f"{rescan_s / full_scan_s:.3f}",
            ],
        ],
    )
    print()
    print_table(
        ["stage part (median s)", "security_scan", "sbom + artifact", "rescan"],
        [
            [name, *(summary[key]["parts_s"].get(name, "-") for key in summary)]
            for name in dict.fromkeys([*SCAN_PARTS, *PUBLISH_PARTS, *RESCAN_PARTS])
        ],
    )
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
