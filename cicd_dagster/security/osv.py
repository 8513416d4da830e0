"""Dependency scanning against an offline folder of OSV advisories.

The folder is a checkout of the PyPI advisory database (vulns/<package>/PYSEC-*.yaml) or
an osv.dev export (*.json), searched recursively. A version is affected exactly as the
OSV schema's evaluation algorithm says, with PEP 440 ordering from packaging. A file that
cannot be used is skipped with a warning that names it (and the advisory and field where
there are some), and every other file is still used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from cvss import CVSS2, CVSS3, CVSS4, CVSSError
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Severity = Literal["low", "medium", "high", "critical", "unknown"]
Threshold = Literal["low", "medium", "high", "critical"]

ECOSYSTEM = "PyPI"
ADVISORY_SUFFIXES = frozenset({".json", ".yaml", ".yml"})
# libyaml's safe loader: a database is thousands of files, and the pure-Python parsers take
# three times as long (benchmarks/README.md, finding 5).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
SUMMARY_LIMIT = 200

_THRESHOLDS: tuple[Threshold, ...] = get_args(Threshold)
# GitHub's labels (database_specific.severity of GHSA records) and ours.
_SEVERITY_LABELS: dict[str, Severity] = {
    "low": "low",
    "moderate": "medium",
    "medium": "medium",
    "high": "high",
    "critical": "critical",
}
# Range types whose events are package versions; GIT ranges need the repository.
_VERSION_RANGE_TYPES = frozenset({"ECOSYSTEM", "SEMVER"})
_RANGE_TYPES = _VERSION_RANGE_TYPES | {"GIT"}
_EVENT_KINDS = ("introduced", "fixed", "last_affected", "limit")
_OUTSIDE = "links outside the advisory folder; not read"


class AdvisoryDatabaseError(Exception):
    """The advisory folder itself cannot be used (missing, not a folder)."""


class DependencyVersionError(ValueError):
    """A dependency that has advisories carries a version PEP 440 cannot order."""


@dataclass(frozen=True)
class AdvisoryWarning:
    """Why (part of) an advisory file was not used."""

    file: Path
    reason: str
    advisory_id: str | None = None
    field: str | None = None  # e.g. affected[0].ranges[1].events[2].fixed

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.advisory_id, self.field) if part)
        return f"{self.file}: {where}: {self.reason}" if where else f"{self.file}: {self.reason}"


# A point on the version line: before everything ("0"), a version, or infinity ("*").
_Bound = tuple[int] | tuple[int, Version]
_START: _Bound = (0,)
_INFINITY: _Bound = (2,)


def _at(version: Version) -> _Bound:
    return (1, version)


@dataclass(frozen=True)
class VersionRange:
    """One ECOSYSTEM range: its events sorted by version, and its limits."""

    events: tuple[tuple[str, _Bound], ...]  # (introduced | fixed | last_affected, bound)
    limits: tuple[_Bound, ...]  # empty: the implicit limit "*"

    def contains(self, version: Version) -> bool:
        """The OSV schema's IncludedInRanges for this one range."""
        here = _at(version)
        if self.limits and not any(here < limit for limit in self.limits):
            return False
        vulnerable = False
        for kind, bound in self.events:
            if kind == "introduced" and here >= bound:
                vulnerable = True
            elif (kind == "fixed" and here >= bound) or (kind == "last_affected" and here > bound):
                vulnerable = False
        return vulnerable


@dataclass(frozen=True)
class AffectedPackage:
    """One affected[] entry of an advisory for a PyPI package."""

    name: str  # normalised per PEP 503
    ranges: tuple[VersionRange, ...]
    versions: tuple[Version, ...]  # the explicit list
    fixed_versions: tuple[str, ...]
    severity: Severity

    def affects(self, version: Version) -> bool:
        public = Version(version.public)
        return any(_listed(version, public, listed) for listed in self.versions) or any(
            version_range.contains(version) for version_range in self.ranges
        )


@dataclass(frozen=True)
class Advisory:
    id: str
    aliases: tuple[str, ...]
    summary: str
    file: Path
    modified: datetime | None
    withdrawn: bool
    packages: tuple[AffectedPackage, ...]  # PyPI entries only


@dataclass(frozen=True)
class AdvisoryDatabase:
    folder: Path
    advisories: tuple[Advisory, ...]
    warnings: tuple[AdvisoryWarning, ...]

    @cached_property
    def by_package(self) -> dict[str, list[tuple[Advisory, AffectedPackage]]]:
        """Live (not withdrawn) advisories per normalised package name."""
        index: dict[str, list[tuple[Advisory, AffectedPackage]]] = {}
        for advisory in self.advisories:
            if not advisory.withdrawn:
                for package in advisory.packages:
                    index.setdefault(package.name, []).append((advisory, package))
        return index


@dataclass(frozen=True)
class VulnerabilityFinding:
    advisory_id: str
    aliases: tuple[str, ...]  # CVE and GHSA ids of the same vulnerability
    package: str  # normalised per PEP 503
    installed_version: str
    fixed_versions: tuple[str, ...]  # ascending; empty when no fix is known
    severity: Severity
    summary: str
    advisory_file: Path


def load_advisories(folder: Path) -> AdvisoryDatabase:
    """Every usable advisory under folder (recursively, hidden folders left out)."""
    if not folder.exists():
        raise AdvisoryDatabaseError(f"advisory database {folder} does not exist")
    if not folder.is_dir():
        raise AdvisoryDatabaseError(f"advisory database {folder} is not a folder")
    warnings: list[AdvisoryWarning] = []
    by_id: dict[str, Advisory] = {}
    files = _advisory_files(folder, warnings)
    for path in files:
        advisory = _load_advisory(path, warnings)
        if advisory is None:
            continue
        kept = by_id.setdefault(advisory.id, advisory)
        if kept is not advisory:
            newer, older = sorted((kept, advisory), key=_modified, reverse=True)
            by_id[advisory.id] = newer
            warnings.append(
                AdvisoryWarning(
                    older.file,
                    f"duplicate of {newer.file}, which was modified later or at the same time; "
                    "skipped",
                    advisory.id,
                )
            )
    if not files:
        suffixes = ", ".join(f"*{suffix}" for suffix in sorted(ADVISORY_SUFFIXES))
        warnings.append(AdvisoryWarning(folder, f"no advisory files ({suffixes}) found"))
    return AdvisoryDatabase(folder, tuple(by_id.values()), tuple(warnings))


def match(
    db: AdvisoryDatabase, dependencies: Iterable[tuple[str, str]]
) -> list[VulnerabilityFinding]:
    """One finding per (advisory, dependency) whose installed version the advisory affects."""
    findings: list[VulnerabilityFinding] = []
    for name, installed in sorted(set(dependencies)):
        package = canonicalize_name(name)
        candidates = db.by_package.get(package, [])
        if not candidates:
            continue
        try:
            version = Version(installed)
        except InvalidVersion:
            raise DependencyVersionError(
                f"dependency {name} {installed!r} is not a PEP 440 version, so it cannot be "
                f"checked against the advisories for {package}"
            ) from None
        affecting: dict[str, tuple[Advisory, list[AffectedPackage]]] = {}
        for advisory, affected in candidates:
            if affected.affects(version):
                affecting.setdefault(advisory.id, (advisory, []))[1].append(affected)
        for advisory, entries in affecting.values():
            findings.append(
                VulnerabilityFinding(
                    advisory_id=advisory.id,
                    aliases=advisory.aliases,
                    package=package,
                    installed_version=installed,
                    fixed_versions=_sorted_versions(v for e in entries for v in e.fixed_versions),
                    severity=max((e.severity for e in entries), key=_severity_rank),
                    summary=advisory.summary,
                    advisory_file=advisory.file,
                )
            )
    return sorted(findings, key=lambda f: (f.package, f.installed_version, f.advisory_id))


def severity_at_least(finding: VulnerabilityFinding, threshold: Threshold) -> bool:
    """Whether the finding reaches the gate's threshold (low < medium < high < critical).

    A finding of unknown severity reaches every threshold: the gate fails closed, since
    many PyPI advisories carry no severity at all.
    """
    if threshold not in _THRESHOLDS:
        raise ValueError(f"severity threshold {threshold!r} is not one of {', '.join(_THRESHOLDS)}")
    return _severity_rank(finding.severity) >= _severity_rank(threshold)


def _severity_rank(severity: Severity) -> int:
    return len(_THRESHOLDS) if severity == "unknown" else _THRESHOLDS.index(severity)


# --- reading files ---------------------------------------------------------------------------


def _advisory_files(folder: Path, warnings: list[AdvisoryWarning]) -> list[Path]:
    """The advisory files in folder and below; links are read only where they stay inside."""
    root = folder.resolve()
    found: list[Path] = []
    for directory, subdirectories, names in os.walk(folder):  # does not follow linked folders
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for linked in (Path(directory, d) for d in subdirectories):
            if linked.is_symlink() and not linked.resolve().is_relative_to(root):
                warnings.append(AdvisoryWarning(linked, _OUTSIDE))
        for name in sorted(names):
            path = Path(directory, name)
            if path.suffix.lower() not in ADVISORY_SUFFIXES:
                continue
            if not path.resolve().is_relative_to(root):
                warnings.append(AdvisoryWarning(path, _OUTSIDE))
            elif not path.is_file():  # a pipe would block the read, a dangling link fail it
                warnings.append(AdvisoryWarning(path, "not a regular file; not read"))
            else:
                found.append(path)
    return found


class _Unusable(Exception):
    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


def _load_advisory(path: Path, warnings: list[AdvisoryWarning]) -> Advisory | None:
    advisory_id: str | None = None
    try:
        document = _read_document(path)
        if isinstance(document, dict) and isinstance(document.get("id"), str):
            advisory_id = document["id"]
        return _advisory(path, _parse_document(document), warnings)
    except _Unusable as unusable:
        warnings.append(
            AdvisoryWarning(path, f"{unusable.reason}; skipped", advisory_id, unusable.field)
        )
        return None


def _read_document(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise _Unusable(f"not UTF-8 text (byte {error.start})") from None
    except OSError as error:
        raise _Unusable(f"cannot be read: {error.strerror}") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise _Unusable(f"not valid JSON: {error.msg} at line {error.lineno}") from None
    try:
        return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 -- a safe loader
    except yaml.MarkedYAMLError as error:
        line = f" at line {error.problem_mark.line + 1}" if error.problem_mark else ""
        raise _Unusable(f"not valid YAML: {error.problem or error.context}{line}") from None
    except yaml.YAMLError as error:
        raise _Unusable(f"not valid YAML: {error}") from None


# The OSV fields this module reads, with their JSON types. Strict: a YAML `fixed: 2.10` is
# the float 2.1, which must not pass as the version "2.10".
class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class _SeverityScore(_Model):
    type: str
    score: str


class _Package(_Model):
    ecosystem: str
    name: str


class _Event(_Model):
    introduced: str | None = None
    fixed: str | None = None
    last_affected: str | None = None
    limit: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> _Event:
        if len(self._given()) != 1:
            raise ValueError(f"an event has exactly one of {', '.join(_EVENT_KINDS)}")
        return self

    def _given(self) -> list[tuple[str, str]]:
        return [
            (kind, value) for kind in _EVENT_KINDS if (value := getattr(self, kind)) is not None
        ]

    @property
    def kind_and_value(self) -> tuple[str, str]:
        (given,) = self._given()
        return given


class _Range(_Model):
    type: str
    events: list[_Event]


class _Affected(_Model):
    package: _Package | None = None
    ranges: list[_Range] = []
    versions: list[str] = []
    severity: list[_SeverityScore] = []


class _Document(_Model):
    id: str
    affected: list[_Affected]
    aliases: list[str] = []
    summary: str = ""
    details: str = ""
    severity: list[_SeverityScore] = []
    database_specific: dict[str, Any] = {}
    # YAML gives timestamps, JSON gives RFC 3339 strings.
    modified: datetime | None = Field(default=None, strict=False)
    withdrawn: datetime | None = Field(default=None, strict=False)

    @field_validator("modified", "withdrawn")
    @classmethod
    def _aware(cls, moment: datetime | None) -> datetime | None:
        return moment.replace(tzinfo=UTC) if moment and moment.tzinfo is None else moment


def _parse_document(document: object) -> _Document:
    if not isinstance(document, dict):
        raise _Unusable(f"not an OSV record: the top level is {_kind(document)}, not a mapping")
    try:
        return _Document.model_validate(document)
    except ValidationError as error:
        first, *others = error.errors(include_url=False)
        message = first["msg"].removeprefix("Value error, ")
        if others:
            message += f" (and {len(others)} more problems)"
        raise _Unusable(message, _field_path(first["loc"])) from None


def _kind(value: object) -> str:
    return "empty" if value is None else f"a {type(value).__name__}"


def _field_path(loc: Iterable[int | str]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path


# --- turning a record into an advisory -------------------------------------------------------


def _advisory(path: Path, document: _Document, warnings: list[AdvisoryWarning]) -> Advisory:
    label = _SEVERITY_LABELS.get(str(document.database_specific.get("severity", "")).lower())
    packages = []
    for index, affected in enumerate(document.affected):
        if affected.package is None or affected.package.ecosystem != ECOSYSTEM:
            continue
        scores = affected.severity or document.severity
        field = f"affected[{index}].severity" if affected.severity else "severity"
        severity = label or _cvss_severity(scores, field, path, document.id, warnings)
        packages.append(_affected_package(affected, index, severity))
    return Advisory(
        id=document.id,
        aliases=tuple(document.aliases),
        summary=_summary(document),
        file=path,
        modified=document.modified,
        withdrawn=document.withdrawn is not None,
        packages=tuple(packages),
    )


def _summary(document: _Document) -> str:
    text = document.summary.strip() or next(iter(document.details.strip().splitlines()), "")
    return text if len(text) <= SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 1] + "…"


def _modified(advisory: Advisory) -> datetime:
    return advisory.modified or datetime.min.replace(tzinfo=UTC)


def _affected_package(affected: _Affected, index: int, severity: Severity) -> AffectedPackage:
    assert affected.package is not None
    ranges = []
    fixed: list[str] = []
    for range_index, version_range in enumerate(affected.ranges):
        field = f"affected[{index}].ranges[{range_index}]"
        if version_range.type not in _RANGE_TYPES:
            raise _Unusable(
                f"unknown range type {version_range.type!r} (expected one of "
                f"{', '.join(sorted(_RANGE_TYPES))})",
                f"{field}.type",
            )
        if version_range.type in _VERSION_RANGE_TYPES:
            ranges.append(_version_range(version_range.events, f"{field}.events"))
            fixed.extend(e.fixed for e in version_range.events if e.fixed is not None)
    return AffectedPackage(
        name=canonicalize_name(affected.package.name),
        ranges=tuple(ranges),
        versions=_listed_versions(affected.versions),
        fixed_versions=_sorted_versions(fixed),
        severity=severity,
    )


def _version_range(events: list[_Event], field: str) -> VersionRange:
    """Checks a range as the OSV schema requires it and sorts its events by version."""
    timeline: list[tuple[_Bound, int, str, str]] = []  # bound, index in the file, kind, value
    limits: list[_Bound] = []
    for index, event in enumerate(events):
        kind, value = event.kind_and_value
        bound = _bound(kind, value, f"{field}[{index}].{kind}")
        if kind == "limit":
            limits.append(bound)
        else:
            timeline.append((bound, index, kind, value))
    kinds = {kind for _, _, kind, _ in timeline}
    if "introduced" not in kinds:
        raise _Unusable("a range needs at least one introduced event", field)
    if {"fixed", "last_affected"} <= kinds:
        raise _Unusable("a range has fixed or last_affected events, not both", field)
    timeline.sort(key=lambda event: event[:2])  # the file's order breaks ties
    open_since: str | None = None
    for _, index, kind, value in timeline:
        if kind == "introduced":
            open_since = open_since or value
        elif open_since is None:
            raise _Unusable(
                f"events out of order: {kind} {value} ends no range (no introduced version "
                "before it and after the previous end)",
                f"{field}[{index}].{kind}",
            )
        else:
            open_since = None
    return VersionRange(
        events=tuple((kind, bound) for bound, _, kind, _ in timeline), limits=tuple(limits)
    )


def _bound(kind: str, value: str, field: str) -> _Bound:
    if kind == "introduced" and value == "0":
        return _START
    if kind == "limit" and "*" in value:
        return _INFINITY
    try:
        return _at(Version(value))
    except InvalidVersion:
        raise _Unusable(f"{value!r} is not a PEP 440 version", field) from None


def _listed_versions(listed: list[str]) -> tuple[Version, ...]:
    """The listed versions PEP 440 can read: PyPI still serves a few older release names, which
    no installed (PEP 440) version can equal, so leaving them out loses nothing."""
    versions = []
    for text in listed:
        try:
            versions.append(Version(text))
        except InvalidVersion:
            continue
    return tuple(versions)


def _listed(version: Version, public: Version, listed: Version) -> bool:
    """PEP 440's ==: a listed public version also covers its local builds (1.0 lists 1.0+cpu)."""
    return version == listed or (listed.local is None and public == listed)


def _sorted_versions(versions: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(versions), key=Version))


# --- severity --------------------------------------------------------------------------------


def _cvss_severity(
    scores: list[_SeverityScore],
    field: str,
    path: Path,
    advisory_id: str,
    warnings: list[AdvisoryWarning],
) -> Severity:
    """The highest CVSS rating among the scores; unknown when there is none to compute."""
    ratings: list[Severity] = []
    for index, score in enumerate(scores):
        if score.type not in _CVSS_PARSERS:
            continue  # e.g. Ubuntu priorities: not CVSS
        try:
            ratings.append(cvss_rating(score.type, score.score))
        except ValueError as error:
            warnings.append(
                AdvisoryWarning(
                    path, f"{error}; severity left unknown", advisory_id, f"{field}[{index}].score"
                )
            )
    return max(ratings, key=_severity_rank, default="unknown")


_CVSS_PARSERS: dict[str, type[CVSS2] | type[CVSS3] | type[CVSS4]] = {
    "CVSS_V2": CVSS2,
    "CVSS_V3": CVSS3,
    "CVSS_V4": CVSS4,
}


def cvss_base_score(kind: str, vector: str) -> float:
    """The base score of a CVSS vector of OSV severity type `kind` (CVSS_V2, _V3 or _V4),
    computed by the `cvss` library; ValueError naming the vector when it is malformed."""
    try:
        return float(_CVSS_PARSERS[kind](vector).base_score)
    except (CVSSError, KeyError) as error:
        raise ValueError(f"CVSS vector {vector!r} ({kind}) is malformed: {error}") from error


def cvss_rating(kind: str, vector: str) -> Severity:
    """The qualitative rating of the base score on the v3/v4 scale (section 5 of v3.1); a
    0.0 "none" counts as low."""
    score = cvss_base_score(kind, vector)
    if score >= 9.0:
        return "critical"
    if score >= 7.0:
        return "high"
    if score >= 4.0:
        return "medium"
    return "low"
