"""The quality report: how one repository's delivery went over a period, as an HTML page.

Builds and test pass rates per day (per week beyond three months), the failing and the
slowest tests, failed gates, security findings by severity, deployments and rollbacks per
environment, and incidents, all read from the history DB; and the analytics of the same
period: DORA's four keys with their levels, the flaky tests, build and stage durations,
benchmark regressions and (given the Dagster instance's build records) the dependency
cache hit rate. Charts are inline SVG, like the rest of the page.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from cicd_dagster.analytics.dora import NO_DATA, DeliveryEvents, DoraMetrics, all_dora_metrics
from cicd_dagster.analytics.flaky import TestHealth, collect_test_health
from cicd_dagster.analytics.performance import (
    BUILD_ENV_COLUMNS,
    RUN_COLUMNS,
    PerformanceReport,
    performance_report,
)
from cicd_dagster.config import ControlConfig
from cicd_dagster.html_report import Bar, Segment, bar_chart, css_class, duration, percent, render
from cicd_dagster.store import HistoryStore
from cicd_dagster.store.models import FINDING_SEVERITIES

# Beyond this many days, the charts count per week rather than per day.
_DAILY_UP_TO_DAYS = 92
_TOP = 15
# The colour of a DORA level (classes of base.html.j2).
_LEVEL_CLASSES = {"elite": "ok", "high": "ok", "medium": "warn", "low": "bad"}


def render_quality_report(
    config: ControlConfig,
    history: HistoryStore,
    repository: str,
    since: datetime,
    *,
    now: datetime | None = None,
    output: Path | None = None,
    build_envs: pd.DataFrame | None = None,
) -> Path:
    """Write the report of `repository` from `since` to now; returns its path (default
    home/reports/<repo>/quality-<today>.html). `build_envs` are the Dagster instance's
    build records (assets.analytics_performance.build_env_records): without them the
    cache hit rate is shown as unknown."""
    now = now or datetime.now(UTC)
    if since.tzinfo is None or since >= now:
        raise ValueError(f"since must be a timezone-aware moment before now, not {since}")
    path = output or config.home / "reports" / repository / f"quality-{now:%Y-%m-%d}.html"
    context = quality_context(config, history, repository, since, now, build_envs=build_envs)
    return render("quality.html.j2", context, path)


def quality_context(
    config: ControlConfig,
    history: HistoryStore,
    repository: str,
    since: datetime,
    now: datetime,
    *,
    build_envs: pd.DataFrame | None = None,
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
    ((dora, events),) = all_dora_metrics(config, history, since, now, [repository])
    health = collect_test_health(config, history, since, repositories=[repository])
    performance = performance_report(
        history,
        since=since,
        until=now,
        build_envs=pd.DataFrame(columns=BUILD_ENV_COLUMNS) if build_envs is None else build_envs,
        # Run records are the instance's, across repositories: not part of this page.
        runs=pd.DataFrame(columns=RUN_COLUMNS),
        repository=repository,
    )
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
        "slowest_tests": _slowest_tests(performance),
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
        "dora": _dora(config, dora, events, since, now),
        "flaky": _flaky(health),
        "performance": _performance(performance, since, now, cache_known=build_envs is not None),
    }


def _daily(since: datetime, now: datetime) -> bool:
    return (now - since).days <= _DAILY_UP_TO_DAYS


def _by_period(
    frame: pd.DataFrame, column: str, since: datetime, now: datetime
) -> list[tuple[pd.Period, pd.DataFrame]]:
    """Every day (or week) from `since` to `now`, with the rows whose `column` falls in it."""
    frequency = "D" if _daily(since, now) else "W"
    span = pd.period_range(_period(since, frequency), _period(now, frequency), freq=frequency)
    keys = frame[column].map(lambda moment: _period(moment, frequency))
    return [(period, frame[keys == period]) for period in span]


def _periods(builds: pd.DataFrame, since: datetime, now: datetime) -> list[dict[str, Any]]:
    """Per day (or week) from `since` to `now`, also those without a build: counts, pass rate
    and mean duration."""
    rows = []
    for period, chunk in _by_period(builds, "created_at", since, now):
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


def _slowest_tests(performance: PerformanceReport) -> list[dict[str, Any]]:
    """The slowest tests of the period, beside their mean in the period as long before."""
    return [
        {
            "stage": row["stage"],
            "test": _test_name(row["classname"], row["name"]),
            "mean_s": row["mean_s"],
            "previous_mean_s": row["previous_mean_s"],
            "change": row["change"],
            "runs": row["runs"],
        }
        for row in performance.slowest_tests.to_dict("records")
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


# --- analytics ------------------------------------------------------------------------------


def _dora(
    config: ControlConfig,
    metrics: DoraMetrics,
    events: DeliveryEvents,
    since: datetime,
    now: datetime,
) -> dict[str, Any]:
    """The four keys as rows (value, what it is computed over, bucket, level) and the
    production deployments per period as a chart."""
    frequency, lead, failure, restore = (
        metrics.deployment_frequency,
        metrics.lead_time,
        metrics.change_failure_rate,
        metrics.time_to_restore,
    )
    rows = [
        (
            "deployment-frequency",
            "Deployment frequency",
            frequency.value,
            f"{frequency.value:.2f} per week" if frequency.value is not None else None,
            f"{frequency.count} deployments on {metrics.deployment_days} days",
            frequency,
        ),
        (
            "lead-time",
            "Lead time for changes",
            lead.value,
            duration(lead.value * 60) if lead.value is not None else None,
            f"median of {lead.count} changes",
            lead,
        ),
        (
            "change-failure-rate",
            "Change failure rate",
            failure.value,
            percent(failure.value),
            f"{metrics.failed_deployments} of {failure.count} deployments",
            failure,
        ),
        (
            "time-to-restore",
            "Time to restore service",
            restore.value,
            duration(restore.value * 60) if restore.value is not None else None,
            f"median of {restore.count} restored, of {metrics.incidents} incidents",
            restore,
        ),
    ]
    deployments = events.deployments
    times = deployments["time_created"]
    deployed = deployments[(times > since) & (times <= now)]
    chart = bar_chart(
        "production deployments",
        [
            Bar(
                f"{period.start_time:%m-%d}",
                [Segment(len(chunk), "ok", f"{len(chunk)} deployments")],
            )
            for period, chunk in _by_period(deployed, "time_created", since, now)
        ],
    )
    return {
        "environment": config.environments[-1].name if config.environments else None,
        "metrics": [
            {
                "id": id_,
                "name": name,
                "value": shown if value is not None else NO_DATA,
                "basis": basis,
                "bucket": metric.bucket or "",
                "level": metric.level,
                "css": _LEVEL_CLASSES.get(metric.level, "muted"),
            }
            for id_, name, value, shown, basis, metric in rows
        ],
        "deployments": len(deployed),
        "chart": chart,
        "notes": metrics.notes,
    }


def _flaky(health: TestHealth) -> dict[str, Any]:
    """The flakiest tests (flip rate first) and the quarantine's state."""
    (repository,) = health.repositories
    ranking = health.ranking.head(_TOP)
    tests = [
        {
            "stage": row["stage"],
            "test": row["test"],
            "runs": int(row["runs"]),
            "flips": int(row["flips"]),
            "flip_rate": row["flip_rate"],
            "commits": list(row["commits"]),
            "last_seen": row["last_seen"],
            "last_status": row["last_status"],
            "quarantined": bool(row["quarantined"]),
        }
        for row in ranking.to_dict("records")
    ]
    chart = bar_chart(
        "flip rate of the flakiest tests",
        [
            Bar(
                f"#{rank}",
                [
                    Segment(
                        test["flip_rate"] * 100, "warn", f"{test['test']}: {test['flip_rate']:.0%}"
                    )
                ],
            )
            for rank, test in enumerate(tests[:10], start=1)
        ],
        max_value=100,
        unit=" %",
    )
    return {
        "tests": tests,
        "count": len(health.ranking),
        "tests_run": repository.tests,
        "runs": repository.runs,
        "min_runs": health.min_runs,
        "chart": chart,
        "quarantine": list(repository.quarantine),
        "stale_quarantine": list(repository.stale_quarantine),
        "quarantine_commit": repository.quarantine_commit,
        "quarantine_error": repository.quarantine_error,
    }


def _performance(
    report: PerformanceReport, since: datetime, now: datetime, *, cache_known: bool
) -> dict[str, Any]:
    """Build durations per period, stage durations, benchmark regressions and the cache."""
    summary = report.summary()
    builds = report.builds
    medians = [
        (period, chunk["duration_s"].median() if len(chunk) else None)
        for period, chunk in _by_period(builds, "created_at", since, now)
    ]
    chart = bar_chart(
        "median build duration",
        [
            Bar(
                f"{period.start_time:%m-%d}",
                [Segment(median, "info", duration(median))] if median is not None else [],
            )
            for period, median in medians
        ],
        unit=" s",
    )
    regressions = report.benchmarks[report.benchmarks["regressed"]]
    cache = report.cache
    return {
        "builds": summary["builds"],
        "build_median_s": summary["build_median_s"],
        "build_p90_s": summary["build_p90_s"],
        "chart": chart if len(builds) else None,
        "stages": report.stages.to_dict("records"),
        "benchmarks": len(report.benchmarks),
        "regressions": regressions.sort_values("created_at", ascending=False)
        .head(_TOP)
        .to_dict("records"),
        "regression_count": len(regressions),
        "cache_known": cache_known,
        "cache_hit_rate": summary["cache_hit_rate"],
        "cache_installs": int(cache["installs"].sum()),
        "cache_hits": int(cache["hits"].sum()),
    }
