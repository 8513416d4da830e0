"""Quality gates: thresholds of .cicd.yml applied to one test stage's outcome.

Every test stage answers the same gates (the Dagster checks are declared up front), so
a gate with nothing to judge passes and says why in its detail.
"""

from __future__ import annotations

import math

from cicd_dagster.config import GatesConfig
from cicd_dagster.reports.benchmark import max_regression
from cicd_dagster.stages.tests import TestStageOutcome
from cicd_dagster.store import GateRecord

GATES_BY_STAGE = {
    "unit": ("min_pass_rate", "min_coverage"),
    "integration": ("min_pass_rate", "min_coverage"),
    "e2e": ("min_pass_rate", "min_coverage"),
    "performance": ("min_pass_rate", "min_coverage", "max_perf_regression"),
    "qa": ("min_pass_rate",),  # the QA suite against a deployed environment
}

# A gate's detail names this many quarantined failures; the stage's metadata lists them all.
_NAMED_QUARANTINED = 5


def evaluate_gates(gates: GatesConfig, outcome: TestStageOutcome) -> list[GateRecord]:
    judges = {
        "min_pass_rate": _pass_rate,
        "min_coverage": _coverage,
        "max_perf_regression": _perf_regression,
    }
    if not outcome.configured:
        return [
            GateRecord(name, True, None, None, f"the {outcome.stage} stage is not configured")
            for name in GATES_BY_STAGE[outcome.stage]
        ]
    return [judges[name](gates, outcome) for name in GATES_BY_STAGE[outcome.stage]]


def _pass_rate(gates: GatesConfig, outcome: TestStageOutcome) -> GateRecord:
    threshold = gates.min_pass_rate
    summary = outcome.summary
    # Quarantined failures are left out of the rate, and said.
    quarantined = len(outcome.quarantined)
    judged = 0 if summary is None else summary.tests - summary.skipped - quarantined
    if summary is None or judged == 0:
        detail = "no test case ran" + (" outside the quarantine" if quarantined else "")
        return GateRecord("min_pass_rate", False, None, threshold, detail)
    rate = summary.passed / judged
    detail = f"{summary.passed} of {judged} tests passed ({rate:.1%}; minimum {threshold:.1%})"
    if quarantined:
        noun = "failure" if quarantined == 1 else "failures"
        named = ", ".join(outcome.quarantined[:_NAMED_QUARANTINED])
        more = quarantined - _NAMED_QUARANTINED
        detail += f"; {quarantined} quarantined {noun}: {named}" + (
            f" and {more} more" if more > 0 else ""
        )
    passed = rate >= threshold
    if outcome.failure:
        # A crashed or timed-out run may have reported only part of its tests.
        passed = False
        detail += f"; {outcome.failure}"
    return GateRecord("min_pass_rate", passed, rate, threshold, detail)


def _coverage(gates: GatesConfig, outcome: TestStageOutcome) -> GateRecord:
    threshold = gates.min_coverage
    if threshold is None:
        return GateRecord("min_coverage", True, _line_rate(outcome), None, "no min_coverage set")
    if outcome.coverage is None:
        return GateRecord(
            "min_coverage", True, None, threshold, f"{outcome.stage} reports no coverage"
        )
    rate = outcome.coverage.line_rate
    return GateRecord(
        "min_coverage",
        rate >= threshold,
        rate,
        threshold,
        f"line coverage {rate:.1%} (minimum {threshold:.1%})",
    )


def _perf_regression(gates: GatesConfig, outcome: TestStageOutcome) -> GateRecord:
    threshold = gates.max_perf_regression
    benchmarks = outcome.benchmarks
    if benchmarks is None or benchmarks.empty:
        return GateRecord("max_perf_regression", True, None, threshold, "no benchmarks reported")
    worst = max_regression(benchmarks)
    if worst is None or math.isnan(worst):
        return GateRecord(
            "max_perf_regression",
            True,
            None,
            threshold,
            "no green baseline on the default branch yet",
        )
    slowest = benchmarks.sort_values("regression", ascending=False).iloc[0]
    detail = f"slowest change: {slowest['name']} {worst:+.1%} against the last green baseline"
    if threshold is None:
        return GateRecord("max_perf_regression", True, worst, None, detail)
    return GateRecord(
        "max_perf_regression",
        worst <= threshold,
        worst,
        threshold,
        f"{detail} (max {threshold:+.1%})",
    )


def _line_rate(outcome: TestStageOutcome) -> float | None:
    return outcome.coverage.line_rate if outcome.coverage else None
