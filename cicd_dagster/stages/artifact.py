"""sbom and artifact: a green build's outputs published, described and vouched for.

`run_sbom` describes the build (its resolved environment and its artifacts) as CycloneDX
in the commit's run folder. `publish_artifacts`, once the tests are green, puts the
artifacts and that SBOM into the content-addressed store under
``<repository>/<commit>/<name>`` and adds a signed SLSA provenance statement
(`PROVENANCE_NAME`) whose subjects are their digests. `verify_commit` checks it again
from the store alone, as `cicd verify` does.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from cicd_dagster.artifact_store import (
    ArtifactRow,
    ArtifactStore,
    ArtifactStoreError,
    file_sha256,
)
from cicd_dagster.config import ControlConfig, PipelineConfig
from cicd_dagster.security.dependencies import (
    DependencyError,
    ResolvedDependencies,
    lock_digest,
    resolved_dependencies,
)
from cicd_dagster.security.provenance import (
    ProvenanceError,
    ResolvedDependency,
    SigningKey,
    SigningKeyError,
    Subject,
    VerifiedProvenance,
    load_public_key,
    read_envelope,
    sign,
    statement,
    verify,
)
from cicd_dagster.security.sbom import ArtifactFile, SbomError, SbomSummary, build_sbom
from cicd_dagster.stages.build import BuildOutcome, load_build
from cicd_dagster.stages.context import StageContext, StageError
from cicd_dagster.store import ArtifactRecord, HistoryStore
from cicd_dagster.workspace import fingerprint

SBOM_STAGE = "sbom"
ARTIFACT_STAGE = "artifact"
SBOM_NAME = "sbom.cdx.json"
PROVENANCE_NAME = "provenance.intoto.jsonl"
BUILDER_ID = "urn:cicd-dagster:builder:local:v1"
LOCK_NAME = "python-environment.lock"
# Names the stage writes itself: a build artifact may not take them.
_RESERVED = (SBOM_NAME, PROVENANCE_NAME)
# Serial numbers of SBOMs are derived from what they describe: the same build, the same BOM.
_SBOM_NAMESPACE = uuid.UUID("6f1d3a52-93b5-4c47-9a43-2f0e8f6c1d7e")


def artifact_store(config: ControlConfig) -> ArtifactStore:
    return ArtifactStore(config.home / "artifacts")


def signing_key_path(config: ControlConfig) -> Path:
    return config.security.signing_key or config.home / "keys" / "signing.pem"


def public_key_path(config: ControlConfig) -> Path:
    """Where verifiers find the public key: next to the store, whatever signs."""
    return config.home / "keys" / "signing.pub"


@dataclass(frozen=True)
class SbomOutcome:
    path: Path
    sha256: str
    summary: SbomSummary
    lock_sha256: str
    serial_number: str
    duration_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    reused: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SbomOutcome:
        return cls(
            **{**data, "path": Path(data["path"]), "summary": SbomSummary(**data["summary"])}
        )


def _sbom_fingerprint(build: BuildOutcome) -> str:
    return fingerprint(SBOM_STAGE, build.fingerprint, [asdict(a) for a in build.artifacts])


def load_sbom(ctx: StageContext, pipeline: PipelineConfig) -> SbomOutcome:
    """The SBOM of this commit's finished build, for the artifact stage."""
    build = load_build(ctx, pipeline)
    stored = ctx.workspace.load_result(SBOM_STAGE, _sbom_fingerprint(build))
    if stored is not None:
        outcome = SbomOutcome.from_json(stored)
        if outcome.path.is_file() and file_sha256(outcome.path) == outcome.sha256:
            return outcome
    raise StageError(f"{ctx.sha} has no SBOM of its current build: materialize sbom")


def run_sbom(ctx: StageContext, pipeline: PipelineConfig) -> SbomOutcome:
    """The CycloneDX SBOM of the build's environment and artifacts, reused while the build
    is unchanged (so its digest, and the provenance naming it, stay the same)."""
    with ctx.workspace.stage_lock(SBOM_STAGE):
        started = time.monotonic()
        build = load_build(ctx, pipeline)
        this_fingerprint = _sbom_fingerprint(build)
        if not ctx.force:
            with suppress(StageError):
                return _reused(load_sbom(ctx, pipeline))
        try:
            resolved: ResolvedDependencies = resolved_dependencies(build.env_dir)
        except DependencyError as error:
            raise StageError(f"cannot read the build environment: {error}") from error
        files = [ArtifactFile(a.path, a.sha256) for a in build.artifacts]
        lock = lock_digest(resolved.dependencies)
        serial = uuid.uuid5(
            _SBOM_NAMESPACE, f"{ctx.repository.name}@{ctx.sha}:{lock}:{this_fingerprint}"
        )
        try:
            sbom = build_sbom(
                ctx.repository.name, ctx.sha, resolved.dependencies, files, serial_number=serial
            )
        except SbomError as error:
            raise StageError(f"cannot build the SBOM: {error}") from error
        path = ctx.workspace.run_dir / SBOM_NAME
        temporary = path.with_suffix(".tmp")
        temporary.write_text(sbom.json, encoding="utf-8")
        temporary.replace(path)
        outcome = SbomOutcome(
            path=path,
            sha256=file_sha256(path),
            summary=sbom.summary,
            lock_sha256=lock,
            serial_number=sbom.serial_number,
            duration_s=time.monotonic() - started,
            warnings=resolved.warnings,
        )
        ctx.workspace.save_result(SBOM_STAGE, this_fingerprint, outcome.to_json())
        return outcome


def _reused(outcome: SbomOutcome) -> SbomOutcome:
    return SbomOutcome(**{**outcome.__dict__, "reused": True, "duration_s": 0.0})


@dataclass(frozen=True)
class ArtifactOutcome:
    subjects: list[ArtifactRecord]
    """What the provenance vouches for: the build artifacts and the SBOM, as stored."""
    provenance: ArtifactRecord
    keyid: str
    public_key: Path
    invocation_id: str
    duration_s: float
    reused: bool = False
    """True when the store already held exactly these, signed: nothing was rewritten."""
    rebound: list[str] = field(default_factory=list)
    """Names whose stored digest this build changed (a rebuild with other bytes)."""

    @property
    def stored(self) -> list[ArtifactRecord]:
        return [*self.subjects, self.provenance]


def publish_artifacts(
    ctx: StageContext,
    pipeline: PipelineConfig,
    history: HistoryStore,
    *,
    invocation_id: str,
    started_on: datetime,
) -> ArtifactOutcome:
    """Store the build's artifacts and SBOM, sign their provenance, record them.

    The key is loaded first: with no usable key, nothing reaches the store. Re-publishing
    an unchanged build keeps the stored, signed provenance (same digests).
    """
    with ctx.workspace.stage_lock(ARTIFACT_STAGE):
        started = time.monotonic()
        build = load_build(ctx, pipeline)
        sbom = load_sbom(ctx, pipeline)
        key = _signing_key(ctx.config)
        files = _subject_files(ctx, build, sbom)
        store = artifact_store(ctx.config)
        repo, sha = ctx.repository.name, ctx.sha
        try:
            subjects = _put_subjects(store, files, build, ctx.workspace.run_dir)
            current = {row.name: row for row in store.list(repo) if row.commit == sha}
            public_key = _write_public_key(ctx.config, key)
            reused = _still_signed(store, repo, sha, current, subjects, key)
            if reused:
                row = current[PROVENANCE_NAME]
                provenance = ArtifactRecord(row.name, _hex(row.digest), row.size)
                rebound = []
            else:
                rebound = sorted(
                    s.path
                    for s in subjects
                    if s.path in current and current[s.path].digest != f"sha256:{s.sha256}"
                )
                envelope = sign(
                    statement(
                        [Subject(s.path, s.sha256) for s in subjects],
                        repository_url=ctx.repository.url,
                        commit_sha=sha,
                        ref=ctx.ref,
                        builder_id=BUILDER_ID,
                        invocation_id=invocation_id,
                        started_on=started_on,
                        finished_on=datetime.now(UTC),
                        dependencies=[
                            ResolvedDependency(digest={"sha256": sbom.lock_sha256}, name=LOCK_NAME)
                        ],
                    ),
                    key,
                )
                # The subjects are named before the statement that vouches for them; a
                # rebuild of the commit with other bytes rebinds them, then re-signs.
                for name, path in files.items():
                    store.add(repo, sha, name, path, within=ctx.workspace.run_dir, replace=True)
                body = (json.dumps(envelope, sort_keys=True) + "\n").encode()
                stored = store.add(repo, sha, PROVENANCE_NAME, body, replace=True)
                provenance = ArtifactRecord(PROVENANCE_NAME, _hex(stored.digest), stored.size)
        except (ArtifactStoreError, ProvenanceError) as error:
            raise StageError(f"cannot publish the artifacts of {sha}: {error}") from error
        outcome = ArtifactOutcome(
            subjects=subjects,
            provenance=provenance,
            keyid=key.keyid,
            public_key=public_key,
            invocation_id=invocation_id,
            duration_s=time.monotonic() - started,
            reused=reused,
            rebound=rebound,
        )
        history.record_artifacts(repo, sha, outcome.stored)
        return outcome


def _hex(digest: str) -> str:
    """The history DB and the statement keep bare hex; the store says sha256:<hex>."""
    return digest.removeprefix("sha256:")


def _signing_key(config: ControlConfig) -> SigningKey:
    # Only the default key is created on first use: a configured key that is missing is
    # a mistake (an unmounted secret), and a new key would not be the one verifiers trust.
    try:
        return SigningKey.load(signing_key_path(config), create=config.security.signing_key is None)
    except SigningKeyError as error:
        raise StageError(f"cannot sign provenance, nothing was published: {error}") from error


def _subject_files(ctx: StageContext, build: BuildOutcome, sbom: SbomOutcome) -> dict[str, Path]:
    files = {a.path: ctx.workspace.artifacts_dir / a.path for a in build.artifacts}
    if taken := sorted(set(files) & set(_RESERVED)):
        raise StageError(
            f"build artifact {', '.join(taken)} has a name the artifact stage writes itself; "
            "rename it in the build"
        )
    return {**files, SBOM_NAME: sbom.path}


def _put_subjects(
    store: ArtifactStore, files: dict[str, Path], build: BuildOutcome, within: Path
) -> list[ArtifactRecord]:
    """Store the blobs (not yet named) and check they are what the build produced: a test
    step can write into the artifacts folder, and nothing changed may be signed."""
    built = {a.path: a.sha256 for a in build.artifacts}
    subjects = []
    for name, path in files.items():
        stored = store.put(path, within=within)
        digest = _hex(stored.digest)
        if name in built and built[name] != digest:
            raise StageError(
                f"artifact {name} changed after the build: the build collected sha256 "
                f"{built[name]}, {path} now has {digest}; rebuild with --force"
            )
        subjects.append(ArtifactRecord(name, digest, stored.size))
    return subjects


def _still_signed(
    store: ArtifactStore,
    repository: str,
    sha: str,
    current: dict[str, ArtifactRow],
    subjects: list[ArtifactRecord],
    key: SigningKey,
) -> bool:
    """Whether the store already holds exactly these subjects with provenance signed by
    this key: then publishing again changes nothing."""
    wanted = {s.path: f"sha256:{s.sha256}" for s in subjects}
    named = {name: row.digest for name, row in current.items() if name != PROVENANCE_NAME}
    if named != wanted or PROVENANCE_NAME not in current:
        return False
    try:
        _verify_stored(store, repository, sha, current, key.public_key())
    except (ProvenanceError, ArtifactStoreError):
        return False
    return True


def _write_public_key(config: ControlConfig, key: SigningKey) -> Path:
    path = public_key_path(config)
    pem = key.public_key_pem()
    if path.is_file() and path.read_text(encoding="ascii") == pem:
        return path
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(pem, encoding="ascii")
    temporary.replace(path)
    return path


def verify_commit(
    config: ControlConfig, repository: str, sha: str, public_key: Path | None = None
) -> VerifiedProvenance:
    """Check the commit's stored provenance: signed by the public key (default: the one
    next to the store), for this commit and builder, and naming exactly the commit's stored
    artifacts with their digests. ProvenanceError or SigningKeyError says what failed."""
    store = artifact_store(config)
    try:
        rows = {row.name: row for row in store.list(repository) if row.commit == sha}
    except ArtifactStoreError as error:
        raise ProvenanceError("envelope", str(error)) from error
    if PROVENANCE_NAME not in rows:  # said before any key problem: the likelier news
        raise _no_provenance(store, repository, sha)
    key = load_public_key(public_key or public_key_path(config))
    return _verify_stored(store, repository, sha, rows, key)


def _no_provenance(store: ArtifactStore, repository: str, sha: str) -> ProvenanceError:
    return ProvenanceError(
        "envelope",
        f"{repository}@{sha[:12]} has no {PROVENANCE_NAME} in the artifact store "
        f"{store.root}: was its artifact stage materialized?",
    )


def _verify_stored(
    store: ArtifactStore,
    repository: str,
    sha: str,
    rows: dict[str, ArtifactRow],
    key: Ed25519PublicKey,
) -> VerifiedProvenance:
    if PROVENANCE_NAME not in rows:
        raise _no_provenance(store, repository, sha)
    files = {name: _blob(store, row) for name, row in rows.items()}
    envelope = read_envelope(files.pop(PROVENANCE_NAME))
    return verify(envelope, key, files, builder_id=BUILDER_ID, commit_sha=sha)


def _blob(store: ArtifactStore, row: ArtifactRow) -> Path:
    """The stored file of a named artifact, its content checked against its digest."""
    try:
        return store.path(row.digest)
    except ArtifactStoreError as error:
        raise ProvenanceError("artifact", f"{row.name}: {error}") from error
