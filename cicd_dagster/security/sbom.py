"""CycloneDX 1.6 JSON SBOM of one build: the repository at its commit, the resolved Python
dependencies of the build environment and the files the build produced."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from uuid import UUID

from cyclonedx.contrib.license.factories import LicenseFactory
from cyclonedx.model import (
    ExternalReference,
    ExternalReferenceType,
    HashAlgorithm,
    HashType,
    Property,
    XsUri,
)
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from cicd_dagster.artifact_store import file_sha256
from cicd_dagster.security.dependencies import Dependency

SPEC_VERSION = "1.6"
RECORD_PROPERTY = "cicd-dagster:dist-info:record-sha256"
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class SbomError(ValueError):
    """Input that cannot go into an SBOM; the message names the artifact or field."""


@dataclass(frozen=True)
class ArtifactFile:
    name: str  # path relative to the checkout, "/"-separated
    sha256: str

    @classmethod
    def from_file(cls, root: Path, path: Path) -> ArtifactFile:
        """Hash `path` and name it relative to `root`; it must be a file inside `root`."""
        real_root, real = root.resolve(), (root / path).resolve()
        if not real.is_relative_to(real_root):
            raise SbomError(f"artifact {path}: outside {root}")
        if not real.is_file():
            raise SbomError(f"artifact {path}: not a file")
        return cls(real.relative_to(real_root).as_posix(), file_sha256(real))


@dataclass(frozen=True)
class SbomSummary:
    component_count: int  # libraries + files (the metadata component not counted)
    library_count: int
    file_count: int
    licenses: dict[str, int]  # licence expression -> dependencies declaring it; "unknown"


@dataclass(frozen=True)
class Sbom:
    json: str
    summary: SbomSummary
    serial_number: str  # urn:uuid:...


def _purl(dependency: Dependency) -> PackageURL:
    return PackageURL(type="pypi", name=dependency.name, version=dependency.version)


def _library(dependency: Dependency) -> Component:
    purl = _purl(dependency)
    hashes = []
    if dependency.archive_sha256:
        hashes.append(HashType(alg=HashAlgorithm.SHA_256, content=dependency.archive_sha256))
    properties = []
    if dependency.record_sha256:
        properties.append(Property(name=RECORD_PROPERTY, value=dependency.record_sha256))
    licenses = [LicenseFactory().make_from_string(dependency.license)] if dependency.license else []
    return Component(
        type=ComponentType.LIBRARY,
        name=dependency.name,
        version=dependency.version,
        purl=purl,
        bom_ref=purl.to_string(),
        description=dependency.summary,
        licenses=licenses,
        hashes=hashes,
        properties=properties,
    )


def _file(artifact: ArtifactFile) -> Component:
    if not _SHA256.fullmatch(artifact.sha256):
        raise SbomError(
            f"artifact {artifact.name}: sha256 {artifact.sha256!r} is not 64 hex digits"
        )
    return Component(
        type=ComponentType.FILE,
        name=artifact.name,
        bom_ref=f"file:{artifact.name}",
        hashes=[HashType(alg=HashAlgorithm.SHA_256, content=artifact.sha256)],
    )


def _unique(components: list[Component], what: str) -> None:
    refs = Counter(str(c.bom_ref.value) for c in components)
    if duplicates := sorted(ref for ref, count in refs.items() if count > 1):
        raise SbomError(f"{what} listed more than once: {', '.join(duplicates)}")


def build_sbom(
    repository: str,
    commit: str,
    dependencies: Sequence[Dependency],
    artifacts: Sequence[ArtifactFile],
    *,
    repository_url: str | None = None,
    timestamp: datetime | None = None,
    serial_number: UUID | None = None,
) -> Sbom:
    """The SBOM of `repository` built at `commit`.

    The dependency graph comes from each distribution's Requires-Dist: the repository
    depends on the distributions nothing else requires, each distribution on what it
    requires. `timestamp` and `serial_number` default to now and a random UUID; pass them
    to make the document reproducible.
    """
    if not _COMMIT.fullmatch(commit):
        raise SbomError(f"commit {commit!r} is not a full hex commit id")
    root = Component(
        type=ComponentType.APPLICATION,
        name=repository,
        version=commit,
        bom_ref=f"{repository}@{commit}",
        external_references=(
            [ExternalReference(type=ExternalReferenceType.VCS, url=XsUri(repository_url))]
            if repository_url
            else []
        ),
    )
    libraries = [_library(d) for d in dependencies]
    _unique(libraries, "dependency")
    files = [_file(a) for a in artifacts]
    _unique(files, "artifact")
    # A name maps to several components only in a broken environment with two versions.
    by_name: dict[str, list[Component]] = {}
    for dependency, library in zip(dependencies, libraries, strict=True):
        by_name.setdefault(dependency.name, []).append(library)

    bom = Bom(serial_number=serial_number) if serial_number else Bom()
    bom.metadata.component = root
    if timestamp is not None:
        bom.metadata.timestamp = timestamp
    bom.components.update([*libraries, *files])
    required = {name for d in dependencies for name in d.requires}
    bom.register_dependency(root, [c for n, cs in by_name.items() if n not in required for c in cs])
    for dependency, library in zip(dependencies, libraries, strict=True):
        bom.register_dependency(
            library, [c for n in dependency.requires for c in by_name.get(n, [])]
        )

    licenses = Counter(d.license or "unknown" for d in dependencies)
    summary = SbomSummary(
        component_count=len(libraries) + len(files),
        library_count=len(libraries),
        file_count=len(files),
        licenses=dict(sorted(licenses.items())),
    )
    return Sbom(JsonV1Dot6(bom).output_as_string(indent=2), summary, bom.serial_number.urn)


def sbom_libraries(text: str, source: str) -> list[tuple[str, str]]:
    """The (name, version) of every PyPI library a CycloneDX JSON SBOM lists: what a rescan
    matches against advisories. SbomError names `source` when the document is unusable."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise SbomError(f"{source}: not JSON ({error})") from error
    if not isinstance(document, dict) or document.get("bomFormat") != "CycloneDX":
        raise SbomError(f"{source}: not a CycloneDX SBOM (no bomFormat CycloneDX)")
    components = document.get("components", [])
    if not isinstance(components, list):
        raise SbomError(f"{source}: components is not a list")
    libraries = []
    for index, component in enumerate(components):
        purl = component.get("purl") if isinstance(component, dict) else None
        if not isinstance(purl, str) or not purl.startswith("pkg:pypi/"):
            continue
        try:
            parsed = PackageURL.from_string(purl)
        except ValueError as error:
            raise SbomError(f"{source}: components[{index}].purl {purl!r}: {error}") from error
        if not parsed.version:
            raise SbomError(f"{source}: components[{index}].purl {purl!r} has no version")
        libraries.append((parsed.name, parsed.version))
    return libraries
