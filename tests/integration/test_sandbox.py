"""Build steps in their sandbox, with real namespaces: the control plane's keys are out of
their reach, the host's mounts untouched, and everything else about steps unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from cicd_dagster.config import load_control_config
from cicd_dagster.runner import StepResult, base_environment, run_step
from cicd_dagster.sandbox import (
    SANDBOX_FAILED_EXIT,
    StepSandbox,
    hidden_paths,
    isolation_unavailable,
)
from cicd_dagster.security.provenance import SigningKey
from cicd_dagster.stages.deploy import environment_for
from jobs.inprocess import run_commit
from tests.support import commit, control_config, pipeline_writing_reports

ROOT = Path(__file__).resolve().parents[2]
KEY_TEXT = "-----BEGIN PRIVATE KEY----- not-for-steps"
AS_NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]

if isolation_unavailable() is not None:
    pytest.skip(
        f"steps cannot be isolated here: {isolation_unavailable()}", allow_module_level=True
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A control plane home with a signing key, a digest key and a signing key configured
    outside it; returns the cicd.yaml."""
    outside = tmp_path / "secrets" / "release-signing.pem"
    outside.parent.mkdir()
    outside.write_text(KEY_TEXT)
    config = control_config(
        tmp_path, {"app": tmp_path / "app"}, extra=f"security: {{signing_key: {outside}}}\n"
    )
    keys = tmp_path / ".cicd" / "keys"
    keys.mkdir(parents=True)
    (keys / "signing.pem").write_text(KEY_TEXT)
    (keys / "deploy-digest.key").write_text(KEY_TEXT)
    return config


def sandboxed(command: str, tmp_path: Path, sandbox: StepSandbox, **options: object) -> StepResult:
    settings: dict[str, object] = {
        "cwd": tmp_path,
        "env": base_environment({"HOME_KEYS": str(tmp_path / ".cicd" / "keys")}),
        "timeout_s": 30,
        "log_path": tmp_path / "logs" / "step.log",
        "sandbox": sandbox,
        **options,
    }
    return run_step(command, **settings)  # type: ignore[arg-type]


def test_step_cannot_read_the_signing_key_the_parent_still_can(tmp_path, home):
    sandbox = hidden_paths(load_control_config(home))
    result = sandboxed('cat "$HOME_KEYS/signing.pem"', tmp_path, sandbox)
    assert not result.ok
    assert "No such file or directory" in result.log_tail
    assert "not-for-steps" not in result.log_path.read_text()
    assert (tmp_path / ".cicd" / "keys" / "signing.pem").read_text() == KEY_TEXT


def test_step_cannot_plant_a_key_in_the_keys_folder(tmp_path, home):
    sandbox = hidden_paths(load_control_config(home))
    keys = tmp_path / ".cicd" / "keys"
    (keys / "signing.pem").unlink()  # before the first signing: nothing there yet
    for command in ('echo forged > "$HOME_KEYS/signing.pem"', 'mkdir "$HOME_KEYS/sub"'):
        result = sandboxed(command, tmp_path, sandbox)
        assert not result.ok
        assert "Read-only file system" in result.log_tail
    assert [path.name for path in keys.iterdir()] == ["deploy-digest.key"]


def test_configured_signing_key_reads_as_empty_and_the_digest_key_is_hidden(tmp_path, home):
    digest_key = tmp_path / ".cicd" / "keys" / "deploy-digest.key"
    config = load_control_config(home)
    sandbox = hidden_paths(config)
    assert config.security.signing_key is not None
    result = sandboxed(
        'wc -c < "$KEY" && wc -c < "$DIGEST_KEY" && echo forged > "$KEY"',
        tmp_path,
        sandbox,
        env=base_environment(
            {
                "KEY": str(config.security.signing_key),
                "DIGEST_KEY": str(digest_key),
            }
        ),
    )
    assert not result.ok  # the digest key is in the hidden keys folder: not there at all
    assert "No such file or directory" in result.log_tail
    assert result.log_tail.splitlines()[0] == "0"
    result = sandboxed(
        'echo forged > "$KEY"',
        tmp_path,
        sandbox,
        env=base_environment({"KEY": str(config.security.signing_key)}),
    )
    assert result.ok, result.log_tail
    assert config.security.signing_key.read_text() == KEY_TEXT  # the write went to /dev/null
    assert digest_key.read_text() == KEY_TEXT


def test_hidden_paths_creates_the_keys_folder_private(tmp_path):
    config = load_control_config(control_config(tmp_path, {"app": tmp_path / "app"}))
    sandbox = hidden_paths(config)
    keys = tmp_path / ".cicd" / "keys"
    assert sandbox.hidden_dirs == (keys,)
    assert sandbox.hidden_files == ()
    assert keys.stat().st_mode & 0o777 == 0o700


def test_host_mount_table_is_the_same_during_and_after_the_step(tmp_path, home):
    sandbox = hidden_paths(load_control_config(home))
    before = Path("/proc/self/mountinfo").read_text()
    during: list[str] = []
    result = sandboxed(
        "echo running",
        tmp_path,
        sandbox,
        on_line=lambda _: during.append(Path("/proc/self/mountinfo").read_text()),
    )
    assert result.ok
    assert during == [before]
    assert Path("/proc/self/mountinfo").read_text() == before


def test_key_is_not_reachable_through_proc_or_by_unmounting(tmp_path, home):
    """/proc/<pid>/root of a host process would show the host's files; the step sees only
    its own processes and cannot undo its mounts."""
    sandbox = hidden_paths(load_control_config(home))
    key = tmp_path / ".cicd" / "keys" / "signing.pem"
    result = sandboxed(
        f"""
        echo "pid $$"
        for pid in /proc/[0-9]*; do cat "$pid/root{key}" 2>/dev/null || true; done
        umount "$HOME_KEYS" 2>&1 || true
        umount /proc 2>&1 || true
        cat "$HOME_KEYS/signing.pem" 2>&1 || true
        """,
        tmp_path,
        sandbox,
    )
    assert result.ok, result.log_tail
    assert "not-for-steps" not in result.log_path.read_text()
    assert "pid 1" in result.log_tail
    assert "must be superuser" in result.log_tail


def test_processes_a_step_starts_die_with_it(tmp_path, home):
    sandbox = hidden_paths(load_control_config(home))
    marker = f"cicd-sandbox-orphan-{tmp_path.name}"
    result = sandboxed(
        f"(exec -a {marker} sleep 300) & setsid sleep 300 & exit 3", tmp_path, sandbox
    )
    assert result.exit_code == 3
    assert not [
        path
        for path in Path("/proc").glob("[0-9]*/cmdline")
        if marker.encode() in _read_or_empty(path)
    ]


def test_a_step_that_runs_too_long_is_stopped(tmp_path, home):
    sandbox = hidden_paths(load_control_config(home))
    result = sandboxed("sleep 300", tmp_path, sandbox, timeout_s=0.5)
    assert result.timed_out
    assert result.exit_code is None


def test_workspace_git_and_loopback_still_work_in_the_sandbox(tmp_path, home):
    sandbox = hidden_paths(load_control_config(home))
    loopback = (
        "import socket; server = socket.create_server(('127.0.0.1', 0)); "
        "socket.create_connection(server.getsockname()).sendall(b'up'); "
        "print(server.accept()[0].recv(2).decode())"
    )
    command = textwrap.dedent(
        f"""
        git init -q repo
        git -C repo -c user.email=a@b -c user.name=a commit -q --allow-empty -m x
        git -C repo log --oneline | wc -l
        {sys.executable} -c "{loopback}"
        echo artifact > "$CICD_ARTIFACTS_DIR/out.txt"
        """
    )
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    result = sandboxed(
        command,
        tmp_path,
        sandbox,
        env=base_environment({"CICD_ARTIFACTS_DIR": str(artifacts)}),
    )
    assert result.ok, result.log_tail
    assert result.log_tail.splitlines()[-2:] == ["1", "up"]
    assert (artifacts / "out.txt").read_text() == "artifact\n"


def test_smoke_commands_of_an_environment_run_in_the_sandbox(tmp_path, home):
    home.write_text(home.read_text() + "environments:\n  - name: dev\n")
    config = load_control_config(home)
    environment = environment_for(config, "app", config.environments[0])
    assert environment.smoke_sandbox == hidden_paths(config)


def test_a_sandbox_that_cannot_be_set_up_never_runs_the_step(tmp_path):
    ran = tmp_path / "ran"
    result = sandboxed(
        f"touch {ran}", tmp_path, StepSandbox(hidden_dirs=(tmp_path / "no-such-folder",))
    )
    assert result.exit_code == SANDBOX_FAILED_EXIT
    assert "could not be isolated" in result.log_tail
    assert "no-such-folder" in result.log_tail
    assert not ran.exists()


@pytest.fixture
def unprivileged_dir() -> Iterator[Path]:
    """A folder nobody (65534) can use: pytest's tmp_path is root's alone."""
    with tempfile.TemporaryDirectory(prefix="cicd-sandbox-") as name:
        folder = Path(name)
        folder.chmod(0o755)
        yield folder


def _userns_disabled() -> str | None:
    for path, forbidding in (
        ("/proc/sys/kernel/unprivileged_userns_clone", "0"),
        ("/proc/sys/user/max_user_namespaces", "0"),
    ):
        if _read_or_empty(Path(path)).strip() == forbidding.encode():
            return f"{path} is {forbidding}: the kernel forbids unprivileged user namespaces"
    return None


def test_unprivileged_step_is_isolated_in_a_user_namespace(unprivileged_dir):
    if reason := _userns_disabled():
        pytest.skip(reason)
    keys = unprivileged_dir / "keys"
    keys.mkdir(mode=0o700)
    (keys / "signing.pem").write_text(KEY_TEXT)
    digest = unprivileged_dir / "deploy-digest.key"
    digest.write_text(KEY_TEXT)
    for path in (unprivileged_dir, keys, keys / "signing.pem", digest):
        subprocess.run(["chown", "65534:65534", path], check=True)
    # The system Python (the venv's lives under /root): runner and sandbox are stdlib only.
    script = textwrap.dedent(
        f"""
        import json, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        from pathlib import Path
        from cicd_dagster.runner import base_environment, run_step
        from cicd_dagster.sandbox import StepSandbox, isolation_unavailable
        folder = Path({str(unprivileged_dir)!r})
        sandbox = StepSandbox((folder / "keys",), (folder / "deploy-digest.key",))
        result = run_step(
            'id -u; wc -c < deploy-digest.key; cat keys/signing.pem || true; '
            'touch keys/planted || true; '
            'for p in /proc/[0-9]*; do cat "$p/root{keys}/signing.pem" 2>/dev/null || true; done',
            cwd=folder, env=base_environment(), timeout_s=30,
            log_path=folder / "step.log", sandbox=sandbox,
        )
        print(json.dumps({{"unavailable": isolation_unavailable(), "uid": os.getuid(),
                          "exit": result.exit_code, "log": (folder / "step.log").read_text()}}))
        """
    )
    done = subprocess.run(
        [*AS_NOBODY, "/usr/bin/python3", "-c", script],
        cwd=unprivileged_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["unavailable"] is None
    assert report["uid"] == 65534
    assert report["exit"] == 0, report["log"]
    assert "not-for-steps" not in report["log"]
    assert "65534\n0\n" in report["log"]  # its own uid; the digest key reads empty
    assert "Read-only file system" in report["log"]
    assert sorted(p.name for p in keys.iterdir()) == ["signing.pem"]
    assert (keys / "signing.pem").read_text() == KEY_TEXT


@pytest.mark.slow
def test_pipeline_signs_and_verifies_while_its_steps_cannot_touch_the_key(tmp_path):
    keys = tmp_path / ".cicd" / "keys"
    checks = f'  - "! cat {keys}/signing.pem"\n  - "! touch {keys}/signing.pem {keys}/planted"\n'
    pipeline = pipeline_writing_reports().replace(
        '  steps: ["mkdir -p dist && echo built > dist/app.txt"]\n',
        '  steps:\n  - "mkdir -p dist && echo built > dist/app.txt"\n' + checks,
    )
    sha = commit(tmp_path / "app", {".cicd.yml": pipeline})
    config_path = control_config(tmp_path, {"app": tmp_path / "app"})
    config = load_control_config(config_path)
    key = SigningKey.load(keys / "signing.pem", create=True)

    report = run_commit(config, "app", sha, ref="main", branch="main", stream_logs=False)

    assert report["status"] == "success", report
    assert sorted(p.name for p in keys.iterdir()) == ["signing.pem", "signing.pub"]
    assert SigningKey.load(keys / "signing.pem").keyid == key.keyid
    verified = subprocess.run(
        [sys.executable, "-m", "cicd_dagster", "verify", "app", "--commit", sha],
        env={**os.environ, "CICD_CONFIG": str(config_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stderr
    records = DagsterInstance.get().fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(["app", "artifact"]), asset_partitions=[sha]),
        limit=1,
    )
    materialization = records.records[0].asset_materialization
    assert materialization is not None
    assert materialization.metadata["key_isolated"].value is True
    assert materialization.metadata["key_id"].value == key.keyid


def _read_or_empty(path: Path) -> bytes:
    # A process may exit between listing /proc and reading it.
    try:
        return path.read_bytes()
    except OSError:
        return b""
