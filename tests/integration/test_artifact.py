"""sbom and artifact through real CI runs: what a green commit publishes, that `cicd verify`
trusts it, and that it catches a changed byte, a red commit or a bad key."""

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cicd_dagster.artifact_store import ArtifactStore
from cicd_dagster.config import load_control_config
from cicd_dagster.security.provenance import SigningKey
from cicd_dagster.stages.artifact import BUILDER_ID, PROVENANCE_NAME, SBOM_NAME
from cicd_dagster.store import HistoryStore
from jobs.inprocess import run_commit
from tests.support import commit, control_config, junit_xml, pipeline_writing_reports

pytestmark = pytest.mark.slow  # each test runs Dagster jobs or the cicd CLI

CICD = [sys.executable, "-m", "cicd_dagster"]
PUBLISHED = {"dist/app.txt", SBOM_NAME, PROVENANCE_NAME}


def ci(config_path: Path, sha: str) -> dict:
    config = load_control_config(config_path)
    return run_commit(config, "app", sha, ref="main", branch="main", stream_logs=False)


def cicd_verify(config_path: Path, sha: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CICD, "verify", "app", "--commit", sha, *args],
        env={**os.environ, "CICD_CONFIG": str(config_path)},
        capture_output=True,
        text=True,
    )


def store_of(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / ".cicd" / "artifacts")


def stored(tmp_path: Path, sha: str) -> dict[str, str]:
    """name -> digest of the commit's named artifacts."""
    return {row.name: row.digest for row in store_of(tmp_path).list("app") if row.commit == sha}


def blob(tmp_path: Path, digest: str) -> Path:
    return store_of(tmp_path).path(digest)


@pytest.fixture
def green(tmp_path: Path) -> tuple[Path, str, dict]:
    """A green commit run through CI: (cicd.yaml, sha, run report)."""
    sha = commit(tmp_path / "app", {".cicd.yml": pipeline_writing_reports()})
    config = control_config(tmp_path, {"app": tmp_path / "app"})
    return config, sha, ci(config, sha)


def test_green_commit_publishes_artifacts_sbom_and_verifiable_provenance(tmp_path, green):
    config, sha, report = green
    assert report["status"] == "success"
    assert report["stages"]["sbom"]["status"] == "success"
    assert report["stages"]["artifact"]["status"] == "success"
    names = stored(tmp_path, sha)
    assert set(names) == PUBLISHED
    assert blob(tmp_path, names["dist/app.txt"]).read_text() == "built\n"

    sbom = json.loads(blob(tmp_path, names[SBOM_NAME]).read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    assert sbom["metadata"]["component"]["version"] == sha
    files = [c for c in sbom["components"] if c["type"] == "file"]
    assert [f["name"] for f in files] == ["dist/app.txt"]
    libraries = {c["name"] for c in sbom["components"] if c["type"] == "library"}
    assert "pip" in libraries  # the build env is seeded

    done = cicd_verify(config, sha, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    verified = json.loads(done.stdout)
    assert verified["verified"] is True
    assert verified["invocation_id"] == report["run_id"]
    assert verified["builder_id"] == BUILDER_ID
    assert {s["name"]: f"sha256:{s['sha256']}" for s in verified["subjects"]} == {
        name: digest for name, digest in names.items() if name != PROVENANCE_NAME
    }
    envelope = json.loads(blob(tmp_path, names[PROVENANCE_NAME]).read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    resolved = statement["predicate"]["buildDefinition"]["resolvedDependencies"]
    assert resolved[0]["digest"] == {"gitCommit": sha}
    assert resolved[1]["name"] == "python-environment.lock"
    public_key = (tmp_path / ".cicd" / "keys" / "signing.pub").read_text()
    assert public_key.startswith("-----BEGIN PUBLIC KEY-----")

    history = HistoryStore(load_control_config(config).history_db_url)
    rows = history.artifacts(repository="app")
    assert set(rows["path"]) == PUBLISHED
    assert dict(zip(rows["path"], "sha256:" + rows["sha256"], strict=True)) == names

    human = cicd_verify(config, sha)
    assert human.returncode == 0
    assert "verified" in human.stderr


def test_one_changed_byte_in_a_stored_artifact_fails_verify(tmp_path, green):
    config, sha, _ = green
    path = blob(tmp_path, stored(tmp_path, sha)["dist/app.txt"])
    path.chmod(0o644)
    path.write_bytes(b"bui1t\n")
    done = cicd_verify(config, sha)
    assert done.returncode == 1
    assert "not verified" in done.stderr
    assert "dist/app.txt" in done.stderr
    assert "is damaged" in done.stderr


def test_artifact_rebound_to_other_bytes_fails_verify(tmp_path, green):
    """Someone with write access to the store names other content: the store is
    consistent, only the signed digests tell."""
    config, sha, _ = green
    store_of(tmp_path).add("app", sha, "dist/app.txt", b"evil\n", replace=True)
    done = cicd_verify(config, sha, "--json")
    assert done.returncode == 1
    outcome = json.loads(done.stdout)
    assert outcome["verified"] is False
    assert outcome["reason"] == "artifact"
    assert "the signed statement says" in outcome["error"]


def test_one_changed_byte_in_the_statement_fails_verify(tmp_path, green):
    config, sha, _ = green
    envelope = json.loads(blob(tmp_path, stored(tmp_path, sha)[PROVENANCE_NAME]).read_text())
    payload = base64.b64decode(envelope["payload"])
    forged = payload.replace(b"dist/app.txt", b"dist/app.txT")
    assert forged != payload
    envelope["payload"] = base64.b64encode(forged).decode()
    body = (json.dumps(envelope) + "\n").encode()
    store_of(tmp_path).add("app", sha, PROVENANCE_NAME, body, replace=True)
    done = cicd_verify(config, sha)
    assert done.returncode == 1
    assert "the signature does not verify" in done.stderr


def test_tampered_envelope_file_fails_verify(tmp_path, green):
    config, sha, _ = green
    path = blob(tmp_path, stored(tmp_path, sha)[PROVENANCE_NAME])
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    done = cicd_verify(config, sha)
    assert done.returncode == 1
    assert f"{PROVENANCE_NAME}: artifact sha256:" in done.stderr
    assert "is damaged" in done.stderr


def test_red_commit_gets_no_artifact(tmp_path):
    sha = commit(tmp_path / "app", {".cicd.yml": pipeline_writing_reports(junit_xml(1, 1))})
    config = control_config(tmp_path, {"app": tmp_path / "app"})
    report = ci(config, sha)
    assert report["status"] == "failed"
    assert report["stages"]["sbom"]["status"] == "success"  # the build is described
    assert report["stages"]["artifact"]["status"] == "skipped"
    assert stored(tmp_path, sha) == {}
    done = cicd_verify(config, sha)
    assert done.returncode == 1
    assert f"has no {PROVENANCE_NAME} in the artifact store" in done.stderr


def test_verify_usage_errors_exit_2(tmp_path, green):
    config, sha, _ = green
    env = {**os.environ, "CICD_CONFIG": str(config)}
    unknown = subprocess.run(
        [*CICD, "verify", "nope", "--commit", sha], env=env, capture_output=True, text=True
    )
    assert unknown.returncode == 2
    assert "unknown repository 'nope'" in unknown.stderr
    bad_ref = cicd_verify(config, "no-such-ref")
    assert bad_ref.returncode == 2
    by_ref = cicd_verify(config, "main")
    assert by_ref.returncode == 0, by_ref.stderr


@pytest.mark.parametrize(
    ("content", "mode", "expected"),
    [
        (None, 0o600, "key file does not exist"),
        (b"not a key\n", 0o600, "is not a PEM private key"),
        (None, 0o644, "group or others may access the signing key"),
    ],
    ids=["missing", "garbage", "readable-by-others"],
)
def test_unusable_configured_key_fails_the_artifact_stage_and_publishes_nothing(
    tmp_path, content, mode, expected
):
    key = tmp_path / "secrets" / "signing.pem"
    key.parent.mkdir(mode=0o700)
    if mode != 0o600:  # a real key, exposed
        SigningKey.load(key, create=True)
        key.chmod(mode)
    elif content is not None:
        key.write_bytes(content)
        key.chmod(mode)
    sha = commit(tmp_path / "app", {".cicd.yml": pipeline_writing_reports()})
    config = control_config(
        tmp_path, {"app": tmp_path / "app"}, extra=f"security: {{signing_key: {key}}}\n"
    )
    report = ci(config, sha)
    artifact = report["stages"]["artifact"]
    assert report["status"] == "failed"
    assert artifact["status"] == "failed"
    assert "cannot sign provenance, nothing was published" in artifact["detail"]
    assert str(key) in artifact["detail"]
    assert expected in artifact["detail"]
    assert stored(tmp_path, sha) == {}
    assert not (tmp_path / ".cicd" / "keys" / "signing.pub").exists()
    if content is None and mode == 0o600:
        assert not key.exists()  # a configured key is never made up
    stages = HistoryStore(load_control_config(config).history_db_url).stage_rows("app", sha)
    assert stages.set_index("name").loc["artifact", "status"] == "failed"


def test_rematerializing_a_commit_is_idempotent(tmp_path, green):
    config, sha, first = green
    before = stored(tmp_path, sha)
    second = ci(config, sha)
    assert second["status"] == "success"
    assert second["stages"]["sbom"].get("reused") is True
    assert second["stages"]["artifact"].get("reused") is True
    assert stored(tmp_path, sha) == before
    rows = HistoryStore(load_control_config(config).history_db_url).artifacts(repository="app")
    assert sorted(rows["path"]) == sorted(PUBLISHED)
    done = cicd_verify(config, sha, "--json")
    assert json.loads(done.stdout)["invocation_id"] == first["run_id"]
