"""The repository sensor against real git repositories and a real (temporary) Dagster instance.

`Daemon` plays the sensor daemon's part without launching anything: it evaluates a tick,
adds the requested dynamic partitions, records a run per run request (skipping run keys
this sensor already used, as the daemon does) and carries the cursor to the next tick.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import (
    AddDynamicPartitionsRequest,
    DagsterInstance,
    DagsterRun,
    DagsterRunStatus,
    Definitions,
    RunRequest,
    RunsFilter,
    build_sensor_context,
    instance_for_test,
)
from dagster._core.definitions.sensor_definition import SensorExecutionData
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.tags import PARTITION_NAME_TAG, RUN_KEY_TAG, SENSOR_NAME_TAG

from assets.common import BRANCH_TAG, DETECTED_AT_TAG, REF_TAG
from cicd_dagster.config import load_control_config
from cicd_dagster.definitions import build_definitions
from tests.support import commit, control_config, git

WATCHED = 'branches: ["main", "release/*"]\ntags: ["v*"]'


class Daemon:
    def __init__(self, defs: Definitions, instance: DagsterInstance) -> None:
        self.defs = defs
        self.instance = instance
        self.cursors: dict[str, str | None] = {}

    def tick(self, repository: str) -> SensorExecutionData:
        sensor = self.defs.resolve_sensor_def(f"{repository}_commits")
        context = build_sensor_context(
            instance=self.instance,
            # With a ref, as in the daemon: run requests are checked against the partitions.
            instance_ref=self.instance.get_ref(),
            cursor=self.cursors.get(repository),
            definitions=self.defs,
            sensor_name=sensor.name,
        )
        data = sensor.evaluate_tick(context)
        for request in data.dynamic_partitions_requests or []:
            assert isinstance(request, AddDynamicPartitionsRequest)
            self.instance.add_dynamic_partitions(
                request.partitions_def_name, list(request.partition_keys)
            )
        for run_request in data.run_requests or []:
            self._create_run(repository, sensor.name, run_request)
        self.cursors[repository] = data.cursor
        return data

    def _create_run(self, repository: str, sensor_name: str, request: RunRequest) -> None:
        assert request.run_key and request.partition_key
        sensor_tags = {RUN_KEY_TAG: request.run_key, SENSOR_NAME_TAG: sensor_name}
        if self.instance.get_run_ids(RunsFilter(tags=sensor_tags), limit=1):
            return
        self.build(
            repository,
            request.partition_key,
            status=DagsterRunStatus.NOT_STARTED,
            tags={**request.tags, **sensor_tags},
        )

    def build(
        self,
        repository: str,
        sha: str,
        *,
        status: DagsterRunStatus = DagsterRunStatus.SUCCESS,
        tags: dict[str, str] | None = None,
    ) -> None:
        """Record a run of the CI job for `sha`, as `cicd run` or the daemon would (the run
        record only: creating the job's plan snapshots would cost a fraction of a second)."""
        partitions = f"{repository}_commits"
        if not self.instance.has_dynamic_partition(partitions, sha):
            self.instance.add_dynamic_partitions(partitions, [sha])
        self.instance.add_run(
            DagsterRun(
                job_name=f"{repository}_ci",
                run_id=str(uuid.uuid4()),
                status=status,
                tags={**(tags or {}), PARTITION_NAME_TAG: sha},
            )
        )

    def cursor(self, repository: str) -> dict[str, str]:
        cursor = self.cursors.get(repository)
        return json.loads(cursor) if cursor else {}


@pytest.fixture(scope="module")
def empty_instance(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The storage folder of an empty instance, made once: creating its SQLite schemas
    costs about a second, copying them a few milliseconds."""
    folder = tmp_path_factory.mktemp("dagster")
    with instance_for_test(temp_dir=str(folder)):
        pass
    return folder


@pytest.fixture
def instance(empty_instance: Path, tmp_path: Path) -> Iterator[DagsterInstance]:
    folder = tmp_path / "dagster"
    shutil.copytree(empty_instance, folder)
    with DagsterInstance.from_ref(InstanceRef.from_dir(str(folder))) as instance:
        yield instance


def daemon_for(
    tmp_path: Path,
    instance: DagsterInstance,
    repositories: dict[str, Path | str],
    repo_extra: str,
) -> Daemon:
    config = load_control_config(control_config(tmp_path, repositories, repo_extra=repo_extra))
    return Daemon(build_definitions(config, stream_logs=False), instance)


def requests_by_sha(data: SensorExecutionData) -> dict[str, RunRequest]:
    requests = list(data.run_requests or [])
    by_sha = {str(request.run_key): request for request in requests}
    assert len(by_sha) == len(requests), "two run requests for one commit"
    assert all(request.partition_key == sha for sha, request in by_sha.items())
    return by_sha


def added_partitions(data: SensorExecutionData) -> list[str]:
    return [
        key
        for request in data.dynamic_partitions_requests or []
        if isinstance(request, AddDynamicPartitionsRequest)
        for key in request.partition_keys
    ]


@pytest.fixture
def shop(tmp_path: Path) -> dict[str, str]:
    """A repository with main, release/1.x (both watched) and feature/x (not watched)."""
    repo = tmp_path / "shop"
    shas = {"main": commit(repo, {"app.py": "v = 1\n"}, "feat: one")}
    git(repo, "checkout", "--quiet", "-b", "release/1.x")
    shas["release/1.x"] = commit(repo, {"app.py": "v = 2\n"}, "fix: two")
    git(repo, "checkout", "--quiet", "-b", "feature/x")
    shas["feature/x"] = commit(repo, {"app.py": "v = 3\n"}, "feat: three")
    git(repo, "checkout", "--quiet", "main")
    return shas


@pytest.fixture
def daemon(tmp_path: Path, instance: DagsterInstance, shop: dict[str, str]) -> Daemon:
    return daemon_for(tmp_path, instance, {"shop": tmp_path / "shop"}, WATCHED)


def test_first_tick_requests_one_run_per_watched_head_then_nothing(
    daemon: Daemon, shop: dict[str, str]
) -> None:
    first = daemon.tick("shop")

    requests = requests_by_sha(first)
    assert set(requests) == {shop["main"], shop["release/1.x"]}
    assert sorted(added_partitions(first)) == sorted(requests)
    main = requests[shop["main"]].tags
    assert (main[REF_TAG], main[BRANCH_TAG]) == ("refs/heads/main", "main")
    release = requests[shop["release/1.x"]].tags
    assert (release[REF_TAG], release[BRANCH_TAG]) == ("refs/heads/release/1.x", "release/1.x")
    assert main[DETECTED_AT_TAG]
    assert daemon.cursor("shop") == {
        "refs/heads/main": shop["main"],
        "refs/heads/release/1.x": shop["release/1.x"],
    }
    assert daemon.instance.get_dynamic_partitions("shop_commits") == sorted(requests)

    second = daemon.tick("shop")
    assert not second.run_requests
    assert not second.dynamic_partitions_requests
    assert second.skip_message == "no new commits"


def test_a_new_commit_on_main_requests_exactly_one_run(
    daemon: Daemon, shop: dict[str, str], tmp_path: Path
) -> None:
    daemon.tick("shop")
    new = commit(tmp_path / "shop", {"app.py": "v = 4\n"}, "feat: four")

    data = daemon.tick("shop")

    assert list(requests_by_sha(data)) == [new]
    assert added_partitions(data) == [new]
    assert requests_by_sha(data)[new].tags[REF_TAG] == "refs/heads/main"
    assert not daemon.tick("shop").run_requests


def test_a_force_push_requests_a_run_for_the_rewritten_head(
    daemon: Daemon, shop: dict[str, str], tmp_path: Path
) -> None:
    repo = tmp_path / "shop"
    pushed = commit(repo, {"app.py": "v = 5\n"}, "feat: pushed")
    assert requests_by_sha(daemon.tick("shop")).keys() == {pushed, shop["release/1.x"]}

    git(repo, "reset", "--quiet", "--hard", "HEAD~1")
    rewritten = commit(repo, {"app.py": "v = 6\n"}, "feat: rewritten")
    data = daemon.tick("shop")

    assert list(requests_by_sha(data)) == [rewritten]
    assert daemon.cursor("shop")["refs/heads/main"] == rewritten


def test_a_force_push_back_to_a_built_commit_requests_nothing(
    daemon: Daemon, shop: dict[str, str], tmp_path: Path
) -> None:
    repo = tmp_path / "shop"
    daemon.tick("shop")
    commit(repo, {"app.py": "v = 7\n"}, "feat: reverted later")
    daemon.tick("shop")

    git(repo, "reset", "--quiet", "--hard", shop["main"])
    data = daemon.tick("shop")

    assert not data.run_requests
    assert daemon.cursor("shop")["refs/heads/main"] == shop["main"]


def test_a_deleted_branch_is_forgotten_and_recreating_it_at_a_built_commit_builds_nothing(
    daemon: Daemon, shop: dict[str, str], tmp_path: Path
) -> None:
    repo = tmp_path / "shop"
    daemon.tick("shop")
    runs_before = len(daemon.instance.get_run_ids())

    git(repo, "branch", "--quiet", "-D", "release/1.x")
    deleted = daemon.tick("shop")
    assert not deleted.run_requests
    assert daemon.cursor("shop") == {"refs/heads/main": shop["main"]}

    git(repo, "branch", "--quiet", "release/1.x", shop["release/1.x"])
    recreated = daemon.tick("shop")
    assert not recreated.run_requests
    assert not recreated.dynamic_partitions_requests
    assert daemon.cursor("shop")["refs/heads/release/1.x"] == shop["release/1.x"]

    git(repo, "branch", "--quiet", "release/2.x", shop["main"])
    assert not daemon.tick("shop").run_requests
    assert len(daemon.instance.get_run_ids()) == runs_before


def test_a_commit_built_by_cicd_run_is_not_rebuilt_when_a_branch_reaches_it(
    daemon: Daemon, shop: dict[str, str], tmp_path: Path
) -> None:
    # The daemon's run-key check only knows this sensor's runs; the sensor knows them all.
    daemon.tick("shop")
    git(tmp_path / "shop", "merge", "--quiet", "--ff-only", "feature/x")
    daemon.build("shop", shop["feature/x"], tags={"cicd/trigger": "cli"})

    assert not daemon.tick("shop").run_requests


def test_a_partition_without_a_run_is_still_built(
    daemon: Daemon, shop: dict[str, str], tmp_path: Path
) -> None:
    # A tick that failed after adding its partitions but before creating its runs.
    daemon.tick("shop")
    new = commit(tmp_path / "shop", {"app.py": "v = 8\n"}, "feat: eight")
    daemon.instance.add_dynamic_partitions("shop_commits", [new])

    data = daemon.tick("shop")

    assert list(requests_by_sha(data)) == [new]
    assert not data.dynamic_partitions_requests


def test_an_annotated_tag_on_a_built_commit_builds_nothing_and_on_a_new_commit_builds_it(
    daemon: Daemon, shop: dict[str, str], tmp_path: Path
) -> None:
    repo = tmp_path / "shop"
    daemon.tick("shop")

    git(repo, "tag", "--annotate", "v1.0", "-m", "release 1.0", shop["main"])
    on_built = daemon.tick("shop")
    assert not on_built.run_requests
    assert daemon.cursor("shop")["refs/tags/v1.0"] == shop["main"]  # the commit, not the tag

    new = commit(repo, {"app.py": "v = 9\n"}, "feat: nine")
    git(repo, "tag", "--annotate", "v1.1", "-m", "release 1.1")
    on_new = daemon.tick("shop")
    assert list(requests_by_sha(on_new)) == [new]
    tags = requests_by_sha(on_new)[new].tags
    assert (tags[REF_TAG], tags[BRANCH_TAG]) == ("refs/tags/v1.1", "main")


def test_a_tag_on_an_unwatched_branch_builds_with_no_branch(
    daemon: Daemon, shop: dict[str, str], tmp_path: Path
) -> None:
    daemon.tick("shop")
    git(tmp_path / "shop", "tag", "--annotate", "v2.0-rc1", "-m", "rc", shop["feature/x"])

    data = daemon.tick("shop")

    tags = requests_by_sha(data)[shop["feature/x"]].tags
    assert (tags[REF_TAG], tags[BRANCH_TAG]) == ("refs/tags/v2.0-rc1", "")


def test_two_refs_at_one_new_commit_request_one_run(
    daemon: Daemon, shop: dict[str, str], tmp_path: Path
) -> None:
    repo = tmp_path / "shop"
    daemon.tick("shop")
    new = commit(repo, {"app.py": "v = 10\n"}, "feat: ten")
    git(repo, "branch", "--quiet", "release/2.x", new)

    data = daemon.tick("shop")

    assert list(requests_by_sha(data)) == [new]
    assert added_partitions(data) == [new]
    tags = requests_by_sha(data)[new].tags
    assert (tags[REF_TAG], tags[BRANCH_TAG]) == ("refs/heads/main", "main")  # default first


# Names git accepts that a shell would run (`touch PWNED` would land in the cwd: tmp_path).
HOSTILE_BRANCHES = [
    "x$(touch${IFS}PWNED)",
    "`touch${IFS}PWNED`",
    ";touch${IFS}PWNED;",
    "a|touch${IFS}PWNED",
    "x&&touch${IFS}PWNED",
    "-rf",
    "--upload-pack=touch${IFS}PWNED",
    'it\'s"quoted"',
    "日本語",
    "機能/ブランチ",
]


def test_hostile_branch_names_reach_tags_unchanged_and_never_run(
    tmp_path: Path, instance: DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    started_in = Path.cwd()
    monkeypatch.chdir(tmp_path)
    repo = tmp_path / "shop"
    main = commit(repo, {"app.py": "v = 0\n"}, "feat: zero")
    git(repo, "checkout", "--quiet", "--detach")
    shas = {}
    for index, name in enumerate(HOSTILE_BRANCHES):
        shas[name] = commit(repo, {"app.py": f"v = {index + 1}\n"}, f"feat: {name}")
        # update-ref: `git branch` refuses a leading "-", a remote would not.
        git(repo, "update-ref", f"refs/heads/{name}", shas[name])
    daemon = daemon_for(tmp_path, instance, {"shop": repo}, 'branches: ["*"]')

    requests = requests_by_sha(daemon.tick("shop"))

    assert set(requests) == {main, *shas.values()}
    for name, sha in shas.items():
        assert requests[sha].tags[BRANCH_TAG] == name
        assert requests[sha].tags[REF_TAG] == f"refs/heads/{name}"
    assert set(daemon.cursor("shop")) >= {f"refs/heads/{name}" for name in HOSTILE_BRANCHES}
    assert not daemon.tick("shop").run_requests
    assert not list(tmp_path.rglob("PWNED"))
    assert not (started_in / "PWNED").exists()


def test_a_vanished_repository_skips_with_its_name_and_keeps_its_cursor(
    tmp_path: Path, instance: DagsterInstance
) -> None:
    shop, web = tmp_path / "shop", tmp_path / "web"
    commit(shop, {"app.py": "v = 1\n"})
    commit(web, {"app.py": "v = 1\n"})
    daemon = daemon_for(tmp_path, instance, {"shop": shop, "web": web}, "")
    assert daemon.tick("shop").run_requests
    assert daemon.tick("web").run_requests
    cursor = daemon.cursors["shop"]

    shutil.rmtree(shop)
    new = commit(web, {"app.py": "v = 2\n"})
    skipped = daemon.tick("shop")
    other = daemon.tick("web")

    assert not skipped.run_requests
    assert not skipped.dynamic_partitions_requests
    assert skipped.skip_message is not None
    assert skipped.skip_message.startswith("shop: ")
    assert str(shop) in skipped.skip_message
    assert daemon.cursors["shop"] == cursor
    assert list(requests_by_sha(other)) == [new]


def test_sensor_is_due_once_per_poll_interval(tmp_path: Path, shop: dict[str, str]) -> None:
    def interval(folder: Path, repo_extra: str) -> int | None:
        folder.mkdir()
        path = control_config(folder, {"shop": tmp_path / "shop"}, repo_extra=repo_extra)
        defs = build_definitions(load_control_config(path), stream_logs=False)
        return defs.resolve_sensor_def("shop_commits").minimum_interval_seconds

    # One second under the interval, so the daemon's 5 s loop never skips a due tick.
    assert interval(tmp_path / "custom", "poll_interval_s: 45") == 44
    assert interval(tmp_path / "default", "") == 29
