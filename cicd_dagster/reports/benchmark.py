"""pytest-benchmark JSON reports (--benchmark-json) and their comparison with a baseline run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from cicd_dagster.reports import ReportError, open_report

BENCHMARK_COLUMNS = [
    "name",
    "fullname",
    "mean_s",
    "median_s",
    "stddev_s",
    "min_s",
    "max_s",
    "rounds",
    "ops",
]
COMPARISON_COLUMNS = ["name", "fullname", "mean_s", "baseline_mean_s", "regression"]

# Column of BENCHMARK_COLUMNS -> key in a benchmark's "stats" object and its JSON kind.
_STATS_FIELDS = {
    "mean_s": ("mean", float),
    "median_s": ("median", float),
    "stddev_s": ("stddev", float),
    "min_s": ("min", float),
    "max_s": ("max", float),
    "rounds": ("rounds", int),
    "ops": ("ops", float),
}
_COLUMN_TYPES = {"name": "str", "fullname": "str", "rounds": "int64"} | {
    column: "float64" for column, (_, kind) in _STATS_FIELDS.items() if kind is float
}
_JSON_KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    float: "a number",
    int: "an integer",
    bool: "a boolean",
    type(None): "null",
}


def parse_benchmark_json(path: Path) -> pd.DataFrame:
    """One row per benchmark, with the columns BENCHMARK_COLUMNS (times in seconds)."""
    with open_report(path) as stream:
        try:
            document = json.load(stream)
        except json.JSONDecodeError as error:
            raise ReportError(
                path, error.lineno, f"invalid JSON (column {error.colno}): {error.msg}"
            ) from error
        except UnicodeDecodeError as error:
            raise ReportError(path, None, f"not UTF-8 text: {error.reason}") from error
    if not isinstance(document, dict):
        raise ReportError(path, None, f"top level should be an object, not {_kind(document)}")
    rows = []
    for index, benchmark in enumerate(_field(path, document, "", "benchmarks", list)):
        where = f"benchmarks[{index}]"
        if not isinstance(benchmark, dict):
            raise ReportError(path, None, f"{where} should be an object, not {_kind(benchmark)}")
        stats = _field(path, benchmark, where, "stats", dict)
        row = {key: _field(path, benchmark, where, key, str) for key in ("name", "fullname")}
        for column, (key, kind) in _STATS_FIELDS.items():
            row[column] = _field(path, stats, f"{where}.stats", key, kind)
        rows.append(row)
    return pd.DataFrame(rows, columns=BENCHMARK_COLUMNS).astype(_COLUMN_TYPES)


def compare_benchmarks(current: pd.DataFrame, baseline: pd.DataFrame | None) -> pd.DataFrame:
    """current's benchmarks, row for row, with the baseline's mean and the relative change.

    regression is (mean_s - baseline_mean_s) / baseline_mean_s, matched by fullname: 0.25 is
    25% slower. It is NaN for a benchmark the baseline lacks.
    """
    comparison = current[["name", "fullname", "mean_s"]].copy()
    if baseline is None:
        baseline_means = pd.Series(dtype="float64")
    else:
        # A baseline gathered from several reports may repeat a benchmark: the last one counts.
        unique = baseline.drop_duplicates("fullname", keep="last")
        baseline_means = unique.set_index("fullname")["mean_s"]
    comparison["baseline_mean_s"] = comparison["fullname"].map(baseline_means).astype("float64")
    # A zero baseline mean (nothing measured) gives no ratio rather than an infinite one.
    divisor = comparison["baseline_mean_s"].where(comparison["baseline_mean_s"] > 0)
    comparison["regression"] = (comparison["mean_s"] - divisor) / divisor
    return comparison[COMPARISON_COLUMNS]


def max_regression(comparison: pd.DataFrame) -> float | None:
    """The largest regression of a compare_benchmarks frame; None when no benchmark has one."""
    worst = comparison["regression"].max()
    return None if pd.isna(worst) else float(worst)


def _field(path: Path, record: dict[str, Any], where: str, key: str, kind: type) -> Any:
    """record[key], checked to be of a JSON kind; errors name it: benchmarks[2].stats.mean."""
    field = f"{where}.{key}" if where else key
    if key not in record:
        raise ReportError(path, None, f"{field} is missing")
    value = record[key]
    # JSON numbers load as int or float; true and false load as bool, which is an int subclass.
    accepted = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) or not isinstance(value, accepted):
        raise ReportError(path, None, f"{field} should be {_JSON_KINDS[kind]}, not {_kind(value)}")
    return value


def _kind(value: object) -> str:
    return _JSON_KINDS.get(type(value), type(value).__name__)
