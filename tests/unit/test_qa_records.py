"""QA in the config files and in the history DB (SQLite, and PostgreSQL when available):
a QA result is kept with the build but is not part of its CI status."""

from pathlib import Path
from textwrap import dedent

import pytest

from cicd_dagster.config import ConfigError, load_control_config, parse_pipeline_config
from cicd_dagster.stages.deploy import unfit_build, unpassed_qa
from cicd_dagster.store import GateRecord, HistoryStore
from tests.unit import test_history_store as history_tests
from tests.unit.test_history_store import REPO, commit_sha, record_build, stage_record

# The history store on SQLite and PostgreSQL: the fixtures of test_history_store.py.
database_url = history_tests.database_url
store = history_tests.store

CI_GREEN = dict.fromkeys(
    ("source", "build", "unit", "integration", "e2e", "performance"), "success"
)


def test_qa_suite_and_qa_environment_load_with_defaults(tmp_path: Path) -> None:
    pipeline = parse_pipeline_config("qa: {run: pytest tests/qa}\n", "app@1:.cicd.yml")
    assert pipeline.qa is not None
    assert (pipeline.qa.run, pipeline.qa.reports, pipeline.qa.timeout_s) == (
        ["pytest tests/qa"],
        "**/*.xml",
        600.0,
    )
    assert parse_pipeline_config("tests: {}\n", "app@1:.cicd.yml").qa is None
    path = tmp_path / "cicd.yaml"
    path.write_text(
        "repositories: [{name: app, url: /srv/app}]\n"
        "environments: [{name: staging, qa: true}, {name: prod}]\n"
    )
    assert [e.qa for e in load_control_config(path).environments] == [True, False]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("qa: {run: []}\n", "app@1:.cicd.yml:1: qa.run: List should have at least 1 item"),
        ("qa: {run: x, junit: y}\n", 'app@1:.cicd.yml:1: qa.junit: unknown field "junit"'),
        ("qa: {run: x, timeout_s: 0}\n", "app@1:.cicd.yml:1: qa.timeout_s:"),
        ("qa: {run: x, reports: /etc/*.xml}\n", "app@1:.cicd.yml:1: qa.reports:"),
    ],
)
def test_bad_qa_suites_name_the_line_and_field(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_pipeline_config(text, "app@1:.cicd.yml")
    assert str(raised.value).startswith(error), raised.value


def test_only_one_environment_may_run_qa(tmp_path: Path) -> None:
    path = tmp_path / "cicd.yaml"
    path.write_text(
        dedent(
            """\
            repositories: [{name: app, url: /srv/app}]
            environments:
              - name: staging
                qa: true
              - name: prod
                qa: true
            """
        )
    )
    with pytest.raises(ConfigError) as raised:
        load_control_config(path)
    assert str(raised.value) == (
        f"{path}:6: environments[1].qa: only one environment may run QA; staging already does"
    )


def test_a_failed_qa_keeps_the_build_green_and_refuses_the_next_environment(
    store: HistoryStore,
) -> None:
    sha = commit_sha(1)
    record_build(store, sha, stages=CI_GREEN)
    assert unpassed_qa(store, REPO, "staging", sha) == (
        f"it has not run: `cicd qa {REPO} --env staging --commit {sha[:12]}`"
    )

    store.record_stage(REPO, sha, stage_record("qa", "failed"))
    assert unpassed_qa(store, REPO, "staging", sha) == "it failed"  # no detail recorded
    store.record_gates(REPO, sha, "qa", [GateRecord("min_pass_rate", False, 0.5, 1.0, "1 of 2")])

    assert store.builds()["status"].tolist() == ["success"]
    assert unfit_build(store, REPO, sha) is None
    assert unpassed_qa(store, REPO, "staging", sha) == "1 of 2"

    store.record_stage(REPO, sha, stage_record("qa", "success"))
    assert unpassed_qa(store, REPO, "staging", sha) == "1 of 2"  # its gate still failed
    store.record_gates(REPO, sha, "qa", [GateRecord("min_pass_rate", True, 1.0, 1.0, "2 of 2")])
    assert unpassed_qa(store, REPO, "staging", sha) is None
    assert store.stage_rows(REPO, sha)["name"].tolist()[-1] == "qa"
