"""Semantic versions (SemVer 2.0, the `semver` library) from release tags and commits.

Rules, as semantic-release and commitizen (with major_version_zero) apply them:

- The bump comes from the conventional commits since the last *final* release reachable
  from the commit: a breaking change (`!` or a BREAKING CHANGE footer) -> major, feat ->
  minor, fix, perf or a revert -> patch; anything else (docs, chore, non-conventional
  "other" messages) -> no release.
- In 0.y.z a breaking change bumps the minor and a feat the minor too; leaving 0.x is a
  decision a person makes (tag 1.0.0 by hand).
- A pre-release (`pre="rc"`) is the next version with `-rc.N`, N one more than the highest
  rc of that version already tagged; a final after rcs of the same version drops the suffix.
- No release tag at all: the first release is `initial_version` (default 0.1.0).
- Tags not matching the tag format, or whose version is not SemVer, are ignored with a
  warning naming them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from semver import Version

from cicd_dagster.release.conventional import REVERT, ConventionalCommit

VERSION_FIELD = "{version}"
# What git check-ref-format refuses in a ref name (its per-part rules are checked apart).
_BAD_REF = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|^[-/]|[/.]$")
# Pre-release identifiers that `--pre` accepts: one alphanumeric SemVer identifier.
_PRE_IDENTIFIER = re.compile(r"[0-9A-Za-z-]+")


class Bump(StrEnum):
    """What changed the version (stored in the releases table)."""

    MAJOR = "major"
    MINOR = "minor"
    PATCH = "patch"
    PRERELEASE = "prerelease"  # a further pre-release of the same next version
    INITIAL = "initial"


_RANK = {Bump.PATCH: 1, Bump.MINOR: 2, Bump.MAJOR: 3}


@dataclass(frozen=True)
class ReleaseTag:
    name: str
    version: Version
    sha: str  # the commit it points at


class VersioningError(ValueError):
    """A version that cannot be made: a bad --pre identifier or tag format."""


def check_tag_format(tag_format: str) -> str:
    """`tag_format` if it holds {version} exactly once, no other braces, and makes tag
    names git accepts (the rules of git check-ref-format, which git.py applies again)."""
    if tag_format.count(VERSION_FIELD) != 1:
        raise VersioningError(f"tag format {tag_format!r} must contain {VERSION_FIELD} once")
    rest = tag_format.replace(VERSION_FIELD, "")
    if "{" in rest or "}" in rest:
        raise VersioningError(
            f"tag format {tag_format!r}: {VERSION_FIELD} is the only field it may hold"
        )
    sample = tag_format.replace(VERSION_FIELD, "1.0.0")
    parts = sample.split("/")
    if _BAD_REF.search(sample) or any(p.startswith(".") or p.endswith(".lock") for p in parts):
        raise VersioningError(
            f"tag format {tag_format!r} makes tags git refuses, such as {sample!r}: no "
            r"spaces, control characters, ~ ^ : ? * [ \, '..', '@{', '//', no leading '-' "
            "and no part starting with '.' or ending with '.lock'"
        )
    return tag_format


def format_tag(tag_format: str, version: Version) -> str:
    return check_tag_format(tag_format).replace(VERSION_FIELD, str(version))


def parse_tags(
    tags: Iterable[tuple[str, str]], tag_format: str
) -> tuple[list[ReleaseTag], list[str]]:
    """(release tags, highest version first; warnings) from (tag name, commit sha) pairs:
    a tag that does not match the format or whose version is not SemVer is left out with a
    warning that names it."""
    prefix, _, suffix = check_tag_format(tag_format).partition(VERSION_FIELD)
    pattern = re.compile(re.escape(prefix) + "(?P<version>.+)" + re.escape(suffix))
    releases, warnings = [], []
    for name, sha in tags:
        match = pattern.fullmatch(name)
        if match is None:
            warnings.append(
                f"tag {name!r} ignored: it does not match the tag format {tag_format!r}"
            )
            continue
        try:
            version = Version.parse(match["version"])
        except ValueError:
            warnings.append(f"tag {name!r} ignored: {match['version']!r} is not a SemVer version")
            continue
        releases.append(ReleaseTag(name, version, sha))
    releases.sort(key=lambda tag: (tag.version, tag.name), reverse=True)
    return releases, warnings


def counted(
    commits: Sequence[tuple[str, ConventionalCommit]],
) -> list[tuple[str, ConventionalCommit]]:
    """The (sha, commit) pairs that count, in order: a revert and the commit it reverts,
    both in the range, cancel out."""
    shas = [sha for sha, _ in commits]
    cancelled: set[str] = set()
    for sha, commit in commits:
        if commit.type == REVERT and commit.reverts:
            target = next((s for s in shas if s.startswith(commit.reverts)), None)
            if target is not None:
                cancelled |= {sha, target}
    return [(sha, commit) for sha, commit in commits if sha not in cancelled]


def bump_of(commit: ConventionalCommit) -> Bump | None:
    """What one commit asks for, before the 0.x rule."""
    if not commit.conventional:
        return None
    if commit.breaking:
        return Bump.MAJOR
    if commit.type == "feat":
        return Bump.MINOR
    if commit.type in ("fix", "perf", REVERT):
        return Bump.PATCH
    return None


def required_bump(commits: Iterable[ConventionalCommit], base: Version | None) -> Bump | None:
    """The largest bump the commits ask for, with the 0.x rule applied to `base`; None when
    none is release-worthy."""
    bumps = [bump for bump in map(bump_of, commits) if bump is not None]
    if not bumps:
        return None
    bump = max(bumps, key=_RANK.__getitem__)
    if bump is Bump.MAJOR and base is not None and base.major == 0:
        return Bump.MINOR
    return bump


def check_pre(pre: str | None) -> str | None:
    if pre is not None and (not _PRE_IDENTIFIER.fullmatch(pre) or pre.isdigit()):
        raise VersioningError(
            f"--pre {pre!r}: use one identifier of letters, digits and '-', such as rc or beta"
        )
    return pre


def next_version(
    base: Version | None,
    bump: Bump | None,
    *,
    initial: Version,
    pre: str | None = None,
    existing: Iterable[Version] = (),
) -> Version:
    """The version after `base` (the last final release; None: there is none) for `bump`;
    with `pre`, the next free pre-release `-<pre>.N` of that version among `existing`."""
    if base is None:
        target = initial.finalize_version()
    elif bump is None:
        raise VersioningError("no release-worthy change: nothing to bump")
    else:
        target = base.next_version(part=bump.value)
    if check_pre(pre) is None:
        return target
    numbers = [
        int(version.prerelease.split(".")[1])
        for version in existing
        if version.finalize_version() == target
        and version.prerelease
        and re.fullmatch(re.escape(pre or "") + r"\.[0-9]+", version.prerelease)
    ]
    return target.replace(prerelease=f"{pre}.{max(numbers, default=0) + 1}")
