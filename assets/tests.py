"""unit_tests, integration_tests, e2e_tests, performance_tests: test reports as assets.

Each materializes the stage's report and answers its quality gates as blocking asset
checks, so a failed gate stops everything downstream in the run.
"""

import dataclasses
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
)

from assets.build import build_key
from assets.common import (
    commit_asset,
    fail_stage,
    gate_results,
    gate_specs,
    stage_context,
    table,
)
from cicd_dagster.analytics.flaky import case_ids, mark_reruns
from cicd_dagster.config import RepositoryConfig
from cicd_dagster.reports.junit import summarize
from cicd_dagster.resources import CicdResource
from cicd_dagster.stages import StageError
from cicd_dagster.stages.build import load_build
from cicd_dagster.stages.gates import GATES_BY_STAGE, evaluate_gates
from cicd_dagster.stages.source import load_source
from cicd_dagster.stages.tests import TEST_STAGES, TestStageOutcome, run_test_stage
from cicd_dagster.store import StageRecord

GATE_DESCRIPTIONS = {
    "min_pass_rate": "Share of non-skipped tests that passed is at least gates.min_pass_rate.",
    "min_coverage": "Line coverage is at least gates.min_coverage.",
    "max_perf_regression": "No benchmark is slower than the last green default-branch "
    "run by more than gates.max_perf_regression.",
}


def report_key(repository: RepositoryConfig, stage: str) -> AssetKey:
    return AssetKey([repository.name, f"{stage}_tests"])


def report_asset(
    repository: RepositoryConfig, partitions: DynamicPartitionsDefinition, stage: str
) -> AssetsDefinition:
    key = report_key(repository, stage)

    @commit_asset(
        repository,
        partitions,
        key=key,
        deps=[build_key(repository)],
        kinds={"pytest"} if stage != "performance" else {"pytest", "benchmark"},
        description=f"The {stage} test report of the commit.",
        check_specs=gate_specs(
            key, {name: GATE_DESCRIPTIONS[name] for name in GATES_BY_STAGE[stage]}, partitions
        ),
    )
    def tests(
        context: AssetExecutionContext, cicd: CicdResource
    ) -> Iterator[MaterializeResult | AssetCheckResult]:
        ctx = stage_context(context, cicd, repository.name)
        started_at = datetime.now(UTC)
        history = cicd.history()
        try:
            pipeline, _, default_branch = load_source(ctx)
            build = load_build(ctx, pipeline)
            baseline = (
                history.last_green_benchmarks(repository.name, default_branch, before_sha=ctx.sha)
                if stage == "performance"
                else None
            )
            outcome = run_test_stage(ctx, stage, pipeline, build, baseline)
        except StageError as error:
            raise fail_stage(context, cicd, ctx, stage, started_at, error) from error
        if outcome.cases is not None:
            # A re-run of the commit: a test whose outcome changed since its last run is flaky.
            previous = history.test_outcomes(repository.name, commit_sha=ctx.sha, stage=stage)
            cases = mark_reruns(previous, outcome.cases)
            outcome = dataclasses.replace(outcome, cases=cases, summary=summarize(cases))
        gates = evaluate_gates(pipeline.gates, outcome)
        summary = outcome.summary
        history.record_stage(
            repository.name,
            ctx.sha,
            StageRecord(
                name=stage,
                status=outcome.status,
                started_at=started_at,
                duration_s=outcome.duration_s,
                coverage=outcome.coverage.line_rate if outcome.coverage else None,
                detail=outcome.failure,
                reused=outcome.reused,
                run_id=context.run_id,
            ).with_counts(summary),
        )
        if outcome.cases is not None:
            history.record_test_cases(repository.name, ctx.sha, stage, outcome.cases)
        if outcome.benchmarks is not None:
            history.record_benchmarks(repository.name, ctx.sha, stage, outcome.benchmarks)
        history.record_gates(repository.name, ctx.sha, stage, gates)
        yield MaterializeResult(metadata=report_metadata(outcome))
        yield from gate_results(
            gates, lambda gate: {"value": gate.value, "threshold": gate.threshold}
        )

    return tests


def report_metadata(outcome: TestStageOutcome) -> dict[str, Any]:
    """Counts and rates as numbers (so the UI plots them), failures and slow tests as tables."""
    if not outcome.configured:
        return {"status": "not_configured", "duration_s": 0.0}
    summary = outcome.summary
    cases = outcome.cases
    assert summary is not None and cases is not None
    failures = cases[cases["status"].isin(["failed", "error"])].assign(
        quarantined=lambda failed: case_ids(failed).isin(outcome.quarantined)
    )
    slowest = cases.sort_values("duration_s", ascending=False)
    metadata: dict[str, Any] = {
        "status": outcome.status,
        "tests": summary.tests,
        "passed": summary.passed,
        "failed": summary.failed,
        "errors": summary.errors,
        "skipped": summary.skipped,
        "flaky": summary.flaky,
        "pass_rate": summary.pass_rate,
        "duration_s": round(outcome.duration_s, 3),
        "test_time_s": round(summary.duration_s, 3),
        "reused": outcome.reused,
        "reports": ", ".join(outcome.reports),
        "quarantined_failures": len(outcome.quarantined),
        "failures": table(failures, ["classname", "name", "status", "quarantined", "message"]),
        "slowest_tests": table(slowest, ["classname", "name", "duration_s"], limit=10),
        "summary": MetadataValue.md(
            f"**{summary.passed}/{summary.tests}** passed, {summary.failed} failed, "
            f"{summary.errors} errors, {summary.skipped} skipped"
            + (f" ({len(outcome.quarantined)} quarantined)" if outcome.quarantined else "")
            + (f"\n\n{outcome.failure}" if outcome.failure else "")
        ),
    }
    if outcome.coverage is not None:
        metadata["line_coverage"] = outcome.coverage.line_rate
    if outcome.benchmarks is not None:
        metadata["benchmarks"] = table(
            outcome.benchmarks, ["name", "mean_s", "baseline_mean_s", "regression"]
        )
        worst = outcome.benchmarks["regression"].max()
        if worst == worst:  # not NaN
            metadata["max_regression"] = float(worst)
    return metadata


def report_assets(
    repository: RepositoryConfig, partitions: DynamicPartitionsDefinition
) -> list[AssetsDefinition]:
    return [report_asset(repository, partitions, stage) for stage in TEST_STAGES]
