"""The content-addressed artifact store on a real file system, with real processes."""

import hashlib
import json
import multiprocessing
import os
import stat
from datetime import UTC, datetime, timedelta
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest

from cicd_dagster.artifact_store import (
    ArtifactIndexError,
    ArtifactNotFound,
    ArtifactStore,
    DamagedArtifact,
    InvalidDigest,
    ReferenceConflict,
    StoredArtifact,
    TamperedArtifact,
    UnsafeArtifactPath,
)

REPO = "shop-api"
COMMIT = "a" * 40
OTHER_COMMIT = "b" * 40


def digest_of(content: bytes) -> str:
    return f"sha256:{hashlib.sha256(content).hexdigest()}"


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file() or p.is_symlink()}


def make_old(store: ArtifactStore, digest: str, age: timedelta) -> None:
    when = (datetime.now(UTC) - age).timestamp()
    os.utime(store.path(digest), (when, when))


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def test_put_stores_content_read_only_under_its_sha256(store: ArtifactStore) -> None:
    content = b"wheel bytes"

    stored = store.put(content)

    hex_digest = hashlib.sha256(content).hexdigest()
    assert (stored.digest, stored.size, stored.created) == (f"sha256:{hex_digest}", 11, True)
    blob = store.root / "sha256" / hex_digest[:2] / hex_digest[2:]
    assert blob.read_bytes() == content
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    assert store.path(stored.digest) == blob
    with store.open(stored.digest) as handle:
        assert handle.read() == content


def test_put_streams_a_file_larger_than_one_chunk(store: ArtifactStore, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    content = os.urandom(3 * (1 << 20) + 17)
    source.write_bytes(content)

    stored = store.put(source)

    assert (stored.digest, stored.size) == (digest_of(content), len(content))
    assert store.path(stored.digest).read_bytes() == content


def test_same_content_is_stored_once_and_never_rewritten(store: ArtifactStore) -> None:
    first = store.put(b"same")
    blob = store.path(first.digest)
    before = blob.stat()

    second = store.put(b"same")

    assert second.digest == first.digest and not second.created
    after = blob.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(list((store.root / "sha256").rglob("*"))) == 2  # one shard, one blob
    assert not list((store.root / "tmp").iterdir())


def test_add_records_named_references_listed_per_repository(store: ArtifactStore) -> None:
    wheel = store.add(REPO, COMMIT, "dist/shop-1.0.whl", b"wheel")
    sbom = store.add(REPO, COMMIT, "sbom.cdx.json", b"{}")
    store.add("billing", OTHER_COMMIT, "dist/billing.tar.gz", b"tarball")

    rows = store.list(REPO)

    assert [(r.repository, r.commit, r.name, r.digest, r.size) for r in rows] == [
        (REPO, COMMIT, "dist/shop-1.0.whl", wheel.digest, 5),
        (REPO, COMMIT, "sbom.cdx.json", sbom.digest, 2),
    ]
    assert all(r.stored_at.tzinfo is not None for r in rows)
    assert {r.repository for r in store.list()} == {REPO, "billing"}
    index = json.loads((store.root / "refs" / REPO / f"{COMMIT}.json").read_text())
    assert index["artifacts"]["sbom.cdx.json"]["digest"] == sbom.digest


def test_a_name_keeps_its_digest_unless_replaced(store: ArtifactStore) -> None:
    first = store.add(REPO, COMMIT, "app.whl", b"build one")
    again = store.add(REPO, COMMIT, "app.whl", b"build one")
    assert again == StoredArtifact(first.digest, first.size, created=False)

    with pytest.raises(ReferenceConflict, match=rf"{REPO}/{COMMIT}/app.whl is already"):
        store.add(REPO, COMMIT, "app.whl", b"build two")
    assert [r.digest for r in store.list(REPO)] == [first.digest]

    second = store.add(REPO, COMMIT, "app.whl", b"build two", replace=True)
    assert [r.digest for r in store.list(REPO)] == [second.digest]


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "a/../../b",
        "..",
        "/abs",
        "/etc/passwd",
        "C:\\x",
        "C:x",
        "a\\..\\b",
        "a\x00b",
        "a\nb",
        "",
        "./a",
        "a//b",
        "a/",
        "x" * 256,
    ],
)
def test_unsafe_names_are_refused_before_anything_is_written(
    store: ArtifactStore, tmp_path: Path, name: str
) -> None:
    before = files_under(tmp_path)

    with pytest.raises(UnsafeArtifactPath, match=r"artifact name .* is refused") as error:
        store.add(REPO, COMMIT, name, b"payload")

    assert repr(name) in str(error.value)
    assert files_under(tmp_path) == before
    assert store.list() == []


@pytest.mark.parametrize(
    ("repository", "commit"),
    [("../evil", COMMIT), ("Shop", COMMIT), (REPO, "../" + "a" * 37), (REPO, "abc123")],
)
def test_repository_and_commit_must_be_plain_folder_names(
    store: ArtifactStore, repository: str, commit: str
) -> None:
    with pytest.raises(UnsafeArtifactPath, match="not a"):
        store.add(repository, commit, "app.whl", b"payload")
    assert not (store.root / "refs").exists()


def test_a_symlinked_source_pointing_outside_its_folder_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    checkout = tmp_path / "checkout"
    (checkout / "dist").mkdir(parents=True)
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    (checkout / "dist" / "app.whl").symlink_to(secret)
    (checkout / "dist" / "real.whl").write_bytes(b"wheel")
    (checkout / "dist" / "alias.whl").symlink_to(checkout / "dist" / "real.whl")

    with pytest.raises(UnsafeArtifactPath, match=r"dist/app.whl resolves to .*secret.txt, outside"):
        store.add(REPO, COMMIT, "dist/app.whl", checkout / "dist" / "app.whl", within=checkout)
    with pytest.raises(UnsafeArtifactPath, match="outside"):
        store.put(checkout / "dist" / ".." / ".." / "secret.txt", within=checkout)

    assert not (store.root / "sha256").exists()
    stored = store.put(checkout / "dist" / "alias.whl", within=checkout)
    assert stored.digest == digest_of(b"wheel")


def test_sources_that_are_not_regular_files_are_refused(
    store: ArtifactStore, tmp_path: Path
) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UnsafeArtifactPath, match=r"pipe is not a regular file"):
        store.put(fifo)
    with pytest.raises(UnsafeArtifactPath, match="not a regular file"):
        store.put(tmp_path)
    with pytest.raises(ArtifactNotFound, match=r"missing.whl does not exist"):
        store.put(tmp_path / "missing.whl")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UnsafeArtifactPath, match="loop"):
        store.put(loop)


def test_one_changed_byte_is_reported_as_tampering(store: ArtifactStore) -> None:
    stored = store.add(REPO, COMMIT, "app.whl", b"original wheel")
    intact = store.add(REPO, COMMIT, "other.whl", b"untouched")
    blob = store.path(stored.digest)
    blob.chmod(0o644)
    blob.write_bytes(b"Original wheel")

    with pytest.raises(TamperedArtifact) as error:
        store.open(stored.digest)
    assert stored.digest in str(error.value) and str(blob) in str(error.value)
    with pytest.raises(TamperedArtifact, match=stored.digest):
        store.path(stored.digest)

    assert store.verify_all() == [
        DamagedArtifact(
            stored.digest, str(blob), f"content hashes to {digest_of(b'Original wheel')}"
        )
    ]
    assert store.path(intact.digest).read_bytes() == b"untouched"


def test_verify_all_lists_referenced_blobs_that_are_missing(store: ArtifactStore) -> None:
    stored = store.add(REPO, COMMIT, "app.whl", b"wheel")
    blob = store.path(stored.digest)
    blob.unlink()

    assert store.verify_all() == [
        DamagedArtifact(stored.digest, str(blob), "referenced but missing")
    ]
    with pytest.raises(ArtifactNotFound, match=stored.digest):
        store.open(stored.digest)


@pytest.mark.parametrize(
    "digest",
    ["sha256:../../etc/passwd", "sha256:" + "A" * 64, "md5:" + "a" * 32, "a" * 64, ""],
)
def test_malformed_digests_are_refused(store: ArtifactStore, digest: str) -> None:
    with pytest.raises(InvalidDigest, match="not an artifact digest"):
        store.open(digest)
    with pytest.raises(InvalidDigest):
        store.prune(keep=[digest], max_age=None, now=datetime.now(UTC))


def test_prune_never_deletes_a_kept_digest_however_old(store: ArtifactStore) -> None:
    released = store.add(REPO, COMMIT, "app.whl", b"released build")
    deployed = store.put(b"deployed, unnamed")
    abandoned = store.add(REPO, OTHER_COMMIT, "app.whl", b"abandoned build")
    store.add(REPO, OTHER_COMMIT, "sbom.json", b"abandoned sbom")
    a_year_later = datetime.now(UTC) + timedelta(days=365)

    result = store.prune(
        keep=[released.digest, deployed.digest], max_age=timedelta(days=30), now=a_year_later
    )

    assert {b.digest for b in result.blobs} == {abandoned.digest, digest_of(b"abandoned sbom")}
    assert {(r.commit, r.name) for r in result.references} == {
        (OTHER_COMMIT, "app.whl"),
        (OTHER_COMMIT, "sbom.json"),
    }
    assert store.path(released.digest).read_bytes() == b"released build"
    assert store.path(deployed.digest).read_bytes() == b"deployed, unnamed"
    assert [(r.commit, r.name) for r in store.list()] == [(COMMIT, "app.whl")]
    assert not (store.root / "refs" / REPO / f"{OTHER_COMMIT}.json").exists()
    assert store.verify_all() == []


def test_prune_keeps_blobs_stored_or_named_within_max_age(store: ArtifactStore) -> None:
    old = store.put(b"old and unnamed")
    make_old(store, old.digest, timedelta(days=10))
    renamed = store.put(b"old, named again today")
    make_old(store, renamed.digest, timedelta(days=10))
    store.add(REPO, COMMIT, "app.whl", b"old, named again today")
    fresh = store.put(b"fresh")

    result = store.prune(keep=[], max_age=timedelta(days=1), now=datetime.now(UTC))

    assert [b.digest for b in result.blobs] == [old.digest]
    assert result.references == []
    assert store.path(renamed.digest) and store.path(fresh.digest)
    with pytest.raises(ArtifactNotFound):
        store.open(old.digest)


def test_prune_without_max_age_deletes_everything_not_kept(store: ArtifactStore) -> None:
    kept = store.add(REPO, COMMIT, "app.whl", b"kept")
    store.add(REPO, COMMIT, "tmp.log", b"log")
    store.put(b"loose")

    result = store.prune(keep=[kept.digest], max_age=None, now=datetime.now(UTC))

    assert len(result.blobs) == 2
    assert [r.name for r in store.list()] == ["app.whl"]


def test_export_writes_a_commits_artifacts_by_name(store: ArtifactStore, tmp_path: Path) -> None:
    store.add(REPO, COMMIT, "dist/app.whl", b"wheel")
    store.add(REPO, COMMIT, "sbom.json", b"{}")
    destination = tmp_path / "deploy"

    written = store.export(REPO, COMMIT, destination)

    assert written == [destination / "dist" / "app.whl", destination / "sbom.json"]
    assert (destination / "dist" / "app.whl").read_bytes() == b"wheel"


def test_export_never_writes_through_a_symlinked_folder(
    store: ArtifactStore, tmp_path: Path
) -> None:
    store.add(REPO, COMMIT, "dist/app.whl", b"wheel")
    destination = tmp_path / "deploy"
    outside = tmp_path / "outside"
    outside.mkdir()
    destination.mkdir()
    (destination / "dist").symlink_to(outside)

    with pytest.raises(UnsafeArtifactPath, match=r"'dist/app.whl' would be written to .*outside"):
        store.export(REPO, COMMIT, destination)
    assert list(outside.iterdir()) == []


def test_export_replaces_a_symlink_planted_at_the_name(
    store: ArtifactStore, tmp_path: Path
) -> None:
    store.add(REPO, COMMIT, "app.whl", b"wheel")
    destination = tmp_path / "deploy"
    destination.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (destination / "app.whl").symlink_to(victim)

    store.export(REPO, COMMIT, destination)

    assert victim.read_text() == "keep me"
    assert not (destination / "app.whl").is_symlink()
    assert (destination / "app.whl").read_bytes() == b"wheel"


def test_export_refuses_a_tampered_blob(store: ArtifactStore, tmp_path: Path) -> None:
    stored = store.add(REPO, COMMIT, "app.whl", b"wheel")
    store.path(stored.digest).write_bytes(b"wheeL")

    with pytest.raises(TamperedArtifact, match=stored.digest):
        store.export(REPO, COMMIT, tmp_path / "deploy")
    assert not (tmp_path / "deploy" / "app.whl").exists()


def test_a_corrupt_index_is_named_and_left_as_it_is(store: ArtifactStore) -> None:
    store.add(REPO, COMMIT, "app.whl", b"wheel")
    index = store.root / "refs" / REPO / f"{COMMIT}.json"
    index.write_text('{"artifacts": {"app.whl": ')

    with pytest.raises(ArtifactIndexError, match=rf"{index} cannot be read"):
        store.list()
    with pytest.raises(ArtifactIndexError, match=str(index)):
        store.add(REPO, COMMIT, "sbom.json", b"{}")
    assert index.read_text() == '{"artifacts": {"app.whl": '

    index.write_text('{"artifacts": {"app.whl": {"digest": "sha256:abc", "size": 1}}}')
    with pytest.raises(ArtifactIndexError, match=r"entry 'app.whl' is not \{digest, size"):
        store.list(REPO)
    index.write_text('["app.whl"]')
    with pytest.raises(ArtifactIndexError, match='has no "artifacts" object'):
        store.list(REPO)


def add_concurrently(root: str, name: str, content: bytes, start: Event) -> None:
    start.wait()
    ArtifactStore(Path(root)).add(REPO, COMMIT, name, content)


def test_processes_adding_the_same_content_at_once_leave_one_intact_blob(
    store: ArtifactStore,
) -> None:
    content = os.urandom(4 << 20)
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    names = [f"dist/worker-{n}.whl" for n in range(4)]
    workers = [
        context.Process(target=add_concurrently, args=(str(store.root), name, content, start))
        for name in names
    ]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=120)
        if worker.is_alive():
            worker.kill()
            worker.join()

    assert [worker.exitcode for worker in workers] == [0, 0, 0, 0]
    blobs = [p for p in (store.root / "sha256").rglob("*") if p.is_file()]
    assert len(blobs) == 1 and blobs[0].read_bytes() == content
    assert list((store.root / "tmp").iterdir()) == []
    assert sorted(r.name for r in store.list()) == names
    assert {r.digest for r in store.list()} == {digest_of(content)}
    assert store.verify_all() == []


def test_prune_refuses_a_naive_now(store: ArtifactStore) -> None:
    store.put(b"loose")
    with pytest.raises(ValueError, match="timezone-aware"):
        store.prune(keep=[], max_age=None, now=datetime(2030, 1, 1))
    assert len(list(store.backend.iter_blobs())) == 1
