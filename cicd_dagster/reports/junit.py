"""JUnit/xUnit XML reports: one row per <testcase>, wherever it sits in the tree.

Counts come from the leaf <testcase> elements only. The tests/failures/errors/skipped
attributes of suites are often wrong: pytest subtests inflate them, and trimmed or
hand-edited reports keep the counts of the full run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pandas as pd
from lxml import etree

from cicd_dagster.reports import ReportError, malformed_xml, open_report

TESTCASE_COLUMNS = [
    "report",
    "suite",
    "classname",
    "name",
    "file",
    "duration_s",
    "status",
    "message",
    "flaky",
]
MESSAGE_LIMIT = 2000

_COLUMN_TYPES = {column: "str" for column in TESTCASE_COLUMNS} | {
    "duration_s": "float64",
    "flaky": "bool",
}
_ROOT_TAGS = frozenset({"testsuite", "testsuites"})
# A testcase's result child and the status it gives, in order of precedence.
_RESULTS = (("failure", "failed"), ("error", "error"), ("skipped", "skipped"))
# Surefire's rerun markers: flaky* on a test that passed on a rerun, rerun* on one that never did.
_FLAKY_MARKERS = frozenset({"flakyFailure", "flakyError", "rerunFailure", "rerunError"})
# Elements that may hold megabytes of captured output and are never read.
_UNREAD_TAGS = frozenset({"system-out", "system-err", "properties"})
_INVALID_CHARACTER_ERRORS = frozenset(
    {
        etree.ErrorTypes.ERR_INVALID_CHAR,
        etree.ErrorTypes.ERR_INVALID_CHARREF,
        etree.ErrorTypes.ERR_INVALID_DEC_CHARREF,
        etree.ErrorTypes.ERR_INVALID_HEX_CHARREF,
    }
)

_Row = tuple[str, str, str, str, str, float, str, str, bool]


def parse_junit(path: Path) -> pd.DataFrame:
    """One row per <testcase> in the report, with the columns TESTCASE_COLUMNS."""
    return _frame(_read_testcases(path))


def parse_junit_files(paths: Iterable[Path]) -> pd.DataFrame:
    """The testcases of all the reports, in order; no paths give an empty frame."""
    return _frame([row for path in paths for row in _read_testcases(path)])


@dataclass(frozen=True)
class TestSummary:
    """Outcome counts of a set of testcases; pass_rate leaves skipped tests out."""

    __test__ = False  # not a pytest test class, despite the name

    tests: int
    passed: int
    failed: int
    errors: int
    skipped: int
    flaky: int
    duration_s: float
    pass_rate: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def summarize(testcases: pd.DataFrame) -> TestSummary:
    """Count the testcases of parse_junit/parse_junit_files by status."""
    statuses = testcases["status"].value_counts()
    tests = len(testcases)
    passed = int(statuses.get("passed", 0))
    skipped = int(statuses.get("skipped", 0))
    ran = tests - skipped
    return TestSummary(
        tests=tests,
        passed=passed,
        failed=int(statuses.get("failed", 0)),
        errors=int(statuses.get("error", 0)),
        skipped=skipped,
        flaky=int(testcases["flaky"].sum()),
        duration_s=float(testcases["duration_s"].sum()),
        pass_rate=passed / ran if ran else None,
    )


def _frame(rows: list[_Row]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=TESTCASE_COLUMNS).astype(_COLUMN_TYPES)


def _read_testcases(path: Path) -> list[_Row]:
    with open_report(path) as stream:
        try:
            return _collect_testcases(path, stream, recover=False)
        except etree.XMLSyntaxError as error:
            if error.code not in _INVALID_CHARACTER_ERRORS:
                raise malformed_xml(path, error) from error
        # Captured output often holds characters XML 1.0 forbids (ANSI colour codes); a
        # recovering pass drops them, and any other error still fails the report.
        stream.seek(0)
        return _collect_testcases(path, stream, recover=True)


def _collect_testcases(path: Path, stream: IO[bytes], *, recover: bool) -> list[_Row]:
    events = etree.iterparse(
        stream,
        events=("start", "end"),
        resolve_entities=False,
        no_network=True,
        # Lifts libxml2's 10 MB limit on one text node: a test may print more than that.
        huge_tree=True,
        recover=recover,
    )
    rows: list[_Row] = []
    suites: list[str] = []  # names of the enclosing <testsuite> elements, innermost last
    for event, element in events:
        tag = _local_name(element.tag)
        if event == "start":
            if tag == "testsuite":
                suites.append(element.get("name", ""))
            elif tag not in _ROOT_TAGS and element.getparent() is None:
                raise ReportError(
                    path,
                    element.sourceline,
                    f"root element is <{tag}>, expected <testsuite> or <testsuites>",
                )
        elif tag == "testcase":
            rows.append(_testcase_row(path.name, suites[-1] if suites else "", element))
            _discard(element)
        elif tag == "testsuite":
            suites.pop()
            _discard(element)
        elif tag in _UNREAD_TAGS:
            element.clear()
    if recover:
        for entry in events.error_log:
            if entry.type not in _INVALID_CHARACTER_ERRORS:
                raise malformed_xml(path, entry)
    return rows


def _testcase_row(report: str, suite: str, testcase: Any) -> _Row:
    children: dict[str, Any] = {}
    for child in testcase.iterchildren(tag=etree.Element):
        children.setdefault(_local_name(child.tag), child)
    status, message = "passed", ""
    for result_tag, result_status in _RESULTS:
        result = children.get(result_tag)
        if result is not None:
            status = result_status
            message = (result.get("message") or result.text or "").strip()[:MESSAGE_LIMIT]
            break
    return (
        report,
        suite,
        testcase.get("classname", ""),
        testcase.get("name", ""),
        testcase.get("file", ""),
        _seconds(testcase.get("time")),
        status,
        message,
        not _FLAKY_MARKERS.isdisjoint(children),
    )


def _seconds(time: str | None) -> float:
    """A time attribute in seconds; 0.0 when missing or garbage. Some tools write "1,234.5"."""
    if time is None:
        return 0.0
    try:
        seconds = float(time.replace(",", ""))
    except ValueError:
        return 0.0
    return seconds if math.isfinite(seconds) else 0.0


def _discard(element: Any) -> None:
    """Free a finished element and its earlier siblings, so memory stays flat on big reports."""
    element.clear()
    parent = element.getparent()
    if parent is not None:
        while element.getprevious() is not None:
            del parent[0]


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]
