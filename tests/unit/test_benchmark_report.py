"""pytest-benchmark JSON: real reports, malformed ones, and comparison with a baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from cicd_dagster.reports import ReportError
from cicd_dagster.reports.benchmark import (
    BENCHMARK_COLUMNS,
    COMPARISON_COLUMNS,
    compare_benchmarks,
    max_regression,
    parse_benchmark_json,
)
from tests.support import run_pytest

BENCHMARK_SAMPLE = """
import pytest

@pytest.mark.parametrize("size", [10, 1000])
def test_sum(benchmark, size):
    benchmark(sum, range(size))

def test_join(benchmark):
    benchmark("-".join, ["a"] * 100)
"""


@pytest.fixture(scope="module")
def real_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A report written by pytest-benchmark itself, on a few tiny benchmarks."""
    directory = tmp_path_factory.mktemp("benchmark-run")
    (directory / "test_speed.py").write_text(BENCHMARK_SAMPLE)
    report = directory / "benchmark.json"
    run = run_pytest(
        directory,
        f"--benchmark-json={report}",
        "--benchmark-min-rounds=3",
        "--benchmark-max-time=0.01",
        "test_speed.py",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return report


def write_json(directory: Path, document: Any, name: str = "benchmark.json") -> Path:
    path = directory / name
    path.write_text(json.dumps(document, indent=2))
    return path


def benchmark_entry(name: str, mean: float = 0.001) -> dict[str, Any]:
    stats = {
        "min": mean / 2,
        "max": mean * 2,
        "mean": mean,
        "stddev": mean / 10,
        "rounds": 5,
        "median": mean,
        "ops": 1 / mean,
    }
    return {"name": name, "fullname": f"test_speed.py::{name}", "stats": stats}


def benchmarks_frame(means: dict[str, float]) -> pd.DataFrame:
    """A parse_benchmark_json-shaped frame; keys are fullnames, names are their last part."""
    return pd.DataFrame(
        {
            "name": [fullname.rpartition("::")[2] for fullname in means],
            "fullname": list(means),
            "mean_s": list(means.values()),
        }
    )


def test_real_report_has_one_row_per_benchmark(real_report: Path) -> None:
    frame = parse_benchmark_json(real_report)
    assert list(frame.columns) == BENCHMARK_COLUMNS
    assert sorted(frame["fullname"]) == [
        "test_speed.py::test_join",
        "test_speed.py::test_sum[1000]",
        "test_speed.py::test_sum[10]",
    ]
    assert sorted(frame["name"]) == ["test_join", "test_sum[1000]", "test_sum[10]"]
    assert (frame["rounds"] >= 3).all()
    assert (frame["min_s"] <= frame["median_s"]).all()
    assert (frame["median_s"] <= frame["max_s"]).all()
    assert (frame["mean_s"] > 0).all()
    assert frame["ops"].tolist() == pytest.approx((1 / frame["mean_s"]).tolist())
    assert str(frame["rounds"].dtype) == "int64"
    assert str(frame["mean_s"].dtype) == "float64"


def test_real_report_compared_with_itself_shows_no_regression(real_report: Path) -> None:
    frame = parse_benchmark_json(real_report)
    comparison = compare_benchmarks(frame, frame)
    assert comparison["regression"].tolist() == [0.0, 0.0, 0.0]
    assert max_regression(comparison) == 0.0


def test_invalid_json_names_the_line_and_column(tmp_path: Path) -> None:
    report = tmp_path / "broken.json"
    report.write_text('{\n  "benchmarks": [\n    {"name": "a",,}\n  ]\n}\n')
    with pytest.raises(ReportError) as raised:
        parse_benchmark_json(report)
    assert raised.value.line == 3
    assert str(raised.value).startswith(f"{report}:3: invalid JSON (column 18)")


def test_non_utf8_report_raises(tmp_path: Path) -> None:
    report = tmp_path / "latin1.json"
    report.write_bytes(b'{"benchmarks": [], "note": "caf\xe9"}')
    with pytest.raises(ReportError, match="not UTF-8 text"):
        parse_benchmark_json(report)


def with_field(path: list[Any], value: Any) -> dict[str, Any]:
    """A valid two-benchmark document with the field at path replaced, or removed for `...`."""
    document: dict[str, Any] = {"benchmarks": [benchmark_entry("a"), benchmark_entry("b")]}
    container: Any = document
    for key in path[:-1]:
        container = container[key]
    if value is ...:
        del container[path[-1]]
    else:
        container[path[-1]] = value
    return document


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "top level should be an object, not an array"),
        ({"machine_info": {}}, "benchmarks is missing"),
        ({"benchmarks": {}}, "benchmarks should be an array, not an object"),
        ({"benchmarks": [None]}, "benchmarks[0] should be an object, not null"),
        (with_field(["benchmarks", 1, "stats"], ...), "benchmarks[1].stats is missing"),
        (
            with_field(["benchmarks", 1, "fullname"], 7),
            "benchmarks[1].fullname should be a string, not an integer",
        ),
        (
            with_field(["benchmarks", 1, "stats", "mean"], "fast"),
            "benchmarks[1].stats.mean should be a number, not a string",
        ),
        (
            with_field(["benchmarks", 0, "stats", "rounds"], True),
            "benchmarks[0].stats.rounds should be an integer, not a boolean",
        ),
        (
            with_field(["benchmarks", 0, "stats", "rounds"], 2.5),
            "benchmarks[0].stats.rounds should be an integer, not a number",
        ),
    ],
)
def test_malformed_document_names_the_field(tmp_path: Path, document: Any, message: str) -> None:
    report = write_json(tmp_path, document)
    with pytest.raises(ReportError) as raised:
        parse_benchmark_json(report)
    assert str(raised.value) == f"{report}: {message}"


def test_integer_times_are_accepted_as_seconds(tmp_path: Path) -> None:
    document = with_field(["benchmarks", 0, "stats", "max"], 2)
    assert parse_benchmark_json(write_json(tmp_path, document))["max_s"].tolist() == [2.0, 0.002]


def test_report_without_benchmarks_gives_empty_frame(tmp_path: Path) -> None:
    frame = parse_benchmark_json(write_json(tmp_path, {"benchmarks": []}))
    assert list(frame.columns) == BENCHMARK_COLUMNS
    assert frame.empty


def test_empty_report_raises(tmp_path: Path) -> None:
    report = tmp_path / "empty.json"
    report.write_bytes(b"")
    with pytest.raises(ReportError, match=r"empty\.json: file is empty$"):
        parse_benchmark_json(report)


def test_missing_report_raises(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"absent\.json: file does not exist$"):
        parse_benchmark_json(tmp_path / "absent.json")


def test_regression_is_relative_change_of_mean_matched_by_fullname() -> None:
    current = benchmarks_frame({"a.py::test_x": 1.5, "b.py::test_x": 0.5, "a.py::test_new": 1.0})
    baseline = benchmarks_frame({"b.py::test_x": 1.0, "a.py::test_x": 1.0, "a.py::test_gone": 9.0})
    comparison = compare_benchmarks(current, baseline)
    assert list(comparison.columns) == COMPARISON_COLUMNS
    assert comparison["fullname"].tolist() == ["a.py::test_x", "b.py::test_x", "a.py::test_new"]
    assert comparison["baseline_mean_s"].tolist()[:2] == [1.0, 1.0]
    assert comparison["regression"].tolist()[:2] == [0.5, -0.5]
    assert math.isnan(comparison["regression"].iloc[2])
    assert max_regression(comparison) == 0.5


def test_without_baseline_no_benchmark_has_a_regression() -> None:
    comparison = compare_benchmarks(benchmarks_frame({"a.py::test_x": 1.0}), None)
    assert comparison["baseline_mean_s"].isna().all()
    assert comparison["regression"].isna().all()
    assert max_regression(comparison) is None


def test_repeated_baseline_benchmark_uses_the_last_one() -> None:
    baseline = pd.concat(
        [benchmarks_frame({"a.py::test_x": 4.0}), benchmarks_frame({"a.py::test_x": 2.0})],
        ignore_index=True,
    )
    comparison = compare_benchmarks(benchmarks_frame({"a.py::test_x": 3.0}), baseline)
    assert comparison["regression"].tolist() == [0.5]


def test_zero_baseline_mean_gives_no_regression() -> None:
    comparison = compare_benchmarks(
        benchmarks_frame({"a.py::test_x": 1.0}), benchmarks_frame({"a.py::test_x": 0.0})
    )
    assert math.isnan(comparison["regression"].iloc[0])
    assert max_regression(comparison) is None


def test_max_regression_of_no_benchmarks_is_none() -> None:
    empty = benchmarks_frame({})
    assert max_regression(compare_benchmarks(empty, empty)) is None
