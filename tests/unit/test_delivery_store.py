"""The deliveries of the history DB (the notification outbox), on SQLite and PostgreSQL."""

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from cicd_dagster.store import HistoryStore
from tests.unit.test_history_store import database_url  # noqa: F401 (a fixture)

T0 = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
ALL_KINDS = ["failed", "deployed", "rolled_back", "drift"]


@pytest.fixture
def store(database_url: str) -> Iterator[HistoryStore]:  # noqa: F811
    history = HistoryStore(database_url)
    yield history
    history.dispose()


def enqueue(store: HistoryStore, channel: str = "webhook:a", kinds: list[str] = ALL_KINDS) -> int:
    return store.enqueue_deliveries(
        channel, kinds, not_before=T0 - 24 * HOUR, new_channel_since=T0 - HOUR / 4
    )


def statuses(store: HistoryStore, channel: str = "webhook:a") -> dict[int, str]:
    frame = store.deliveries(channel=channel)
    return dict(zip(frame["event_id"], frame["status"], strict=True))


def test_a_new_channel_starts_with_recent_events_not_the_history(store: HistoryStore) -> None:
    old = store.record_event("app", "deployed", "last week", at=T0 - 7 * 24 * HOUR)
    recent = store.record_event("app", "deployed", "ten minutes ago", at=T0 - HOUR / 6)

    assert enqueue(store) == 1
    assert statuses(store) == {recent: "pending"}
    later = store.record_event("app", "failed", "now", at=T0)
    assert enqueue(store) == 1
    assert enqueue(store) == 0
    assert statuses(store) == {later: "pending", recent: "pending"}
    assert old not in set(store.deliveries(status="skipped")["event_id"])


def test_a_new_channel_without_recent_events_marks_where_it_starts(store: HistoryStore) -> None:
    store.record_event("app", "deployed", "yesterday", at=T0 - 20 * HOUR)
    newest = store.record_event("app", "drift", "two hours ago", at=T0 - 2 * HOUR)

    assert enqueue(store, kinds=["deployed"]) == 0
    skipped = store.deliveries(status="skipped")
    assert list(skipped["event_id"]) == [newest]
    assert store.deliveries().empty  # the marker is bookkeeping, not a delivery

    # An event recorded later, even with an older time, is after the marker.
    late = store.record_event("app", "deployed", "reported late", at=T0 - 3 * HOUR)
    assert enqueue(store, kinds=["deployed"]) == 1
    assert statuses(store) == {late: "pending"}


def test_a_channel_on_an_empty_history_gets_the_first_events(store: HistoryStore) -> None:
    assert enqueue(store) == 0
    first = store.record_event("app", "deployed", "first", at=T0)
    assert enqueue(store) == 1
    assert statuses(store) == {first: "pending"}


def test_only_the_kinds_a_channel_wants_and_never_stale_events(store: HistoryStore) -> None:
    store.record_event("app", "released", "not wanted", at=T0)
    wanted = store.record_event("app", "failed", "wanted", at=T0)
    assert enqueue(store, kinds=["failed"]) == 1
    stale = store.record_event("app", "failed", "two days late", at=T0 - 48 * HOUR)
    assert enqueue(store, kinds=["failed"]) == 0
    assert statuses(store) == {wanted: "pending"}
    assert stale not in statuses(store)
    with pytest.raises(ValueError, match="unknown event kinds"):
        enqueue(store, kinds=["deploy"])


def test_channels_are_independent(store: HistoryStore) -> None:
    event = store.record_event("app", "deployed", "v1", at=T0)
    assert enqueue(store, "webhook:a") == 1
    assert enqueue(store, "smtp:b") == 1
    claimed = store.claim_delivery("webhook:a", now=T0, lease_until=T0 + HOUR)
    assert claimed is not None
    store.mark_delivered(claimed.id, at=T0)
    assert statuses(store, "webhook:a") == {event: "sent"}
    assert statuses(store, "smtp:b") == {event: "pending"}


def test_a_claim_takes_the_oldest_due_delivery_and_leases_it(store: HistoryStore) -> None:
    first = store.record_event("app", "deployed", "first", environment="dev", at=T0 - HOUR / 10)
    second = store.record_event("app", "failed", "second", at=T0)
    enqueue(store)

    claimed = store.claim_delivery("webhook:a", now=T0, lease_until=T0 + HOUR)
    assert claimed is not None
    assert (claimed.event.id, claimed.attempts, claimed.channel) == (first, 1, "webhook:a")
    assert (claimed.event.repository, claimed.event.kind, claimed.event.environment) == (
        "app",
        "deployed",
        "dev",
    )
    assert claimed.event.at == T0 - HOUR / 10
    # Leased: the next claim gets the other one, and then nothing until the lease ends.
    other = store.claim_delivery("webhook:a", now=T0, lease_until=T0 + HOUR)
    assert other is not None and other.event.id == second
    assert store.claim_delivery("webhook:a", now=T0, lease_until=T0 + HOUR) is None
    again = store.claim_delivery("webhook:a", now=T0 + 2 * HOUR, lease_until=T0 + 3 * HOUR)
    assert again is not None and (again.event.id, again.attempts) == (first, 2)
    with pytest.raises(ValueError, match="lease_until"):
        store.claim_delivery("webhook:a", now=T0, lease_until=T0)


def test_failed_attempts_are_retried_then_given_up(store: HistoryStore) -> None:
    event = store.record_event("app", "deployed", "v1", at=T0)
    enqueue(store)
    claimed = store.claim_delivery("webhook:a", now=T0, lease_until=T0 + HOUR)
    assert claimed is not None
    store.mark_delivery_failed(claimed.id, "timed out after 5 s", retry_at=T0 + HOUR / 2)

    row = store.deliveries().iloc[0]
    assert (row["status"], row["attempts"], row["last_error"]) == (
        "pending",
        1,
        "timed out after 5 s",
    )
    assert row["next_attempt_at"] == T0 + HOUR / 2
    assert store.claim_delivery("webhook:a", now=T0 + HOUR / 4, lease_until=T0 + HOUR) is None
    retried = store.claim_delivery("webhook:a", now=T0 + HOUR / 2, lease_until=T0 + HOUR)
    assert retried is not None and retried.attempts == 2
    store.mark_delivery_failed(retried.id, "HTTP 404 Not Found", retry_at=None)

    assert statuses(store) == {event: "failed"}
    assert (
        store.claim_delivery("webhook:a", now=T0 + 99 * HOUR, lease_until=T0 + 100 * HOUR) is None
    )
    assert list(store.deliveries(status="failed")["last_error"]) == ["HTTP 404 Not Found"]


def test_deliveries_are_listed_newest_first_with_filters(store: HistoryStore) -> None:
    store.record_event("app", "deployed", "app v1", at=T0 - HOUR / 10)
    store.record_event("web", "failed", "web red", commit_sha="f" * 40, at=T0)
    enqueue(store)
    claimed = store.claim_delivery("webhook:a", now=T0, lease_until=T0 + HOUR)
    assert claimed is not None
    store.mark_delivered(claimed.id, at=T0 + timedelta(seconds=1))

    frame = store.deliveries()
    assert list(frame.columns) == [
        "event_id",
        "repository",
        "kind",
        "environment",
        "commit",
        "at",
        "channel",
        "status",
        "attempts",
        "last_error",
        "next_attempt_at",
        "delivered_at",
    ]
    assert list(frame["repository"]) == ["web", "app"]
    assert list(frame["status"]) == ["pending", "sent"]
    assert frame.iloc[1]["delivered_at"] == T0 + timedelta(seconds=1)
    assert list(store.deliveries(repository="app")["kind"]) == ["deployed"]
    assert list(store.deliveries(status="pending")["commit"]) == ["f" * 40]
    assert list(store.deliveries(since=T0)["repository"]) == ["web"]
    assert store.deliveries(channel="smtp:b").empty
    with pytest.raises(ValueError, match="unknown delivery status"):
        store.deliveries(status="done")


def test_concurrent_claims_never_take_one_delivery_twice(
    store: HistoryStore,
    database_url: str,  # noqa: F811
) -> None:
    events = [store.record_event("app", "deployed", f"v{n}", at=T0) for n in range(40)]
    enqueue(store)
    stores = [HistoryStore(database_url) for _ in range(4)]
    start = threading.Barrier(len(stores))
    claimed: list[list[int]] = [[] for _ in stores]

    def claim_all(index: int) -> None:
        start.wait()
        while (
            found := stores[index].claim_delivery("webhook:a", now=T0, lease_until=T0 + HOUR)
        ) is not None:
            claimed[index].append(found.event.id)

    threads = [threading.Thread(target=claim_all, args=(index,)) for index in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for each in stores:
        each.dispose()

    everything = [event_id for ids in claimed for event_id in ids]
    assert sorted(everything) == sorted(events)
    assert set(store.deliveries()["attempts"]) == {1}


def test_concurrent_enqueues_add_each_delivery_once(
    store: HistoryStore,
    database_url: str,  # noqa: F811
) -> None:
    events = [store.record_event("app", "deployed", f"v{n}", at=T0) for n in range(20)]
    stores = [HistoryStore(database_url) for _ in range(3)]
    start = threading.Barrier(len(stores))
    added = [0] * len(stores)

    def add(index: int) -> None:
        start.wait()
        added[index] = enqueue(stores[index])

    threads = [threading.Thread(target=add, args=(index,)) for index in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for each in stores:
        each.dispose()

    assert sum(added) == len(events)
    assert sorted(store.deliveries()["event_id"]) == sorted(events)
