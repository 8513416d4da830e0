"""Flaky tests: tests that passed and failed on the same commit, how often tests flip, and
the quarantine that keeps a known-flaky test's failure from failing a gate.

A test's id is "classname::name" as the JUnit report names its <testcase> (just the name
when it has no classname); quarantine entries are fnmatch patterns of ids.

The history DB keeps the last outcome of each test per commit and stage (a re-run replaces
the stage's test cases), with `flaky` set when the test passed and failed on that commit:
within one run (JUnit rerun markers) or across re-runs (mark_reruns). A flaky row
therefore stands for two runs, the other outcome and then the one kept, so flip rates are
exact for commits run at most twice and a lower bound otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from fnmatch import fnmatchcase
from itertools import pairwise

import pandas as pd

from cicd_dagster.config import ConfigError, ControlConfig
from cicd_dagster.git import GitError
from cicd_dagster.stages.context import StageError
from cicd_dagster.stages.source import pipeline_at
from cicd_dagster.store import HistoryStore

FAILING_STATUSES = ("failed", "error")
EXECUTED_STATUSES = ("passed", *FAILING_STATUSES)  # skipped tests did not run
RANKING_COLUMNS = [
    "repository",
    "stage",
    "test",
    "runs",
    "flips",
    "flip_rate",
    "commits",  # where it passed and failed, oldest first
    "first_seen",
    "last_seen",
    "last_status",
    "quarantined",
]
_TEST_KEY = ["repository", "stage", "test"]


def case_id(classname: str, name: str) -> str:
    return f"{classname}::{name}" if classname else name


def case_ids(cases: pd.DataFrame) -> pd.Series:
    """The id of every row of a frame with classname and name columns."""
    return pd.Series(
        [case_id(c, n) for c, n in zip(cases["classname"], cases["name"], strict=True)],
        index=cases.index,
        dtype="str",
    )


def flip_rate(outcomes: Sequence[bool]) -> float | None:
    """Changes of outcome between consecutive runs / (runs - 1); None for fewer than two runs."""
    if len(outcomes) < 2:
        return None
    flips = sum(before != after for before, after in pairwise(outcomes))
    return flips / (len(outcomes) - 1)


# --- quarantine ------------------------------------------------------------------------------


def matches(ids: pd.Series, patterns: Iterable[str]) -> pd.Series:
    """Which ids match one of the fnmatch patterns (case-sensitive)."""
    listed = list(patterns)
    return ids.map(lambda id_: any(fnmatchcase(id_, p) for p in listed)).astype(bool)


def quarantined(cases: pd.DataFrame, patterns: Iterable[str]) -> pd.Series:
    """Which rows are quarantined: their id matches one of the patterns."""
    return matches(case_ids(cases), patterns)


def quarantined_failures(cases: pd.DataFrame, patterns: Iterable[str]) -> tuple[str, ...]:
    """Ids of the failed or errored cases that are quarantined, in report order."""
    failing = cases[cases["status"].isin(FAILING_STATUSES)]
    return tuple(case_ids(failing)[quarantined(failing, patterns)])


def stale_entries(patterns: Iterable[str], ids: Iterable[str]) -> tuple[str, ...]:
    """The quarantine entries that match none of the ids."""
    known = set(ids)
    return tuple(p for p in patterns if not any(fnmatchcase(id_, p) for id_ in known))


# --- re-runs -------------------------------------------------------------------------------


def mark_reruns(previous: pd.DataFrame, current: pd.DataFrame) -> pd.DataFrame:
    """`current` (a re-run's test cases) with flaky also set where the stored run of the same
    commit and stage had the test passing and it now fails, or the other way round, or had
    already found it flaky: history keeps that the test passed and failed on this commit."""
    if previous.empty or current.empty:
        return current
    before = previous[previous["status"].isin(EXECUTED_STATUSES)]
    ids_before = case_ids(before)
    failed_before = dict(zip(ids_before, before["status"].isin(FAILING_STATUSES), strict=True))
    flaky_before = set(ids_before[before["flaky"].astype(bool)])
    ids = case_ids(current)
    failing_now = current["status"].isin(FAILING_STATUSES)
    flipped = [
        id_ in flaky_before or (status in EXECUTED_STATUSES and failed_before.get(id_, now) != now)
        for id_, status, now in zip(ids, current["status"], failing_now, strict=True)
    ]
    return current.assign(flaky=current["flaky"].astype(bool) | pd.Series(flipped, current.index))


# --- ranking -------------------------------------------------------------------------------


def expand_runs(outcomes: pd.DataFrame) -> pd.DataFrame:
    """One row per run of a test, oldest first, from HistoryStore.test_outcomes: repository,
    stage, test, commit, started_at, failing. A flaky row stands for two runs (the other
    outcome, then the kept one); skipped tests did not run."""
    executed = outcomes[outcomes["status"].isin(EXECUTED_STATUSES)]
    kept = pd.DataFrame(
        {
            "repository": executed["repository"],
            "stage": executed["stage"],
            "test": case_ids(executed),
            "commit": executed["commit"],
            "started_at": executed["started_at"],
            "failing": executed["status"].isin(FAILING_STATUSES),
            "order": range(0, 2 * len(executed), 2),
        }
    )
    earlier = kept[executed["flaky"].astype(bool)]
    earlier = earlier.assign(failing=~earlier["failing"], order=earlier["order"] - 1)
    runs = pd.concat([earlier, kept]).sort_values("order", kind="stable")
    return runs.drop(columns="order").reset_index(drop=True)


def flaky_ranking(outcomes: pd.DataFrame, *, min_runs: int = 2) -> pd.DataFrame:
    """The flaky tests (passed and failed on the same commit) with at least `min_runs` runs,
    flakiest first (flip rate, then flips, then the most recently seen): RANKING_COLUMNS,
    with quarantined False (quarantine_of fills it in)."""
    if min_runs < 1:
        raise ValueError(f"min_runs must be at least 1, not {min_runs}")
    runs = expand_runs(outcomes)
    if runs.empty:
        return pd.DataFrame(columns=RANKING_COLUMNS)
    groups = runs.groupby(_TEST_KEY, sort=False)
    previous = groups["failing"].shift()
    runs["flip"] = previous.notna() & (runs["failing"] != previous)
    both_outcomes = runs.groupby([*_TEST_KEY, "commit"], sort=False)["failing"].transform("nunique")
    flaky_commits = (
        runs[both_outcomes > 1]
        .groupby(_TEST_KEY, sort=False)["commit"]
        .agg(lambda commits: list(dict.fromkeys(commits)))
        .rename("commits")
    )
    stats = groups.agg(
        runs=("failing", "size"),
        flips=("flip", "sum"),
        first_seen=("started_at", "min"),
        last_seen=("started_at", "max"),
        last_failing=("failing", "last"),
    ).join(flaky_commits, how="inner")
    stats = stats[stats["runs"] >= min_runs].reset_index()
    stats["flips"] = stats["flips"].astype(int)
    stats["flip_rate"] = stats["flips"] / (stats["runs"] - 1)  # runs >= 2: flaky has two
    stats["last_status"] = stats["last_failing"].map({True: "failed", False: "passed"})
    stats["quarantined"] = False
    ranked = stats.sort_values(
        ["flip_rate", "flips", "last_seen"], ascending=False, kind="stable"
    ).reset_index(drop=True)
    return ranked[RANKING_COLUMNS]


# --- test health of every repository -------------------------------------------------------


@dataclass(frozen=True)
class RepositoryTestHealth:
    repository: str
    tests: int  # distinct tests that ran in the window
    runs: int
    flaky: int
    worst_flip_rate: float | None  # None: no flaky test ("no data" for an empty window)
    quarantine: tuple[str, ...] = ()
    stale_quarantine: tuple[str, ...] = ()
    # The newest commit with test cases, whose .cicd.yml gave the quarantine; None if none,
    # and quarantine_error says why it could not be read.
    quarantine_commit: str | None = None
    quarantine_error: str | None = None


@dataclass(frozen=True)
class TestHealth:
    __test__ = False  # not a pytest test class, despite the name

    since: datetime
    min_runs: int
    ranking: pd.DataFrame  # RANKING_COLUMNS
    repositories: list[RepositoryTestHealth]


def collect_test_health(
    config: ControlConfig,
    history: HistoryStore,
    since: datetime,
    *,
    repositories: Sequence[str] | None = None,
    min_runs: int = 2,
) -> TestHealth:
    """Flaky tests and quarantine hygiene of the repositories (default: every one) since then."""
    names = [r.name for r in config.repositories] if repositories is None else list(repositories)
    rankings, healths = [], []
    for name in names:
        outcomes = history.test_outcomes(name, since)
        ranking = flaky_ranking(outcomes, min_runs=min_runs)
        health = _repository_health(config, name, outcomes, ranking)
        ranking["quarantined"] = matches(ranking["test"], health.quarantine)
        rankings.append(ranking)
        healths.append(health)
    found = [ranking for ranking in rankings if not ranking.empty]
    ranking = (
        pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=RANKING_COLUMNS)
    )
    ranking = ranking.sort_values(
        ["flip_rate", "flips", "last_seen"], ascending=False, kind="stable"
    ).reset_index(drop=True)
    return TestHealth(since, min_runs, ranking, healths)


def _repository_health(
    config: ControlConfig, name: str, outcomes: pd.DataFrame, ranking: pd.DataFrame
) -> RepositoryTestHealth:
    runs = expand_runs(outcomes)
    health = RepositoryTestHealth(
        repository=name,
        tests=len(runs[["stage", "test"]].drop_duplicates()),
        runs=len(runs),
        flaky=len(ranking),
        worst_flip_rate=float(ranking["flip_rate"].max()) if len(ranking) else None,
    )
    if outcomes.empty:
        return health
    newest = outcomes["commit"].iloc[-1]
    try:
        patterns = pipeline_at(config, config.repository(name), newest).tests.quarantine
    except (ConfigError, GitError, StageError) as error:
        return replace(health, quarantine_commit=newest, quarantine_error=str(error))
    ids = case_ids(outcomes[outcomes["commit"] == newest])
    return replace(
        health,
        quarantine=tuple(patterns),
        stale_quarantine=stale_entries(patterns, ids),
        quarantine_commit=newest,
    )
