"""release: a commit verified live in the last environment, given its next version.

plan_release works out what a release of the commit would be (version, tag, commits,
changelog) and refuses, with a reason, what must not be released: a commit never verified
in the last environment (with no environments: a commit whose CI is not green), a commit
released already (a final after an rc of the same commit is allowed), a version whose tag
exists, a commit that does not descend from the newest release (history rewritten, or
another line), and a range without a release-worthy commit. make_release carries a plan
out: an annotated tag in the mirror pushed to the repository URL (the mirror's tag is
removed again when the push fails), notes in home/release-notes/<repo>/<version>.{md,html},
a row in the releases table, a `released` event, the HTML release report (release/report.py)
and the release as JSON in <version>.json beside the notes.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from semver import Version

from cicd_dagster.config import ControlConfig, RepositoryConfig
from cicd_dagster.git import CommitInfo, GitError, Mirror
from cicd_dagster.locks import file_lock
from cicd_dagster.release.changelog import ChangelogEntry, render_changelog, render_html
from cicd_dagster.release.conventional import ConventionalCommit, parse_message
from cicd_dagster.release.report import render_release_report
from cicd_dagster.release.versioning import (
    Bump,
    ReleaseTag,
    VersioningError,
    counted,
    format_tag,
    next_version,
    parse_tags,
    required_bump,
)
from cicd_dagster.stages.context import StageError
from cicd_dagster.stages.deploy import unfit_build, was_verified
from cicd_dagster.store import HistoryStore
from cicd_dagster.store.history import ReleaseRecord

TAGGER_NAME = "cicd-dagster"
TAGGER_EMAIL = "cicd-dagster@localhost"


class ReleaseRefused(StageError):
    """The commit may not be released (now); the message says why and what to do."""


@dataclass(frozen=True)
class ReleaseCommit:
    """A commit of the release, its message parsed."""

    info: CommitInfo
    parsed: ConventionalCommit

    def to_json(self) -> dict[str, Any]:
        parsed, info = self.parsed, self.info
        return {
            "sha": info.sha,
            "type": parsed.type,
            "scope": parsed.scope,
            "subject": parsed.subject,
            "breaking": parsed.breaking,
            "author": info.author_name,
            "email": info.author_email,
            "date": info.authored_at.isoformat(),
            "refs": [ref.text for ref in parsed.refs],
            "files": len(info.changed_files),
        }


@dataclass(frozen=True)
class ReleasePlan:
    """What releasing the commit makes; `commits` are those since `previous`, newest first."""

    repository: str
    commit: str
    version: str
    previous: str | None
    previous_tag: str | None
    tag: str
    bump: Bump
    prerelease: bool
    commits: list[ReleaseCommit]
    changelog: str
    deployments: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "repository": self.repository,
            "version": self.version,
            "previous": self.previous,
            "tag": self.tag,
            "previous_tag": self.previous_tag,
            "commit": self.commit,
            "bump": self.bump.value,
            "prerelease": self.prerelease,
            "commits": [commit.to_json() for commit in self.commits],
            "changelog": self.changelog,
            "deployments": self.deployments,
            "warnings": self.warnings,
        }


@dataclass(frozen=True)
class ReleaseOutcome:
    plan: ReleasePlan
    notes_markdown: Path
    notes_html: Path
    report: Path | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            **self.plan.to_json(),
            "notes": {"markdown": str(self.notes_markdown), "html": str(self.notes_html)},
            "report": str(self.report) if self.report else None,
            "created_at": self.created_at.isoformat(),
        }


def mirror_of(config: ControlConfig, repository: RepositoryConfig) -> Mirror:
    return Mirror(config.git_dir / f"{repository.name}.git", repository.url)


def notes_dir(config: ControlConfig, repository: str) -> Path:
    return config.home / "release-notes" / repository


def record_path(config: ControlConfig, repository: str, version: str) -> Path:
    """The release as `cicd release --json` prints it, kept beside its notes."""
    return notes_dir(config, repository) / f"{version}.json"


def plan_release(
    config: ControlConfig,
    repository: str,
    sha: str,
    history: HistoryStore,
    *,
    pre: str | None = None,
    fetch: bool = True,
) -> ReleasePlan:
    """The release the commit would be; ReleaseRefused when it must not be released. No
    side effect but fetching the mirror (`fetch`), so that the newest tags count."""
    repo = config.repository(repository)
    mirror = mirror_of(config, repo)
    if fetch:
        mirror.fetch()
    try:
        full_sha = mirror.resolve(sha)
    except (GitError, ValueError) as error:
        raise ReleaseRefused(f"{repo.name}: no commit {sha!r} in {repo.url}") from error
    _check_verified(config, history, repo.name, full_sha)

    tags, warnings = parse_tags(
        ((tag.name, tag.sha) for tag in mirror.tags()), repo.release.tag_format
    )
    reachable_names = {tag.name for tag in mirror.tags(merged_into=full_sha)}
    reachable = [tag for tag in tags if tag.name in reachable_names]
    _check_not_released(tags, full_sha, pre, history, repo.name)
    if tags and not mirror.is_ancestor(tags[0].sha, full_sha):
        newest = tags[0]
        raise ReleaseRefused(
            f"{full_sha[:12]} does not descend from the newest release {newest.version} "
            f"({newest.name} at {newest.sha[:12]}): history was rewritten or the commit is on "
            "another line; release a commit that contains it"
        )

    final = next((tag for tag in reachable if not tag.version.prerelease), None)
    since_final = _commits(mirror, final.sha if final else None, full_sha)
    try:
        version, bump = _next(repo, final, since_final, pre, tags)
    except VersioningError as error:
        raise ReleaseRefused(f"{repo.name}: {error}") from error
    previous, commits = final, since_final
    if pre is not None and reachable and reachable[0] is not final:
        # A further pre-release: its notes tell what is new since the last one.
        previous = reachable[0]
        commits = _commits(mirror, previous.sha, full_sha)
        if _bump_of(commits, previous) is None:
            raise ReleaseRefused(
                f"no release-worthy commit since {previous.name} ({len(commits)} commits): "
                "nothing new for another pre-release"
            )
    tag = format_tag(repo.release.tag_format, version)
    if mirror.has_tag(tag):
        raise ReleaseRefused(f"tag {tag} exists already in {repo.url}: tags never move")
    recorded = history.releases(repository=repo.name)
    if (recorded["version"] == str(version)).any():
        raise ReleaseRefused(
            f"{repo.name} {version} is recorded already, but its tag {tag} is gone from "
            f"{repo.url}: restore the tag rather than release the version again"
        )
    return ReleasePlan(
        repository=repo.name,
        commit=full_sha,
        version=str(version),
        previous=str(previous.version) if previous else None,
        previous_tag=previous.name if previous else None,
        tag=tag,
        bump=bump,
        prerelease=bool(version.prerelease),
        commits=commits,
        changelog=render_changelog(
            repository=repo.name,
            version=str(version),
            previous=str(previous.version) if previous else None,
            released_on=datetime.now(UTC).date(),
            entries=[
                ChangelogEntry(c.info.sha, c.info.author_name, c.parsed, len(c.info.parents) > 1)
                for c in commits
            ],
            url=repo.url,
            tag=tag,
            previous_tag=previous.name if previous else None,
        ),
        deployments=_deployments(config, history, repo.name, full_sha),
        warnings=warnings,
    )


def _check_verified(config: ControlConfig, history: HistoryStore, repo: str, sha: str) -> None:
    if not config.environments:
        reason = unfit_build(history, repo, sha)
        if reason is not None:
            raise ReleaseRefused(f"{reason} (without environments a release needs green CI)")
        return
    last = config.environments[-1].name
    if not was_verified(history, repo, last, sha):
        verified = history.last_verified_deployment(repo, last)
        current = "nothing" if verified is None else str(verified["commit"])[:12]
        raise ReleaseRefused(
            f"{sha[:12]} was never verified in {last}, the last environment ({last} runs "
            f"{current}): promote it there first"
        )


def _check_not_released(
    tags: list[ReleaseTag], sha: str, pre: str | None, history: HistoryStore, repo: str
) -> None:
    """Two releases of one commit are refused, but for a final after its pre-releases."""
    recorded = history.releases(repository=repo, commit=sha)
    released = [str(tag.version) for tag in tags if tag.sha == sha]
    released += [str(version) for version in recorded["version"] if version not in released]
    finals = [version for version in released if not Version.parse(version).prerelease]
    if finals or (released and pre is not None):
        what = ", ".join(finals or released)
        hint = "" if finals else "; a final release of it is allowed"
        raise ReleaseRefused(f"{sha[:12]} is released already as {what}{hint}")


def _commits(mirror: Mirror, since: str | None, sha: str) -> list[ReleaseCommit]:
    infos = mirror.commits_between(since, sha)
    return [ReleaseCommit(info, parse_message(info.message)) for info in infos]


def _bump_of(commits: list[ReleaseCommit], base: ReleaseTag | None) -> Bump | None:
    pairs = counted([(c.info.sha, c.parsed) for c in commits])
    return required_bump((parsed for _, parsed in pairs), base.version if base else None)


def _next(
    repo: RepositoryConfig,
    final: ReleaseTag | None,
    commits: list[ReleaseCommit],
    pre: str | None,
    tags: list[ReleaseTag],
) -> tuple[Version, Bump]:
    existing = [tag.version for tag in tags]
    initial = Version.parse(repo.release.initial_version)
    if final is None:
        return next_version(None, None, initial=initial, pre=pre, existing=existing), Bump.INITIAL
    bump = _bump_of(commits, final)
    if bump is None:
        raise VersioningError(
            f"no release-worthy commit since {final.name}: {len(commits)} commits, none a fix, "
            "feat, perf, revert or breaking change (non-conventional messages never count)"
        )
    version = next_version(final.version, bump, initial=initial, pre=pre, existing=existing)
    target = version.finalize_version()
    if version.prerelease and any(
        v.prerelease and v.finalize_version() == target for v in existing
    ):
        return version, Bump.PRERELEASE  # a further pre-release of the same version
    return version, bump


def _deployments(
    config: ControlConfig, history: HistoryStore, repo: str, sha: str
) -> list[dict[str, Any]]:
    """The commit's verified deployments, one per environment in promotion order (newest)."""
    rows = history.deployments(repository=repo)
    rows = rows[(rows["commit"] == sha) & (rows["status"] == "deployed")]
    found = []
    for environment in config.environments:
        mine = rows[rows["environment"] == environment.name]
        if not mine.empty:
            row = mine.iloc[0]
            found.append(
                {
                    "environment": environment.name,
                    "strategy": str(row["strategy"]),
                    "finished_at": _iso(row["finished_at"]),
                    "duration_s": None if pd.isna(row["duration_s"]) else float(row["duration_s"]),
                }
            )
    return found


def _iso(value: Any) -> str | None:
    return None if pd.isna(value) else pd.Timestamp(value).isoformat()


def make_release(
    config: ControlConfig,
    repository: str,
    sha: str,
    history: HistoryStore,
    *,
    pre: str | None = None,
    run_id: str | None = None,
    created_by: str | None = None,
) -> ReleaseOutcome:
    """Plan and carry out the release of the commit: tag, push, notes, history row, event.
    ReleaseRefused when it must not be released; StageError when the push fails."""
    repo = config.repository(repository)
    folder = notes_dir(config, repo.name)
    folder.mkdir(parents=True, exist_ok=True)
    # One release of a repository at a time: the plan must still hold when it is carried out.
    with file_lock(folder.with_name(f"{repo.name}.lock")):
        plan = plan_release(config, repo.name, sha, history, pre=pre)
        mirror = mirror_of(config, repo)
        by = f"\n\nReleased by {created_by}." if created_by else ""
        mirror.create_tag(
            plan.tag,
            plan.commit,
            f"{repo.name} {plan.version}\n\n{plan.changelog}{by}",
            tagger_name=TAGGER_NAME,
            tagger_email=TAGGER_EMAIL,
        )
        try:
            mirror.push_tag(plan.tag)
        except GitError as error:
            mirror.delete_tag(plan.tag)
            raise StageError(f"release {plan.version} not made: {error}") from error
        markdown = _write(folder / f"{plan.version}.md", plan.changelog)
        page = render_html(plan.changelog, f"{repo.name} {plan.version}")
        html = _write(folder / f"{plan.version}.html", page)
        created_at = datetime.now(UTC)
        history.record_release(
            repo.name,
            ReleaseRecord(
                version=plan.version,
                tag=plan.tag,
                commit_sha=plan.commit,
                previous_version=plan.previous,
                bump=plan.bump.value,
                prerelease=plan.prerelease,
                commit_count=len(plan.commits),
                changelog=plan.changelog,
                created_at=created_at,
                notes_path=str(markdown),
                report_path=None,  # set once the report, which reads this row, is written
                run_id=run_id,
                created_by=created_by,
            ),
        )
        history.record_event(
            repo.name,
            "released",
            f"{repo.name} {plan.version} released ({plan.tag} at {plan.commit[:12]}, "
            f"{len(plan.commits)} commit{'' if len(plan.commits) == 1 else 's'} since "
            f"{plan.previous or 'the start'})",
            commit_sha=plan.commit,
            at=created_at,
        )
        report = _release_report(config, history, plan)
        outcome = ReleaseOutcome(plan, markdown, html, report, created_at)
        _write(
            record_path(config, repo.name, plan.version), json.dumps(outcome.to_json(), indent=2)
        )
    return outcome


def _release_report(config: ControlConfig, history: HistoryStore, plan: ReleasePlan) -> Path | None:
    """Write the release's HTML report and link it; the release stands without it (the
    tag is pushed), so a failure is a warning, and `cicd report release` can retry."""
    try:
        path = render_release_report(config, history, plan.repository, plan.version)
    except (LookupError, ValueError, OSError) as error:
        plan.warnings.append(f"the release report was not written: {error}")
        return None
    history.set_release_report(plan.repository, plan.version, str(path))
    return path


def _write(path: Path, text: str) -> Path:
    """Write atomically: a reader never sees half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
    return path


# --- diff of two releases ------------------------------------------------------------------


def release_diff(
    config: ControlConfig, history: HistoryStore, repository: str, old: str, new: str
) -> dict[str, Any]:
    """What changed between two releases (versions or tags): commits, authors, files, and
    per side the test counts and unsuppressed findings of its commit's build, with the
    findings new in `new` and those gone since `old`. ValueError for an unknown release."""
    repo = config.repository(repository)
    releases = history.releases(repository=repo.name)
    sides = {
        label: _release_row(releases, repo.name, name)
        for label, name in (("from", old), ("to", new))
    }
    mirror = mirror_of(config, repo)
    mirror.fetch()
    old_sha, new_sha = sides["from"]["commit"], sides["to"]["commit"]
    commits = _commits(mirror, old_sha, new_sha)
    authors = Counter((c.info.author_name, c.info.author_email) for c in commits)
    findings = {
        label: _open_findings(history, repo.name, side["commit"]) for label, side in sides.items()
    }
    identity = ["kind", "rule", "package", "version", "file", "line"]
    keys = {label: {_key(row, identity) for row in rows} for label, rows in findings.items()}
    return {
        "repository": repo.name,
        **{
            label: {
                **side,
                "tests": _test_counts(history, repo.name, side["commit"]),
                "findings": dict(Counter(row["severity"] for row in findings[label])),
            }
            for label, side in sides.items()
        },
        "commits": [commit.to_json() for commit in commits],
        "authors": [
            {"name": name, "email": email, "commits": count}
            for (name, email), count in authors.most_common()
        ],
        "files": [
            {
                "path": f.path,
                "status": f.status,
                "added": f.added,
                "deleted": f.deleted,
                "old_path": f.old_path,
            }
            for f in mirror.changed_files_between(old_sha, new_sha)
        ],
        "new_findings": [r for r in findings["to"] if _key(r, identity) not in keys["from"]],
        "fixed_findings": [r for r in findings["from"] if _key(r, identity) not in keys["to"]],
    }


def _release_row(releases: pd.DataFrame, repo: str, name: str) -> dict[str, Any]:
    match = releases[(releases["version"] == name) | (releases["tag"] == name)]
    if match.empty:
        known = ", ".join(releases["version"].head(10)) or "none yet"
        raise ValueError(f"{repo} has no release {name!r}; its newest: {known}")
    row = match.iloc[0]
    return {
        "version": str(row["version"]),
        "tag": str(row["tag"]),
        "commit": str(row["commit"]),
        "created_at": _iso(row["created_at"]),
    }


def _test_counts(history: HistoryStore, repo: str, sha: str) -> dict[str, Any] | None:
    builds = history.builds(repository=repo)
    build = builds[builds["commit"] == sha]
    if build.empty:
        return None
    row = build.iloc[0]
    counts: dict[str, Any] = {
        name: int(row[name]) for name in ("tests", "passed", "failed", "errors", "skipped")
    }
    counts["pass_rate"] = None if pd.isna(row["pass_rate"]) else float(row["pass_rate"])
    return counts


def _open_findings(history: HistoryStore, repo: str, sha: str) -> list[dict[str, Any]]:
    frame = history.findings(repository=repo, commit=sha)
    frame = frame[~frame["suppressed"].astype(bool)]
    columns = ["kind", "tool", "rule", "severity", "message", "file", "line", "package", "version"]
    return [
        {str(key): (None if pd.isna(value) else value) for key, value in row.items()}
        for row in frame[columns].to_dict("records")
    ]


def _key(row: dict[str, Any], columns: list[str]) -> tuple[Any, ...]:
    return tuple(row[column] for column in columns)
