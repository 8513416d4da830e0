"""Signed build provenance: an in-toto Statement v1 carrying a SLSA provenance v1 predicate,
in a DSSE envelope signed with a local ed25519 key.

Specs followed: https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md,
https://slsa.dev/provenance/v1 and https://github.com/secure-systems-lab/dsse (protocol.md,
envelope.md). Subjects are matched by name *and* sha256, so a verifier also learns which
file is which.

The signing key must stay out of reach of build steps. This module does its share: it refuses
a key file that anyone but its owner may read or write, that another user owns, or that sits
in a folder others may write to (where the key could be swapped), and it creates new keys
0600 in a 0700 folder. The rest is deployment: keep the key outside the state folder that
steps can see and run steps as another uid (see the README).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
import uuid
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from packaging.utils import canonicalize_name

from cicd_dagster.artifact_store import file_sha256

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
# The template a cicd-dagster build follows: .cicd.yml's install, steps and artifact globs at
# the commit in resolvedDependencies. A URN: the project has no public home to resolve to yet.
BUILD_TYPE = "urn:cicd-dagster:buildtype:cicd-yml:v1"

_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_OBJECT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]+")
# `git@host:org/repo.git`, git's scp-like syntax for ssh.
_SCP_LIKE = re.compile(r"(?P<user>[^@/:]+@)?(?P<host>[^/:]+):(?P<path>(?!/).+)")

Reason = Literal[
    "envelope", "payload_type", "signature", "statement", "artifact", "builder", "commit"
]


class SigningKeyError(Exception):
    """The signing or verification key cannot be used; names the file and the cause."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ProvenanceError(Exception):
    """Provenance cannot be built or does not verify. `reason` says which part failed
    (the envelope, its payload type, the signature, the statement, an artifact, the builder,
    the commit), the message says how."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(reason, message)
        self.reason: Reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


class Subject(NamedTuple):
    """A build output: its name (a relative path in the artifact store) and sha256 (hex)."""

    name: str
    sha256: str


@dataclass(frozen=True)
class ResolvedDependency:
    """A SLSA ResourceDescriptor of something the build used: the commit, a lock, a package."""

    digest: Mapping[str, str] = field(default_factory=dict)
    uri: str | None = None
    name: str | None = None

    @classmethod
    def lock_file(cls, path: Path, name: str | None = None) -> ResolvedDependency:
        """A dependency lock (requirements.txt, `pip freeze` output...) by its sha256."""
        return cls(digest={"sha256": file_sha256(path)}, name=name or path.name)

    @classmethod
    def pypi(cls, name: str, version: str, sha256: str | None = None) -> ResolvedDependency:
        """A resolved Python package as a purl, with the wheel's sha256 when known."""
        return cls(
            uri=f"pkg:pypi/{canonicalize_name(name)}@{version}",
            digest={"sha256": sha256} if sha256 else {},
        )

    def to_json(self) -> dict[str, Any]:
        for algorithm, value in self.digest.items():
            if not _HEX.fullmatch(value):
                raise ProvenanceError(
                    "statement",
                    f"dependency {self.uri or self.name}: digest {algorithm} {value!r} "
                    "is not lowercase hex",
                )
        if not self.uri and not self.digest:
            raise ProvenanceError("statement", f"dependency {self.name!r} needs a uri or a digest")
        descriptor: dict[str, Any] = {}
        if self.uri:
            descriptor["uri"] = self.uri
        if self.digest:
            descriptor["digest"] = dict(self.digest)
        if self.name:
            descriptor["name"] = self.name
        return descriptor


@dataclass(frozen=True)
class VerifiedProvenance:
    """What a verified envelope vouches for; only `verify` makes one."""

    keyid: str
    subjects: tuple[Subject, ...]
    builder_id: str
    build_type: str
    commit_sha: str | None
    invocation_id: str | None
    started_on: str | None
    finished_on: str | None
    statement: dict[str, Any] = field(repr=False, compare=False)


def key_id(public_key: Ed25519PublicKey) -> str:
    """The sha256 (hex) of the key's DER SubjectPublicKeyInfo: names the key and its type."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class SigningKey:
    """An ed25519 private key read from a PEM file that only its owner can read."""

    path: Path
    private_key: Ed25519PrivateKey = field(repr=False)

    @classmethod
    def load(cls, path: Path, *, create: bool = False) -> SigningKey:
        """Read the key at `path`; when it is missing and `create`, make a new one there
        (0600, in a folder created 0700). SigningKeyError for anything else: never unsigned."""
        if create and not path.exists():
            _create_key_file(path)
        return cls(path, _read_private_key(path))

    @property
    def keyid(self) -> str:
        return key_id(self.private_key.public_key())

    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def public_key_pem(self) -> str:
        """The public key for verifiers (SubjectPublicKeyInfo PEM)."""
        return (
            self.private_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode("ascii")
        )


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A verifier's ed25519 public key from a PEM file (SubjectPublicKeyInfo)."""
    data = _read_key_bytes(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as error:
        raise SigningKeyError(path, f"is not a PEM public key ({error})") from error
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(path, f"holds a key of type {_key_kind(key)}, not ed25519")
    return key


def statement(
    subjects: Sequence[Subject | tuple[str, str]],
    *,
    repository_url: str,
    commit_sha: str,
    builder_id: str,
    invocation_id: str,
    started_on: datetime,
    finished_on: datetime,
    ref: str | None = None,
    dependencies: Sequence[ResolvedDependency] = (),
    build_type: str = BUILD_TYPE,
    external_parameters: Mapping[str, Any] | None = None,
    internal_parameters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The in-toto Statement v1 with a SLSA provenance v1 predicate for one build.

    The git commit is the first resolved dependency (`gitCommit` digest), then `dependencies`
    (the lock, resolved packages). externalParameters are the repository and ref (credentials
    removed from the URL), updated with `external_parameters`. `invocation_id` is the Dagster
    run id; times must be timezone-aware and are written in UTC (RFC 3339, "Z").
    """
    checked = _check_subjects([Subject(*subject) for subject in subjects])
    if not _GIT_OBJECT.fullmatch(commit_sha):
        raise ProvenanceError(
            "statement", f"commit {commit_sha!r} is not a full lowercase hex git object id"
        )
    started, finished = _timestamp(started_on), _timestamp(finished_on)
    if finished_on < started_on:
        raise ProvenanceError(
            "statement", f"the build finished ({finished_on}) before it started ({started_on})"
        )
    repository = _without_credentials(repository_url)
    build_definition: dict[str, Any] = {
        "buildType": build_type,
        "externalParameters": {"repository": repository, "ref": ref or commit_sha}
        | dict(external_parameters or {}),
        "resolvedDependencies": [
            {"uri": _git_uri(repository, ref), "digest": {"gitCommit": commit_sha}},
            *(dependency.to_json() for dependency in dependencies),
        ],
    }
    if internal_parameters:
        build_definition["internalParameters"] = dict(internal_parameters)
    return {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": subject.name, "digest": {"sha256": subject.sha256}} for subject in checked
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": build_definition,
            "runDetails": {
                "builder": {"id": builder_id},
                "metadata": {
                    "invocationId": invocation_id,
                    "startedOn": started,
                    "finishedOn": finished,
                },
            },
        },
    }


def pae(payload_type: str, body: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(body), body)


def sign(statement: Mapping[str, Any], key: SigningKey) -> dict[str, Any]:
    """The DSSE envelope of `statement`, signed with `key`.

    The statement is checked as verify would check it first, so nothing is signed that
    could not be verified.
    """
    _parse_statement(dict(statement))
    body = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode("utf-8")
    signature = key.private_key.sign(pae(PAYLOAD_TYPE, body))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(body).decode("ascii"),
        "signatures": [{"keyid": key.keyid, "sig": base64.b64encode(signature).decode("ascii")}],
    }


def read_envelope(path: Path) -> dict[str, Any]:
    """A DSSE envelope from a JSON file; ProvenanceError naming the file if it is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise ProvenanceError("envelope", f"{path}: envelope file does not exist") from error
    except (OSError, UnicodeDecodeError) as error:
        raise ProvenanceError("envelope", f"{path}: cannot be read: {error}") from error
    try:
        envelope = json.loads(text)
    except json.JSONDecodeError as error:
        raise ProvenanceError(
            "envelope",
            f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno})",
        ) from error
    if not isinstance(envelope, dict):
        raise ProvenanceError("envelope", f"{path}: a DSSE envelope is a JSON object")
    return envelope


def verify(
    envelope: Mapping[str, Any],
    public_key: Ed25519PublicKey,
    artifacts: Mapping[str, Path],
    *,
    builder_id: str | None = None,
    commit_sha: str | None = None,
) -> VerifiedProvenance:
    """Check the envelope's signature with `public_key`, its payload type and statement, and
    that `artifacts` (subject name -> file) are exactly the subjects, each with its sha256.

    With `builder_id` or `commit_sha`, the statement must also name that builder and have
    that commit among its resolved dependencies. ProvenanceError says what failed.
    """
    payload_type, body, signatures = _parse_envelope(envelope)
    expected_keyid = key_id(public_key)
    message = pae(payload_type, body)
    if not any(_signature_verifies(public_key, sig, message) for _, sig in signatures):
        named = sorted({keyid for keyid, _ in signatures if keyid})
        hint = (
            f"; the envelope names key {', '.join(named)}, the given key is {expected_keyid}"
            if named and expected_keyid not in named
            else ""
        )
        raise ProvenanceError(
            "signature",
            "the signature does not verify: the statement or the signature was changed "
            f"after signing, or another key signed it{hint}",
        )
    if payload_type != PAYLOAD_TYPE:
        raise ProvenanceError(
            "payload_type", f"payloadType {payload_type!r} is not {PAYLOAD_TYPE!r}"
        )
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProvenanceError("statement", f"the payload is not JSON: {error}") from error
    if not isinstance(document, dict):
        raise ProvenanceError("statement", "the payload is not a JSON object")
    subjects = _parse_statement(document)
    _check_artifacts(subjects, artifacts)
    predicate = document["predicate"]
    definition, run_details = predicate["buildDefinition"], predicate["runDetails"]
    signed_builder = run_details["builder"]["id"]
    if builder_id is not None and signed_builder != builder_id:
        raise ProvenanceError(
            "builder", f"built by {signed_builder!r}, not by the expected {builder_id!r}"
        )
    commits = [
        dependency["digest"]["gitCommit"]
        for dependency in definition.get("resolvedDependencies") or []
        if isinstance(dependency, dict)
        and isinstance(dependency.get("digest"), dict)
        and "gitCommit" in dependency["digest"]
    ]
    if commit_sha is not None and commit_sha not in commits:
        raise ProvenanceError(
            "commit",
            f"the provenance is for commit {', '.join(commits) or '(none)'}, not {commit_sha}",
        )
    metadata = run_details.get("metadata") or {}
    return VerifiedProvenance(
        keyid=expected_keyid,
        subjects=subjects,
        builder_id=signed_builder,
        build_type=definition["buildType"],
        commit_sha=commits[0] if commits else None,
        invocation_id=metadata.get("invocationId"),
        started_on=metadata.get("startedOn"),
        finished_on=metadata.get("finishedOn"),
        statement=document,
    )


def _create_key_file(path: Path) -> None:
    """Write a new key without ever exposing a partial or world-readable file: a private
    temporary file, then a hard link that fails if another process made the key first."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as error:
        raise SigningKeyError(path, f"cannot create its folder: {error.strerror}") from error
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)  # whatever the umask
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        with suppress(FileExistsError):  # another process created it first: use that one
            os.link(temporary, path)
    except OSError as error:
        raise SigningKeyError(path, f"cannot create the key: {error.strerror}") from error
    finally:
        temporary.unlink(missing_ok=True)


def _read_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read_key_bytes(path, private=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as error:  # raised for a passphrase-protected key
        raise SigningKeyError(
            path, "is encrypted with a passphrase; the signer needs an unencrypted key (0600)"
        ) from error
    except (ValueError, UnsupportedAlgorithm) as error:
        raise SigningKeyError(path, f"is not a PEM private key ({error})") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(path, f"holds a key of type {_key_kind(key)}, not ed25519")
    return key


def _read_key_bytes(path: Path, *, private: bool = False) -> bytes:
    """The file's bytes; for a private key, only if no one but its owner can read or
    replace it. The checks use the opened file (fstat), so a swap cannot slip between."""
    try:
        with path.open("rb") as handle:
            status = os.fstat(handle.fileno())
            if not stat.S_ISREG(status.st_mode):
                raise SigningKeyError(path, "is not a regular file")
            if private:
                _check_private(path, status)
            return handle.read()
    except FileNotFoundError as error:
        raise SigningKeyError(path, "key file does not exist") from error
    except OSError as error:
        raise SigningKeyError(path, f"cannot be read: {error.strerror}") from error


def _check_private(path: Path, status: os.stat_result) -> None:
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077:
        raise SigningKeyError(
            path,
            f"has mode {mode:04o}: group or others may access the signing key; "
            f"run `chmod 600 {path}`",
        )
    if status.st_uid != os.geteuid():
        raise SigningKeyError(
            path, f"is owned by uid {status.st_uid}, not by this process's uid {os.geteuid()}"
        )
    folder = path.parent
    folder_mode = stat.S_IMODE(folder.stat().st_mode)
    if folder_mode & 0o022:
        raise SigningKeyError(
            path,
            f"its folder {folder} has mode {folder_mode:04o}: others could replace the key; "
            f"run `chmod go-w {folder}`",
        )


def _key_kind(key: object) -> str:
    return type(key).__name__.removeprefix("_").removesuffix("PrivateKey").removesuffix("PublicKey")


def _timestamp(moment: datetime) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ProvenanceError("statement", f"time {moment} has no timezone")
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _without_credentials(url: str) -> str:
    """The URL without user:password@ (tokens live there); ssh keeps its user name."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.scheme in {"ssh", "git+ssh"} or "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _git_uri(repository: str, ref: str | None) -> str:
    """An SPDX-style `git+` download location for the repository at `ref`."""
    if "://" in repository:
        scheme, rest = repository.split("://", 1)
        base = f"{scheme.lower()}://{rest}"
        uri = base if scheme.lower().startswith("git") else f"git+{base}"
    elif match := _SCP_LIKE.fullmatch(repository):
        uri = f"git+ssh://{match['user'] or ''}{match['host'].lower()}/{match['path']}"
    else:
        uri = f"git+{Path(repository).absolute().as_uri()}"
    return f"{uri}@{ref}" if ref else uri


def _check_subjects(subjects: Sequence[Subject]) -> tuple[Subject, ...]:
    seen: set[str] = set()
    for subject in subjects:
        name = subject.name
        if (
            not isinstance(name, str)
            or not name
            or PurePosixPath(name).is_absolute()
            or ".." in PurePosixPath(name).parts
            or "\\" in name
            or "\0" in name
        ):
            raise ProvenanceError(
                "statement", f"subject name {name!r} is not a relative path inside the store"
            )
        if name in seen:
            raise ProvenanceError("statement", f"subject {name!r} is listed twice")
        seen.add(name)
        if not isinstance(subject.sha256, str) or not _SHA256.fullmatch(subject.sha256):
            raise ProvenanceError(
                "statement", f"subject {name!r}: {subject.sha256!r} is not a lowercase sha256"
            )
    if not seen:
        raise ProvenanceError("statement", "a statement needs at least one subject")
    return tuple(subjects)


def _parse_statement(document: dict[str, Any]) -> tuple[Subject, ...]:
    """The subjects of a Statement v1 with a SLSA provenance v1 predicate; checks its shape."""

    def require(condition: bool, what: str) -> None:
        if not condition:
            raise ProvenanceError("statement", f"the statement {what}")

    require(
        document.get("_type") == STATEMENT_TYPE,
        f"has _type {document.get('_type')!r}, not {STATEMENT_TYPE!r}",
    )
    require(
        document.get("predicateType") == PREDICATE_TYPE,
        f"has predicateType {document.get('predicateType')!r}, not {PREDICATE_TYPE!r}",
    )
    # Any: `require` checks the shapes, which mypy cannot follow through a call.
    entries: Any = document.get("subject")
    require(isinstance(entries, list), "has no subject list")
    subjects = []
    for index, entry in enumerate(entries):
        digest: Any = entry.get("digest") if isinstance(entry, dict) else None
        require(
            isinstance(digest, dict) and isinstance(entry.get("name"), str),
            f"subject {index} has no name and digest",
        )
        require("sha256" in digest, f"subject {entry['name']!r} has no sha256 digest")
        subjects.append(Subject(entry["name"], digest["sha256"]))
    predicate: Any = document.get("predicate")
    require(isinstance(predicate, dict), "has no predicate object")
    definition: Any = predicate.get("buildDefinition")
    run_details: Any = predicate.get("runDetails")
    require(
        isinstance(definition, dict) and isinstance(definition.get("buildType"), str),
        "has no predicate.buildDefinition.buildType",
    )
    require(
        isinstance(definition.get("externalParameters"), dict),
        "has no predicate.buildDefinition.externalParameters object",
    )
    builder = run_details.get("builder") if isinstance(run_details, dict) else None
    require(
        isinstance(builder, dict) and isinstance(builder.get("id"), str),
        "has no predicate.runDetails.builder.id",
    )
    return _check_subjects(subjects)


def _parse_envelope(envelope: Mapping[str, Any]) -> tuple[str, bytes, list[tuple[str, bytes]]]:
    """payloadType, the decoded payload and the decoded (keyid, sig) pairs, or
    ProvenanceError("envelope") naming the missing or malformed field."""

    def fail(what: str) -> ProvenanceError:
        return ProvenanceError("envelope", f"the DSSE envelope {what}")

    if not isinstance(envelope, Mapping):
        raise fail("is not a JSON object")
    payload_type, payload = envelope.get("payloadType"), envelope.get("payload")
    entries = envelope.get("signatures")
    if not isinstance(payload_type, str):
        raise fail("has no payloadType string")
    if not isinstance(payload, str):
        raise fail("has no payload string")
    if not isinstance(entries, list) or not entries:
        raise fail("has no signatures")
    try:
        body = _b64decode(payload)
    except binascii.Error as error:
        raise fail(f"payload is not valid base64 ({error})") from error
    signatures = []
    for index, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or not isinstance(entry.get("sig"), str):
            raise fail(f"signature {index} has no sig string")
        keyid = entry.get("keyid") or ""
        if not isinstance(keyid, str):
            raise fail(f"signature {index} has a keyid that is not a string")
        try:
            signatures.append((keyid, _b64decode(entry["sig"])))
        except binascii.Error as error:
            raise fail(f"signature {index} is not valid base64 ({error})") from error
    return payload_type, body, signatures


def _b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, padded or not: DSSE verifiers must accept either."""
    standard = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)


def _signature_verifies(public_key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        public_key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def _check_artifacts(subjects: Sequence[Subject], artifacts: Mapping[str, Path]) -> None:
    by_name = {subject.name: subject for subject in subjects}
    unlisted = sorted(set(artifacts) - set(by_name))
    if unlisted:
        raise ProvenanceError(
            "artifact", f"artifact {', '.join(unlisted)} is not a subject of the statement"
        )
    missing = sorted(set(by_name) - set(artifacts))
    if missing:
        raise ProvenanceError(
            "artifact", f"subject {', '.join(missing)} has no artifact file to check"
        )
    for name, path in sorted(artifacts.items()):
        try:
            actual = file_sha256(path)
        except OSError as error:
            raise ProvenanceError(
                "artifact", f"artifact {name} ({path}) cannot be read: {error.strerror}"
            ) from error
        if actual != by_name[name].sha256:
            raise ProvenanceError(
                "artifact",
                f"artifact {name} ({path}) has sha256 {actual}, "
                f"the signed statement says {by_name[name].sha256}",
            )
