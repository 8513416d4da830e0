"""DORA's four keys per repository and period, with the definitions of Google's fourkeys
(github.com/dora-team/fourkeys, its queries/ and the dashboard's bucket queries in
dashboard/fourkeys_dashboard.json, explained in METRICS.md).

The data are fourkeys' three tables, built per repository from the history DB and the
imported events (`cicd events import`):

- deployments (queries/deployments.sql): the "deployed" deployments of production (the
  last environment of cicd.yaml), at the time they went live, each with its changes: the
  commits it brought (those after the previously deployed commit, from the git mirror),
  and imported deployments with their listed changes. The deployed commit is always one
  of its changes, as fourkeys' main_commit is one of its push's commits.
- changes (queries/changes.sql): commits with their commit time (git's committer date),
  and imported changes.
- incidents (queries/incidents.sql): the deployment-health sensor's production incidents,
  whose root cause is the commit live when they opened, and imported incidents. An
  incident is created at the earlier of its start and the first deployment of its root
  cause (an incident whose root cause was never deployed keeps its start).

A period is (since, until]; every metric without data in it says "no data" (never a
division by zero, never fourkeys' 0 or "Yearly" for no data at all).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pandas as pd

from cicd_dagster.config import ControlConfig
from cicd_dagster.git import GitError, Mirror
from cicd_dagster.store.history import HistoryStore

NO_DATA = "no data"

# Bucket upper bounds (exclusive) in hours, from the dashboard's lead time and time to
# restore stat panels ("One day" < 24 h ... "One year"), with the DORA level of each: the
# dashboard colours lead time purple/green/yellow/red; time to restore has no bucket finer
# than a day, so "one day" is its best level.
_DURATION_BUCKETS: tuple[tuple[float, str, str], ...] = (
    (24, "one day", "elite"),
    (168, "one week", "high"),
    (730, "one month", "medium"),
    (730 * 6, "six months", "low"),
    (float("inf"), "one year", "low"),
)
# The dashboard's deployment frequency panel: Daily is "Elite Performance", then green,
# yellow, red.
_FREQUENCY_LEVELS = {"daily": "elite", "weekly": "high", "monthly": "medium", "yearly": "low"}


@dataclass(frozen=True)
class DeliveryEvents:
    """fourkeys' three tables for one repository (see the module's docstring)."""

    changes: pd.DataFrame  # change_id, time_created
    deployments: pd.DataFrame  # deploy_id, time_created, main_commit, changes (list of shas)
    incidents: pd.DataFrame  # incident_id, time_created, time_resolved, root_cause
    notes: list[str] = field(default_factory=list)  # what could not be read, say why

    def first_event(self) -> datetime | None:
        times = pd.concat(
            [
                self.changes["time_created"],
                self.deployments["time_created"],
                self.incidents["time_created"],
            ]
        ).dropna()
        return None if times.empty else times.min().to_pydatetime()


@dataclass(frozen=True)
class Metric:
    """One key: its value (None: no data), fourkeys' bucket and the DORA level."""

    value: float | None
    bucket: str | None
    level: str
    count: int  # what it is computed over: deployments, changes or incidents

    @classmethod
    def no_data(cls, count: int = 0) -> Metric:
        return cls(None, None, NO_DATA, count)


@dataclass(frozen=True)
class DoraMetrics:
    repository: str
    since: datetime
    until: datetime
    deployment_frequency: Metric  # value: deployments per week; count: deployments
    deployment_days: int
    lead_time: Metric  # value: median minutes; count: changes with a lead time
    change_failure_rate: Metric  # value: ratio; count: deployments
    failed_deployments: int
    time_to_restore: Metric  # value: median minutes; count: restored incidents
    incidents: int
    notes: list[str]

    def to_json(self) -> dict[str, object]:
        frequency, lead, failure, restore = (
            self.deployment_frequency,
            self.lead_time,
            self.change_failure_rate,
            self.time_to_restore,
        )
        return {
            "repository": self.repository,
            "deployment_frequency": {
                "deployments": frequency.count,
                "deployment_days": self.deployment_days,
                "per_week": _rounded(frequency.value),
                "bucket": frequency.bucket,
                "level": frequency.level,
            },
            "lead_time_for_changes": {
                "median_minutes": _rounded(lead.value),
                "changes": lead.count,
                "bucket": lead.bucket,
                "level": lead.level,
            },
            "change_failure_rate": {
                "rate": _rounded(failure.value),
                "failed_deployments": self.failed_deployments,
                "deployments": failure.count,
                "bucket": failure.bucket,
                "level": failure.level,
            },
            "time_to_restore": {
                "median_minutes": _rounded(restore.value),
                "incidents": self.incidents,
                "restored": restore.count,
                "bucket": restore.bucket,
                "level": restore.level,
            },
            "notes": self.notes,
        }


def dora_metrics(
    repository: str, events: DeliveryEvents, since: datetime, until: datetime
) -> DoraMetrics:
    """The four keys of the repository over (since, until]."""
    deployments = _deployments_in(events.deployments, since, until)
    incidents = _incidents_created(events, until)
    failed = _failed_deployments(deployments, incidents)
    restored_in = incidents[(incidents["time_created"] > since)]
    return DoraMetrics(
        repository=repository,
        since=since,
        until=until,
        deployment_frequency=deployment_frequency(deployments, since, until, events.first_event()),
        deployment_days=deployments["time_created"].dt.date.nunique(),
        lead_time=lead_time_for_changes(deployments, events.changes),
        change_failure_rate=change_failure_rate(len(deployments), len(failed)),
        failed_deployments=len(failed),
        time_to_restore=time_to_restore(restored_in),
        incidents=len(restored_in),
        notes=events.notes,
    )


def deployment_frequency(
    deployments: pd.DataFrame, since: datetime, until: datetime, first_event: datetime | None
) -> Metric:
    """Deployments per week over the period, and the bucket of the dashboard's
    "Deployment Frequency" panel: over the days of the period after the day of the first
    event (fourkeys: `day > date(min(time_created)) FROM events_raw`), grouped in weeks
    starting on Sunday (BigQuery's WEEK): "daily" if the median week has deployments on
    3 days or more, "weekly" if the median week has one, "monthly" if the median of each
    week's month's count of weeks with a deployment is 1 or more, else "yearly"."""
    count = len(deployments)
    if count == 0:
        return Metric.no_data()
    per_week = count / ((until - since).total_seconds() / timedelta(weeks=1).total_seconds())
    first_day = first_event.astimezone(UTC).date() if first_event else None
    days = [
        day
        for day in _days(since.astimezone(UTC).date(), until.astimezone(UTC).date())
        if first_day is None or day > first_day
    ]
    if not days:
        return Metric(per_week, None, NO_DATA, count)
    deployed_days = set(deployments["time_created"].dt.date)
    weeks: dict[date, list[date]] = defaultdict(list)
    for day in days:
        weeks[day - timedelta(days=(day.weekday() + 1) % 7)].append(day)
    days_deployed = {week: sum(d in deployed_days for d in ds) for week, ds in weeks.items()}
    week_deployed = {week: int(n > 0) for week, n in days_deployed.items()}
    weeks_deployed_per_month: dict[tuple[int, int], int] = defaultdict(int)
    for week, deployed in week_deployed.items():
        weeks_deployed_per_month[(week.year, week.month)] += deployed
    if np.median(list(days_deployed.values())) >= 3:
        bucket = "daily"
    elif np.median(list(week_deployed.values())) >= 1:
        bucket = "weekly"
    elif np.median([weeks_deployed_per_month[(w.year, w.month)] for w in weeks]) >= 1:
        bucket = "monthly"
    else:
        bucket = "yearly"
    return Metric(per_week, bucket, _FREQUENCY_LEVELS[bucket], count)


def lead_time_for_changes(deployments: pd.DataFrame, changes: pd.DataFrame) -> Metric:
    """queries/lead_time_for_changes.sql: the median, over every change of every
    deployment, of the deployment's time minus the change's, in whole minutes
    (TIMESTAMP_DIFF truncates), leaving out changes of unknown time and values <= 0
    ("automated pushes"); bucketed as the dashboard's "Lead Time to Change Bucket"."""
    known = changes.dropna(subset=["time_created"])
    change_times = known.groupby("change_id")["time_created"].min()
    minutes = [
        _whole_minutes(deployed_at - change_times[change])
        for deployed_at, deployment_changes in zip(
            deployments["time_created"], deployments["changes"], strict=True
        )
        for change in deployment_changes
        if change in change_times.index
    ]
    positive = [m for m in minutes if m > 0]
    if not positive:
        return Metric.no_data()
    return _duration_metric(float(np.median(positive)), len(positive))


def change_failure_rate(deployments: int, failed: int) -> Metric:
    """queries/change_failure_rate.sql: distinct deployments with an incident whose root
    cause is one of their changes / distinct deployments; bucketed as the dashboard's
    "Change Failure Rate" panel (<= 15%, < 46%, else), its green, yellow and red."""
    if deployments == 0:
        return Metric.no_data()
    rate = failed / deployments
    if rate <= 0.15:
        return Metric(rate, "0-15%", "elite", deployments)
    if rate < 0.46:
        return Metric(rate, "16-45%", "medium", deployments)
    return Metric(rate, "46-60%", "low", deployments)


def time_to_restore(incidents: pd.DataFrame) -> Metric:
    """queries/time_to_restore_services.sql: the median of resolved - created in whole
    minutes over the incidents created in the period and resolved (an open one has no
    time to restore yet); bucketed as the dashboard's "Median Time to Restore Services"
    (in hours: < 24, < 168, < 730, < 4380, else)."""
    resolved = incidents.dropna(subset=["time_resolved"])
    if resolved.empty:
        return Metric.no_data()
    minutes = [
        _whole_minutes(end - start)
        for start, end in zip(resolved["time_created"], resolved["time_resolved"], strict=True)
    ]
    return _duration_metric(float(np.median(minutes)), len(minutes))


def all_dora_metrics(
    config: ControlConfig,
    history: HistoryStore,
    since: datetime,
    until: datetime,
    repositories: Iterable[str] | None = None,
) -> list[tuple[DoraMetrics, DeliveryEvents]]:
    """The four keys of each repository (default: repositories_with_events), with the
    tables they were computed from."""
    names = repositories_with_events(config, history) if repositories is None else repositories
    results = []
    for name in names:
        events = delivery_events(config, history, name)
        results.append((dora_metrics(name, events, since, until), events))
    return results


# --- the three tables -------------------------------------------------------------------------

CHANGE_COLUMNS = ["change_id", "time_created"]
DEPLOYMENT_COLUMNS = ["deploy_id", "time_created", "main_commit", "changes"]
INCIDENT_COLUMNS = ["incident_id", "time_created", "time_resolved", "root_cause"]


def delivery_events(
    config: ControlConfig, history: HistoryStore, repository: str, *, fetch: bool = True
) -> DeliveryEvents:
    """The repository's three tables from the history DB (production deployments and
    incidents, commits from its git mirror, fetched first when it lacks a deployed
    commit and `fetch`) and its imported events."""
    notes: list[str] = []
    production = config.environments[-1].name if config.environments else None
    changes: list[dict[str, object]] = []
    deployments: list[dict[str, object]] = []
    incidents: list[dict[str, object]] = []
    if production is not None:
        deployed = history.verified_deployments(repository, production)
        commits = _commit_reader(config, repository, deployed["commit"], fetch, notes)
        previous: str | None = None
        for row in deployed.to_dict("records"):
            brought = commits(previous, row["commit"])
            changes.extend({"change_id": sha, "time_created": at} for sha, at in brought)
            deployments.append(
                {
                    "deploy_id": f"history:{row['id']}",
                    "time_created": row["finished_at"]
                    if pd.notna(row["finished_at"])
                    else row["started_at"],
                    "main_commit": row["commit"],
                    "changes": _with(row["commit"], [sha for sha, _ in brought]),
                }
            )
            previous = row["commit"]
        for row in history.incidents(repository, production).to_dict("records"):
            incidents.append(
                {
                    "incident_id": f"history:{production}:{row['opened_at'].isoformat()}",
                    "time_created": row["opened_at"],
                    "time_resolved": row["closed_at"],
                    "root_cause": row["commit"],
                }
            )
    for event in history.external_events(repository).to_dict("records"):
        if event["type"] == "change":
            changes.append({"change_id": event["sha"], "time_created": event["time"]})
        elif event["type"] == "deployment":
            deployments.append(
                {
                    "deploy_id": event["id"],
                    "time_created": event["time"],
                    "main_commit": event["sha"],
                    "changes": _with(event["sha"], list(event["changes"])),
                }
            )
        else:
            incidents.append(
                {
                    "incident_id": event["id"],
                    "time_created": event["time"],
                    "time_resolved": event["resolved_at"],
                    "root_cause": event["root_cause"],
                }
            )
    return DeliveryEvents(
        changes=_frame(changes, CHANGE_COLUMNS, ["time_created"]),
        deployments=_frame(deployments, DEPLOYMENT_COLUMNS, ["time_created"]),
        incidents=_frame(incidents, INCIDENT_COLUMNS, ["time_created", "time_resolved"]),
        notes=notes,
    )


def repositories_with_events(config: ControlConfig, history: HistoryStore) -> list[str]:
    """The repositories of cicd.yaml, then those known only from imported events."""
    names = [repository.name for repository in config.repositories]
    imported = history.external_events()["repository"].unique()
    return [*names, *sorted(set(imported) - set(names))]


def daily_deployments(events: DeliveryEvents, since: datetime, until: datetime) -> pd.Series:
    """Deployments per day (UTC) in the period, days without one included."""
    deployments = _deployments_in(events.deployments, since, until)
    days = pd.Index(_days(since.astimezone(UTC).date(), until.astimezone(UTC).date()))
    counts = deployments["time_created"].dt.date.value_counts()
    return counts.reindex(days, fill_value=0).sort_index()


def _commit_reader(
    config: ControlConfig,
    repository: str,
    deployed: Iterable[str],
    fetch: bool,
    notes: list[str],
) -> Callable[[str | None, str], list[tuple[str, datetime | None]]]:
    """(previous deployed sha, sha) -> the commits the deployment brought with their
    commit time; just the deployed commit, time unknown, where git cannot tell."""
    try:
        settings = config.repository(repository)
    except KeyError:
        return lambda previous, sha: [(sha, None)]
    mirror = Mirror(config.git_dir / f"{repository}.git", settings.url)
    deployed = set(deployed)
    if fetch and deployed and not (mirror.path.exists() and all(map(mirror.has_commit, deployed))):
        try:
            mirror.fetch()
        except GitError as error:
            notes.append(f"commit times unknown where the mirror lacks them: {error}")
    known = {sha for sha in deployed if mirror.path.exists() and mirror.has_commit(sha)}

    def brought(previous: str | None, sha: str) -> list[tuple[str, datetime | None]]:
        if sha not in known:
            return [(sha, None)]
        since = previous if previous in known else None
        if previous is not None and since is None:
            # Without the previous commit, the whole history would look new.
            return [(sha, mirror.commit_info(sha).committed_at)]
        return [(c.sha, c.committed_at) for c in mirror.commits_between(since, sha)]

    return brought


def _deployments_in(deployments: pd.DataFrame, since: datetime, until: datetime) -> pd.DataFrame:
    times = deployments["time_created"]
    return deployments[(times > since) & (times <= until)]


def _incidents_created(events: DeliveryEvents, until: datetime) -> pd.DataFrame:
    """queries/incidents.sql: created at the earlier of the incident's time and the first
    deployment of its root cause; what happened after `until` is not known at `until`."""
    first_deployed: dict[str, datetime] = {}
    for deployed_at, changes in zip(
        events.deployments["time_created"], events.deployments["changes"], strict=True
    ):
        for change in changes:
            if change not in first_deployed or deployed_at < first_deployed[change]:
                first_deployed[change] = deployed_at
    incidents = events.incidents.copy()
    root_deployed = pd.to_datetime(incidents["root_cause"].map(first_deployed), utc=True)
    incidents["time_created"] = incidents["time_created"].where(
        root_deployed.isna() | (incidents["time_created"] <= root_deployed), root_deployed
    )
    incidents = incidents[incidents["time_created"] <= until].copy()
    incidents.loc[incidents["time_resolved"] > until, "time_resolved"] = pd.NaT
    return incidents


def _failed_deployments(deployments: pd.DataFrame, incidents: pd.DataFrame) -> set[str]:
    root_causes = set(incidents["root_cause"].dropna())
    return {
        deploy_id
        for deploy_id, changes in zip(deployments["deploy_id"], deployments["changes"], strict=True)
        if root_causes.intersection(changes)
    }


def _duration_metric(median_minutes: float, count: int) -> Metric:
    hours = median_minutes / 60
    for bound, bucket, level in _DURATION_BUCKETS:
        if hours < bound:
            return Metric(median_minutes, bucket, level, count)
    raise AssertionError("the last bucket is unbounded")


def _whole_minutes(delta: pd.Timedelta | timedelta) -> int:
    return int(delta.total_seconds() / 60)  # toward zero, as BigQuery's TIMESTAMP_DIFF


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def _with(main_commit: str, changes: list[str]) -> list[str]:
    return list(dict.fromkeys([*changes, main_commit]))


def _frame(rows: list[dict[str, object]], columns: list[str], times: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=columns)
    for column in times:
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
