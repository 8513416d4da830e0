"""The UI path for real: `cicd ui` on loopback, driven through the webserver's GraphQL API.

The tests start `cicd ui` (which execs `dagster dev`: webserver, daemon and a code
server) on a fresh DAGSTER_HOME, then do what a user does in the UI: add a commit
as a partition, launch the repository's CI job for it, and read back the run's status,
the unit_tests materialization's metadata and the min_pass_rate check.

Why `dagster dev` rather than the bare webserver with a DefaultRunCoordinator: `cicd ui`
runs `dagster dev`, and a fresh instance there queues runs (QueuedRunCoordinator) for the
daemon to launch. Testing the bare webserver would need an instance setting no user has
and would skip the queue -> daemon -> run worker hop that users depend on.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import commit, control_config, junit_xml, pipeline_writing_reports

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
REPO = "shop"
JOB = f"{REPO}_ci"
PARTITIONS = f"{REPO}_commits"
UNIT = [REPO, "unit_tests"]
STAGES = (
    "source",
    "build",
    "unit_tests",
    "integration_tests",
    "e2e_tests",
    "performance_tests",
    "security_scan",
    "sbom",
    "artifact",
)

START_TIMEOUT_S = 120  # webserver answering and the code location loaded
RUN_TIMEOUT_S = 180  # one launched run reaching a terminal status
STOP_TIMEOUT_S = 30  # SIGINT grace before the process group is killed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGINT the process group, wait, then SIGKILL whatever of the group is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT_S)
    # Also after a clean exit: a run worker or code server may have outlived its parent.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


@dataclass
class Dagster:
    """A running `dagster dev` and the GraphQL API of its webserver."""

    url: str
    log: Path
    location: str = ""

    def graphql(self, query: str, **variables: Any) -> dict[str, Any]:
        response = requests.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables}, timeout=30
        )
        response.raise_for_status()
        body = response.json()
        assert not body.get("errors"), body["errors"]
        data: dict[str, Any] = body["data"]
        return data

    @property
    def repository_selector(self) -> dict[str, str]:
        return {"repositoryLocationName": self.location, "repositoryName": "__repository__"}


@dataclass(frozen=True)
class Plane:
    dagster: Dagster
    green: str  # a commit whose 3 unit tests pass
    red: str  # a commit whose unit report has 2 passed and 1 failed


WORKSPACE_QUERY = """
query {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on PythonError { message stack }
          ... on RepositoryLocation {
            repositories { name jobs { name } sensors { name sensorState { status } } }
          }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""


def wait_until_loaded(dagster: Dagster, process: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Wait for /server_info, then for every code location to finish loading."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert process.poll() is None, f"dagster dev exited early:\n{tail(dagster.log)}"
        assert time.monotonic() < deadline, f"dagster dev did not come up:\n{tail(dagster.log)}"
        try:
            if requests.get(f"{dagster.url}/server_info", timeout=2).ok:
                workspace = dagster.graphql(WORKSPACE_QUERY)["workspaceOrError"]
                entries = workspace.get("locationEntries") or []
                if entries and all(entry["loadStatus"] == "LOADED" for entry in entries):
                    return workspace
        except requests.RequestException:
            pass
        time.sleep(0.5)


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    base = tmp_path_factory.mktemp("webserver")
    repo = base / "repos" / REPO
    green = commit(repo, {".cicd.yml": pipeline_writing_reports()}, "feat: green")
    red = commit(
        repo, {".cicd.yml": pipeline_writing_reports(junit_xml(passed=2, failed=1))}, "fix: red"
    )
    # The daemon runs the repository sensor (RUNNING by default). It watches only release/*
    # here, so the commits on main are built only by the runs this test launches and the
    # assertions see exactly those runs.
    config = control_config(base, {REPO: repo}, repo_extra='branches: ["release/*"]')
    with running_ui(base, config) as dagster:
        yield Plane(dagster=dagster, green=green, red=red)


@contextlib.contextmanager
def running_ui(base: Path, config: Path) -> Iterator[Dagster]:
    """`cicd ui` on a free loopback port with a fresh DAGSTER_HOME under `base`, once its
    code location has loaded; the whole process group is stopped on exit."""
    home = base / "dagster_home"
    home.mkdir()
    # A fresh instance as a user gets one: defaults (queued runs), no telemetry.
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = free_port()
    log = base / "dagster-dev.log"
    env = {**os.environ, "CICD_CONFIG": str(config), "DAGSTER_HOME": str(home)}
    with log.open("wb") as out:
        process = subprocess.Popen(
            # What a user runs: `cicd ui` writes its workspace and execs `dagster dev`.
            [str(BIN / "cicd"), "ui", "--host", "127.0.0.1", "--port", str(port)],
            cwd=base,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole below
        )
    try:
        dagster = Dagster(url=f"http://127.0.0.1:{port}", log=log)
        workspace_state = wait_until_loaded(dagster, process)
        (entry,) = workspace_state["locationEntries"]
        loaded = entry["locationOrLoadError"]
        assert loaded["__typename"] == "RepositoryLocation", loaded
        dagster.location = entry["name"]
        yield dagster
    finally:
        stop_group(process)


ADD_PARTITION = """
mutation($selector: RepositorySelector!, $name: String!, $key: String!) {
  addDynamicPartition(repositorySelector: $selector, partitionsDefName: $name, partitionKey: $key) {
    __typename
    ... on AddDynamicPartitionSuccess { partitionKey }
    ... on Error { message }
    ... on PythonError { stack }
  }
}
"""

LAUNCH_RUN = """
mutation($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on Error { message }
    ... on PythonError { stack }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""

RUN_STATUS = """
query($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status stepStats { stepKey status } }
    ... on Error { message }
  }
}
"""

TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def launch_commit(dagster: Dagster, sha: str) -> str:
    """What the UI does: add the commit as a partition and launch the CI job for it."""
    added = dagster.graphql(
        ADD_PARTITION, selector=dagster.repository_selector, name=PARTITIONS, key=sha
    )["addDynamicPartition"]
    assert added["__typename"] == "AddDynamicPartitionSuccess", added
    params: dict[str, Any] = {
        "selector": {**dagster.repository_selector, "jobName": JOB},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": sha}]},
    }
    launched = dagster.graphql(LAUNCH_RUN, params=params)["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id: str = launched["run"]["runId"]
    return run_id


def wait_for_run(dagster: Dagster, run_id: str) -> dict[str, Any]:
    """Poll the run until it ends (the daemon dequeues it, a run worker executes it)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        run = dagster.graphql(RUN_STATUS, runId=run_id)["runOrError"]
        assert run["__typename"] == "Run", run
        if run["status"] in TERMINAL:
            return {"runId": run_id, **run}
        assert time.monotonic() < deadline, (
            f"run {run_id} still {run['status']} after {RUN_TIMEOUT_S}s:\n{tail(dagster.log)}"
        )
        time.sleep(1)


@pytest.fixture(scope="module")
def launched(plane: Plane) -> dict[str, str]:
    """Both commits launched up front, as two pushes would be: {sha: run id}.

    Both run exactly as the UI's "Materialize all" launches them (the CI job's own
    in-process executor); the two runs overlap, so two run workers write the history DB
    at once and the module waits about as long as for one run.
    """
    return {sha: launch_commit(plane.dagster, sha) for sha in (plane.green, plane.red)}


MATERIALIZATIONS = """
query($key: AssetKeyInput!, $partition: String!) {
  assetOrError(assetKey: $key) {
    __typename
    ... on Asset {
      assetMaterializations(partitions: [$partition], limit: 1) {
        runId
        partition
        metadataEntries {
          label
          __typename
          ... on IntMetadataEntry { intValue }
          ... on FloatMetadataEntry { floatValue }
          ... on TextMetadataEntry { text }
        }
      }
    }
  }
}
"""

CHECK_EXECUTIONS = """
query($key: AssetKeyInput!, $check: String!, $partition: String) {
  assetCheckExecutions(assetKey: $key, checkName: $check, partition: $partition, limit: 20) {
    runId
    status
    partition
    evaluation {
      success
      severity
      partition
      metadataEntries {
        label
        ... on TextMetadataEntry { text }
        ... on FloatMetadataEntry { floatValue }
      }
    }
  }
}
"""


def unit_metadata(dagster: Dagster, sha: str, run_id: str) -> dict[str, Any]:
    """The unit_tests materialization of `sha`, written by `run_id`: {label: (type, value)}."""
    asset = dagster.graphql(MATERIALIZATIONS, key={"path": UNIT}, partition=sha)["assetOrError"]
    assert asset["__typename"] == "Asset", asset
    (latest,) = asset["assetMaterializations"]
    assert (latest["runId"], latest["partition"]) == (run_id, sha)
    values: dict[str, Any] = {}
    for entry in latest["metadataEntries"]:
        value = next(
            (entry[field] for field in ("intValue", "floatValue", "text") if field in entry), None
        )
        values[entry["label"]] = (entry["__typename"], value)
    return values


def pass_rate_check(dagster: Dagster, sha: str, run_id: str) -> dict[str, Any]:
    """The min_pass_rate execution of `run_id`, which must be recorded against `sha`."""
    every = dagster.graphql(
        CHECK_EXECUTIONS, key={"path": UNIT}, check="min_pass_rate", partition=None
    )["assetCheckExecutions"]
    mine = [execution for execution in every if execution["runId"] == run_id]
    assert len(mine) == 1, every
    # Per commit, as the UI shows it: the check must be partitioned like its asset, or a
    # red commit's gate would read as the latest result of every commit.
    assert mine[0]["partition"] == sha, (
        f"min_pass_rate of run {run_id} is recorded for partition {mine[0]['partition']!r}, "
        f"not the commit {sha}: declare the AssetCheckSpec with partitions_def"
    )
    per_partition = dagster.graphql(
        CHECK_EXECUTIONS, key={"path": UNIT}, check="min_pass_rate", partition=sha
    )["assetCheckExecutions"]
    assert [execution["runId"] for execution in per_partition] == [run_id], per_partition
    execution: dict[str, Any] = mine[0]
    return execution


def test_green_commit_materializes_with_metadata_and_passing_gate(
    plane: Plane, launched: dict[str, str]
) -> None:
    dagster = plane.dagster
    run = wait_for_run(dagster, launched[plane.green])

    assert run["status"] == "SUCCESS", f"{run}\n{tail(dagster.log)}"
    steps = {step["stepKey"]: step["status"] for step in run["stepStats"]}
    assert steps == {f"{REPO}__{stage}": "SUCCESS" for stage in STAGES}, steps

    metadata = unit_metadata(dagster, plane.green, run["runId"])
    assert metadata["tests"] == ("IntMetadataEntry", 3)
    assert metadata["passed"] == ("IntMetadataEntry", 3)
    assert metadata["failed"] == ("IntMetadataEntry", 0)
    assert metadata["pass_rate"] == ("FloatMetadataEntry", 1.0)
    assert metadata["status"][1] == "success", metadata["status"]

    check = pass_rate_check(dagster, plane.green, run["runId"])
    assert check["status"] == "SUCCEEDED", check
    assert check["evaluation"]["success"] is True
    assert check["evaluation"]["severity"] == "ERROR"


def test_red_commit_fails_the_blocking_pass_rate_gate(
    plane: Plane, launched: dict[str, str]
) -> None:
    dagster = plane.dagster
    run = wait_for_run(dagster, launched[plane.red])

    # A failed blocking check fails its step, and with it the run.
    assert run["status"] == "FAILURE", f"{run}\n{tail(dagster.log)}"
    steps = {step["stepKey"]: step["status"] for step in run["stepStats"]}
    assert steps[f"{REPO}__unit_tests"] == "FAILURE", steps

    metadata = unit_metadata(dagster, plane.red, run["runId"])
    assert metadata["tests"] == ("IntMetadataEntry", 3)
    assert metadata["passed"] == ("IntMetadataEntry", 2)
    assert metadata["failed"] == ("IntMetadataEntry", 1)
    assert metadata["pass_rate"][0] == "FloatMetadataEntry"
    assert metadata["pass_rate"][1] == pytest.approx(2 / 3)

    check = pass_rate_check(dagster, plane.red, run["runId"])
    assert check["status"] == "FAILED", check
    assert check["evaluation"]["success"] is False
    detail = {entry["label"]: entry.get("text") for entry in check["evaluation"]["metadataEntries"]}
    assert "2 of 3 tests passed" in (detail.get("detail") or ""), detail


def test_the_ui_shows_the_repository_job_and_sensor(plane: Plane) -> None:
    workspace = plane.dagster.graphql(WORKSPACE_QUERY)["workspaceOrError"]
    (entry,) = workspace["locationEntries"]
    (repository,) = entry["locationOrLoadError"]["repositories"]
    assert repository["name"] == "__repository__"
    assert JOB in {job["name"] for job in repository["jobs"]}
    sensors = {sensor["name"]: sensor["sensorState"]["status"] for sensor in repository["sensors"]}
    # The run-failure sensor turns failed runs into `failed` events for notifications; the
    # analytics sensor refreshes the analytics on new deployments, incidents and events.
    assert sensors == {
        f"{REPO}_commits": "RUNNING",
        "run_failure_events": "RUNNING",
        "analytics_on_new_history": "RUNNING",
    }


def test_repository_root_workspace_loads_without_error(tmp_path: Path) -> None:
    """`dagster dev` in the repository root loads ./workspace.yaml, and loads it cleanly.

    `dagster definitions validate` with no target resolves the workspace as `dagster dev`
    does (pyproject's [tool.dagster] first, else ./workspace.yaml) and loads it in-process:
    the location's name shows that workspace.yaml, not some other target, was loaded.
    """
    repo = tmp_path / "repos" / REPO
    commit(repo, {".cicd.yml": pipeline_writing_reports()}, "feat: first")
    config = control_config(tmp_path, {REPO: repo})
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**os.environ, "CICD_CONFIG": str(config), "DAGSTER_HOME": str(home)}
    done = subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Validation successful for code location cicd_dagster.definitions:defs" in output
    assert "All code locations passed validation" in output, output
