"""Parsing fourkeys-style event lines, and storing them idempotently on SQLite and
PostgreSQL."""

import json
from datetime import UTC, datetime

import pytest

from cicd_dagster.analytics.events_import import parse_events
from cicd_dagster.store import HistoryStore
from tests.unit.test_history_store import database_url, store  # noqa: F401 (fixtures)

SHA = "ab" * 20
NOW = datetime(2026, 2, 1, tzinfo=UTC)


def line(**fields: object) -> str:
    return json.dumps({"id": "e1", "repository": "shop", **fields})


def test_times_in_any_offset_are_stored_in_utc_and_shas_lowercased() -> None:
    events, errors = parse_events(
        [
            line(type="change", time="2026-01-05T09:30:00+05:30", sha=SHA.upper()),
            line(
                id="e2",
                type="incident",
                time="2026-01-05T00:00:00-08:00",
                resolved="2026-01-05T10:00:00Z",
            ),
        ]
    )
    assert errors == []
    assert events[0].time == datetime(2026, 1, 5, 4, tzinfo=UTC)
    assert events[0].sha == SHA
    assert (events[1].time, events[1].resolved_at) == (
        datetime(2026, 1, 5, 8, tzinfo=UTC),
        datetime(2026, 1, 5, 10, tzinfo=UTC),
    )
    assert (events[1].root_cause, events[1].sha) == (None, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            line(type="push", time="2026-01-05T09:00:00Z", sha=SHA),
            "type: 'push' is not one of change, deployment, incident",
        ),
        (
            json.dumps({"id": "e1", "time": "2026-01-05T09:00:00Z"}),
            "type: missing (change, deployment or incident)",
        ),
        (line(type="deployment", sha=SHA), "time: Field required"),
        (line(type="change", time="2026-01-05T09:00:00Z"), "sha: Field required"),
        (
            line(type="change", time="2026-01-05T09:00:00", sha=SHA),
            "time: Input should have timezone info",
        ),
        (line(type="change", time="yesterday", sha=SHA), "time: Input should be a valid datetime"),
        (
            line(type="change", time="2026-01-05T09:00:00Z", sha="main"),
            "sha: 'main' is not a commit sha (7-64 hex digits)",
        ),
        (
            line(type="deployment", time="2026-01-05T09:00:00Z", sha=SHA, changes=["HEAD~1"]),
            "changes.0: 'HEAD~1' is not a commit sha",
        ),
        (
            line(type="change", time="2026-01-05T09:00:00Z", sha=SHA, repository="Shop"),
            'repository: "Shop" is not a valid name',
        ),
        (
            line(type="incident", time="2026-01-05T09:00:00Z", severity="high"),
            "severity: Extra inputs are not permitted",
        ),
        ("[1, 2]", "line: Input should be a valid dictionary"),
        ('{"id": "e1",', "not JSON: "),
    ],
)
def test_a_bad_line_is_reported_by_number_and_skipped(text: str, message: str) -> None:
    good = line(id="ok", type="change", time="2026-01-05T09:00:00Z", sha=SHA)

    events, errors = parse_events([good, "", text, good.replace('"ok"', '"ok2"')])

    assert [event.source_id for event in events] == ["ok", "ok2"]
    [error] = errors
    assert error.line == 3
    assert message in error.message


def test_an_id_twice_in_one_file_is_an_error_on_the_second_line() -> None:
    text = line(type="change", time="2026-01-05T09:00:00Z", sha=SHA)

    events, errors = parse_events([text, text, text.replace('"shop"', '"other"')])

    assert [(e.repository, e.source_id) for e in events] == [("shop", "e1"), ("other", "e1")]
    assert [str(error) for error in errors] == ["line 2: duplicate id 'e1' (first on line 1)"]


def test_importing_again_changes_nothing_and_other_content_is_a_conflict(
    store: HistoryStore,  # noqa: F811 (the imported fixture)
) -> None:
    events, _ = parse_events(
        [
            line(type="deployment", time="2026-01-05T09:00:00+01:00", sha=SHA, changes=[SHA]),
            line(id="e2", type="incident", time="2026-01-06T09:00:00Z", root_cause=SHA),
        ]
    )
    first = store.import_events(events, at=NOW)
    again = store.import_events(events, at=NOW)
    changed, _ = parse_events([line(type="deployment", time="2026-01-05T09:00:00Z", sha=SHA)])
    conflict = store.import_events(changed, at=NOW)

    assert (first.imported, first.unchanged, first.conflicting) == (["e1", "e2"], [], [])
    assert (again.imported, again.unchanged, again.conflicting) == ([], ["e1", "e2"], [])
    assert (conflict.imported, conflict.conflicting) == ([], ["e1"])
    stored = store.external_events("shop").to_dict("records")
    assert [(e["id"], e["type"], e["time"], e["changes"]) for e in stored] == [
        ("e1", "deployment", datetime(2026, 1, 5, 8, tzinfo=UTC), [SHA]),
        ("e2", "incident", datetime(2026, 1, 6, 9, tzinfo=UTC), []),
    ]
    assert stored[1]["root_cause"] == SHA


def test_the_delivery_marker_moves_with_imports_deployments_and_closed_incidents(
    store: HistoryStore,  # noqa: F811 (the imported fixture)
) -> None:
    empty = store.delivery_marker()
    events, _ = parse_events([line(type="change", time="2026-01-05T09:00:00Z", sha=SHA)])
    store.import_events(events, at=NOW)
    imported = store.delivery_marker()
    store.open_incident("shop", "prod", SHA, "probe failed", at=NOW)
    opened = store.delivery_marker()
    store.close_incident("shop", "prod", at=NOW)
    closed = store.delivery_marker()

    assert len({empty, imported, opened, closed}) == 4
    assert store.delivery_marker() == closed
