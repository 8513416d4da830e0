"""A content-addressed, immutable artifact store with named references and retention.

Blobs are addressed by ``sha256:<hex>`` and stored once, read-only, by a pluggable
backend (the local filesystem by default: ``<root>/sha256/<2 hex>/<62 hex>``). Named
references say that ``<repository>/<commit>/<name>`` is a digest; they live in one JSON
index file per repository and commit (``<root>/refs/<repository>/<commit>.json``), which
the history DB can mirror. Names come from untrusted builds, so they are checked before
they are stored and again before they are written anywhere.

Layout of the local backend, all under one root so that renames stay atomic::

    sha256/ab/cdef...   blobs, mode 0444, never rewritten
    tmp/                blobs being written (a crash leaves a file here, never a half blob)
    refs/<repo>/<commit>.json
    locks/store.lock    serialises index writes against prune
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol

from cicd_dagster.locks import file_lock

_CHUNK = 1 << 20
_DIGEST = re.compile(r"^sha256:(?P<hex>[0-9a-f]{64})$")
# The same rules as cicd.yaml's repository names and workspace.py's commits: both become
# folder names, so nothing else may reach the filesystem.
_REPOSITORY = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_NAME_BYTES = 1024
_MAX_COMPONENT_BYTES = 255
# A reference written while prune had just deleted its blob is retried; more than this
# many lost races in a row means something deletes blobs continuously.
_ADD_ATTEMPTS = 3


class ArtifactStoreError(Exception):
    """Base class: every error of the store names the digest, name or file involved."""


class InvalidDigest(ArtifactStoreError, ValueError):
    pass


class UnsafeArtifactPath(ArtifactStoreError, ValueError):
    """A name or source that would read or write outside its folder."""


class ArtifactNotFound(ArtifactStoreError, LookupError):
    pass


class TamperedArtifact(ArtifactStoreError):
    """A stored blob whose content no longer matches its digest."""

    def __init__(self, digest: str, location: str, actual: str) -> None:
        super().__init__(
            f"artifact {digest} is damaged: {location} now hashes to {actual}; "
            "restore it from the build or delete it and rebuild"
        )
        self.digest = digest
        self.location = location
        self.actual = actual


class ReferenceConflict(ArtifactStoreError):
    pass


class ArtifactIndexError(ArtifactStoreError):
    """An index file that cannot be read; it is left as it is."""


@dataclass(frozen=True)
class StoredArtifact:
    digest: str
    """``sha256:<64 hex>``"""
    size: int
    created: bool
    """False when the content was already stored (deduplicated)."""


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    size: int
    stored_at: datetime


@dataclass(frozen=True)
class ArtifactRow:
    """One named reference: the row of ``cicd history artifacts`` and of the history DB."""

    repository: str
    commit: str
    name: str
    digest: str
    size: int
    stored_at: datetime


@dataclass(frozen=True)
class DamagedArtifact:
    digest: str
    location: str
    problem: str


@dataclass(frozen=True)
class PruneResult:
    blobs: list[BlobInfo]
    references: list[ArtifactRow]
    """The references that pointed at the deleted blobs, removed with them."""


class ArtifactBackend(Protocol):
    """Where blobs live. Content addressing is the backend's contract: `put` stores bytes
    under the sha256 it computes while storing them, atomically and never twice."""

    def put(self, chunks: Iterable[bytes]) -> StoredArtifact:
        """Store the content under the digest computed while storing it."""
        ...

    def open(self, digest: str) -> BinaryIO:
        """A seekable reader of the stored bytes; ArtifactNotFound if absent."""
        ...

    def exists(self, digest: str) -> bool: ...

    def delete(self, digest: str) -> None: ...

    def iter_blobs(self) -> Iterator[BlobInfo]: ...

    def location(self, digest: str) -> str:
        """Where the blob is, for error messages (a file path, a URL)."""
        ...


class LocalFilesystemBackend:
    """The default: each blob a read-only file named by its digest under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "sha256"
        self._tmp = root / "tmp"

    def blob_path(self, digest: str) -> Path:
        hex_digest = parse_digest(digest)
        return self._blobs / hex_digest[:2] / hex_digest[2:]

    def location(self, digest: str) -> str:
        return str(self.blob_path(digest))

    def put(self, chunks: Iterable[bytes]) -> StoredArtifact:
        self._tmp.mkdir(parents=True, exist_ok=True)
        # The temp file is in the store so that linking it into place is atomic.
        handle = tempfile.NamedTemporaryFile(dir=self._tmp, prefix="blob-", delete=False)  # noqa: SIM115
        temp = Path(handle.name)
        try:
            hasher = hashlib.sha256()
            size = 0
            with handle:
                for chunk in chunks:
                    hasher.update(chunk)
                    handle.write(chunk)
                    size += len(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temp, 0o444)
            digest = f"sha256:{hasher.hexdigest()}"
            final = self.blob_path(digest)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                # link, unlike rename, never replaces: of two writers of the same content
                # the first wins and the stored blob is never touched again.
                os.link(temp, final)
                created = True
            except FileExistsError:
                created = False
            _fsync_directory(final.parent)
        finally:
            temp.unlink(missing_ok=True)
        return StoredArtifact(digest, size, created)

    def open(self, digest: str) -> BinaryIO:
        path = self.blob_path(digest)
        try:
            return path.open("rb")
        except FileNotFoundError:
            raise ArtifactNotFound(f"artifact {digest} is not in the store ({path})") from None

    def exists(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def delete(self, digest: str) -> None:
        self.blob_path(digest).unlink(missing_ok=True)

    def iter_blobs(self) -> Iterator[BlobInfo]:
        if not self._blobs.is_dir():
            return
        for shard in sorted(self._blobs.iterdir()):
            for blob in sorted(shard.iterdir()):
                digest = f"sha256:{shard.name}{blob.name}"
                if not _DIGEST.match(digest):
                    continue  # not a blob this store wrote; never touched
                try:
                    info = blob.stat()
                except FileNotFoundError:
                    continue  # pruned meanwhile
                yield BlobInfo(digest, info.st_size, datetime.fromtimestamp(info.st_mtime, UTC))


class ArtifactStore:
    """Blobs through a backend, named references in JSON index files under `root`."""

    def __init__(self, root: Path, backend: ArtifactBackend | None = None) -> None:
        self.root = root
        self.backend: ArtifactBackend = backend or LocalFilesystemBackend(root)
        self._refs = root / "refs"

    # --- blobs --------------------------------------------------------------------------

    def put(self, source: Path | bytes, *, within: Path | None = None) -> StoredArtifact:
        """Store a file (streamed) or bytes. With `within`, a file whose real path (after
        symlinks) is outside that folder is refused. An unreferenced blob that is not kept
        may be pruned at any time; `add` is the way to keep a name on it."""
        if isinstance(source, bytes):
            return self.backend.put([source])
        with _open_source(source, within) as handle:
            return self.backend.put(iter(lambda: handle.read(_CHUNK), b""))

    def open(self, digest: str) -> BinaryIO:
        """A reader of the blob, positioned at the start, after checking its hash."""
        handle = self.backend.open(digest)
        try:
            self._check(digest, handle)
        except BaseException:
            handle.close()
            raise
        handle.seek(0)
        return handle

    def path(self, digest: str) -> Path:
        """The checked file of the blob; only for the local filesystem backend."""
        if not isinstance(self.backend, LocalFilesystemBackend):
            raise TypeError(f"{type(self.backend).__name__} keeps no local files; use open()")
        with self.open(digest):
            return self.backend.blob_path(digest)

    def verify_all(self) -> builtins.list[DamagedArtifact]:
        """Every blob whose content does not match its digest, and every referenced blob
        that is missing."""
        damaged = []
        for info in self.backend.iter_blobs():
            try:
                with self.backend.open(info.digest) as handle:
                    self._check(info.digest, handle)
            except ArtifactNotFound:
                continue  # pruned meanwhile
            except TamperedArtifact as error:
                damaged.append(
                    DamagedArtifact(
                        info.digest, error.location, f"content hashes to {error.actual}"
                    )
                )
            except OSError as error:
                damaged.append(
                    DamagedArtifact(info.digest, self.backend.location(info.digest), str(error))
                )
        for digest in sorted({row.digest for row in self.list()}):
            if not self.backend.exists(digest):
                location = self.backend.location(digest)
                damaged.append(DamagedArtifact(digest, location, "referenced but missing"))
        return damaged

    def _check(self, digest: str, handle: BinaryIO) -> None:
        expected = parse_digest(digest)
        # Not hashlib.file_digest: a backend's reader need not be a file (have readinto).
        hasher = hashlib.sha256()
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            hasher.update(chunk)
        if hasher.hexdigest() != expected:
            actual = f"sha256:{hasher.hexdigest()}"
            raise TamperedArtifact(digest, self.backend.location(digest), actual)

    # --- named references ---------------------------------------------------------------

    def add(
        self,
        repository: str,
        commit: str,
        name: str,
        source: Path | bytes,
        *,
        within: Path | None = None,
        replace: bool = False,
    ) -> StoredArtifact:
        """Store `source` and record `<repository>/<commit>/<name>` as its digest.

        A name already bound to another digest is a ReferenceConflict unless `replace`:
        a provenance statement may already vouch for the first one."""
        index = self._index_path(repository, commit)
        check_artifact_name(name)
        for _ in range(_ADD_ATTEMPTS):
            stored = self.put(source, within=within)
            with self._lock():
                # Prune runs under the same lock: a blob seen here stays until the index
                # entry that keeps its name is written.
                if not self.backend.exists(stored.digest):
                    continue
                entries = self._read_index(index)
                current = entries.get(name)
                if current and current["digest"] != stored.digest and not replace:
                    raise ReferenceConflict(
                        f"{repository}/{commit}/{name} is already {current['digest']}, "
                        f"not {stored.digest}; pass replace=True to rebind it"
                    )
                if not current or current["digest"] != stored.digest:
                    entries[name] = {
                        "digest": stored.digest,
                        "size": stored.size,
                        "stored_at": datetime.now(UTC).isoformat(),
                    }
                    _write_json_atomically(index, {"artifacts": entries})
                return stored
        raise ArtifactStoreError(
            f"{stored.digest} for {repository}/{commit}/{name} was deleted {_ADD_ATTEMPTS} "
            "times while being added; is a prune running in a loop?"
        )

    def list(self, repository: str | None = None) -> builtins.list[ArtifactRow]:
        """Every named reference (of one repository), oldest first."""
        if repository is not None:
            _check_repository(repository)
            folders = [self._refs / repository]
        else:
            folders = sorted(p for p in self._refs.glob("*") if _REPOSITORY.match(p.name))
        rows = []
        for folder in folders:
            for index in sorted(folder.glob("*.json")):
                if not _COMMIT.match(index.stem):
                    continue
                for name, entry in self._read_index(index).items():
                    rows.append(
                        ArtifactRow(
                            repository=folder.name,
                            commit=index.stem,
                            name=name,
                            digest=entry["digest"],
                            size=entry["size"],
                            stored_at=datetime.fromisoformat(entry["stored_at"]),
                        )
                    )
        return sorted(rows, key=lambda r: (r.stored_at, r.repository, r.commit, r.name))

    def export(self, repository: str, commit: str, destination: Path) -> builtins.list[Path]:
        """Write a commit's named artifacts under `destination` (checked, by name); a name
        that would land outside it, also through a symlinked folder, is refused."""
        entries = self._read_index(self._index_path(repository, commit))
        root = destination.resolve()
        written = []
        for name, entry in sorted(entries.items()):
            check_artifact_name(name)
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.parent.resolve().is_relative_to(root):
                raise UnsafeArtifactPath(
                    f"artifact name {name!r} would be written to {target.parent.resolve()}, "
                    f"outside {root} (a symlinked folder)"
                )
            with self.open(entry["digest"]) as blob:
                _write_atomically(target, iter(lambda: blob.read(_CHUNK), b""))
            written.append(target)
        return written

    # --- retention ----------------------------------------------------------------------

    def prune(
        self,
        keep: Iterable[str],
        max_age: timedelta | None,
        now: datetime,
        *,
        dry_run: bool = False,
    ) -> PruneResult:
        """Delete every blob not in `keep` whose last use (stored, or last named) is older
        than `max_age` (any age if None), with the references that name it. A kept digest
        is never deleted, however old. With `dry_run`, return what would go and delete
        nothing."""
        if now.tzinfo is None:
            raise ValueError(f"prune needs a timezone-aware `now`, got {now!r}")
        kept = set(keep)
        for digest in kept:
            parse_digest(digest)  # a typo in `keep` must not silently unprotect a release
        cutoff = None if max_age is None else now - max_age
        deleted_blobs: builtins.list[BlobInfo] = []
        with self._lock():
            rows = self.list()
            last_named: dict[str, datetime] = {}
            for row in rows:
                last_named[row.digest] = max(
                    row.stored_at, last_named.get(row.digest, row.stored_at)
                )
            for info in builtins.list(self.backend.iter_blobs()):
                if info.digest in kept:
                    continue
                last_used = max(info.stored_at, last_named.get(info.digest, info.stored_at))
                if cutoff is not None and last_used > cutoff:
                    continue
                if not dry_run:
                    self.backend.delete(info.digest)
                deleted_blobs.append(info)
            gone = {info.digest for info in deleted_blobs}
            deleted_rows = [row for row in rows if row.digest in gone]
            if dry_run:
                return PruneResult(deleted_blobs, deleted_rows)
            for repository, commit in sorted({(r.repository, r.commit) for r in deleted_rows}):
                index = self._index_path(repository, commit)
                entries = self._read_index(index)
                remaining = {n: e for n, e in entries.items() if e["digest"] not in gone}
                if remaining:
                    _write_json_atomically(index, {"artifacts": remaining})
                else:
                    index.unlink()
        return PruneResult(deleted_blobs, deleted_rows)

    # --- internals ----------------------------------------------------------------------

    def _lock(self) -> AbstractContextManager[None]:
        return file_lock(self.root / "locks" / "store.lock")

    def _index_path(self, repository: str, commit: str) -> Path:
        _check_repository(repository)
        if not _COMMIT.match(commit):
            raise UnsafeArtifactPath(f"not a full lowercase hex commit sha: {commit!r}")
        return self._refs / repository / f"{commit}.json"

    @staticmethod
    def _read_index(index: Path) -> dict[str, dict]:
        try:
            document = json.loads(index.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise ArtifactIndexError(f"artifact index {index} cannot be read: {error}") from None
        entries = document.get("artifacts") if isinstance(document, dict) else None
        if not isinstance(entries, dict):
            raise ArtifactIndexError(
                f'artifact index {index} has no "artifacts" object; it was left as it is'
            )
        for name, entry in entries.items():
            try:
                parse_digest(entry["digest"])
                if not isinstance(entry["size"], int):
                    raise TypeError("size is not an integer")
                datetime.fromisoformat(entry["stored_at"])
            except (TypeError, KeyError, ValueError, ArtifactStoreError) as error:
                raise ArtifactIndexError(
                    f"artifact index {index}: entry {name!r} is not "
                    f"{{digest, size, stored_at}} ({type(error).__name__}: {error}); "
                    "it was left as it is"
                ) from None
        return entries


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file's bytes: what the store, SBOMs and provenance name it by."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def parse_digest(digest: str) -> str:
    """The hex part of ``sha256:<64 lowercase hex>``; InvalidDigest for anything else."""
    match = _DIGEST.match(digest) if isinstance(digest, str) else None
    if not match:
        raise InvalidDigest(f"not an artifact digest (sha256:<64 lowercase hex>): {digest!r}")
    return match["hex"]


def check_artifact_name(name: str) -> str:
    """Return `name` if it is a normalised relative POSIX path that stays inside its
    folder wherever it is written; raise UnsafeArtifactPath naming it otherwise."""

    def unsafe(reason: str) -> UnsafeArtifactPath:
        return UnsafeArtifactPath(f"artifact name {name!r} is refused: {reason}")

    if not isinstance(name, str) or not name:
        raise unsafe("it is empty")
    if _CONTROL.search(name):
        raise unsafe("it contains a NUL or control character")
    if "\\" in name:
        raise unsafe("backslashes are not allowed (use / between folders)")
    if _DRIVE.match(name):
        raise unsafe("a drive letter makes it absolute")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise unsafe("it is absolute; names are relative to the store")
    if ".." in path.parts:
        raise unsafe("'..' would escape the store")
    if path.as_posix() != name or "." in name.split("/"):
        raise unsafe(f"it is not normalised (write it as {path.as_posix()!r})")
    if len(name.encode()) > _MAX_NAME_BYTES or any(
        len(part.encode()) > _MAX_COMPONENT_BYTES for part in path.parts
    ):
        raise unsafe("it is too long for a file system")
    return name


def _check_repository(repository: str) -> None:
    if not _REPOSITORY.match(repository):
        raise UnsafeArtifactPath(f"not a repository name ([a-z0-9][a-z0-9_-]*): {repository!r}")


def _open_source(source: Path, within: Path | None) -> BinaryIO:
    try:
        real = source.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
        raise UnsafeArtifactPath(f"artifact source {source} cannot be resolved: {error}") from None
    if within is not None and not real.is_relative_to(within.resolve()):
        raise UnsafeArtifactPath(
            f"artifact source {source} resolves to {real}, outside {within.resolve()}"
        )
    try:
        # O_NOFOLLOW: the resolved path is what was checked; a symlink swapped in since
        # is refused. O_NONBLOCK: a FIFO must not hang the build.
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ArtifactNotFound(f"artifact source {source} does not exist") from None
    except OSError as error:
        raise UnsafeArtifactPath(f"artifact source {source} cannot be opened: {error}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafeArtifactPath(f"artifact source {source} is not a regular file")
    return os.fdopen(fd, "rb")


def _write_json_atomically(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, [json.dumps(document, indent=2, sort_keys=True).encode()])


def _write_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    """Readers see the old file or the whole new one. os.replace swaps a symlink planted at
    `path` itself; it never writes through it."""
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)  # noqa: SIM115
    try:
        with handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    finally:
        Path(handle.name).unlink(missing_ok=True)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
