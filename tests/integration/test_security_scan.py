"""security_scan through real CI runs: bandit, an offline OSV folder, licences, secrets."""

import json
import os
import secrets
import string
import subprocess
import sys
from datetime import date, timedelta
from pathlib import Path

import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance
from uv import find_uv_bin

from cicd_dagster.config import load_control_config
from cicd_dagster.store import HistoryStore
from jobs.inprocess import run_commit
from tests.support import commit, control_config, pipeline_writing_reports

pytestmark = pytest.mark.slow  # each test runs a Dagster job with a real build venv

CICD = [sys.executable, "-m", "cicd_dagster"]
VULNERABLE_CODE = (
    "import subprocess\n\n\ndef run(cmd):\n    return subprocess.call(cmd, shell=True)\n"
)
SECURITY_GATES = ("no_vulnerabilities", "licenses_allowed", "no_secrets", "no_sast_findings")


def fake_github_token() -> str:
    alphabet = string.ascii_letters + string.digits
    return "ghp_" + "".join(secrets.choice(alphabet) for _ in range(36))


def demo_wheel(folder: Path, license_id: str = "MIT") -> Path:
    """Builds demo-lib 1.0 into folder/wheels with uv's own build backend (no network)."""
    project = folder / "demo-lib"
    (project / "demo_lib").mkdir(parents=True)
    (project / "demo_lib" / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "demo-lib"\nversion = "1.0"\n'
        f'license = "{license_id}"\n'
        '[build-system]\nrequires = ["uv_build>=0.7,<1"]\nbuild-backend = "uv_build"\n'
        '[tool.uv.build-backend]\nmodule-root = ""\n'
    )
    wheels = folder / "wheels"
    subprocess.run(
        [find_uv_bin(), "build", "--quiet", "--wheel", "--out-dir", str(wheels), str(project)],
        env={**os.environ, "UV_OFFLINE": "1"},
        check=True,
    )
    return wheels


def write_advisory(folder: Path, advisory_id: str, fixed: str, severity: str = "HIGH") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "id": advisory_id,
        "aliases": [f"CVE-2099-{advisory_id[-4:]}"],
        "summary": "demo-lib runs arbitrary code",
        "modified": "2024-01-01T00:00:00Z",
        "affected": [
            {
                "package": {"ecosystem": "PyPI", "name": "demo-lib"},
                "ranges": [
                    {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": fixed}]}
                ],
            }
        ],
        "database_specific": {"severity": severity},
    }
    (folder / f"{advisory_id}.json").write_text(json.dumps(record))


def pipeline(wheels: Path, security: str = "") -> str:
    """The reports-writing pipeline, with demo-lib installed offline into the build venv."""
    install = '  install: uv pip install --quiet --no-index --find-links "$WHEELS" demo-lib==1.0\n'
    return (
        pipeline_writing_reports().replace("build:\n", "build:\n" + install)
        + f"env:\n  WHEELS: {wheels}\n"
        + security
    )


def security_config(advisories: Path, deny: str = "[AGPL-3.0-only]") -> str:
    return (
        f"security:\n  advisory_db: {advisories}\n  fail_on: high\n  licenses: {{deny: {deny}}}\n"
    )


def ci(config_path: Path, sha: str) -> dict:
    config = load_control_config(config_path)
    return run_commit(config, "app", sha, ref="main", branch="main", stream_logs=False)


def gates_of(report: dict) -> dict[str, dict]:
    return {
        gate["name"].removeprefix("security_scan."): gate
        for gate in report["gates"]
        if gate["stage"] == "security_scan"
    }


def scan_metadata(sha: str) -> dict:
    records = DagsterInstance.get().fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(["app", "security_scan"]), asset_partitions=[sha]),
        limit=1,
    )
    materialization = records.records[0].asset_materialization
    assert materialization is not None
    return {label: value.value for label, value in materialization.metadata.items()}


def findings(config_path: Path, sha: str):
    return HistoryStore(load_control_config(config_path).history_db_url).findings(
        repository="app", commit=sha
    )


def test_vulnerable_dependency_shell_call_and_token_are_all_blocked(tmp_path):
    token = fake_github_token()
    wheels = demo_wheel(tmp_path)
    advisories = tmp_path / "advisories"
    write_advisory(advisories, "PYSEC-2099-0001", fixed="1.1")
    (advisories / "broken.json").write_text('{"id": "PYSEC-2099-0002", "affected": [')
    repo = tmp_path / "app"
    sha = commit(
        repo,
        {
            ".cicd.yml": pipeline(wheels),
            "app.py": VULNERABLE_CODE,
            "settings.py": f'GITHUB_TOKEN = "{token}"\n',
        },
    )
    config = control_config(tmp_path, {"app": repo}, extra=security_config(advisories))
    done = subprocess.run(
        [*CICD, "run", "app", "--json"],
        env={**os.environ, "CICD_CONFIG": str(config)},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1, done.stderr
    assert token not in done.stdout
    report = json.loads(done.stdout)
    assert report["status"] == "failed"
    assert report["stages"]["security_scan"]["status"] == "failed"
    gates = gates_of(report)
    assert set(gates) == set(SECURITY_GATES)
    assert gates["no_vulnerabilities"]["passed"] is False
    assert "PYSEC-2099-0001 high demo-lib==1.0" in gates["no_vulnerabilities"]["detail"]
    assert gates["no_sast_findings"]["passed"] is False
    assert "B602 high app.py:5" in gates["no_sast_findings"]["detail"]
    assert gates["no_secrets"]["passed"] is False
    assert (
        f"github-token high settings.py:1: {token[:4]}…(40 chars)" in gates["no_secrets"]["detail"]
    )
    assert gates["licenses_allowed"]["passed"] is True

    recorded = findings(config, sha)
    blocking = recorded[~recorded["suppressed"]]
    assert {("dependency", "PYSEC-2099-0001"), ("sast", "B602"), ("secret", "github-token")} <= set(
        zip(blocking["kind"], blocking["rule"], strict=True)
    )
    assert not recorded["message"].str.contains(token, regex=False).any()

    metadata = scan_metadata(sha)
    assert metadata["dependency_findings"] == 1
    assert metadata["secret_findings"] == 1
    assert metadata["sarif"].endswith("reports/security_scan/bandit.sarif")
    assert Path(metadata["sarif"]).is_file()
    # The malformed advisory is named in a warning; the other one was still used.
    assert "broken.json" in metadata["warnings"]
    home = Path(os.environ["DAGSTER_HOME"])
    assert not [p for p in home.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]


def test_clean_repository_passes_every_security_gate(tmp_path):
    wheels = demo_wheel(tmp_path)
    advisories = tmp_path / "advisories"
    write_advisory(advisories, "PYSEC-2099-0003", fixed="1.0")  # 1.0 is the fixed version
    repo = tmp_path / "app"
    sha = commit(
        repo, {".cicd.yml": pipeline(wheels), "app.py": "def add(a, b):\n    return a + b\n"}
    )
    config = control_config(tmp_path, {"app": repo}, extra=security_config(advisories))
    report = ci(config, sha)
    assert report["stages"]["security_scan"]["status"] == "success"
    gates = gates_of(report)
    assert {name: gate["passed"] for name, gate in gates.items()} == dict.fromkeys(
        SECURITY_GATES, True
    )
    assert findings(config, sha).empty
    rerun = ci(config, sha)
    assert rerun["stages"]["security_scan"].get("reused") is True


def test_live_suppression_lets_a_finding_pass_and_an_expired_one_does_not(tmp_path):
    token = fake_github_token()
    wheels = demo_wheel(tmp_path)
    future = date.today() + timedelta(days=30)
    past = date.today() - timedelta(days=1)
    security = (
        "security:\n"
        "  suppressions:\n"
        f"    - {{rule: B602, path: app.py, reason: commands are constants, expires: {future}}}\n"
        f"    - {{rule: github-token, reason: revoked token, expires: {past}}}\n"
    )
    repo = tmp_path / "app"
    sha = commit(
        repo,
        {
            ".cicd.yml": pipeline(wheels, security),
            "app.py": VULNERABLE_CODE,
            "settings.py": f'GITHUB_TOKEN = "{token}"\n',
        },
    )
    config = control_config(tmp_path, {"app": repo})
    gates = gates_of(ci(config, sha))
    assert gates["no_sast_findings"]["passed"] is True
    assert "(1 suppressed)" in gates["no_sast_findings"]["detail"]
    assert gates["no_secrets"]["passed"] is False
    assert "expired: suppression of github-token" in gates["no_secrets"]["detail"]
    # Without an advisory folder dependencies are not checked, and the gate says so.
    assert "no security.advisory_db configured" in gates["no_vulnerabilities"]["detail"]

    recorded = findings(config, sha).set_index("rule")
    assert bool(recorded.loc["B602", "suppressed"]) is True
    assert recorded.loc["B602", "suppression_reason"].startswith("commands are constants")
    assert bool(recorded.loc["github-token", "suppressed"]) is False
    assert "github-token" in scan_metadata(sha)["expired_suppressions"]


def test_denied_licence_fails_licenses_allowed(tmp_path):
    wheels = demo_wheel(tmp_path, license_id="AGPL-3.0-only")
    advisories = tmp_path / "advisories"
    write_advisory(advisories, "PYSEC-2099-0004", fixed="0.5")
    repo = tmp_path / "app"
    sha = commit(repo, {".cicd.yml": pipeline(wheels)})
    config = control_config(tmp_path, {"app": repo}, extra=security_config(advisories))
    gates = gates_of(ci(config, sha))
    assert gates["licenses_allowed"]["passed"] is False
    assert "AGPL-3.0-only high demo-lib==1.0: denied" in gates["licenses_allowed"]["detail"]
    assert gates["no_vulnerabilities"]["passed"] is True
    licence = findings(config, sha)
    assert list(zip(licence["kind"], licence["package"], strict=True)) == [("license", "demo-lib")]
