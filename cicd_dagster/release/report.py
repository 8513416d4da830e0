"""The release report: one HTML page per release that a person would read.

What changed (the release's changelog), the tests of the released commit against those of
the previous release's commit, with the pass rates and durations of the builds in between,
the gates, the security findings of the commit (rescans included), its deployments with
their durations, and the approvals given or refused for it. Everything comes from the
history DB; a part with no data (a release without tests, never deployed...) says so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from cicd_dagster.config import ControlConfig
from cicd_dagster.html_report import Bar, Segment, bar_chart, css_class, finite, render
from cicd_dagster.quality import findings_by_severity
from cicd_dagster.store import HistoryStore
from cicd_dagster.store.models import TEST_STAGES

# Builds shown in the trend when there is no previous release to start from.
_TREND_WITHOUT_PREVIOUS = 30
_BROKEN = ("failed", "error")
# A version becomes a file name: SemVer's characters only.
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z.+-]*")


class ReleaseNotFound(LookupError):
    """No release of that version in the history DB."""


def release_report_path(config: ControlConfig, repository: str, version: str) -> Path:
    if not _VERSION.fullmatch(version):
        raise ValueError(f"{version!r} is not a version")
    return config.home / "reports" / repository / f"release-{version}.html"


def render_release_report(
    config: ControlConfig,
    history: HistoryStore,
    repository: str,
    version: str,
    *,
    output: Path | None = None,
    now: datetime | None = None,
) -> Path:
    """Write the report of `repository`'s release `version`; returns its path (default
    home/reports/<repo>/release-<version>.html). ReleaseNotFound if there is no such
    release."""
    path = output or release_report_path(config, repository, version)
    context = release_context(history, repository, version)
    context["generated_at"] = now or datetime.now(UTC)
    return render("release.html.j2", context, path)


def release_context(history: HistoryStore, repository: str, version: str) -> dict[str, Any]:
    """What the template shows, in plain values."""
    releases = history.releases(repository=repository)
    matches = releases[releases["version"] == version]
    if matches.empty:
        known = ", ".join(releases["version"].head(10)) or "none"
        raise ReleaseNotFound(f"{repository} has no release {version!r} (latest: {known})")
    release = matches.iloc[0].to_dict()
    previous_rows = releases[releases["version"] == release["previous_version"]]
    previous = None if previous_rows.empty else previous_rows.iloc[0].to_dict()
    sha = release["commit"]
    previous_sha = previous["commit"] if previous else None
    builds = history.builds(repository=repository)
    build = _row(builds, sha)
    previous_build = _row(builds, previous_sha)
    trend = _trend(builds, build, previous_build)
    tests_now = _tests_of(history, repository, build)
    tests_before = _tests_of(history, repository, previous_build)
    findings = history.findings(repository=repository, commit=sha)
    deployments = history.deployments(repository=repository)
    deployments = deployments[deployments["commit"] == sha].iloc[::-1]  # oldest first
    return {
        "repository": repository,
        "release": release,
        "previous": previous,
        "build": build,
        "previous_build": previous_build,
        "stages": _stages(history, repository, sha, previous_sha),
        "gates": history.gate_rows(repository, sha).to_dict("records") if build else [],
        "failing_tests": tests_now[tests_now["status"].isin(_BROKEN)].to_dict("records"),
        "test_changes": _test_changes(tests_now, tests_before) if previous_build else None,
        "trend": trend.to_dict("records"),
        "pass_rate_chart": bar_chart(
            "test pass rate per build",
            [
                Bar(
                    row["commit"][:7],
                    [
                        Segment(
                            row["pass_rate"] * 100,
                            "info",
                            f"{row['commit'][:12]}: {row['pass_rate']:.1%}",
                        )
                    ],
                )
                if pd.notna(row["pass_rate"])
                else Bar(row["commit"][:7], [])
                for row in trend.to_dict("records")
            ],
            max_value=100,
            unit=" %",
        ),
        "duration_chart": bar_chart(
            "build duration",
            [
                Bar(
                    row["commit"][:7],
                    [
                        Segment(
                            row["duration_s"],
                            css_class(row["status"]),
                            f"{row['commit'][:12]}: {row['duration_s']:.1f} s",
                        )
                    ],
                )
                for row in trend.to_dict("records")
            ],
            unit=" s",
        ),
        "findings": findings.to_dict("records"),
        "findings_by_severity": findings_by_severity(findings),
        "deployments": deployments.to_dict("records"),
        "approvals": history.approvals(repository=repository, commit=sha).to_dict("records"),
    }


def _row(frame: pd.DataFrame, sha: str | None) -> dict[str, Any] | None:
    rows = frame[frame["commit"] == sha] if sha else frame.iloc[0:0]
    return None if rows.empty else {str(key): value for key, value in rows.iloc[0].items()}


def _trend(
    builds: pd.DataFrame, build: dict[str, Any] | None, previous: dict[str, Any] | None
) -> pd.DataFrame:
    """The builds from the previous release's commit to this one (of this build's branch),
    oldest first; without a previous release, the last few up to this one."""
    if build is None:
        return builds.iloc[0:0]
    window = builds[builds["created_at"] <= build["created_at"]]
    if build["branch"] is not None:
        window = window[window["branch"] == build["branch"]]
    if previous is not None:
        window = window[window["created_at"] >= previous["created_at"]]
    else:
        window = window.head(_TREND_WITHOUT_PREVIOUS)
    return window.iloc[::-1]


def _tests_of(history: HistoryStore, repository: str, build: dict[str, Any] | None) -> pd.DataFrame:
    """The test cases of a build (none without a build)."""
    since = build["created_at"] if build else datetime.now(UTC)
    tests = history.tests(repository=repository, since=since)
    return tests[tests["commit"] == (build["commit"] if build else None)]


@dataclass(frozen=True)
class Change:
    """How a figure moved since the previous release, e.g. "+1.5 pt", and whether that is
    for the better."""

    text: str
    better: bool


def _stages(
    history: HistoryStore, repository: str, sha: str, previous_sha: str | None
) -> list[dict[str, Any]]:
    """Per test stage: this release's figures, the previous release's, and the changes."""
    now = history.stage_rows(repository, sha).set_index("name")
    before = (
        history.stage_rows(repository, previous_sha).set_index("name")
        if previous_sha
        else now.iloc[0:0]
    )
    rows = []
    for stage in TEST_STAGES:
        ran = [
            frame.loc[stage, "status"] != "not_configured"
            for frame in (now, before)
            if stage in frame.index
        ]
        if not any(ran):
            continue
        figures = now.loc[stage].to_dict() if stage in now.index else None
        earlier = before.loc[stage].to_dict() if stage in before.index else None
        both = figures or {}, earlier or {}
        changes = {
            "tests": _change(*both, "tests", "{:+.0f}"),
            "pass_rate": _change(*both, "pass_rate", "{:+.1%}"),
            "coverage": _change(*both, "coverage", "{:+.1%}"),
            "duration_s": _change(*both, "duration_s", "{:+.1f} s", higher=False),
        }
        rows.append({"stage": stage, "now": figures, "before": earlier, "changes": changes})
    return rows


def _change(
    now: Mapping[Any, Any], before: Mapping[Any, Any], name: str, form: str, *, higher: bool = True
) -> Change | None:
    """How figure `name` changed; None when either is missing or it did not change.
    `higher`: whether more is better."""
    current, previous = finite(now.get(name)), finite(before.get(name))
    if current is None or previous is None:
        return None
    text = form.format(current - previous)
    if text in (form.format(0.0), form.format(-0.0)):
        return None  # no change that shows
    return Change(text, (current > previous) == higher)


def _test_changes(now: pd.DataFrame, before: pd.DataFrame) -> dict[str, list[str]]:
    """Tests added, removed, fixed (broken before, passing now) and newly broken, by name."""

    def names(frame: pd.DataFrame, statuses: tuple[str, ...] | None = None) -> set[str]:
        if statuses is not None:
            frame = frame[frame["status"].isin(statuses)]
        return {
            f"{s}: {c}.{n}" if c else f"{s}: {n}"
            for s, c, n in zip(frame["stage"], frame["classname"], frame["name"], strict=True)
        }

    all_now, all_before = names(now), names(before)
    broken_now, broken_before = names(now, _BROKEN), names(before, _BROKEN)
    return {
        "added": sorted(all_now - all_before),
        "removed": sorted(all_before - all_now),
        "fixed": sorted((broken_before - broken_now) & all_now),
        "broken": sorted(broken_now - broken_before),
    }
