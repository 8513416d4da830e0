"""Real git repositories and control-plane configs for tests, made in temp folders."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from cicd_dagster.deploy.strategies import Environment

T = TypeVar("T")

AUTHOR = ["-c", "user.name=Test Author", "-c", "user.email=author@example.com"]


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *AUTHOR, "-C", str(repo), *args], check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def commit(repo: Path, files: dict[str, str], message: str = "feat: change") -> str:
    """Write `files` into `repo` (creating it on first use) and commit them; returns the sha."""
    if not (repo / ".git").exists():
        repo.mkdir(parents=True, exist_ok=True)
        git(repo, "init", "--quiet", "--initial-branch=main")
    for name, text in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def junit_xml(passed: int = 1, failed: int = 0, skipped: int = 0) -> str:
    cases = [f'<testcase classname="t" name="ok{i}" time="0.01"/>' for i in range(passed)]
    cases += [
        f'<testcase classname="t" name="bad{i}"><failure message="boom {i}"/></testcase>'
        for i in range(failed)
    ]
    cases += [
        f'<testcase classname="t" name="skip{i}"><skipped message="later"/></testcase>'
        for i in range(skipped)
    ]
    return f'<testsuite name="t">{"".join(cases)}</testsuite>'


def pipeline_writing_reports(unit: str | None = None, extra: str = "") -> str:
    """A .cicd.yml whose unit stage writes a fixed JUnit report (no network, no pytest)."""
    report = unit if unit is not None else junit_xml(3)
    return (
        "build:\n"
        '  steps: ["mkdir -p dist && echo built > dist/app.txt"]\n'
        '  artifacts: ["dist/*.txt"]\n'
        "tests:\n"
        "  unit:\n"
        f"    run: printf '%s' '{report}' > \"$CICD_REPORTS_DIR/unit.xml\"\n" + extra
    )


def control_config(
    folder: Path, repositories: dict[str, Path | str], extra: str = "", repo_extra: str = ""
) -> Path:
    lines = ["home: .cicd", "repositories:"]
    for name, url in repositories.items():
        lines += [f"  - name: {name}", f"    url: {url}"]
        lines += [f"    {line}" for line in repo_extra.splitlines() if line]
    path = folder / "cicd.yaml"
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """A real pytest run in `directory`, unaffected by this test session's options."""
    env = {key: value for key, value in os.environ.items() if key != "PYTEST_ADDOPTS"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def pytest_counts(run: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """pytest's own closing line ("3 passed, 1 skipped in 0.1s") as {"passed": 3, ...}."""
    closing = run.stdout.strip().splitlines()[-1]
    return {word: int(count) for count, word in re.findall(r"(\d+) (\w+)", closing)}


REQUEST_TIMEOUT_S = 2.0
# No proxy from the environment: requests must reach services on 127.0.0.1.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url: str, timeout_s: float = REQUEST_TIMEOUT_S) -> str:
    """The body of a 200 answer, each request on a new connection."""
    with _DIRECT.open(url, timeout=timeout_s) as response:
        assert response.status == 200, response.status
        return str(response.read().decode())


class TrafficProbe(threading.Thread):
    """Sequential GETs against `url` until told to stop, or by itself after `max_requests`
    or `max_seconds`; records every answer and every failure (non-200 or exception)."""

    def __init__(self, url: str, max_requests: int = 3000, max_seconds: float = 20.0) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.max_requests = max_requests
        self.max_seconds = max_seconds
        self.answers: list[str] = []
        self.failures: list[str] = []
        self._stop_requested = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        for _ in range(self.max_requests):
            if self._stop_requested.is_set() or time.monotonic() > deadline:
                return
            try:
                self.answers.append(http_get(self.url))
            except Exception as error:  # any failure at all is a dropped request
                self.failures.append(repr(error))

    def finish(self) -> None:
        self._stop_requested.set()
        self.join()


def eventually(check: Callable[[], T | None], within_s: float = 30.0) -> T:
    """Poll `check` until it returns something truthy (a deadline, not a timing assert)."""
    deadline = time.monotonic() + within_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s}s")
        time.sleep(0.02)


def tear_down(environment: Environment) -> None:
    """Stop everything an environment runs, even after a test failed half-way: its slots,
    whatever else its target still runs, and its router. An error of down() is raised
    after the rest is stopped."""
    try:
        environment.down()
    finally:
        for state in environment.target.all():
            environment.target.stop(state.name, timeout_s=5)
            for pid in (state.pid, state.child_pid):
                if pid is not None:
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        environment.router.stop()
