"""Parsers for the reports that test stages write: JUnit XML, pytest-benchmark JSON, Cobertura.

Plain typed Python without Dagster, so the parsers can be tested and reused on their own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from lxml import etree


class ReportError(Exception):
    """A report file is missing, unreadable or malformed; names the file and, if known, the line."""

    def __init__(self, path: Path, line: int | None, message: str) -> None:
        super().__init__(path, line, message)
        self.path = path
        self.line = line
        self.message = message

    def __str__(self) -> str:
        where = str(self.path) if self.line is None else f"{self.path}:{self.line}"
        return f"{where}: {self.message}"


def open_report(path: Path) -> BinaryIO:
    """Open a report for binary reading, or raise ReportError if it is missing or empty."""
    try:
        stream = path.open("rb")
    except FileNotFoundError as error:
        raise ReportError(path, None, "file does not exist") from error
    except OSError as error:
        raise ReportError(path, None, f"cannot be read: {error.strerror}") from error
    if os.fstat(stream.fileno()).st_size == 0:
        stream.close()
        raise ReportError(path, None, "file is empty")
    return stream


def malformed_xml(path: Path, problem: etree.XMLSyntaxError | etree._LogEntry) -> ReportError:
    """ReportError for an lxml syntax error or error-log entry, with the line lxml reports."""
    entry = problem.error_log.last_error if isinstance(problem, etree.XMLSyntaxError) else problem
    if entry is None:  # lxml raised the error itself, without a libxml2 error behind it
        return ReportError(path, problem.lineno, f"malformed XML: {problem.msg}")
    # libxml2 has no text for some errors (an unclosed CDATA section); its code name says it.
    reason = entry.type_name if entry.message.startswith("Unregistered") else entry.message
    return ReportError(path, entry.line, f"malformed XML (column {entry.column}): {reason}")


# The parser modules import the helpers above from this package, so they are imported
# only after those are defined.
from cicd_dagster.reports.benchmark import (  # noqa: E402
    BENCHMARK_COLUMNS,
    COMPARISON_COLUMNS,
    compare_benchmarks,
    max_regression,
    parse_benchmark_json,
)
from cicd_dagster.reports.coverage import CoverageSummary, parse_cobertura  # noqa: E402
from cicd_dagster.reports.junit import (  # noqa: E402
    TESTCASE_COLUMNS,
    TestSummary,
    parse_junit,
    parse_junit_files,
    summarize,
)

__all__ = [
    "BENCHMARK_COLUMNS",
    "COMPARISON_COLUMNS",
    "TESTCASE_COLUMNS",
    "CoverageSummary",
    "ReportError",
    "TestSummary",
    "compare_benchmarks",
    "malformed_xml",
    "max_regression",
    "open_report",
    "parse_benchmark_json",
    "parse_cobertura",
    "parse_junit",
    "parse_junit_files",
    "summarize",
]
