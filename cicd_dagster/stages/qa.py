"""qa_<env>: the repository's QA suite (.cicd.yml `qa`) run against the environment a
commit is live in, the step between that environment and the next (Stage -> QA -> Prod).

The suite runs as a test stage does (bash steps, sandboxed, JUnit reports under
$CICD_REPORTS_DIR, the min_pass_rate gate) with the build's env, in the commit's release
folder home/releases/<repo>/<sha> (it outlives workspace pruning; the checkout when there is
none), and gets CICD_TARGET_URL (the environment's stable router address) and
CICD_ENVIRONMENT. It never runs against a version that is not live there: its verdict would
speak for the wrong commit. Reports and logs go to the commit's run folder under
qa_<env>; the history DB keeps the result as the build's "qa" stage, which
stages/deploy.py's refusal reads before the next environment takes the commit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from cicd_dagster.config import EnvironmentConfig, TestStageConfig
from cicd_dagster.stages.build import load_build
from cicd_dagster.stages.context import StageContext, StageError
from cicd_dagster.stages.deploy import QA_STAGE, environment_for
from cicd_dagster.stages.gates import evaluate_gates
from cicd_dagster.stages.source import load_source
from cicd_dagster.stages.tests import TestStageOutcome, run_and_read
from cicd_dagster.store import GateRecord


class QaRefused(StageError):
    """QA may not run for this commit here (not live, no QA in this environment): nothing
    is recorded, so an earlier verdict on the commit stands."""


@dataclass(frozen=True)
class QaOutcome:
    environment: str
    url: str
    tests: TestStageOutcome  # stage "qa"; status not_configured without a QA suite
    gates: list[GateRecord]

    @property
    def passed(self) -> bool:
        return self.tests.status != "failed" and all(gate.passed for gate in self.gates)

    @property
    def detail(self) -> str:
        """One line for the history DB and for a refusal that quotes it."""
        where = f"in {self.environment} at {self.url}"
        summary = self.tests.summary
        if summary is None:
            return f"{where}: the repository has no QA suite (.cicd.yml qa)"
        executed = summary.tests - summary.skipped
        line = f"{where}: {summary.passed} of {executed} tests passed"
        failing = [gate.detail for gate in self.gates if not gate.passed]
        if self.tests.failure:
            line += f"; {self.tests.failure}"
        elif failing:
            line += f"; {'; '.join(failing)}"
        return line


def qa_folder(environment: str) -> str:
    """The name of the commit's reports and log folder of QA in `environment`."""
    return f"{QA_STAGE}_{environment}"


def run_qa(ctx: StageContext, environment: EnvironmentConfig) -> QaOutcome:
    """Run the commit's QA suite against `environment`; QaRefused when the commit is not
    live there or the environment does not run QA, StageError when the suite reported
    nothing readable (a crash, a timeout before any report)."""
    repo, sha = ctx.repository.name, ctx.sha
    if not environment.qa:
        raise QaRefused(f"{environment.name} does not run QA (cicd.yaml environments[].qa)")
    target = environment_for(ctx.config, repo, environment)
    live = target.current_version()
    if live != sha:
        runs = "nothing" if live is None else live[:12]
        raise QaRefused(
            f"{sha[:12]} is not live in {environment.name} ({environment.name} runs {runs}): "
            f"deploy it there first"
        )
    url = target.router.url
    pipeline = load_source(ctx)[0]
    if pipeline.qa is None:
        tests = TestStageOutcome(stage=QA_STAGE, status="not_configured")
        return QaOutcome(environment.name, url, tests, evaluate_gates(pipeline.gates, tests))
    build = load_build(ctx, pipeline)
    folder = qa_folder(environment.name)
    with ctx.workspace.stage_lock(folder):
        cwd = _suite_folder(ctx)
        env = ctx.step_env(folder, pipeline, build.env_dir)
        env.update(CICD_TARGET_URL=url, CICD_ENVIRONMENT=environment.name, CICD_WORKSPACE=str(cwd))
        suite = TestStageConfig(
            run=pipeline.qa.run, reports=pipeline.qa.reports, timeout_s=pipeline.qa.timeout_s
        )
        outcome, _ = run_and_read(ctx, folder, suite, env, cwd=cwd)
    tests = replace(outcome, stage=QA_STAGE)
    return QaOutcome(environment.name, url, tests, evaluate_gates(pipeline.gates, tests))


def _suite_folder(ctx: StageContext) -> Path:
    """The release folder the deploy made (what runs), else the checkout."""
    release = ctx.config.home / "releases" / ctx.repository.name / ctx.sha
    for folder in (release, ctx.workspace.checkout):
        if folder.is_dir():
            return folder
    raise StageError(
        f"neither the release folder {release} nor the checkout {ctx.workspace.checkout} "
        f"of {ctx.sha[:12]} exists: deploy it again"
    )
