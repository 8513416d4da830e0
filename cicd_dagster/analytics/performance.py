"""Performance trends: how long builds, stages and tests take over time, benchmarks with
their regressions, how often the dependency env cache hits, queue and run times of runs.

Inputs are the history DB and two frames the caller reads from the Dagster instance (this
module does not import Dagster): the build materializations' env_reused flags and the run
records. Medians of an empty period are NaN ("no data"), never a division by zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd

from cicd_dagster.store import HistoryStore
from cicd_dagster.store.models import PROMOTION_STAGES

# Stages that did no work of their own in a build.
_IDLE_STATUSES = ("not_configured", "skipped")
BUILD_ENV_COLUMNS = ["repository", "commit", "env_reused", "timestamp"]
RUN_COLUMNS = ["run_id", "job_name", "status", "trigger", "created_at", "started_at", "ended_at"]


@dataclass(frozen=True)
class PerformanceReport:
    since: datetime
    until: datetime
    builds: pd.DataFrame
    """Per build, oldest first: repository, commit, branch, created_at, duration_s (its CI
    stages that ran) and one column per stage (NaN where it did not run)."""
    stages: pd.DataFrame
    """Per repository and stage: runs, median_s, p90_s, max_s, last_s."""
    slowest_tests: pd.DataFrame
    """The slowest tests of the period: repository, stage, classname, name, runs, mean_s,
    previous_mean_s (the window of the same length before it; NaN if it did not run then),
    change (relative: 0.25 = 25 % slower)."""
    benchmarks: pd.DataFrame
    """Per benchmark per build, oldest first, with `regressed`: its slowdown against the
    last green baseline exceeded the build's max_perf_regression (the gate's own rule)."""
    cache: pd.DataFrame
    """Per repository: installs (build materializations), hits (env reused), hit_rate."""
    runs: pd.DataFrame
    """Per run created in the period: the run columns with queue_s (created to started)
    and run_s (started to ended), NaN while it has not started or ended."""
    jobs: pd.DataFrame
    """Per job: runs, finished, queue_median_s, queue_p90_s, run_median_s, run_p90_s."""

    def summary(self) -> dict[str, float | int | None]:
        """Headline figures over every repository: None where the period has no data."""
        hits, installs = int(self.cache["hits"].sum()), int(self.cache["installs"].sum())
        return {
            "builds": len(self.builds),
            "build_median_s": _number(self.builds["duration_s"].median()),
            "build_p90_s": _number(self.builds["duration_s"].quantile(0.9)),
            "cache_hit_rate": hits / installs if installs else None,
            "benchmark_regressions": int(self.benchmarks["regressed"].sum()),
            "runs": len(self.runs),
            "queue_median_s": _number(self.runs["queue_s"].median()),
            "run_median_s": _number(self.runs["run_s"].median()),
        }


def performance_report(
    history: HistoryStore,
    *,
    since: datetime,
    until: datetime,
    build_envs: pd.DataFrame,
    runs: pd.DataFrame,
    repository: str | None = None,
    slowest: int = 10,
) -> PerformanceReport:
    """The performance of builds created in [since, until) (and runs created then)."""
    window = until - since
    stage_rows = _in_window(history.stage_durations(repository, since), "created_at", until)
    tests = history.test_durations(repository, since, until)
    tests_before = history.test_durations(repository, since - window, since)
    benchmarks = _in_window(history.benchmark_history(repository, since), "created_at", until)
    if repository is not None:
        build_envs = build_envs[build_envs["repository"] == repository]
    return PerformanceReport(
        since=since,
        until=until,
        builds=build_durations(stage_rows),
        stages=stage_summary(stage_rows),
        slowest_tests=slowest_tests(tests, tests_before, limit=slowest),
        benchmarks=mark_regressions(benchmarks),
        cache=cache_hit_rate(_in_window(build_envs, "timestamp", until, since)),
        runs=(timed_runs := run_times(_in_window(runs, "created_at", until, since))),
        jobs=job_times(timed_runs),
    )


def build_durations(stage_rows: pd.DataFrame) -> pd.DataFrame:
    """One row per build with its total and per-stage durations (see PerformanceReport)."""
    ran = stage_rows[
        ~stage_rows["stage"].isin(PROMOTION_STAGES) & ~stage_rows["status"].isin(_IDLE_STATUSES)
    ]
    keys = ["repository", "commit", "branch", "created_at"]
    if ran.empty:
        return pd.DataFrame(columns=[*keys, "duration_s"])
    # groupby, not pivot_table: that would cross every key with every other (and drop a
    # build without a branch).
    grouped = ran.groupby([*keys, "stage"], dropna=False, sort=False)["duration_s"].sum()
    per_stage = grouped.unstack("stage")
    # Pipeline order, as the history returns them, not alphabetical.
    per_stage = per_stage[list(dict.fromkeys(ran["stage"]))]
    frame = per_stage.reset_index()
    frame.columns.name = None
    frame.insert(len(keys), "duration_s", per_stage.sum(axis=1).to_numpy())
    return frame.sort_values("created_at", kind="stable").reset_index(drop=True)


def stage_summary(stage_rows: pd.DataFrame) -> pd.DataFrame:
    """Per repository and stage that ran: runs, median_s, p90_s, max_s, last_s."""
    columns = ["repository", "stage", "runs", "median_s", "p90_s", "max_s", "last_s"]
    ran = stage_rows[~stage_rows["status"].isin(_IDLE_STATUSES)]
    if ran.empty:
        return pd.DataFrame(columns=columns)
    grouped = ran.groupby(["repository", "stage"], sort=False)["duration_s"]
    frame = grouped.agg(
        runs="count",
        median_s="median",
        p90_s=lambda durations: durations.quantile(0.9),
        max_s="max",
        last_s="last",
    )
    return frame.reset_index()[columns]


def slowest_tests(
    current: pd.DataFrame, previous: pd.DataFrame, *, limit: int = 10
) -> pd.DataFrame:
    """The `limit` tests with the highest mean duration in the period, beside their mean in
    the window of the same length before it (see PerformanceReport): `current` and
    `previous` are HistoryStore.test_durations of the two windows."""
    keys = ["repository", "stage", "classname", "name"]
    columns = [*keys, "runs", "mean_s", "previous_mean_s", "change"]
    if current.empty:
        return pd.DataFrame(columns=columns)
    before = previous.set_index(keys)["mean_s"].rename("previous_mean_s")
    frame = current.join(before, on=keys)
    # A test that took no time before has no relative change to speak of.
    frame["change"] = (frame["mean_s"] - frame["previous_mean_s"]) / frame["previous_mean_s"].where(
        frame["previous_mean_s"] > 0
    )
    return frame.nlargest(limit, "mean_s")[columns].reset_index(drop=True)


def mark_regressions(benchmarks: pd.DataFrame) -> pd.DataFrame:
    """The benchmark history with `regressed`: regression > threshold, as the
    max_perf_regression gate judges (no threshold or no baseline: never regressed)."""
    frame = benchmarks.copy()
    frame["regressed"] = (frame["regression"] > frame["threshold"]).fillna(False).astype(bool)
    return frame


def cache_hit_rate(build_envs: pd.DataFrame) -> pd.DataFrame:
    """Per repository, how often a build found its dependency env ready (see
    PerformanceReport); hit_rate is NaN for a repository without builds."""
    columns = ["repository", "installs", "hits", "hit_rate"]
    if build_envs.empty:
        return pd.DataFrame(columns=columns)
    grouped = build_envs.groupby("repository")["env_reused"]
    frame = grouped.agg(installs="count", hits="sum").reset_index()
    frame["hits"] = frame["hits"].astype(int)
    frame["hit_rate"] = frame["hits"] / frame["installs"]
    return frame[columns]


def run_times(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs with how long each waited to start (queue_s: created to started) and ran
    (run_s: started to ended); NaN for a run that has not started or ended yet."""
    return runs.assign(
        queue_s=_seconds(runs["started_at"] - runs["created_at"]),
        run_s=_seconds(runs["ended_at"] - runs["started_at"]),
    )


def job_times(runs: pd.DataFrame) -> pd.DataFrame:
    """Per job, the queue and run times of run_times()' rows (see PerformanceReport)."""
    columns = ["job_name", "runs", "finished", "queue_median_s", "queue_p90_s"]
    columns += ["run_median_s", "run_p90_s"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    grouped = runs.groupby("job_name")
    summary = pd.DataFrame(
        {
            "runs": grouped.size(),
            "finished": grouped["run_s"].count(),
            "queue_median_s": grouped["queue_s"].median(),
            "queue_p90_s": grouped["queue_s"].quantile(0.9),
            "run_median_s": grouped["run_s"].median(),
            "run_p90_s": grouped["run_s"].quantile(0.9),
        }
    )
    return summary.reset_index()[columns]


def _in_window(
    frame: pd.DataFrame, column: str, until: datetime, since: datetime | None = None
) -> pd.DataFrame:
    keep = frame[column] < until
    if since is not None:
        keep &= frame[column] >= since
    return frame[keep]


def _seconds(delta: pd.Series) -> pd.Series:
    return pd.to_timedelta(delta).dt.total_seconds()


def _number(value: Any) -> float | None:
    return None if pd.isna(value) else round(float(value), 3)
