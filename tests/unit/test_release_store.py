"""The releases table through HistoryStore, on SQLite and PostgreSQL."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from cicd_dagster.store import HistoryStore
from cicd_dagster.store.history import ReleaseRecord
from tests.unit.test_history_store import database_url  # noqa: F401 (a fixture)

AT = datetime(2025, 3, 1, 9, 30, tzinfo=UTC)


@pytest.fixture
def store(database_url: str) -> Iterator[HistoryStore]:  # noqa: F811
    history = HistoryStore(database_url)
    yield history
    history.dispose()


def release(version: str, sha: str, at: datetime, **fields: object) -> ReleaseRecord:
    values: dict = {
        "version": version,
        "tag": f"v{version}",
        "commit_sha": sha,
        "previous_version": None,
        "bump": "initial",
        "prerelease": "-" in version,
        "commit_count": 3,
        "changelog": f"## {version}\n\n<script>kept as text</script>\n",
        "created_at": at,
        **fields,
    }
    return ReleaseRecord(**values)


def test_releases_newest_first_with_filters(store: HistoryStore) -> None:
    store.record_release("shop", release("0.1.0", "a" * 40, AT, run_id="r1", created_by="cli"))
    store.record_release(
        "shop",
        release("0.2.0-rc.1", "b" * 40, AT + timedelta(hours=1), previous_version="0.1.0",
                bump="minor", notes_path="/n/0.2.0-rc.1.md"),
    )  # fmt: skip
    store.record_release("other", release("3.0.0", "c" * 40, AT + timedelta(hours=2)))

    rows = store.releases(repository="shop")
    assert list(rows["version"]) == ["0.2.0-rc.1", "0.1.0"]
    first = rows.iloc[1]
    assert (first["tag"], first["commit"], first["run_id"], first["created_by"]) == (
        "v0.1.0",
        "a" * 40,
        "r1",
        "cli",
    )
    assert first["created_at"] == AT
    assert first["changelog"] == "## 0.1.0\n\n<script>kept as text</script>\n"
    newest = rows.iloc[0]
    assert bool(newest["prerelease"]) and newest["previous_version"] == "0.1.0"
    assert newest["notes_path"] == "/n/0.2.0-rc.1.md"
    assert newest["report_path"] is None
    assert list(store.releases(commit="b" * 40)["version"]) == ["0.2.0-rc.1"]
    assert list(store.releases(since=AT + timedelta(minutes=90))["repository"]) == ["other"]
    assert list(store.releases()["repository"]) == ["other", "shop", "shop"]


def test_a_version_is_released_once(store: HistoryStore) -> None:
    store.record_release("shop", release("1.0.0", "a" * 40, AT))
    with pytest.raises(ValueError, match=r"shop 1\.0\.0 is released already"):
        store.record_release("shop", release("1.0.0", "b" * 40, AT + timedelta(hours=1)))
    # The same version of another repository is another release; the store stays usable.
    store.record_release("other", release("1.0.0", "b" * 40, AT))
    assert len(store.releases()) == 2


def test_naive_datetimes_are_refused(store: HistoryStore) -> None:
    with pytest.raises(Exception, match="naive"):
        store.record_release("shop", release("1.0.0", "a" * 40, datetime(2025, 1, 1)))
    assert store.releases().empty


def test_no_releases_is_an_empty_frame_with_the_columns(store: HistoryStore) -> None:
    rows = store.releases(repository="shop")
    assert rows.empty
    assert {"version", "tag", "commit", "changelog", "created_at"} <= set(rows.columns)
