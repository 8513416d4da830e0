"""Usage analytics: who triggers what, which assets materialize how often, the busiest
hours, deployments per environment and requests per version through the routers.

The runs and materializations are frames the caller reads from the Dagster instance (this
module does not import Dagster); deployments come from the history DB and requests from the
routers' nginx access logs, whose lines name the version of the backend that answered.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pandas as pd

from cicd_dagster.config import ControlConfig
from cicd_dagster.deploy import layout
from cicd_dagster.stages.deploy import environment_for
from cicd_dagster.store import HistoryStore
from cicd_dagster.store.models import DEPLOYMENT_STATUSES

MATERIALIZATION_COLUMNS = ["asset", "repository", "timestamp"]
# A request whose backend is unknown: no version logged and its port serves no slot now.
UNKNOWN_VERSION = "unknown"


@dataclass(frozen=True)
class RequestCounts:
    """Requests of one router's access log by version, and the lines that were not JSON."""

    counts: pd.DataFrame
    """version, requests, errors (answered 5xx or not at all)."""
    malformed_lines: list[int]


@dataclass(frozen=True)
class UsageReport:
    since: datetime
    until: datetime
    triggers: pd.DataFrame
    """kind (cli, sensor, schedule, backfill, ui), trigger, job_name, runs; most first."""
    assets: pd.DataFrame
    """asset (its key path joined by /), repository (None for global assets), count."""
    repositories: pd.DataFrame
    """repository, materializations."""
    hours: pd.DataFrame
    """hour (0..23, UTC), runs: every hour, also the idle ones."""
    deployments: pd.DataFrame
    """repository, environment, deployments and one column per deployment status."""
    requests: pd.DataFrame
    """repository, environment, version, requests, errors."""

    def summary(self) -> dict[str, int | None]:
        """Headline figures; busiest_hour is None without runs."""
        runs = int(self.hours["runs"].sum())
        busiest = self.hours.sort_values("runs", ascending=False, kind="stable").iloc[0]
        return {
            "runs": runs,
            "materializations": int(self.assets["count"].sum()),
            "deployments": int(self.deployments["deployments"].sum()),
            "requests": int(self.requests["requests"].sum()),
            "busiest_hour": int(busiest["hour"]) if runs else None,
        }


def usage_report(
    config: ControlConfig,
    history: HistoryStore,
    *,
    since: datetime,
    until: datetime,
    runs: pd.DataFrame,
    materializations: pd.DataFrame,
    repository: str | None = None,
) -> UsageReport:
    """Usage in [since, until): `runs` has the run columns of analytics.performance
    (RUN_COLUMNS), `materializations` MATERIALIZATION_COLUMNS."""
    runs = runs[(runs["created_at"] >= since) & (runs["created_at"] < until)]
    materializations = materializations[
        (materializations["timestamp"] >= since) & (materializations["timestamp"] < until)
    ]
    if repository is not None:
        materializations = materializations[materializations["repository"] == repository]
    deployments = history.deployments(repository=repository, since=since)
    repositories = [repository] if repository else [r.name for r in config.repositories]
    return UsageReport(
        since=since,
        until=until,
        triggers=trigger_counts(runs),
        assets=asset_counts(materializations),
        repositories=repository_counts(materializations),
        hours=busiest_hours(runs),
        deployments=deployment_counts(deployments[deployments["started_at"] < until]),
        requests=router_requests(config, repositories, since=since, until=until),
    )


def trigger_kind(trigger: str) -> str:
    """ "sensor:promotion" -> "sensor", "cli" -> "cli"."""
    return trigger.split(":", 1)[0]


def trigger_counts(runs: pd.DataFrame) -> pd.DataFrame:
    columns = ["kind", "trigger", "job_name", "runs"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    frame = runs.groupby(["trigger", "job_name"]).size().rename("runs").reset_index()
    frame["kind"] = frame["trigger"].map(trigger_kind)
    return frame.sort_values(["runs", "trigger"], ascending=[False, True])[columns].reset_index(
        drop=True
    )


def asset_counts(materializations: pd.DataFrame) -> pd.DataFrame:
    columns = ["asset", "repository", "count"]
    if materializations.empty:
        return pd.DataFrame(columns=columns)
    frame = (
        materializations.groupby(["asset", "repository"], dropna=False)
        .size()
        .rename("count")
        .reset_index()
    )
    return frame.sort_values(["count", "asset"], ascending=[False, True])[columns].reset_index(
        drop=True
    )


def repository_counts(materializations: pd.DataFrame) -> pd.DataFrame:
    per_repository = materializations.dropna(subset=["repository"])
    frame = per_repository.groupby("repository").size().rename("materializations")
    return frame.reset_index().sort_values("materializations", ascending=False, kind="stable")


def busiest_hours(runs: pd.DataFrame) -> pd.DataFrame:
    hours = pd.to_datetime(runs["created_at"], utc=True).dt.hour
    counts = hours.value_counts().reindex(range(24), fill_value=0)
    return pd.DataFrame({"hour": range(24), "runs": counts.to_numpy(dtype=int)})


def deployment_counts(deployments: pd.DataFrame) -> pd.DataFrame:
    columns = ["repository", "environment", "deployments", *DEPLOYMENT_STATUSES]
    if deployments.empty:
        return pd.DataFrame(columns=columns)
    frame = pd.crosstab(
        [deployments["repository"], deployments["environment"]], deployments["status"]
    )
    frame = frame.reindex(columns=list(DEPLOYMENT_STATUSES), fill_value=0)
    frame.insert(0, "deployments", frame.sum(axis=1))
    frame.columns.name = None
    return frame.reset_index()[columns]


def count_requests(
    log_path: Path,
    versions_by_port: dict[int, str],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> RequestCounts:
    """Requests of a router's access log (NginxRouter.access_log_path) per version.

    A line names the version of the backend that answered; a line without one (logged
    before versions were, or by a backend without one) is given the version that the port
    of the last backend tried serves now (`versions_by_port`, from the environment's
    slots), else UNKNOWN_VERSION. Lines that are not JSON objects are skipped and listed.
    """
    requests: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    malformed: list[int] = []
    with log_path.open(errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                entry = json.loads(line)
                at = datetime.fromisoformat(entry["time"])
                status = int(entry["status"])
            except (ValueError, KeyError, TypeError):
                malformed.append(number)
                continue
            if (since is not None and at < since) or (until is not None and at >= until):
                continue
            version = entry.get("version") or _version_of(
                str(entry.get("upstream_addr", "")), versions_by_port
            )
            requests[version] += 1
            errors[version] += status >= 500
    counts = pd.DataFrame(
        {
            "version": list(requests),
            "requests": list(requests.values()),
            "errors": [errors[version] for version in requests],
        },
        columns=["version", "requests", "errors"],
    )
    return RequestCounts(
        counts.sort_values(["requests", "version"], ascending=[False, True]).reset_index(drop=True),
        malformed,
    )


def router_requests(
    config: ControlConfig,
    repositories: list[str],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
) -> pd.DataFrame:
    """Requests per version of every environment of `repositories` whose router has an
    access log: repository, environment, version, requests, errors."""
    frames = []
    for repository in repositories:
        for environment in config.environments:
            log_path = layout.router_dir(config.home, repository, environment.name) / "access.log"
            if not log_path.is_file():
                continue
            slots = environment_for(config, repository, environment).slots()
            counted = count_requests(
                log_path, {slot.port: slot.version for slot in slots}, since=since, until=until
            )
            frames.append(
                counted.counts.assign(repository=repository, environment=environment.name)
            )
    columns = ["repository", "environment", "version", "requests", "errors"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def _version_of(upstream_addr: str, versions_by_port: dict[int, str]) -> str:
    # "127.0.0.1:8001, 127.0.0.1:8002": the last address tried is the one that answered.
    last = upstream_addr.rsplit(",", 1)[-1].strip()
    host, _, port = last.rpartition(":")
    if host and port.isdigit():
        return versions_by_port.get(int(port), UNKNOWN_VERSION)
    return UNKNOWN_VERSION
