"""The quality report: how one repository's delivery went over a period, as an HTML page.

Builds and test pass rates per day (per week beyond three months), the failing and the
slowest tests, failed gates, security findings by severity, deployments and rollbacks per
environment, and incidents, all read from the history DB.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from cicd_dagster.config import ControlConfig
from cicd_dagster.html_report import Bar, Segment, bar_chart, css_class, render
from cicd_dagster.store import HistoryStore
from cicd_dagster.store.models import FINDING_SEVERITIES

# Beyond this many days, the charts count per week rather than per day.
_DAILY_UP_TO_DAYS = 92
_TOP = 15


def render_quality_report(
    config: ControlConfig,
    history: HistoryStore,
    repository: str,
    since: datetime,
    *,
    now: datetime | None = None,
    output: Path | None = None,
) -> Path:
    """Write the report of `repository` from `since` to now; returns its path (default
    home/reports/<repo>/quality-<today>.html)."""
    now = now or datetime.now(UTC)
    if since.tzinfo is None or since >= now:
        raise ValueError(f"since must be a timezone-aware moment before now, not {since}")
    path = output or config.home / "reports" / repository / f"quality-{now:%Y-%m-%d}.html"
    return render("quality.html.j2", quality_context(history, repository, since, now), path)


def quality_context(
    history: HistoryStore, repository: str, since: datetime, now: datetime
) -> dict[str, Any]:
    """What the template shows, in plain values."""
    builds = history.builds(repository=repository, since=since)
    tests = history.tests(repository=repository, since=since)
    gates = history.gate_results(repository=repository, since=since)
    findings = history.findings(repository=repository, since=since)
    deployments = history.deployments(repository=repository, since=since)
    incidents = history.incidents(repository=repository)
    incidents = incidents[incidents["closed_at"].isna() | (incidents["closed_at"] >= since)]
    periods = _periods(builds, since, now)
    executed = int(builds[["passed", "failed", "errors"]].to_numpy().sum())
    finding_summary = _findings(findings)
    return {
        "repository": repository,
        "since": since,
        "until": now,
        "generated_at": now,
        "period_unit": "day" if _daily(since, now) else "week",
        "summary": {
            "builds": len(builds),
            "succeeded": int((builds["status"] == "success").sum()),
            "failed": int((builds["status"] == "failed").sum()),
            "tests_run": int(builds["tests"].sum()),
            "pass_rate": int(builds["passed"].sum()) / executed if executed else None,
            "median_duration_s": builds["duration_s"].median() if len(builds) else None,
            "deployments": len(deployments),
            "rollbacks": int((deployments["status"] == "rolled_back").sum()),
            "incidents": len(incidents),
            "open_findings": int((~findings["suppressed"].astype(bool)).sum()),
        },
        "periods": periods,
        "builds_chart": bar_chart(
            "builds",
            [
                Bar(
                    period["label"],
                    [
                        Segment(period["succeeded"], "ok", f"{period['succeeded']} succeeded"),
                        Segment(period["failed"], "bad", f"{period['failed']} failed"),
                        Segment(period["running"], "muted", f"{period['running']} unfinished"),
                    ],
                )
                for period in periods
            ],
        ),
        "pass_rate_chart": bar_chart(
            "test pass rate",
            [
                Bar(
                    period["label"],
                    [Segment(period["pass_rate"] * 100, "info", f"{period['pass_rate']:.1%}")]
                    if period["pass_rate"] is not None
                    else [],
                )
                for period in periods
            ],
            max_value=100,
            unit=" %",
        ),
        "failing_tests": _failing_tests(tests),
        "slowest_tests": _slowest_tests(tests),
        "flaky_tests": int(tests["flaky"].astype(bool).sum()),
        "gate_failures": _gate_failures(gates),
        "findings": finding_summary,
        "findings_chart": bar_chart(
            "open findings by severity",
            [
                Bar(
                    row["severity"],
                    [Segment(row["open"], css_class(row["severity"]), f"{row['open']} open")],
                )
                for row in finding_summary["by_severity"]
            ],
        ),
        "environments": _environments(deployments),
        "rollbacks": deployments[deployments["status"] == "rolled_back"].to_dict("records"),
        "incidents": incidents.to_dict("records"),
    }


def _daily(since: datetime, now: datetime) -> bool:
    return (now - since).days <= _DAILY_UP_TO_DAYS


def _periods(builds: pd.DataFrame, since: datetime, now: datetime) -> list[dict[str, Any]]:
    """Per day (or week) from `since` to `now`, also those without a build: counts, pass rate
    and mean duration."""
    frequency = "D" if _daily(since, now) else "W"
    span = pd.period_range(_period(since, frequency), _period(now, frequency), freq=frequency)
    keys = builds["created_at"].map(lambda moment: _period(moment, frequency))
    rows = []
    for period in span:
        chunk = builds[keys == period]
        executed = int(chunk[["passed", "failed", "errors"]].to_numpy().sum())
        rows.append(
            {
                "label": f"{period.start_time:%m-%d}",
                "start": period.start_time.tz_localize(UTC),
                "builds": len(chunk),
                "succeeded": int((chunk["status"] == "success").sum()),
                "failed": int((chunk["status"] == "failed").sum()),
                "running": int((chunk["status"] == "running").sum()),
                "tests": int(chunk["tests"].sum()),
                "pass_rate": int(chunk["passed"].sum()) / executed if executed else None,
                "mean_duration_s": chunk["duration_s"].mean() if len(chunk) else None,
            }
        )
    return rows


def _period(moment: datetime, frequency: str) -> pd.Period:
    return pd.Timestamp(moment).tz_convert(UTC).tz_localize(None).to_period(frequency)


def _failing_tests(tests: pd.DataFrame) -> list[dict[str, Any]]:
    """The tests that failed or errored most often: how often, of how many runs, the last
    time and its message."""
    if tests.empty:
        return []
    tests = tests.assign(broken=tests["status"].isin(["failed", "error"]))
    rows = []
    for (stage, classname, name), runs in tests.groupby(["stage", "classname", "name"]):
        broken = runs[runs["broken"]]
        if broken.empty:
            continue
        last = broken.sort_values("created_at").iloc[-1]
        rows.append(
            {
                "stage": stage,
                "test": _test_name(str(classname), str(name)),
                "failures": len(broken),
                "runs": len(runs),
                "last_failed": last["created_at"],
                "last_commit": last["commit"],
                "message": last["message"] or "",
            }
        )
    rows.sort(key=lambda row: (-row["failures"], row["stage"], row["test"]))
    return rows[:_TOP]


def _slowest_tests(tests: pd.DataFrame) -> list[dict[str, Any]]:
    timed = tests.dropna(subset=["duration_s"])
    if timed.empty:
        return []
    slowest = (
        timed.groupby(["stage", "classname", "name"])
        .agg(
            mean_s=("duration_s", "mean"),
            max_s=("duration_s", "max"),
            runs=("duration_s", "size"),
        )
        .sort_values("mean_s", ascending=False)
        .head(10)
        .reset_index()
    )
    return [
        {
            "stage": row["stage"],
            "test": _test_name(row["classname"], row["name"]),
            "mean_s": row["mean_s"],
            "max_s": row["max_s"],
            "runs": row["runs"],
        }
        for row in slowest.to_dict("records")
    ]


def _test_name(classname: str, name: str) -> str:
    return f"{classname}.{name}" if classname else name


def _gate_failures(gates: pd.DataFrame) -> list[dict[str, Any]]:
    failed = gates[~gates["passed"].astype(bool)]
    rows = []
    for (stage, name), chunk in failed.groupby(["stage", "name"]):
        last = chunk.sort_values("created_at").iloc[-1]
        total = int(((gates["stage"] == stage) & (gates["name"] == name)).sum())
        rows.append(
            {
                "gate": f"{stage}.{name}",
                "failures": len(chunk),
                "evaluations": total,
                "last_commit": last["commit"],
                "last_failed": last["created_at"],
                "detail": last["detail"],
            }
        )
    rows.sort(key=lambda row: (-row["failures"], row["gate"]))
    return rows


def findings_by_severity(findings: pd.DataFrame) -> list[dict[str, Any]]:
    """Open and suppressed findings per severity (of a history.findings() frame), the
    unknown first and then the most severe; severities without any are left out."""
    suppressed = findings["suppressed"].astype(bool)
    rows = [
        {
            "severity": severity,
            "open": int(((findings["severity"] == severity) & ~suppressed).sum()),
            "suppressed": int(((findings["severity"] == severity) & suppressed).sum()),
        }
        for severity in reversed(FINDING_SEVERITIES)
    ]
    return [row for row in rows if row["open"] or row["suppressed"]]


def _findings(findings: pd.DataFrame) -> dict[str, Any]:
    open_findings = findings[~findings["suppressed"].astype(bool)]
    worst = open_findings[open_findings["severity"].isin(["critical", "high", "unknown"])]
    return {
        "by_severity": findings_by_severity(findings),
        "worst": worst.head(_TOP).to_dict("records"),
        "total": len(findings),
    }


def _environments(deployments: pd.DataFrame) -> list[dict[str, Any]]:
    rows = []
    for environment, chunk in deployments.groupby("environment", sort=False):
        statuses = chunk["status"].value_counts()
        rows.append(
            {
                "environment": environment,
                "attempts": len(chunk),
                "deployed": int(statuses.get("deployed", 0)),
                "rolled_back": int(statuses.get("rolled_back", 0)),
                "failed": int(statuses.get("failed", 0)),
                "refused": int(statuses.get("refused", 0)),
                "median_duration_s": chunk["duration_s"].median(),
                "median_rollback_s": chunk["rollback_s"].median(),
            }
        )
    return rows
