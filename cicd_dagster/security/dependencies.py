"""The distributions installed in a build's virtual environment, read from its files.

Only the *.dist-info folders are read (core metadata, RECORD, PEP 610 direct_url.json):
nothing from the environment is imported or run, so a hostile package cannot act here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from packaging.metadata import parse_email
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import InvalidName, canonicalize_name

from cicd_dagster.artifact_store import file_sha256
from cicd_dagster.security.licenses import declared_license


class DependencyError(Exception):
    """The environment folder cannot be read as a Python virtual environment."""


@dataclass(frozen=True)
class Dependency:
    name: str  # normalised per PEP 503: lower case, runs of -_. as one "-"
    version: str  # as declared in METADATA
    license: str | None  # SPDX expression where one is known, else the declared name
    license_source: str | None  # "License-Expression", "License" or "classifiers"
    summary: str | None
    # Names of the installed distributions this one requires (extras left out, since
    # which extras were asked for is not recorded in the environment).
    requires: tuple[str, ...] = ()
    # sha256 of the archive it was installed from, when the installer recorded it (PEP 610).
    archive_sha256: str | None = None
    # sha256 of RECORD, which lists every installed file with its hash: a fingerprint of
    # the installed content.
    record_sha256: str | None = None
    dist_info: str = ""  # folder name under site-packages


@dataclass
class ResolvedDependencies:
    dependencies: list[Dependency]
    warnings: list[str] = field(default_factory=list)
    site_packages: list[Path] = field(default_factory=list)


def site_packages_dirs(env_dir: Path) -> list[Path]:
    """The site-packages folders of a virtual environment (POSIX and Windows layouts)."""
    if not env_dir.is_dir():
        raise DependencyError(f"{env_dir}: no such environment folder")
    candidates = [
        *sorted(env_dir.glob("lib*/python*/site-packages")),
        env_dir / "Lib/site-packages",
    ]
    # lib64 is often a symlink to lib: one entry per real folder.
    found = {p.resolve(): p for p in reversed(candidates) if p.is_dir()}
    if not found:
        raise DependencyError(
            f"{env_dir}: not a virtual environment "
            "(no lib/python*/site-packages or Lib/site-packages)"
        )
    return sorted(found.values())


def _archive_sha256(dist_info: Path, warnings: list[str]) -> str | None:
    path = dist_info / "direct_url.json"
    if not path.is_file():
        return None
    try:
        archive = json.loads(path.read_text(encoding="utf-8")).get("archive_info") or {}
        digest = (archive.get("hashes") or {}).get("sha256")
        if digest is None and str(archive.get("hash", "")).startswith("sha256="):
            digest = archive["hash"].removeprefix("sha256=")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
        warnings.append(f"{path}: unreadable direct_url.json ignored: {error}")
        return None
    return str(digest) if digest else None


@dataclass(frozen=True)
class _Read:
    dependency: Dependency
    requirements: tuple[Requirement, ...]


def _read_dist_info(dist_info: Path, warnings: list[str]) -> _Read | None:
    metadata = dist_info / "METADATA"
    try:
        raw, unparsed = parse_email(metadata.read_bytes())
    except (OSError, ValueError) as error:
        warnings.append(f"{metadata}: skipped, cannot read: {error}")
        return None
    if unparsed:
        # Undecodable or unknown fields: the rest of the file is still good.
        warnings.append(f"{metadata}: fields not understood and ignored: {', '.join(unparsed)}")
    declared = {"Name": raw.get("name", "").strip(), "Version": raw.get("version", "").strip()}
    if missing := [key for key, value in declared.items() if not value]:
        warnings.append(f"{metadata}: skipped, no {' and '.join(missing)} field")
        return None
    try:
        name = canonicalize_name(declared["Name"], validate=True)
    except InvalidName:
        warnings.append(f"{metadata}: skipped, invalid Name {declared['Name']!r}")
        return None
    requirements = []
    for line in raw.get("requires_dist", []):
        try:
            requirements.append(Requirement(line))
        except InvalidRequirement as error:
            warnings.append(f"{metadata}: Requires-Dist {line!r} ignored: {error}")
    license_, source = declared_license(
        raw.get("license_expression"), raw.get("license"), raw.get("classifiers", [])
    )
    record = dist_info / "RECORD"
    dependency = Dependency(
        name=name,
        version=declared["Version"],
        license=license_,
        license_source=source,
        summary=(raw.get("summary") or "").strip() or None,
        archive_sha256=_archive_sha256(dist_info, warnings),
        record_sha256=file_sha256(record) if record.is_file() else None,
        dist_info=dist_info.name,
    )
    return _Read(dependency, tuple(requirements))


def _installed_requirements(
    requirements: Iterable[Requirement], installed: set[str]
) -> tuple[str, ...]:
    names = {
        canonicalize_name(r.name)
        for r in requirements
        if not (r.marker and "extra" in str(r.marker))
    }
    return tuple(sorted(names & installed))


def resolved_dependencies(env_dir: Path) -> ResolvedDependencies:
    """Every distribution installed in the virtual environment at `env_dir`, sorted by name.

    A dist-info folder whose METADATA is missing or malformed is skipped with a warning
    naming the file; so is one that is a link out of site-packages. Raises DependencyError
    when `env_dir` is not a virtual environment.
    """
    warnings: list[str] = []
    folders = site_packages_dirs(env_dir)
    reads: list[_Read] = []
    for site_packages in folders:
        root = site_packages.resolve()
        for dist_info in sorted(site_packages.glob("*.dist-info")):
            if not dist_info.resolve().is_relative_to(root):
                warnings.append(f"{dist_info}: skipped, links outside {site_packages}")
                continue
            if (read := _read_dist_info(dist_info, warnings)) is not None:
                reads.append(read)
    installed = {read.dependency.name for read in reads}
    unique: dict[tuple[str, str], Dependency] = {}
    for read in reads:
        dependency = read.dependency
        key = (dependency.name, dependency.version)
        if key in unique:
            warnings.append(
                f"{dependency.dist_info}: {dependency.name} {dependency.version} is installed "
                f"twice (also {unique[key].dist_info}); counted once"
            )
            continue
        requires = _installed_requirements(read.requirements, installed - {dependency.name})
        unique[key] = replace(dependency, requires=requires)
    names = [name for name, _version in unique]
    for name in sorted({n for n in names if names.count(n) > 1}):
        versions = ", ".join(v for n, v in unique if n == name)
        warnings.append(f"{env_dir}: {name} is installed in several versions: {versions}")
    return ResolvedDependencies(
        sorted(unique.values(), key=lambda d: (d.name, d.version)), warnings, folders
    )


def lock_digest(dependencies: Iterable[Dependency]) -> str:
    """sha256 (hex) of the sorted "name==version" lines: the lock of the environment, as
    provenance's resolvedDependencies records it."""
    lines = sorted({f"{d.name}=={d.version}" for d in dependencies})
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()
