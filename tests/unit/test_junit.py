"""JUnit XML parsing: the shared fixture corpus, hand-made edge cases and real pytest output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cicd_dagster.reports import ReportError
from cicd_dagster.reports.junit import (
    MESSAGE_LIMIT,
    TESTCASE_COLUMNS,
    TestSummary,
    parse_junit,
    parse_junit_files,
    summarize,
)
from tests.support import pytest_counts, run_pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# shared/ lies beside the clone: /work/shared next to /work/main, and so in CI.
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "junit"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
COUNTS = ("tests", "passed", "failed", "errors", "skipped", "flaky")


def write_report(directory: Path, body: str, name: str = "report.xml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body).strip(), encoding="utf-8")
    return path


def counts(summary: TestSummary) -> dict[str, int]:
    return {name: getattr(summary, name) for name in COUNTS}


def test_fixture_corpus_has_expected_counts_for_every_report() -> None:
    assert sorted(EXPECTED) == sorted(path.name for path in FIXTURES.glob("*.xml"))


@pytest.mark.parametrize("report", sorted(FIXTURES.glob("*.xml")), ids=lambda path: path.name)
def test_fixture_report_counts_match_expected(report: Path) -> None:
    expected = EXPECTED[report.name]
    if expected["parse_error"]:
        with pytest.raises(ReportError, match=re.escape(report.name)):
            parse_junit(report)
    else:
        assert counts(summarize(parse_junit(report))) == {name: expected[name] for name in COUNTS}


def test_nested_testsuites_count_leaf_testcases(tmp_path: Path) -> None:
    report = write_report(
        tmp_path,
        """
        <testsuites tests="99" failures="42">
          <testsuite name="outer" tests="50">
            <testcase classname="a" name="beside_inner"/>
            <testsuite name="inner" tests="7" failures="3">
              <testsuite name="innermost"><testcase classname="b" name="deep"/></testsuite>
              <testcase classname="c" name="after_innermost"><failure message="boom"/></testcase>
            </testsuite>
          </testsuite>
          <testcase classname="d" name="outside_any_suite"/>
        </testsuites>
        """,
    )
    cases = parse_junit(report)
    assert list(cases.columns) == TESTCASE_COLUMNS
    assert list(zip(cases["name"], cases["suite"], strict=True)) == [
        ("beside_inner", "outer"),
        ("deep", "innermost"),
        ("after_innermost", "inner"),
        ("outside_any_suite", ""),
    ]
    assert counts(summarize(cases)) == {
        "tests": 4,
        "passed": 3,
        "failed": 1,
        "errors": 0,
        "skipped": 0,
        "flaky": 0,
    }


def test_status_follows_failure_error_skipped_precedence(tmp_path: Path) -> None:
    report = write_report(
        tmp_path,
        """
        <testsuite name="s">
          <testcase name="all"><skipped/><error message="e"/><failure message="f"/></testcase>
          <testcase name="error_and_skipped"><skipped message="s"/><error message="e"/></testcase>
          <testcase name="skipped"><skipped message="s"/></testcase>
          <testcase name="none"><system-out>noise</system-out></testcase>
        </testsuite>
        """,
    )
    cases = parse_junit(report)
    assert list(zip(cases["name"], cases["status"], cases["message"], strict=True)) == [
        ("all", "failed", "f"),
        ("error_and_skipped", "error", "e"),
        ("skipped", "skipped", "s"),
        ("none", "passed", ""),
    ]


def test_surefire_flaky_markers_set_flaky_and_keep_the_final_status(tmp_path: Path) -> None:
    report = write_report(
        tmp_path,
        """
        <testsuite name="s">
          <testcase name="passed_on_rerun"><flakyFailure message="first try"/></testcase>
          <testcase name="errored_then_passed"><flakyError message="first try"/></testcase>
          <testcase name="always_fails"><failure message="f"/><rerunFailure message="f"/></testcase>
          <testcase name="always_errors"><error message="e"/><rerunError message="e"/></testcase>
          <testcase name="steady"/>
        </testsuite>
        """,
    )
    cases = parse_junit(report)
    assert list(zip(cases["name"], cases["status"], cases["flaky"], strict=True)) == [
        ("passed_on_rerun", "passed", True),
        ("errored_then_passed", "passed", True),
        ("always_fails", "failed", True),
        ("always_errors", "error", True),
        ("steady", "passed", False),
    ]


def test_message_falls_back_to_stripped_text_and_is_truncated(tmp_path: Path) -> None:
    long_trace = "trace line\n" * 1000
    report = write_report(
        tmp_path,
        f"""
        <testsuite name="s">
          <testcase name="attribute"><failure message="short">long text</failure></testcase>
          <testcase name="text"><failure>
              AssertionError: 1 != 2
          </failure></testcase>
          <testcase name="long"><error><![CDATA[{long_trace}]]></error></testcase>
        </testsuite>
        """,
    )
    messages = parse_junit(report).set_index("name")["message"]
    assert messages["attribute"] == "short"
    assert messages["text"] == "AssertionError: 1 != 2"
    assert len(messages["long"]) == MESSAGE_LIMIT
    assert messages["long"].startswith("trace line\n")


@pytest.mark.parametrize(
    ("time", "seconds"),
    [
        ('time="0.25"', 0.25),
        ('time="1,234.5"', 1234.5),
        ('time="soon"', 0.0),
        ('time="nan"', 0.0),
        ("", 0.0),
    ],
)
def test_duration_reads_the_time_attribute_and_defaults_to_zero(
    tmp_path: Path, time: str, seconds: float
) -> None:
    report = write_report(tmp_path, f'<testsuite><testcase name="t" {time}/></testsuite>')
    assert parse_junit(report)["duration_s"].tolist() == [seconds]


def test_identity_columns_come_from_attributes_and_file_name(tmp_path: Path) -> None:
    report = write_report(
        tmp_path,
        """
        <testsuite name="pkg.suite">
          <testcase classname="pkg.test_mod" name="test_x" file="pkg/test_mod.py" time="1"/>
          <testcase/>
        </testsuite>
        """,
        name="unit-results.xml",
    )
    rows = parse_junit(report).to_dict("records")
    assert rows == [
        {
            "report": "unit-results.xml",
            "suite": "pkg.suite",
            "classname": "pkg.test_mod",
            "name": "test_x",
            "file": "pkg/test_mod.py",
            "duration_s": 1.0,
            "status": "passed",
            "message": "",
            "flaky": False,
        },
        {
            "report": "unit-results.xml",
            "suite": "pkg.suite",
            "classname": "",
            "name": "",
            "file": "",
            "duration_s": 0.0,
            "status": "passed",
            "message": "",
            "flaky": False,
        },
    ]


def test_characters_xml_forbids_are_dropped_not_fatal(tmp_path: Path) -> None:
    # ANSI colour codes from captured output: a character reference and a raw control byte.
    report = tmp_path / "colours.xml"
    report.write_bytes(
        b'<testsuite name="s"><testcase name="red&#27;[31m">'
        b'<failure message="bad">\x1b[31mred\x01</failure></testcase>'
        b'<testcase name="fine"/></testsuite>'
    )
    cases = parse_junit(report)
    assert cases["status"].tolist() == ["failed", "passed"]


def test_forbidden_characters_do_not_hide_a_truncated_report(tmp_path: Path) -> None:
    report = tmp_path / "colours-truncated.xml"
    report.write_bytes(b'<testsuite name="s">\n<testcase name="a&#27;"/>\n<testcase name="b">')
    with pytest.raises(ReportError, match=r"colours-truncated\.xml:3: malformed XML"):
        parse_junit(report)


def test_truncated_report_names_the_file_and_line(tmp_path: Path) -> None:
    report = tmp_path / "truncated.xml"
    report.write_text(
        '<?xml version="1.0"?>\n<testsuite name="s">\n'
        '  <testcase name="a"/>\n  <testcase name="b">\n'
        '    <failure message="cut off'
    )
    with pytest.raises(ReportError) as raised:
        parse_junit(report)
    assert raised.value.path == report
    assert raised.value.line == 5
    assert str(raised.value).startswith(f"{report}:5: malformed XML")


def test_empty_report_raises(tmp_path: Path) -> None:
    report = tmp_path / "empty.xml"
    report.write_bytes(b"")
    with pytest.raises(ReportError, match=r"empty\.xml: file is empty$"):
        parse_junit(report)


def test_missing_report_raises(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"absent\.xml: file does not exist$"):
        parse_junit(tmp_path / "absent.xml")


def test_root_other_than_testsuite_raises(tmp_path: Path) -> None:
    report = write_report(tmp_path, "<html><testcase name='t'/></html>", name="page.xml")
    with pytest.raises(ReportError, match=r"page\.xml:1: root element is <html>, expected"):
        parse_junit(report)


def test_entities_are_not_expanded(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    report = write_report(
        tmp_path,
        f"""
        <?xml version="1.0"?>
        <!DOCTYPE testsuite [
          <!ENTITY xxe SYSTEM "{secret.as_uri()}">
          <!ENTITY lol "LOLLOLLOLLOLLOL">
        ]>
        <testsuite name="s">
          <testcase name="t"><failure>&xxe; and &lol;</failure></testcase>
        </testsuite>
        """,
    )
    cases = parse_junit(report)
    assert cases["status"].tolist() == ["failed"]
    text = cases.to_string()
    assert "TOP-SECRET" not in text
    assert "LOL" not in text


def test_parse_junit_files_concatenates_reports(tmp_path: Path) -> None:
    first = write_report(tmp_path, '<testsuite><testcase name="a"/></testsuite>', name="a.xml")
    second = write_report(
        tmp_path, '<testsuite><testcase name="b"><skipped/></testcase></testsuite>', name="b.xml"
    )
    cases = parse_junit_files([first, second])
    assert cases["report"].tolist() == ["a.xml", "b.xml"]
    assert cases.index.tolist() == [0, 1]


def test_parse_junit_files_without_paths_gives_empty_frame() -> None:
    cases = parse_junit_files([])
    assert list(cases.columns) == TESTCASE_COLUMNS
    assert cases.empty
    assert summarize(cases) == TestSummary(0, 0, 0, 0, 0, 0, 0.0, None)


def test_summary_pass_rate_leaves_skipped_tests_out(tmp_path: Path) -> None:
    report = write_report(
        tmp_path,
        """
        <testsuite>
          <testcase name="a" time="1.5"/>
          <testcase name="b" time="0.5"><failure/></testcase>
          <testcase name="c"><skipped/></testcase>
          <testcase name="d"><flakyFailure/></testcase>
        </testsuite>
        """,
    )
    summary = summarize(parse_junit(report))
    assert summary.to_dict() == {
        "tests": 4,
        "passed": 2,
        "failed": 1,
        "errors": 0,
        "skipped": 1,
        "flaky": 1,
        "duration_s": 2.0,
        "pass_rate": 2 / 3,
    }


def test_summary_pass_rate_is_none_when_every_test_skipped(tmp_path: Path) -> None:
    report = write_report(
        tmp_path, '<testsuite><testcase name="a"><skipped/></testcase></testsuite>'
    )
    assert summarize(parse_junit(report)).pass_rate is None


PYTEST_SAMPLE = """
import pytest

def test_passes():
    pass

def test_passes_too():
    print("captured output")

def test_fails():
    assert 1 == 2

@pytest.mark.skip(reason="not today")
def test_skipped():
    pass

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_fixture_errors(broken):
    pass
"""


@pytest.mark.parametrize("junit_family", ["xunit1", "xunit2"])
def test_real_pytest_report_matches_pytest_summary(tmp_path: Path, junit_family: str) -> None:
    (tmp_path / "test_sample.py").write_text(PYTEST_SAMPLE)
    report = tmp_path / "junit.xml"
    run = run_pytest(
        tmp_path, "-o", f"junit_family={junit_family}", f"--junitxml={report}", "test_sample.py"
    )
    assert run.returncode == 1, run.stdout + run.stderr
    reported = {word.rstrip("s"): n for word, n in pytest_counts(run).items()}
    closing_line = run.stdout.strip().splitlines()[-1]
    assert reported == {"passed": 2, "failed": 1, "skipped": 1, "error": 1}, closing_line

    cases = parse_junit(report)
    summary = summarize(cases)
    assert (summary.passed, summary.failed, summary.skipped, summary.errors) == (
        reported["passed"],
        reported["failed"],
        reported["skipped"],
        reported["error"],
    )
    assert summary.tests == 5
    statuses = dict(zip(cases["name"], cases["status"], strict=True))
    assert statuses == {
        "test_passes": "passed",
        "test_passes_too": "passed",
        "test_fails": "failed",
        "test_skipped": "skipped",
        "test_fixture_errors": "error",
    }
    # Only xunit1 writes the file attribute.
    expected_files = {"test_sample.py"} if junit_family == "xunit1" else {""}
    assert set(cases["file"]) == expected_files


MEASURE_PARSE = """
import json, resource, sys
from pathlib import Path
from cicd_dagster.reports.junit import parse_junit, summarize

before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cases = parse_junit(Path(sys.argv[1]))
growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kib
longest_message = int(cases["message"].str.len().max())
print(json.dumps({"growth_kib": growth_kib, "longest_message": longest_message,
                  **summarize(cases).to_dict()}))
"""


def write_large_report(path: Path, testcases: int, output_bytes: int) -> None:
    """A report of many testcases with big captured output, and one output beyond 10 MB."""
    output = "captured line of test output\n" * (output_bytes // 29)
    with path.open("w", encoding="utf-8") as stream:
        stream.write(
            '<?xml version="1.0" encoding="utf-8"?>\n<testsuites>\n<testsuite name="big">\n'
        )
        for index in range(testcases):
            result = (
                f"<failure message='case {index}'>{output}</failure>" if index % 10 == 0 else ""
            )
            stream.write(
                f'<testcase classname="big.Case" name="test_{index}" time="0.01">{result}'
                f"<system-out>{output}</system-out></testcase>\n"
            )
        stream.write('<testcase name="chatty"><error>')
        stream.write("x" * 12_000_000)
        stream.write("</error><system-out>")
        stream.write("y" * 12_000_000)
        stream.write("</system-out></testcase>\n</testsuite>\n</testsuites>\n")


@pytest.mark.slow
def test_fifty_megabyte_report_parses_in_bounded_memory(tmp_path: Path) -> None:
    report = tmp_path / "large.xml"
    write_large_report(report, testcases=3200, output_bytes=8000)
    assert report.stat().st_size > 50_000_000
    # A fresh interpreter, so its peak RSS before parsing is its current RSS.
    run = subprocess.run(
        [sys.executable, "-c", MEASURE_PARSE, str(report)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    measured = json.loads(run.stdout)
    assert measured["tests"] == 3201
    assert measured["failed"] == 320
    assert measured["errors"] == 1
    assert measured["longest_message"] == MESSAGE_LIMIT
    # Holding the parsed tree would take more than the file's size (about 60 MB measured);
    # streaming keeps the peak near the largest single text (about 10 MB measured).
    assert measured["growth_kib"] * 1024 < report.stat().st_size / 2, measured
