"""What the benchmark scripts share: paths, environments, timing, git, reporting.

Everything a benchmark creates lives in a temporary folder that is removed at the end;
the only thing written inside the project is benchmarks/results/<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# BENCH_RESULTS_DIR sends the JSON elsewhere (a smoke run that must not replace the figures).
RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS_DIR") or ROOT / "benchmarks" / "results")
VENV_BIN = ROOT / ".venv" / "bin"
# The interpreter that runs `cicd`: the project's venv, else whatever runs this script.
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
CICD = [PYTHON, "-m", "cicd_dagster"]
GIT_AUTHOR = ["-c", "user.name=Bench", "-c", "user.email=bench@example.com"]


def uv_bin() -> str:
    from uv import find_uv_bin  # the uv the product itself uses for build envs

    return str(find_uv_bin())


# --- environments ------------------------------------------------------------------------


def tool_env(
    scratch: Path, *, uv_cache: Path, bytecode_cache: bool = True, **extra: str
) -> dict[str, str]:
    """The environment `cicd` and `dagster-daemon` run with.

    No DAGSTER_HOME or CICD_CONFIG leaks in from the caller. Python bytecode goes to a
    pycache under `scratch` (PYTHONPYCACHEPREFIX) so that each `cicd` process does not
    compile Dagster from source again when the caller's shell sets
    PYTHONDONTWRITEBYTECODE (as this sandbox does) -- an installed venv normally has its
    .pyc files -- and nothing is written into the project's .venv.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DAGSTER_HOME", "CICD_CONFIG", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV")
    }
    if bytecode_cache:
        env["PYTHONPYCACHEPREFIX"] = str(scratch / "pycache")
    else:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
    env["UV_CACHE_DIR"] = str(uv_cache)
    env.update(extra)
    return env


def step_env(uv_cache: Path) -> dict[str, str]:
    """What a by-hand script gets: the same minimal environment cicd gives its steps."""
    from cicd_dagster.runner import base_environment

    env = base_environment({"UV_CACHE_DIR": str(uv_cache), "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    # A user's shell would not have PYTHONDONTWRITEBYTECODE either way: base_environment
    # already drops it, as the cicd steps do.
    return env


# --- processes and time -------------------------------------------------------------------


class Timed:
    def __init__(self, seconds: float, returncode: int, stdout: str, stderr: str) -> None:
        self.seconds, self.returncode, self.stdout, self.stderr = (
            seconds,
            returncode,
            stdout,
            stderr,
        )


def timed_run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: Path,
    timeout_s: float,
) -> Timed:
    """Run argv in its own process group, wall-clock timed; the group is killed on timeout."""
    started = time.perf_counter()
    process = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(process.pid)
        stdout, stderr = process.communicate()
        raise RuntimeError(
            f"timed out after {timeout_s:.0f} s: {' '.join(argv)}\n{stderr[-2000:]}"
        ) from None
    except BaseException:
        kill_group(process.pid)
        process.wait()
        raise
    return Timed(time.perf_counter() - started, process.returncode, stdout, stderr)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def loadavg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# --- git ----------------------------------------------------------------------------------


def git(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        ["git", *GIT_AUTHOR, *args], cwd=cwd, check=True, capture_output=True, text=True
    )
    return result.stdout.strip()


def init_repository(path: Path, message: str = "initial") -> str:
    """Make `path` (already holding files) a git repository with one commit on main."""
    git("init", "--quiet", "--initial-branch=main", cwd=path)
    git("add", "--all", cwd=path)
    git("commit", "--quiet", "-m", message, cwd=path)
    return git("rev-parse", "HEAD", cwd=path)


def project_revision() -> str | None:
    """The commit of the project being measured, read from .git (no git command runs there)."""
    git_dir = ROOT / ".git"
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        loose = git_dir / ref
        if loose.exists():
            return loose.read_text().strip()
        for line in (git_dir / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return None


# --- the measured projects ----------------------------------------------------------------

MORE_ITERTOOLS_PIPELINE = """\
# The more-itertools sdist's own test suite, run by cicd-dagster.
build:
  install: uv pip install pytest
tests:
  unit:
    run: pytest -q -p no:cacheprovider tests --junitxml="$CICD_REPORTS_DIR/unit.xml"
"""


def make_demo_repository(dest: Path) -> Path:
    """The embedded demo project as a git repository (what `cicd demo --no-run` makes)."""
    from cicd_dagster.demo import create_demo_repository

    create_demo_repository(dest)
    return dest


def make_more_itertools_repository(dest: Path, scratch: Path, version: str | None) -> str:
    """more-itertools' sdist unpacked into a git repository with a .cicd.yml; returns the
    version downloaded."""
    download = scratch / "sdist"
    requirement = f"more-itertools=={version}" if version else "more-itertools"
    subprocess.run(
        [
            PYTHON,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            requirement,
            "-d",
            str(download),
        ],
        check=True,
        timeout=300,
    )
    (archive,) = download.glob("more_itertools-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(download, filter="data")
    (unpacked,) = (p for p in download.iterdir() if p.is_dir())
    shutil.copytree(unpacked, dest)
    (dest / ".cicd.yml").write_text(MORE_ITERTOOLS_PIPELINE)
    init_repository(dest, "more-itertools sdist")
    return unpacked.name.removeprefix("more_itertools-")


def write_control_config(
    folder: Path, name: str, url: Path, *, poll_interval_s: int | None = None
) -> Path:
    """A cicd.yaml whose home (state, Dagster instance, history DB) is inside `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "home: .cicd",
        "repositories:",
        f"  - name: {name}",
        f"    url: {json.dumps(str(url))}",
        '    branches: ["main"]',
    ]
    if poll_interval_s is not None:
        lines.append(f"    poll_interval_s: {poll_interval_s}")
    path = folder / "cicd.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


# --- cicd ---------------------------------------------------------------------------------


def reset_control_plane(home: Path) -> None:
    """Cold for the next timed run: no build env, checkout or stored stage result; the
    Dagster instance, history DB and git mirror stay (an installation that built before)."""
    for name in ("envs", "workspaces", "runs"):
        shutil.rmtree(home / name, ignore_errors=True)


def run_cicd(config: Path, name: str, env: dict[str, str], timeout_s: float) -> Timed:
    result = timed_run(
        [*CICD, "--config", str(config), "run", name, "--json"],
        env=env,
        cwd=config.parent,
        timeout_s=timeout_s,
    )
    if result.returncode not in (0, 1) or not result.stdout.strip():
        raise RuntimeError(f"cicd run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


# --- pytest's closing line ----------------------------------------------------------------

_CLOSING = re.compile(r"^=*\s*(?P<body>\d+ [a-z ]+(?:, \d+ [a-z ]+)*) in [\d.]+s")


def pytest_closing_line(output: str) -> tuple[str, dict[str, int]] | None:
    """The last `N passed, M skipped in 1.23s` line of pytest output, parsed:
    {"passed": N, "skipped": M, "subtests passed": ...}."""
    for raw in reversed(output.splitlines()):
        line = raw.strip()
        match = _CLOSING.match(line)
        if match:
            counts = {}
            for part in match["body"].split(", "):
                number, _, label = part.partition(" ")
                label = {"error": "errors", "warning": "warnings"}.get(label, label)
                counts[label] = int(number)
            return line.strip("= "), counts
    return None


def pytest_totals(counts: Mapping[str, int]) -> dict[str, int]:
    """pytest's counts in JUnit terms (xfailed are skipped, xpassed passed), subtests
    left out: JUnit has one <testcase> per test, not per subtest."""
    passed = counts.get("passed", 0) + counts.get("xpassed", 0)
    skipped = counts.get("skipped", 0) + counts.get("xfailed", 0)
    failed = counts.get("failed", 0)
    errors = counts.get("errors", 0)
    return {
        "tests": passed + skipped + failed + errors,
        "passed": passed,
        "failed": failed,
        "errors": errors,
        "skipped": skipped,
    }


# --- output -------------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def metadata() -> dict[str, Any]:
    import dagster

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "dagster": dagster.__version__,
        "project_revision": project_revision(),
        "note": "shared 2-core machine: other work ran alongside, figures are noisy",
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nresults: {path}")
    return path


@contextmanager
def scratch_dir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A temporary folder, removed afterwards (also on Ctrl-C or SIGTERM)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield path
    finally:
        signal.signal(signal.SIGTERM, previous)
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def add_project_arguments(parser: argparse.ArgumentParser) -> None:
    """The options (a) and (b) share: which projects, and how each run is made."""
    parser.add_argument(
        "--project",
        action="append",
        choices=["demo", "more-itertools"],
        help="measure only this project (repeatable; default both)",
    )
    parser.add_argument("--more-itertools-version", help="pin the sdist (default: latest)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="run cicd with PYTHONDONTWRITEBYTECODE=1 (compiles Dagster in every process)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
