"""SAST: real bandit and ruff runs on small trees with known issues, hand-written SARIF of
another tool (semgrep's shape), and SARIF logs that are broken in every way we could think of."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from cicd_dagster.reports import ReportError
from cicd_dagster.security.sast import (
    FINDING_COLUMNS,
    Finding,
    SastError,
    findings_frame,
    parse_sarif,
    run_bandit,
    severity_rank,
)

VULNERABLE = textwrap.dedent(
    """\
    import subprocess

    import yaml

    password = "correct-horse-battery"


    def run(command):
        return subprocess.call(command, shell=True)


    def load(text):
        return yaml.load(text)
    """
)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def sarif_log(*runs: dict[str, Any]) -> dict[str, Any]:
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": list(runs),
    }


def result(uri: str, line: Any = 1, **extra: Any) -> dict[str, Any]:
    location = {
        "physicalLocation": {"artifactLocation": {"uri": uri}, "region": {"startLine": line}}
    }
    return {"ruleId": "R1", "message": {"text": "problem"}, "locations": [location]} | extra


def write_sarif(path: Path, log: Any) -> Path:
    path.write_text(json.dumps(log))
    return path


def by_rule(findings: list[Finding]) -> dict[str, Finding]:
    return {finding.rule: finding for finding in findings}


def test_bandit_finds_shell_injection_unsafe_yaml_and_hardcoded_password(tmp_path: Path) -> None:
    checkout = write(tmp_path / "checkout", {"src/app.py": VULNERABLE})
    report = run_bandit(checkout, tmp_path / "reports" / "bandit.sarif")

    assert json.loads(report.path.read_text())["version"] == "2.1.0"
    findings = by_rule(report.findings)
    assert {finding.tool for finding in report.findings} == {"Bandit"}
    assert (findings["B602"].severity, findings["B602"].file, findings["B602"].line) == (
        "high",
        "src/app.py",
        9,
    )
    assert (findings["B506"].severity, findings["B506"].line) == ("medium", 13)
    assert (findings["B105"].severity, findings["B105"].confidence) == ("low", "medium")
    assert findings["B105"].line == 5
    assert report.problems == []


def test_a_nosec_comment_does_not_hide_a_finding(tmp_path: Path) -> None:
    # Only a .cicd.yml suppression, with a reason and an expiry, may silence a finding.
    source = VULNERABLE.replace("shell=True)", "shell=True)  # nosec B602")
    checkout = write(tmp_path / "checkout", {"app.py": source})
    report = run_bandit(checkout, tmp_path / "bandit.sarif")

    assert "B602" in by_rule(report.findings)


def test_hardcoded_password_message_is_redacted(tmp_path: Path) -> None:
    checkout = write(tmp_path / "checkout", {"app.py": VULNERABLE})
    report = run_bandit(checkout, tmp_path / "bandit.sarif")

    message = by_rule(report.findings)["B105"].message
    assert "horse" not in message
    assert "(21 chars)" in message


def test_bandit_skips_git_virtualenvs_and_symlinks_out_of_the_checkout(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside", {"evil.py": VULNERABLE})
    checkout = write(
        tmp_path / "checkout",
        {
            "app.py": "print('clean')\n",
            ".git/hooks/hook.py": VULNERABLE,
            ".venv/lib/site.py": VULNERABLE,
            "build-env/pyvenv.cfg": "home = /usr/bin\n",
            "build-env/lib/site.py": VULNERABLE,
            "node_modules/x/y.py": VULNERABLE,
            # A folder merely named like one bandit skips by substring must still be read.
            ".github/scripts/deploy.py": VULNERABLE,
        },
    )
    (checkout / "linked.py").symlink_to(outside / "evil.py")
    (checkout / "linked_dir").symlink_to(outside, target_is_directory=True)

    report = run_bandit(checkout, tmp_path / "bandit.sarif")

    assert {finding.file for finding in report.findings} == {".github/scripts/deploy.py"}


def test_files_bandit_cannot_parse_are_reported_not_lost(tmp_path: Path) -> None:
    checkout = write(tmp_path / "checkout", {"ok.py": "x = 1\n", "broken.py": "def broken(:\n"})
    report = run_bandit(checkout, tmp_path / "bandit.sarif")

    assert report.findings == []
    assert report.problems == ["Bandit: broken.py: syntax error while parsing AST from file"]


def test_clean_checkout_gives_no_findings(tmp_path: Path) -> None:
    checkout = write(tmp_path / "checkout", {"app.py": "def add(a, b):\n    return a + b\n"})
    report = run_bandit(checkout, tmp_path / "bandit.sarif")
    assert (report.findings, report.problems) == ([], [])


def test_bandit_crash_is_an_error_with_its_stderr(tmp_path: Path) -> None:
    # A project .bandit file selecting a test that does not exist makes bandit exit 2.
    checkout = write(
        tmp_path / "checkout", {"app.py": "x = 1\n", ".bandit": "[bandit]\ntests: B999\n"}
    )
    with pytest.raises(SastError, match=r"exit code 2:\n(.|\n)*No tests would be run"):
        run_bandit(checkout, tmp_path / "bandit.sarif")


def test_bandit_that_does_not_finish_in_time_is_an_error(tmp_path: Path) -> None:
    checkout = write(tmp_path / "checkout", {"app.py": "x = 1\n"})
    with pytest.raises(SastError, match="did not finish within"):
        run_bandit(checkout, tmp_path / "bandit.sarif", timeout_s=0.001)


def test_missing_checkout_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SastError, match="not a folder"):
        run_bandit(tmp_path / "nope", tmp_path / "bandit.sarif")


def test_real_ruff_sarif_with_absolute_file_uris(tmp_path: Path) -> None:
    checkout = write(tmp_path / "checkout", {"pkg/app.py": VULNERABLE})
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--isolated",
            "--no-cache",
            "--select",
            "S",
            "--output-format",
            "sarif",
            ".",
        ],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    report = parse_sarif(write_sarif(tmp_path / "ruff.sarif", json.loads(done.stdout)), checkout)

    findings = by_rule(report.findings)
    assert set(findings) == {"S105", "S602", "S506"}
    assert all(f.tool == "ruff" and f.file == "pkg/app.py" for f in report.findings)
    assert (findings["S602"].severity, findings["S602"].line) == ("high", 9)


def test_semgrep_shaped_sarif(tmp_path: Path) -> None:
    checkout = write(tmp_path / "checkout", {})
    rules = [
        {
            "id": "python.lang.security.audit.eval-detected",
            "defaultConfiguration": {"level": "warning"},
            "properties": {"precision": "very-high", "tags": ["CWE-95"]},
        },
        {
            "id": "python.flask.security.injection.sql",
            "defaultConfiguration": {"level": "error"},
            "properties": {"security-severity": "9.8"},
        },
        {"id": "generic.secrets.note", "defaultConfiguration": {"level": "note"}},
    ]
    results = [
        # No level on the result: the rule's default configuration applies.
        {
            "ruleId": rules[0]["id"],
            "message": {"text": "Detected the use of eval()."},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": "app/views.py", "uriBaseId": "%SRCROOT%"},
                        "region": {"startLine": 12, "startColumn": 5},
                    }
                }
            ],
            "fingerprints": {"matchBasedId/v1": "abc"},
        },
        # The rule's security-severity wins over its level.
        {
            "ruleId": rules[1]["id"],
            "ruleIndex": 1,
            "level": "error",
            "message": {"text": "SQL built from {0}.", "arguments": ["request.args"]},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": "app/my%20db.py"},
                        "region": {"startLine": 3},
                    }
                }
            ],
        },
        {"ruleId": rules[2]["id"], "message": {"text": "Only a logical place."}, "locations": []},
        # A passed check is not a finding.
        result("app/views.py", kind="pass"),
    ]
    log = sarif_log(
        {
            "tool": {"driver": {"name": "Semgrep OSS", "rules": rules}},
            "originalUriBaseIds": {"%SRCROOT%": {"uri": "src/"}},
            "results": results,
            "invocations": [
                {
                    "executionSuccessful": True,
                    "toolExecutionNotifications": [
                        {"level": "error", "message": {"text": "Timeout on big.py"}},
                        {"level": "note", "message": {"text": "just chatter"}},
                    ],
                }
            ],
        }
    )
    report = parse_sarif(write_sarif(tmp_path / "semgrep.sarif", log), checkout)

    assert [(f.rule, f.severity, f.file, f.line) for f in report.findings] == [
        (rules[0]["id"], "medium", "src/app/views.py", 12),
        (rules[1]["id"], "critical", "app/my db.py", 3),
        (rules[2]["id"], "low", None, None),
    ]
    assert report.findings[1].message == "SQL built from request.args."
    assert report.problems == ["Semgrep OSS: Timeout on big.py"]


def test_codeql_shaped_sarif_with_rules_in_an_extension(tmp_path: Path) -> None:
    rule = {
        "id": "py/sql-injection",
        "defaultConfiguration": {"level": "error"},
        "properties": {"security-severity": "8.8"},
    }
    reference = {"id": "py/sql-injection", "index": 0, "toolComponent": {"index": 0}}
    location = {
        "physicalLocation": {
            # %SRCROOT% is not defined in the log: the checkout, where the tool ran.
            "artifactLocation": {"uri": "app/db.py", "uriBaseId": "%SRCROOT%", "index": 0},
            "region": {"startLine": 41, "startColumn": 9},
        }
    }
    run: dict[str, Any] = {
        "tool": {
            "driver": {"name": "CodeQL", "rules": []},
            "extensions": [{"name": "codeql/python-queries", "rules": [rule]}],
        },
        "results": [
            {
                "ruleId": "py/sql-injection",
                "ruleIndex": 0,
                "rule": reference,
                "message": {"text": "This SQL query depends on a user-provided value."},
                "locations": [location],
            },
            {"rule": reference | {"toolComponent": {"index": 3}}, "message": {"text": "m"}},
        ],
    }
    path = write_sarif(tmp_path / "codeql.sarif", sarif_log(run))
    with pytest.raises(
        ReportError, match=r"results\[1\]\.rule\.toolComponent: no tool\.extensions\[3\]"
    ):
        parse_sarif(path, tmp_path)

    run["results"] = run["results"][:1]
    report = parse_sarif(write_sarif(path, sarif_log(run)), tmp_path)
    assert [(f.tool, f.rule, f.severity, f.file, f.line) for f in report.findings] == [
        ("CodeQL", "py/sql-injection", "high", "app/db.py", 41)
    ]


def test_several_runs_in_one_log(tmp_path: Path) -> None:
    log = sarif_log(
        {"tool": {"driver": {"name": "a"}}, "results": [result("x.py", level="note")]},
        {"tool": {"driver": {"name": "b"}}, "results": [result("./y.py", 7)]},
        {"tool": {"driver": {"name": "c"}}, "invocations": [{"executionSuccessful": False}]},
    )
    report = parse_sarif(write_sarif(tmp_path / "x.sarif", log), tmp_path)
    assert [(f.tool, f.severity, f.file, f.line) for f in report.findings] == [
        ("a", "low", "x.py", 1),
        ("b", "medium", "y.py", 7),
    ]
    assert report.problems == ["c: the run did not complete successfully"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b'{"version": "2.1.0",\n  "runs": [}',
            r"x\.sarif:2: not valid JSON \(column 12\): Expecting value",
        ),
        (b"", r"x\.sarif: file is empty"),
        (b'{"a": "\xff"}', r"x\.sarif: not valid JSON: not UTF-8 text"),
        (b"[]", r"x\.sarif: not a SARIF log: expected a JSON object, got a list"),
        (b'{"runs": []}', r"x\.sarif: version: not SARIF 2\.1\.0: version is null"),
        (b'{"version": "2.0.0", "runs": []}', r'version is "2\.0\.0"'),
        (b'{"version": "2.1.0"}', r"x\.sarif: runs: missing"),
        (b'{"version": "2.1.0", "runs": {}}', r"runs: expected a list, got an object"),
        (b'{"version": "2.1.0", "runs": [{}]}', r"runs\[0\]\.tool: missing"),
        (
            b'{"version": "2.1.0", "runs": [{"tool": {"driver": {"name": 3}}}]}',
            r"runs\[0\]\.tool\.driver\.name: expected a name, got int",
        ),
    ],
)
def test_malformed_sarif_names_the_file_and_place(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "x.sarif"
    path.write_bytes(content)
    with pytest.raises(ReportError, match=expected):
        parse_sarif(path, tmp_path)


def test_missing_sarif_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        parse_sarif(tmp_path / "none.sarif", tmp_path)


@pytest.mark.parametrize(
    ("bad_result", "expected"),
    [
        ({"ruleId": "R1", "locations": []}, r"results\[0\]\.message: missing"),
        (result("a.py", level="fatal"), r'results\[0\]\.level: unknown level "fatal"'),
        (result("a.py", ruleIndex=4), r"results\[0\]\.ruleIndex: no rule 4"),
        (result("a.py", 0), r"region\.startLine: expected a line number, got 0"),
        (result("a.py", "12"), r"region\.startLine: expected a line number, got '12'"),
        ("oops", r"results\[0\]: expected an object, got a string"),
    ],
)
def test_malformed_results_name_the_field(tmp_path: Path, bad_result: Any, expected: str) -> None:
    log = sarif_log({"tool": {"driver": {"name": "t"}}, "results": [result("ok.py"), bad_result]})
    with pytest.raises(ReportError, match=expected.replace("results\\[0\\]", "results\\[1\\]")):
        parse_sarif(write_sarif(tmp_path / "x.sarif", log), tmp_path)


@pytest.mark.parametrize(
    "uri",
    [
        "../../etc/passwd",
        "src/../../outside.py",
        "file:///etc/passwd",
        "https://example.com/app.py",
        "file://otherhost/checkout/app.py",
        ".",
    ],
)
def test_locations_outside_the_checkout_are_refused(tmp_path: Path, uri: str) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    log = sarif_log({"tool": {"driver": {"name": "t"}}, "results": [result(uri)]})
    with pytest.raises(
        ReportError, match=r"artifactLocation\.uri: .* (outside|not a file|another host)"
    ):
        parse_sarif(write_sarif(tmp_path / "x.sarif", log), checkout)


def test_base_uri_escaping_the_checkout_is_refused(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    artifact = {"uri": "passwd", "uriBaseId": "ROOT"}
    log = sarif_log(
        {
            "tool": {"driver": {"name": "t"}},
            "originalUriBaseIds": {"ROOT": {"uri": "file:///etc/"}},
            "results": [
                {
                    "message": {"text": "m"},
                    "locations": [{"physicalLocation": {"artifactLocation": artifact}}],
                }
            ],
        }
    )
    with pytest.raises(ReportError, match="outside the checkout"):
        parse_sarif(write_sarif(tmp_path / "x.sarif", log), checkout)


def test_checkout_reached_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "src").mkdir(parents=True)
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)
    log = sarif_log(
        {"tool": {"driver": {"name": "t"}}, "results": [result((real / "src/a.py").as_uri())]}
    )
    report = parse_sarif(write_sarif(tmp_path / "x.sarif", log), alias)
    assert report.findings[0].file == "src/a.py"


def test_findings_frame_has_fixed_columns_even_when_empty() -> None:
    assert list(findings_frame([]).columns) == FINDING_COLUMNS
    finding = Finding("Bandit", "B602", "high", "high", "shell", "a.py", None)
    frame = findings_frame([finding])
    assert frame.loc[0, "rule"] == "B602"
    assert str(frame["line"].dtype) == "Int64"


def test_severities_are_ordered() -> None:
    assert severity_rank("low") < severity_rank("medium") < severity_rank("high")
    assert severity_rank("high") < severity_rank("critical")
