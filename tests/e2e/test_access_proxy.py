"""The README's way to guard the UI, for real: its nginx example (basic auth) in front of
a read-only `dagster-webserver` on loopback. Without credentials nothing gets through;
with them the UI reads everything, and mutations (adding a partition, launching a run)
are refused by the read-only webserver."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.e2e.test_webserver import (
    ADD_PARTITION,
    BIN,
    LAUNCH_RUN,
    ROOT,
    Dagster,
    free_port,
    stop_group,
    tail,
    wait_until_loaded,
)
from tests.support import commit, control_config, pipeline_writing_reports

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

USER, PASSWORD = "ops-lead", "correct horse battery staple"
APPROVALS = "environments:\n  - name: prod\n    approvals: {required: 1}\n"


@dataclass(frozen=True)
class GuardedUI:
    proxy: str  # the URL people use
    dagster: Dagster  # the webserver itself, behind the proxy
    commit: str


def readme_nginx_example() -> str:
    """The server block of the README's nginx example."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Approvals and access control", 1)[1]
    match = re.search(r"```nginx\n(.*?)```", section, re.DOTALL)
    assert match, "the README's access control section has no nginx example"
    return match[1]


def start_nginx(nginx: str, root: Path, port: int, upstream: int) -> subprocess.Popen[bytes]:
    password = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=PASSWORD.encode(),
        capture_output=True,
        check=True,
    ).stdout.decode()
    (root / "htpasswd").write_text(f"{USER}:{password}")
    server = (
        readme_nginx_example()
        .replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{port};")
        .replace("http://127.0.0.1:3000;", f"http://127.0.0.1:{upstream};")
        .replace("/etc/nginx/dagster.htpasswd", str(root / "htpasswd"))
    )
    assert str(port) in server and str(upstream) in server and "/etc/nginx" not in server
    user = "user root;\n" if os.geteuid() == 0 else ""
    (root / "nginx.conf").write_text(
        f"{user}daemon off;\npid {root}/nginx.pid;\nerror_log {root}/error.log warn;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {root}/body;\n"
        f"  proxy_temp_path {root}/proxy;\n{server}\n}}\n"
    )
    return subprocess.Popen(
        [nginx, "-p", str(root), "-c", str(root / "nginx.conf")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_nginx(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, nginx: str) -> Iterator[GuardedUI]:
    base = tmp_path_factory.mktemp("guarded")
    sha = commit(base / "app", {".cicd.yml": pipeline_writing_reports()})
    config = control_config(base, {"app": base / "app"}, APPROVALS)
    workspace = base / "workspace.yaml"  # what `cicd ui` writes
    workspace.write_text(
        "load_from:\n  - python_module:\n      module_name: cicd_dagster.definitions\n"
        "      attribute: defs\n"
    )
    home = base / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port, proxy_port = free_port(), free_port()
    log = base / "webserver.log"
    env = {**os.environ, "CICD_CONFIG": str(config), "DAGSTER_HOME": str(home)}
    address = ["-h", "127.0.0.1", "-p", str(port)]
    with log.open("wb") as out:
        webserver = subprocess.Popen(
            [str(BIN / "dagster-webserver"), "--read-only", "-w", str(workspace), *address],
            cwd=base,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    proxy: subprocess.Popen[bytes] | None = None
    try:
        proxy_root = base / "proxy"
        proxy_root.mkdir()
        proxy = start_nginx(nginx, proxy_root, proxy_port, port)
        dagster = Dagster(url=f"http://127.0.0.1:{port}", log=log)
        (entry,) = wait_until_loaded(dagster, webserver)["locationEntries"]
        dagster.location = entry["name"]
        assert proxy.poll() is None, tail(proxy_root / "error.log")
        yield GuardedUI(f"http://127.0.0.1:{proxy_port}", dagster, sha)
    finally:
        if proxy is not None:
            stop_nginx(proxy)
        stop_group(webserver)


def graphql(ui: GuardedUI, query: str, **variables: object) -> dict[str, object]:
    response = requests.post(
        f"{ui.proxy}/graphql",
        json={"query": query, "variables": variables},
        auth=(USER, PASSWORD),
        timeout=30,
    )
    response.raise_for_status()
    body = response.json()
    assert not body.get("errors"), body["errors"]
    data: dict[str, object] = body["data"]
    return data


def test_the_proxy_lets_only_people_with_the_password_in(guarded):
    assert requests.get(f"{guarded.proxy}/server_info", timeout=10).status_code == 401
    wrong = requests.get(f"{guarded.proxy}/server_info", auth=(USER, "guess"), timeout=10)
    assert wrong.status_code == 401
    right = requests.get(f"{guarded.proxy}/server_info", auth=(USER, PASSWORD), timeout=10)
    assert right.status_code == 200
    assert "dagster_webserver_version" in right.json()


SENSORS = """
query($selector: RepositorySelector!) {
  sensorsOrError(repositorySelector: $selector) {
    ... on Sensors { results { name } }
  }
}
"""


def test_the_read_only_ui_shows_everything_and_changes_nothing(guarded):
    selector = guarded.dagster.repository_selector
    sensors = graphql(guarded, SENSORS, selector=selector)["sensorsOrError"]
    assert "app_approvals" in {sensor["name"] for sensor in sensors["results"]}  # type: ignore[index]

    added = graphql(
        guarded, ADD_PARTITION, selector=selector, name="app_commits", key=guarded.commit
    )["addDynamicPartition"]
    assert added["__typename"] == "UnauthorizedError", added  # type: ignore[index]

    params = {
        "selector": {**selector, "jobName": "app_deploy_prod"},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": guarded.commit}]},
    }
    launched = graphql(guarded, LAUNCH_RUN, params=params)["launchRun"]
    assert launched["__typename"] == "UnauthorizedError", launched  # type: ignore[index]
