"""Artifact retention on a real store: old artifacts go, what is deployed or recent stays.

The commits in service are put there by real deploys (local target, real nginx router)
of a small HTTP service, as `cicd deploy` would; the retention reads them back from the
environments' state. Without nginx those tests skip, except under CICD_REQUIRE_NGINX=1.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cicd_dagster.artifact_store import ArtifactIndexError, ArtifactStore, LocalFilesystemBackend
from cicd_dagster.config import ConfigError, ControlConfig, load_control_config
from cicd_dagster.deploy.strategies import Environment, Release
from cicd_dagster.retention import RetentionResult, prune_artifacts
from cicd_dagster.stages.artifact import PROVENANCE_NAME, SBOM_NAME, artifact_store
from cicd_dagster.stages.deploy import environment_for
from cicd_dagster.store import HistoryStore
from cicd_dagster.store.history import ReleaseRecord
from tests.support import control_config, tear_down

CICD = [sys.executable, "-m", "cicd_dagster"]
ENVIRONMENTS = (
    "environments:\n"
    "  - name: staging\n"
    "    verify: {interval_s: 0.05, success_threshold: 1}\n"
    "  - name: prod\n"
    "    strategy: {type: blue_green}\n"
    "    verify: {interval_s: 0.05, success_threshold: 1}\n"
)
OLD = 400  # days: far beyond any retention in these tests


def sha(number: int) -> str:
    return f"{number:040x}"


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[[str], ControlConfig]:
    """cicd.yaml with repositories shop and billing, the environments staging and prod,
    and this `artifacts:` section."""

    def make(artifacts: str = "") -> ControlConfig:
        repositories = {"shop": tmp_path / "shop", "billing": tmp_path / "billing"}
        return load_control_config(control_config(tmp_path, repositories, ENVIRONMENTS + artifacts))

    return make


def publish(store: ArtifactStore, repository: str, commit: str, wheel: bytes) -> set[str]:
    """What the artifact stage stores for a commit: a build artifact, its SBOM and its
    provenance; returns their digests."""
    files = {
        "dist/app.whl": wheel,
        SBOM_NAME: f'{{"bomFormat": "CycloneDX", "commit": "{commit}"}}'.encode(),
        PROVENANCE_NAME: f'{{"payload": "{commit}"}}\n'.encode(),
    }
    return {store.add(repository, commit, name, data).digest for name, data in files.items()}


def backdate(store: ArtifactStore, repository: str, commit: str, days: int) -> None:
    """Make a commit's artifacts look stored and named `days` ago: the blob files' mtime
    and the stored_at of the commit's index entries are what retention reads."""
    index = store.root / "refs" / repository / f"{commit}.json"
    document = json.loads(index.read_text())
    when = datetime.now(UTC) - timedelta(days=days)
    for entry in document["artifacts"].values():
        entry["stored_at"] = when.isoformat()
        os.utime(blob_file(store, entry["digest"]), (when.timestamp(), when.timestamp()))
    index.write_text(json.dumps(document))


def blob_file(store: ArtifactStore, digest: str) -> Path:
    return LocalFilesystemBackend(store.root).blob_path(digest)


def stored_commits(store: ArtifactStore) -> set[tuple[str, str]]:
    return {(row.repository, row.commit) for row in store.list()}


def blobs(store: ArtifactStore) -> set[str]:
    return {blob.digest for blob in store.backend.iter_blobs()}


def deleted_commits(result: RetentionResult) -> set[tuple[str, str]]:
    return {(row.repository, row.commit) for row in result.references}


def prune(
    config: ControlConfig, *, dry_run: bool = False, repository: str | None = None
) -> RetentionResult:
    return prune_artifacts(config, now=datetime.now(UTC), dry_run=dry_run, repository=repository)


@pytest.fixture
def deploy(tmp_path: Path, nginx: str) -> Iterator[Callable[[ControlConfig, str, str, str], None]]:
    """Deploys a commit of a repository to an environment for real (a static HTTP server
    stands in for the service); everything deployed is stopped after the test."""
    site = tmp_path / "site"
    site.mkdir()
    command = f'exec {shlex.quote(sys.executable)} -m http.server --bind 127.0.0.1 "$PORT"'
    made: dict[tuple[str, str], Environment] = {}

    def deploy_commit(
        config: ControlConfig, repository: str, environment: str, commit: str
    ) -> None:
        settings = next(e for e in config.environments if e.name == environment)
        env = made.setdefault(
            (repository, environment), environment_for(config, repository, settings)
        )
        release = Release(commit, command, site, {"PATH": os.environ["PATH"]}, health_path="/")
        outcome = env.deploy(release, settings.strategy)
        assert outcome.status == "deployed", outcome.reason

    yield deploy_commit
    for env in made.values():
        tear_down(env)


def test_old_unreferenced_commits_are_pruned_with_their_sbom_and_provenance(
    make_config: Callable[[str], ControlConfig],
) -> None:
    config = make_config("artifacts: {retention_days: 30, keep_last: 0}\n")
    store = artifact_store(config)
    old = publish(store, "shop", sha(1), b"wheel 1")
    young = publish(store, "shop", sha(2), b"wheel 2")
    backdate(store, "shop", sha(1), OLD)

    result = prune(config)

    assert {blob.digest for blob in result.deleted} == old
    assert {row.name for row in result.references} == {"dist/app.whl", SBOM_NAME, PROVENANCE_NAME}
    assert deleted_commits(result) == {("shop", sha(1))}
    assert result.bytes_freed == sum(blob.size for blob in result.deleted) > 0
    assert stored_commits(store) == {("shop", sha(2))}
    assert blobs(store) == young
    assert store.verify_all() == []  # nothing left naming a deleted blob


def test_a_released_commit_is_kept_however_old(
    make_config: Callable[[str], ControlConfig],
) -> None:
    config = make_config("artifacts: {retention_days: 30, keep_last: 0}\n")
    store = artifact_store(config)
    released = publish(store, "shop", sha(1), b"wheel 1")
    old = publish(store, "shop", sha(2), b"wheel 2")
    for number in (1, 2):
        backdate(store, "shop", sha(number), OLD)
    HistoryStore(config.history_db_url).record_release(
        "shop",
        ReleaseRecord(
            version="1.0.0",
            tag="v1.0.0",
            commit_sha=sha(1),
            previous_version=None,
            bump="initial",
            prerelease=False,
            commit_count=1,
            changelog="",
            created_at=datetime.now(UTC),
        ),
    )

    result = prune(config)

    assert {blob.digest for blob in result.deleted} == old
    assert blobs(store) == released
    assert [(k.commit, k.reasons) for k in result.kept] == [(sha(1), ["released as v1.0.0"])]


@pytest.mark.slow
def test_live_and_standby_commits_are_kept_however_old(
    make_config: Callable[[str], ControlConfig],
    deploy: Callable[[ControlConfig, str, str, str], None],
) -> None:
    config = make_config("artifacts: {retention_days: 1, keep_last: 0}\n")
    store = artifact_store(config)
    for number in range(1, 5):
        publish(store, "shop", sha(number), f"wheel {number}".encode())
        backdate(store, "shop", sha(number), OLD)
    deploy(config, "shop", "prod", sha(1))
    deploy(config, "shop", "prod", sha(2))  # sha(1) stays ready for a rollback
    deploy(config, "shop", "staging", sha(3))

    result = prune(config)

    assert deleted_commits(result) == {("shop", sha(4))}
    assert stored_commits(store) == {("shop", sha(n)) for n in (1, 2, 3)}
    assert {(k.commit, tuple(k.reasons)) for k in result.kept} == {
        (sha(1), ("standby in prod",)),
        (sha(2), ("live in prod",)),
        (sha(3), ("live in staging",)),
    }
    assert store.verify_all() == []


def test_keep_last_keeps_the_newest_commits_of_each_repository(
    make_config: Callable[[str], ControlConfig],
) -> None:
    config = make_config("artifacts: {retention_days: 1, keep_last: 2}\n")
    store = artifact_store(config)
    for number in range(1, 5):  # sha(4) is the newest
        publish(store, "shop", sha(number), f"wheel {number}".encode())
        backdate(store, "shop", sha(number), OLD - number)
    publish(store, "billing", sha(9), b"billing wheel")
    backdate(store, "billing", sha(9), OLD)

    result = prune(config)

    assert deleted_commits(result) == {("shop", sha(1)), ("shop", sha(2))}
    assert stored_commits(store) == {("shop", sha(3)), ("shop", sha(4)), ("billing", sha(9))}
    assert [(k.repository, k.commit, k.reasons) for k in result.kept] == [
        ("shop", sha(4), ["one of the 2 newest"]),
        ("shop", sha(3), ["one of the 2 newest"]),
        ("billing", sha(9), ["one of the 2 newest"]),
    ]


def test_a_blob_an_old_commit_shares_with_a_kept_commit_stays(
    make_config: Callable[[str], ControlConfig],
) -> None:
    config = make_config("artifacts: {retention_days: 1, keep_last: 1}\n")
    store = artifact_store(config)
    publish(store, "shop", sha(1), b"the same wheel")
    backdate(store, "shop", sha(1), OLD)
    kept = publish(store, "shop", sha(2), b"the same wheel")

    result = prune(config)

    assert {row.name for row in result.references} == {SBOM_NAME, PROVENANCE_NAME}
    assert blobs(store) == kept
    assert [row.name for row in store.list() if row.commit == sha(1)] == ["dist/app.whl"]


def test_dry_run_deletes_nothing_and_lists_what_a_prune_deletes(
    make_config: Callable[[str], ControlConfig],
) -> None:
    config = make_config("artifacts: {retention_days: 1, keep_last: 0}\n")
    store = artifact_store(config)
    for number in (1, 2):
        publish(store, "shop", sha(number), f"wheel {number}".encode())
    backdate(store, "shop", sha(1), OLD)
    rows, digests = store.list(), blobs(store)

    planned = prune(config, dry_run=True)

    assert planned.dry_run and deleted_commits(planned) == {("shop", sha(1))}
    assert store.list() == rows and blobs(store) == digests
    done = prune(config)
    assert done.to_json() == {**planned.to_json(), "dry_run": False}
    assert blobs(store) == digests - {blob.digest for blob in planned.deleted}


def test_repo_prunes_only_what_that_repository_names(
    make_config: Callable[[str], ControlConfig],
) -> None:
    config = make_config("artifacts: {retention_days: 1, keep_last: 0}\n")
    store = artifact_store(config)
    publish(store, "shop", sha(1), b"shop wheel")
    publish(store, "shop", sha(2), b"shared wheel")
    publish(store, "billing", sha(3), b"shared wheel")
    unnamed = store.put(b"a blob a crashed publish left behind").digest
    for repository, number in (("shop", 1), ("shop", 2), ("billing", 3)):
        backdate(store, repository, sha(number), OLD)
    old = datetime.now(UTC) - timedelta(days=OLD)
    os.utime(blob_file(store, unnamed), (old.timestamp(), old.timestamp()))

    result = prune(config, repository="shop")

    assert deleted_commits(result) == {("shop", sha(1)), ("shop", sha(2))}
    assert "dist/app.whl" not in {row.name for row in result.references if row.commit == sha(2)}
    assert stored_commits(store) == {("shop", sha(2)), ("billing", sha(3))}
    assert unnamed in blobs(store)
    everything = prune(config)
    assert stored_commits(store) == set()
    assert unnamed in {blob.digest for blob in everything.deleted}
    assert blobs(store) == set()


def test_a_tampered_blob_is_pruned_when_expired_and_kept_as_evidence_when_protected(
    make_config: Callable[[str], ControlConfig],
) -> None:
    config = make_config("artifacts: {retention_days: 1, keep_last: 1}\n")
    store = artifact_store(config)
    wheels = {}
    for number in (1, 2):
        publish(store, "shop", sha(number), f"wheel {number}".encode())
        row = next(r for r in store.list() if r.commit == sha(number) and r.name == "dist/app.whl")
        blob = blob_file(store, row.digest)
        blob.chmod(0o644)
        blob.write_bytes(b"changed after the build")
        backdate(store, "shop", sha(number), OLD - number)
        wheels[number] = row.digest

    result = prune(config)

    assert deleted_commits(result) == {("shop", sha(1))}
    assert wheels[1] in {blob.digest for blob in result.deleted}
    assert stored_commits(store) == {("shop", sha(2))}
    assert [damage.digest for damage in store.verify_all()] == [wheels[2]]


def test_an_unreadable_index_stops_the_prune_before_anything_is_deleted(
    make_config: Callable[[str], ControlConfig],
) -> None:
    config = make_config("artifacts: {retention_days: 1, keep_last: 0}\n")
    store = artifact_store(config)
    publish(store, "shop", sha(1), b"wheel 1")
    backdate(store, "shop", sha(1), OLD)
    publish(store, "billing", sha(2), b"wheel 2")
    index = store.root / "refs" / "billing" / f"{sha(2)}.json"
    index.write_text("{not json")
    digests = blobs(store)

    with pytest.raises(ArtifactIndexError, match=str(index)):
        prune(config)

    assert blobs(store) == digests
    done = run_cicd(config, "artifacts", "prune")
    assert done.returncode == 1
    assert f"nothing was pruned: artifact index {index} cannot be read" in done.stderr
    assert blobs(store) == digests


def test_retention_days_null_keeps_everything(
    make_config: Callable[[str], ControlConfig],
) -> None:
    config = make_config("artifacts: {retention_days: null, keep_last: 0}\n")
    store = artifact_store(config)
    publish(store, "shop", sha(1), b"wheel 1")
    backdate(store, "shop", sha(1), OLD * 10)
    store.put(b"unnamed")

    result = prune(config)

    assert result.deleted == [] and result.retention_days is None
    assert stored_commits(store) == {("shop", sha(1))} and len(blobs(store)) == 4


# --- the command -----------------------------------------------------------------------


def run_cicd(config: ControlConfig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CICD, "--config", str(config.config_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_prints_the_deleted_artifacts_and_the_total(
    make_config: Callable[[str], ControlConfig],
) -> None:
    config = make_config("artifacts: {retention_days: 7, keep_last: 1}\n")
    store = artifact_store(config)
    old = publish(store, "shop", sha(1), b"wheel 1")
    backdate(store, "shop", sha(1), OLD)
    publish(store, "shop", sha(2), b"wheel 2")
    backdate(store, "shop", sha(2), OLD)
    size = sum(blob.size for blob in store.backend.iter_blobs() if blob.digest in old)

    planned = run_cicd(config, "artifacts", "prune", "--dry-run", "--json")
    table = run_cicd(config, "artifacts", "prune", "--repo", "shop")

    assert planned.returncode == 0, planned.stderr
    report = json.loads(planned.stdout)
    assert {key: report[key] for key in ("dry_run", "repository", "retention_days")} == {
        "dry_run": True,
        "repository": None,
        "retention_days": 7,
    }
    assert {blob["digest"] for blob in report["deleted"]} == old
    assert report["bytes_freed"] == size
    assert report["kept"] == [
        {"repository": "shop", "commit": sha(2), "reasons": ["one of the 1 newest"]}
    ]
    assert table.returncode == 0, table.stderr
    assert f"shop@{sha(1)[:12]}/{PROVENANCE_NAME}" in table.stdout
    assert f"kept shop@{sha(2)[:12]}: one of the 1 newest" in table.stderr
    assert f"3 blobs of 1 commit: {size} bytes freed" in table.stderr
    assert stored_commits(store) == {("shop", sha(2))}


def test_cli_refuses_an_unknown_repository(make_config: Callable[[str], ControlConfig]) -> None:
    done = run_cicd(make_config(), "artifacts", "prune", "--repo", "nope")

    assert done.returncode == 2
    assert "unknown repository 'nope'" in done.stderr


@pytest.mark.parametrize(
    ("artifacts", "error"),
    [
        (
            "artifacts:\n  retention_days: 0\n",
            "cicd.yaml:14: artifacts.retention_days: Input should be greater than or equal to 1",
        ),
        (
            "artifacts:\n  keep_last: -1\n",
            "cicd.yaml:14: artifacts.keep_last: Input should be greater than or equal to 0",
        ),
        (
            "artifacts:\n  keep: 3\n",
            'cicd.yaml:14: artifacts.keep: unknown field "keep" (did you mean "keep_last"?)',
        ),
    ],
)
def test_bad_retention_settings_name_the_file_line_and_field(
    tmp_path: Path, make_config: Callable[[str], ControlConfig], artifacts: str, error: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        make_config(artifacts)
    assert str(raised.value) == f"{tmp_path}/{error}"


def test_cli_reports_bad_retention_settings_as_a_usage_error(tmp_path: Path) -> None:
    path = control_config(
        tmp_path, {"shop": tmp_path / "shop"}, "artifacts: {retention_days: -5}\n"
    )

    done = subprocess.run(
        [*CICD, "--config", str(path), "artifacts", "prune"], capture_output=True, text=True
    )

    assert done.returncode == 2
    assert "artifacts.retention_days: Input should be greater than or equal to 1" in done.stderr
