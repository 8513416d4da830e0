"""Flaky tests: flip-rate math, the ranking over recorded outcomes, re-runs, quarantine."""

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from cicd_dagster.analytics.flaky import (
    case_id,
    expand_runs,
    flaky_ranking,
    flip_rate,
    mark_reruns,
    quarantined_failures,
    stale_entries,
)
from cicd_dagster.config import ConfigError, parse_pipeline_config

START = datetime(2024, 5, 1, tzinfo=UTC)


def outcomes(*rows: tuple[str, str, str, bool]) -> pd.DataFrame:
    """HistoryStore.test_outcomes rows of repository "app", stage "unit", one hour apart:
    (commit, test name, status, flaky)."""
    return pd.DataFrame(
        [
            {
                "repository": "app",
                "commit": commit,
                "stage": "unit",
                "started_at": START + timedelta(hours=index),
                "classname": "tests.test_app",
                "name": name,
                "status": status,
                "flaky": flaky,
            }
            for index, (commit, name, status, flaky) in enumerate(rows)
        ]
    )


@pytest.mark.parametrize(
    ("runs", "expected"),
    [
        ([], None),
        ([True], None),  # one run: no flip is possible, and no division by zero
        ([False, False], 0.0),
        ([False, True], 1.0),
        ([False, True, False, False], 2 / 3),
        ([True, False, True, False, True], 1.0),
    ],
)
def test_flip_rate_is_flips_over_runs_minus_one(runs, expected):
    assert flip_rate(runs) == expected


def test_case_id_joins_classname_and_name():
    assert (
        case_id("tests.test_app.TestCart", "test_total[2]")
        == "tests.test_app.TestCart::test_total[2]"
    )
    assert case_id("", "test_bare") == "test_bare"


def test_a_flaky_row_stands_for_two_runs_with_both_outcomes():
    runs = expand_runs(
        outcomes(("a1", "test_x", "passed", True), ("b2", "test_x", "skipped", False))
    )
    assert runs[["commit", "failing"]].values.tolist() == [["a1", True], ["a1", False]]


def test_ranking_counts_flips_and_names_the_commits_that_flipped():
    history = outcomes(
        ("c1", "test_flaky", "passed", False),
        ("c1", "test_steady", "passed", False),
        ("c2", "test_flaky", "passed", True),  # failed, then passed on a re-run
        ("c2", "test_steady", "passed", False),
        ("c3", "test_flaky", "failed", False),
        ("c3", "test_steady", "failed", False),  # broke on c3: a flip, but not flaky
    )
    ranking = flaky_ranking(history)
    assert ranking["test"].tolist() == ["tests.test_app::test_flaky"]
    row = ranking.iloc[0]
    # runs: passed (c1), failed + passed (c2), failed (c3): three flips in three intervals
    assert (row["runs"], row["flips"], row["flip_rate"]) == (4, 3, 1.0)
    assert row["commits"] == ["c2"]
    assert row["first_seen"] == START and row["last_seen"] == START + timedelta(hours=4)
    assert row["last_status"] == "failed"


def test_ranking_puts_the_flakiest_first_and_applies_min_runs():
    history = outcomes(
        ("c1", "test_rarely", "passed", False),
        ("c2", "test_often", "failed", True),
        ("c2", "test_rarely", "passed", False),
        ("c3", "test_rarely", "failed", True),
    )
    ranking = flaky_ranking(history)
    assert ranking["test"].str.split("::").str[1].tolist() == ["test_often", "test_rarely"]
    assert ranking["flip_rate"].tolist() == [1.0, 1 / 3]
    assert flaky_ranking(history, min_runs=3)["test"].tolist() == ["tests.test_app::test_rarely"]


def test_ranking_of_no_history_is_empty():
    empty = outcomes()
    assert flaky_ranking(empty.reindex(columns=list(outcomes(("c", "t", "passed", False))))).empty
    with pytest.raises(ValueError, match="min_runs"):
        flaky_ranking(empty, min_runs=0)


def test_a_rerun_with_another_outcome_is_marked_flaky_and_stays_so():
    first = outcomes(("c1", "test_x", "failed", False), ("c1", "test_y", "passed", False))
    rerun = first.assign(status=["passed", "passed"])
    marked = mark_reruns(first, rerun)
    assert marked["flaky"].tolist() == [True, False]
    again = mark_reruns(marked, rerun.assign(flaky=False))  # a third run, both passing
    assert again["flaky"].tolist() == [True, False]


def test_a_first_run_or_a_skipped_test_is_no_flip():
    current = outcomes(("c1", "test_x", "failed", False))
    assert mark_reruns(current.iloc[0:0], current)["flaky"].tolist() == [False]
    skipped = current.assign(status="skipped")
    assert mark_reruns(current, skipped)["flaky"].tolist() == [False]


def test_quarantine_matches_ids_with_fnmatch_and_reports_stale_entries():
    cases = outcomes(
        ("c1", "test_net", "failed", False),
        ("c1", "test_db[pg]", "error", False),
        ("c1", "test_ok", "passed", False),
        ("c1", "test_other", "failed", False),
    )
    patterns = ["tests.test_app::test_net", "tests.test_app::test_db*", "tests.gone::*", "*ok"]
    assert quarantined_failures(cases, patterns) == (
        "tests.test_app::test_net",
        "tests.test_app::test_db[pg]",
    )
    # fnmatch's [...] is a character class: quote brackets of parametrized ids as [[]
    assert quarantined_failures(cases, ["tests.test_app::test_db[[]pg]"]) == (
        "tests.test_app::test_db[pg]",
    )
    ids = ["tests.test_app::test_net", "tests.test_app::test_db[pg]", "tests.test_app::test_ok"]
    assert stale_entries(patterns, ids) == ("tests.gone::*",)
    assert quarantined_failures(cases, []) == ()


def test_quarantine_is_a_list_of_non_empty_patterns_in_the_pipeline():
    pipeline = parse_pipeline_config('tests:\n  quarantine: ["t::flaky*"]\n', "app@1:.cicd.yml")
    assert pipeline.tests.quarantine == ["t::flaky*"]
    with pytest.raises(
        ConfigError, match=r"app@1:\.cicd\.yml:2: tests\.quarantine\[0\]: String should"
    ):
        parse_pipeline_config('tests:\n  quarantine: [""]\n', "app@1:.cicd.yml")
