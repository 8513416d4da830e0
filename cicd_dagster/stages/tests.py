"""unit, integration, e2e and performance: run a test stage, read what it reported.

One function serves the four stages; only the performance stage also reads
pytest-benchmark JSON and compares it with the last green run of the default branch.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from cicd_dagster.analytics.flaky import quarantined_failures
from cicd_dagster.config import PipelineConfig, TestStageConfig
from cicd_dagster.reports import ReportError
from cicd_dagster.reports.benchmark import compare_benchmarks, parse_benchmark_json
from cicd_dagster.reports.coverage import CoverageSummary, parse_cobertura
from cicd_dagster.reports.junit import TestSummary, parse_junit_files, summarize
from cicd_dagster.stages.build import BuildOutcome
from cicd_dagster.stages.context import StageContext, StageError, step_failure
from cicd_dagster.workspace import fingerprint

TEST_STAGES = ("unit", "integration", "e2e", "performance")


@dataclass(frozen=True)
class CommandsRun:
    """How the stage's commands went; stored so that a re-run can reuse the reports."""

    duration_s: float
    exit_code: int | None
    failure: str | None  # why the commands failed, when they did


@dataclass(frozen=True)
class TestStageOutcome:
    __test__ = False  # not a pytest test class

    stage: str
    status: str  # success | failed | not_configured
    duration_s: float = 0.0
    exit_code: int | None = None
    failure: str | None = None  # why the commands failed, when they did
    cases: pd.DataFrame | None = None
    summary: TestSummary | None = None
    coverage: CoverageSummary | None = None
    benchmarks: pd.DataFrame | None = None  # with baseline_mean_s and regression columns
    reports: tuple[str, ...] = ()
    reused: bool = False
    quarantined: tuple[str, ...] = ()  # ids of the failed tests tests.quarantine lets through

    @property
    def configured(self) -> bool:
        return self.status != "not_configured"


def run_test_stage(
    ctx: StageContext,
    stage: str,
    pipeline: PipelineConfig,
    build: BuildOutcome,
    baseline: pd.DataFrame | None = None,
) -> TestStageOutcome:
    stage_config = pipeline.tests.stages()[stage]
    if stage_config is None:
        return TestStageOutcome(stage=stage, status="not_configured")
    with ctx.workspace.stage_lock(stage):
        # The build's fingerprint covers the commit, the env and the checkout it ran in.
        stage_fingerprint = fingerprint(stage_config.model_dump(mode="json"), build.fingerprint)
        quarantine = pipeline.tests.quarantine
        cached = None if ctx.force else ctx.workspace.load_result(stage, stage_fingerprint)
        if cached is not None:
            return read_reports(
                ctx, stage, stage_config, baseline, CommandsRun(**cached), True, quarantine
            )
        env = ctx.step_env(stage, pipeline, build.env_dir)
        outcome, commands = run_and_read(
            ctx, stage, stage_config, env, baseline, quarantine=quarantine
        )
        if outcome.status == "success":
            ctx.workspace.save_result(stage, stage_fingerprint, asdict(commands))
        return outcome


def run_and_read(
    ctx: StageContext,
    stage: str,
    config: TestStageConfig,
    env: dict[str, str],
    baseline: pd.DataFrame | None = None,
    *,
    cwd: Path | None = None,
    quarantine: Sequence[str] = (),
) -> tuple[TestStageOutcome, CommandsRun]:
    """Run the stage's commands (in the checkout, or `cwd`) into a fresh reports folder
    and read what they reported; StageError when nothing readable was reported."""
    reports_dir = ctx.workspace.reports_dir(stage)
    shutil.rmtree(reports_dir, ignore_errors=True)
    reports_dir.mkdir(parents=True)
    started = time.monotonic()
    exit_code: int | None = 0
    failure = None
    log_tail = ""
    for command in config.run:
        result = ctx.run(stage, command, env, config.timeout_s, cwd)
        if not result.ok:
            # Test commands exit non-zero when tests fail: the report still counts,
            # and later commands are skipped as a shell `&&` chain would skip them.
            exit_code, failure, log_tail = (
                result.exit_code,
                step_failure("test command", result),
                result.log_tail,
            )
            break
    commands = CommandsRun(time.monotonic() - started, exit_code, failure)
    try:
        return read_reports(ctx, stage, config, baseline, commands, quarantine=quarantine), commands
    except StageError as error:
        if failure:
            raise StageError(f"{failure}; {error.message}", log_tail=log_tail) from error
        raise


def read_reports(
    ctx: StageContext,
    stage: str,
    config: TestStageConfig,
    baseline: pd.DataFrame | None,
    commands: CommandsRun,
    reused: bool = False,
    quarantine: Sequence[str] = (),
) -> TestStageOutcome:
    """Parse everything the stage wrote under its reports folder.

    Failures of quarantined tests fail neither the stage nor its commands: a test command
    that exited 1 (what test runners exit when tests failed) with only quarantined failures
    succeeded."""
    reports_dir = ctx.workspace.reports_dir(stage)
    coverage_path = reports_dir / config.coverage if config.coverage else None
    junit_files = [
        path
        for path in sorted(reports_dir.glob(config.reports))
        if path.is_file() and path != coverage_path
    ]
    if not junit_files:
        raise StageError(
            f"{stage}: no JUnit XML report matched {config.reports!r} under $CICD_REPORTS_DIR"
        )
    try:
        cases = parse_junit_files(junit_files)
        coverage = (
            parse_cobertura(coverage_path)
            if coverage_path is not None and coverage_path.exists()
            else None
        )
        benchmarks = _benchmarks(reports_dir, config, baseline)
    except ReportError as error:
        raise StageError(f"{stage}: {error}") from error
    summary = summarize(cases)
    quarantined = quarantined_failures(cases, quarantine)
    tests_failed = summary.failed + summary.errors > len(quarantined)
    failure = commands.failure
    if quarantined and not tests_failed and commands.exit_code == 1:
        failure = None
    return TestStageOutcome(
        stage=stage,
        status="failed" if failure or tests_failed else "success",
        duration_s=commands.duration_s,
        exit_code=commands.exit_code,
        failure=failure,
        cases=cases,
        summary=summary,
        coverage=coverage,
        benchmarks=benchmarks,
        reports=tuple(p.relative_to(reports_dir).as_posix() for p in junit_files),
        reused=reused,
        quarantined=quarantined,
    )


def _benchmarks(
    reports_dir: Path, config: TestStageConfig, baseline: pd.DataFrame | None
) -> pd.DataFrame | None:
    if not config.benchmarks:
        return None
    files = sorted(p for p in reports_dir.glob(config.benchmarks) if p.is_file())
    if not files:
        return None
    current = pd.concat([parse_benchmark_json(p) for p in files], ignore_index=True)
    comparison = compare_benchmarks(current, baseline)  # row for row with `current`
    return current.assign(
        baseline_mean_s=comparison["baseline_mean_s"], regression=comparison["regression"]
    )
