"""Cobertura coverage.xml: hand-written reports, broken ones, and coverage.py's own output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cicd_dagster.reports import ReportError
from cicd_dagster.reports.coverage import CoverageSummary, parse_cobertura


def write_report(directory: Path, body: str, name: str = "coverage.xml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body).strip(), encoding="utf-8")
    return path


def test_root_counts_give_the_summary(tmp_path: Path) -> None:
    report = write_report(
        tmp_path,
        """
        <?xml version="1.0" ?>
        <coverage version="7.6.1" timestamp="1" lines-valid="10" lines-covered="8"
                  line-rate="0.8" branches-covered="3" branches-valid="4" branch-rate="0.75"
                  complexity="0">
          <packages><package name="pkg" line-rate="0" branch-rate="0" complexity="0">
            <classes><class name="m.py" filename="pkg/m.py" line-rate="0" branch-rate="0">
              <lines><line number="1" hits="0"/></lines>
            </class></classes>
          </package></packages>
        </coverage>
        """,
    )
    assert parse_cobertura(report) == CoverageSummary(
        line_rate=0.8, lines_valid=10, lines_covered=8, branch_rate=0.75
    )


def test_missing_root_counts_are_counted_from_class_lines(tmp_path: Path) -> None:
    # Line 3 of a.py is listed under two classes of the file: it counts once, as covered.
    report = write_report(
        tmp_path,
        """
        <coverage line-rate="0.1">
          <packages><package name="pkg"><classes>
            <class name="A" filename="pkg/a.py">
              <methods><method name="f">
                <lines><line number="1" hits="1"/></lines>
              </method></methods>
              <lines>
                <line number="1" hits="1"/>
                <line number="2" hits="0"/>
                <line number="3" hits="0" branch="true" condition-coverage="0% (0/2)"/>
              </lines>
            </class>
            <class name="A.Inner" filename="pkg/a.py">
              <lines>
                <line number="3" hits="4" branch="true" condition-coverage="50% (1/2)"/>
              </lines>
            </class>
            <class name="B" filename="pkg/b.py">
              <lines>
                <line number="1" hits="2" branch="true" condition-coverage="100% (2/2)"/>
                <line number="2"/>
              </lines>
            </class>
          </classes></package></packages>
        </coverage>
        """,
    )
    assert parse_cobertura(report) == CoverageSummary(
        line_rate=3 / 5, lines_valid=5, lines_covered=3, branch_rate=3 / 4
    )


def test_unmeasured_branches_give_no_branch_rate(tmp_path: Path) -> None:
    report = write_report(
        tmp_path,
        """
        <coverage lines-valid="4" lines-covered="1" line-rate="0.25"
                  branches-valid="0" branches-covered="0" branch-rate="0"/>
        """,
    )
    assert parse_cobertura(report) == CoverageSummary(
        line_rate=0.25, lines_valid=4, lines_covered=1, branch_rate=None
    )


def test_report_with_no_lines_counts_as_fully_covered(tmp_path: Path) -> None:
    report = write_report(tmp_path, "<coverage><packages/></coverage>")
    assert parse_cobertura(report) == CoverageSummary(
        line_rate=1.0, lines_valid=0, lines_covered=0, branch_rate=None
    )


def test_truncated_report_names_the_file_and_line(tmp_path: Path) -> None:
    report = tmp_path / "coverage.xml"
    report.write_text('<coverage lines-valid="1" lines-covered="1">\n  <packages>\n    <pack')
    with pytest.raises(ReportError) as raised:
        parse_cobertura(report)
    assert raised.value.line == 3
    assert str(raised.value).startswith(f"{report}:3: malformed XML")


def test_non_numeric_count_names_the_attribute(tmp_path: Path) -> None:
    report = write_report(tmp_path, '<coverage lines-valid="many" lines-covered="1"/>')
    with pytest.raises(ReportError, match=r":1: <coverage> lines-valid='many' is not a whole"):
        parse_cobertura(report)


def test_root_other_than_coverage_raises(tmp_path: Path) -> None:
    report = write_report(tmp_path, "<testsuite/>")
    with pytest.raises(ReportError, match="root element is <testsuite>, expected <coverage>"):
        parse_cobertura(report)


def test_empty_report_raises(tmp_path: Path) -> None:
    report = tmp_path / "coverage.xml"
    report.write_bytes(b"")
    with pytest.raises(ReportError, match=r"coverage\.xml: file is empty$"):
        parse_cobertura(report)


def test_missing_report_raises(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"absent\.xml: file does not exist$"):
        parse_cobertura(tmp_path / "absent.xml")


MEASURED_MODULE = """
def classify(number):
    if number < 0:
        return "negative"
    if number == 0:
        return "zero"
    return "positive"


def never_called():
    return 1
"""


@pytest.mark.parametrize("branch", [True, False], ids=["branch", "line-only"])
def test_real_coverage_xml_matches_coverage_totals(tmp_path: Path, branch: bool) -> None:
    pytest.importorskip("coverage")
    (tmp_path / "measured.py").write_text(MEASURED_MODULE)
    (tmp_path / "main.py").write_text("import measured\nmeasured.classify(5)\n")
    env = {key: value for key, value in os.environ.items() if not key.startswith("COVERAGE_")}

    def coverage(*arguments: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "coverage", *arguments],
            cwd=tmp_path,
            env=env,
            check=True,
            capture_output=True,
            timeout=120,
        )

    coverage("run", *(["--branch"] if branch else []), "--include=measured.py", "main.py")
    coverage("xml", "-o", "coverage.xml")
    coverage("json", "-o", "coverage.json")
    totals = json.loads((tmp_path / "coverage.json").read_text())["totals"]

    summary = parse_cobertura(tmp_path / "coverage.xml")
    assert summary.lines_valid == totals["num_statements"]
    assert summary.lines_covered == totals["covered_lines"]
    assert summary.line_rate == totals["covered_lines"] / totals["num_statements"]
    if branch:
        assert totals["num_branches"] > 0
        assert summary.branch_rate == totals["covered_branches"] / totals["num_branches"]
    else:
        assert summary.branch_rate is None
