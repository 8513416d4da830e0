"""Cobertura coverage reports (coverage.xml), as written by `coverage xml` and pytest-cov."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from cicd_dagster.reports import ReportError, malformed_xml, open_report

# condition-coverage="50% (1/2)": branches taken / branches at that line.
_CONDITION_COVERAGE = re.compile(r"\((\d+)/(\d+)\)")


@dataclass(frozen=True)
class CoverageSummary:
    """Line coverage of a run; branch_rate is None when no branch was measured."""

    line_rate: float
    lines_valid: int
    lines_covered: int
    branch_rate: float | None


def parse_cobertura(path: Path) -> CoverageSummary:
    """The totals of a Cobertura report: from the root's counts, else from its <line> elements."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)
    with open_report(path) as stream:
        try:
            root = etree.parse(stream, parser).getroot()
        except etree.XMLSyntaxError as error:
            raise malformed_xml(path, error) from error
    if root.tag != "coverage":
        raise ReportError(
            path, root.sourceline, f"root element is <{root.tag}>, expected <coverage>"
        )
    lines = _root_counts(path, root, "lines-valid", "lines-covered")
    branches = _root_counts(path, root, "branches-valid", "branches-covered")
    if lines is None or branches is None:
        counted_lines, counted_branches = _count_lines(path, root)
        lines = counted_lines if lines is None else lines
        branches = counted_branches if branches is None else branches
    lines_valid, lines_covered = lines
    branches_valid, branches_covered = branches
    return CoverageSummary(
        # As coverage.py does, a run with no lines to cover counts as fully covered.
        line_rate=lines_covered / lines_valid if lines_valid else 1.0,
        lines_valid=lines_valid,
        lines_covered=lines_covered,
        # coverage.py writes branches-valid="0" when it did not measure branches.
        branch_rate=branches_covered / branches_valid if branches_valid else None,
    )


def _root_counts(path: Path, root: Any, valid: str, covered: str) -> tuple[int, int] | None:
    """(valid, covered) from the root's attributes; None when either is missing."""
    if root.get(valid) is None or root.get(covered) is None:
        return None
    return _count(path, root, valid), _count(path, root, covered)


def _count_lines(path: Path, root: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """(valid, covered) lines and branches counted from the <line> elements of every <class>."""
    # Keyed by (file, line number): some producers list one file's line under several classes.
    line_hits: dict[tuple[str, str], int] = {}
    branch_counts: dict[tuple[str, str], tuple[int, int]] = {}
    for class_element in root.iter("class"):
        filename = class_element.get("filename", "")
        for line in class_element.iterfind("lines/line"):
            key = (filename, line.get("number", ""))
            line_hits[key] = max(line_hits.get(key, 0), _count(path, line, "hits"))
            condition = _CONDITION_COVERAGE.search(line.get("condition-coverage", ""))
            if line.get("branch") == "true" and condition:
                taken, total = int(condition[1]), int(condition[2])
                branch_counts[key] = max(branch_counts.get(key, (0, 0)), (taken, total))
    lines_covered = sum(1 for hits in line_hits.values() if hits > 0)
    branches_covered = sum(taken for taken, _ in branch_counts.values())
    branches_valid = sum(total for _, total in branch_counts.values())
    return (len(line_hits), lines_covered), (branches_valid, branches_covered)


def _count(path: Path, element: Any, attribute: str) -> int:
    value = element.get(attribute, "0")
    try:
        return int(value)
    except ValueError:
        raise ReportError(
            path,
            element.sourceline,
            f"<{element.tag}> {attribute}={value!r} is not a whole number",
        ) from None
