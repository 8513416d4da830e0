"""DORA metrics end to end: imported events through `cicd events import` and `cicd metrics
dora --json`, history from real deployments of a real git repository, the asset and the
sensor."""

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    SkipReason,
    build_sensor_context,
    materialize,
)

from assets.analytics_dora import DORA_METRICS_KEY, analytics_dora_assets
from cicd_dagster.analytics.dora import delivery_events, dora_metrics
from cicd_dagster.config import load_control_config
from cicd_dagster.resources import CicdResource
from cicd_dagster.store import DeploymentRecord, HistoryStore
from jobs.analytics import analytics_job, analytics_sensor
from tests.support import commit, control_config

CICD = [sys.executable, "-m", "cicd_dagster"]
ENVIRONMENTS = "environments:\n  - name: staging\n  - name: prod\n"


def sha(label: str) -> str:
    return label.ljust(40, "0")


def event(**fields: object) -> str:
    return json.dumps(fields)


# Every time zone on purpose: the hand computation below is in UTC.
EVENTS = [
    event(id="c0", type="change", time="2026-01-02T12:00:00Z", repository="shop", sha=sha("00")),
    event(id="c1", type="change", time="2026-01-05T08:00:00Z", repository="shop", sha=sha("a1")),
    event(
        id="c2", type="change", time="2026-01-05T09:30:00+01:00", repository="shop", sha=sha("a2")
    ),
    event(id="c3", type="change", time="2026-01-06T10:00:00Z", repository="shop", sha=sha("b1")),
    event(
        id="c4", type="change", time="2026-01-12T23:00:00-05:00", repository="shop", sha=sha("b2")
    ),
    event(id="c5", type="change", time="2026-01-20T12:00:00Z", repository="shop", sha=sha("c1")),
    event(
        id="d0",
        type="deployment",
        time="2026-01-03T12:00:00Z",
        repository="shop",
        sha=sha("00"),
        changes=[sha("00")],
    ),
    event(
        id="d1",
        type="deployment",
        time="2026-01-05T10:00:00Z",
        repository="shop",
        sha=sha("a2"),
        changes=[sha("a1"), sha("a2")],
    ),
    event(
        id="d2",
        type="deployment",
        time="2026-01-06T10:00:00Z",
        repository="shop",
        sha=sha("b1"),
        changes=[sha("b1")],
    ),
    event(
        id="d3",
        type="deployment",
        time="2026-01-13T08:00:00+02:00",
        repository="shop",
        sha=sha("b2"),
        changes=[sha("b2")],
    ),
    event(
        id="d4", type="deployment", time="2026-01-20T12:30:00Z", repository="shop", sha=sha("c1")
    ),
    event(
        id="d5",
        type="deployment",
        time="2026-01-20T18:00:00Z",
        repository="shop",
        sha=sha("dd"),
        changes=[sha("ee")],
    ),
    event(
        id="d6",
        type="deployment",
        time="2026-02-02T10:00:00Z",
        repository="shop",
        sha=sha("ff"),
        changes=[sha("ff")],
    ),
    event(
        id="i1",
        type="incident",
        time="2026-01-06T12:00:00Z",
        repository="shop",
        root_cause=sha("b1"),
        resolved="2026-01-06T15:00:00Z",
    ),
    event(
        id="i2",
        type="incident",
        time="2026-01-21T01:00:00+09:00",
        repository="shop",
        root_cause=sha("c1"),
        resolved="2026-01-20T17:00:00Z",
    ),
    event(
        id="i3",
        type="incident",
        time="2026-01-25T10:00:00Z",
        repository="shop",
        root_cause=sha("fe"),
        resolved="2026-01-25T10:45:00Z",
    ),
    event(
        id="i4",
        type="incident",
        time="2026-01-28T09:00:00Z",
        repository="shop",
        root_cause=sha("a1"),
    ),
    event(
        id="i5",
        type="incident",
        time="2026-01-04T06:00:00Z",
        repository="shop",
        root_cause=sha("00"),
        resolved="2026-01-04T08:00:00Z",
    ),
]
BAD_LINES = [
    event(id="x1", type="rollout", time="2026-01-05T10:00:00Z", repository="shop", sha=sha("a1")),
    event(id="x2", type="deployment", repository="shop", sha=sha("a1")),
    event(id="x3", type="change", time="2026-01-05T10:00:00", repository="shop", sha=sha("a1")),
    event(
        id="d1", type="deployment", time="2026-01-09T10:00:00Z", repository="shop", sha=sha("a1")
    ),
    '{"id": "x5", "type": "change",',
]
SINCE, UNTIL = "2026-01-04T00:00:00+00:00", "2026-01-31T12:00:00+00:00"


def hand_computed() -> dict[str, object]:
    """fourkeys' formulas worked by hand over EVENTS for (Jan 4 00:00, Jan 31 12:00] UTC."""
    # Deployments in the period: d1, d2, d3 (06:00Z), d4, d5; d0 is before it, d6 after.
    deployments = 5
    per_week = deployments / (27.5 / 7)  # 27.5 days
    # Days after the first event's day (Jan 2), in Sunday weeks: Jan 4-10 deployed on the
    # 5th and 6th, Jan 11-17 on the 13th, Jan 18-24 on the 20th, Jan 25-31 never.
    # Days deployed per week [2, 1, 1, 0]: median 1 < 3, not daily; weeks deployed
    # [1, 1, 1, 0]: median 1 >= 1, weekly.
    # Lead times in minutes: d1: a1 10:00-08:00 = 120, a2 10:00-08:30 = 90; d2: b1 0
    # (left out, <= 0); d3: b2 06:00-04:00 = 120; d4: its own commit c1 12:30-12:00 = 30;
    # d5: changes of unknown time. Median of [30, 90, 120, 120] = (90 + 120) / 2.
    lead_time = (90 + 120) / 2
    # Failed: d1 (i4's root cause a1), d2 (i1: b1), d4 (i2: c1); i3's root cause was never
    # deployed, i5's was deployed by d0 before the period.
    failure_rate = 3 / 5
    # Created = the earlier of the incident and its root cause's deployment: i1 10:00
    # (d2) -> 15:00 = 300; i2 12:30 (d4, before 16:00Z) -> 17:00 = 270; i3 10:00 -> 10:45
    # = 45; i4 is open; i5 is created Jan 3 12:00 (d0), before the period.
    restore = sorted([300, 270, 45])[1]
    return {
        "deployment_frequency": {
            "deployments": deployments,
            "deployment_days": 4,
            "per_week": round(per_week, 4),
            "bucket": "weekly",
            "level": "high",
        },
        "lead_time_for_changes": {
            "median_minutes": lead_time,
            "changes": 4,
            "bucket": "one day",
            "level": "elite",
        },
        "change_failure_rate": {
            "rate": failure_rate,
            "failed_deployments": 3,
            "deployments": 5,
            "bucket": "46-60%",
            "level": "low",
        },
        "time_to_restore": {
            "median_minutes": float(restore),
            "incidents": 4,
            "restored": 3,
            "bucket": "one day",
            "level": "elite",
        },
    }


def cicd(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CICD, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ.copy(),
    )


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """Watching "shop", never deployed here: its delivery history comes from elsewhere."""
    commit(tmp_path / "shop", {"README.md": "shop\n"})
    return control_config(tmp_path, {"shop": tmp_path / "shop"}, extra=ENVIRONMENTS)


def test_imported_events_give_fourkeys_numbers_computed_by_hand(
    config_path: Path, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join([*EVENTS, *BAD_LINES]) + "\n")

    imported = cicd(config_path, "events", "import", str(events), "--json")
    assert imported.returncode == 1, imported.stderr
    report = json.loads(imported.stdout)
    assert (report["imported"], report["unchanged"]) == (len(EVENTS), 0)
    first_bad = len(EVENTS) + 1
    assert [e["line"] for e in report["errors"]] == [first_bad + n for n in range(5)]
    assert f"events.jsonl:{first_bad}: type: 'rollout' is not one of" in imported.stderr
    assert f"events.jsonl:{first_bad + 1}: time: Field required" in imported.stderr
    assert f"events.jsonl:{first_bad + 2}: time: Input should have timezone info" in (
        imported.stderr
    )
    assert f"{first_bad + 3}: duplicate id 'd1' (first on line 8)" in imported.stderr
    assert f"{first_bad + 4}: not JSON" in imported.stderr

    dora = cicd(config_path, "metrics", "dora", "--since", SINCE, "--until", UNTIL, "--json")
    assert dora.returncode == 0, dora.stderr
    document = json.loads(dora.stdout)
    assert (document["since"], document["until"], document["environment"]) == (
        SINCE,
        UNTIL,
        "prod",
    )
    [shop] = document["repositories"]
    assert shop == {"repository": "shop", "notes": [], **hand_computed()}

    # Importing the good lines again changes nothing, and neither do the numbers.
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(EVENTS) + "\n")
    again = cicd(config_path, "events", "import", str(good), "--json")
    assert again.returncode == 0, again.stderr
    assert (json.loads(again.stdout)["imported"], json.loads(again.stdout)["unchanged"]) == (
        0,
        len(EVENTS),
    )
    rerun = cicd(config_path, "metrics", "dora", "--since", SINCE, "--until", UNTIL, "--json")
    assert json.loads(rerun.stdout)["repositories"] == document["repositories"]


def test_a_changed_event_under_a_known_id_is_reported_and_kept_as_it_was(
    config_path: Path, tmp_path: Path
) -> None:
    first = tmp_path / "first.jsonl"
    first.write_text(EVENTS[1] + "\n")
    assert cicd(config_path, "events", "import", str(first)).returncode == 0
    changed = tmp_path / "changed.jsonl"
    changed.write_text(EVENTS[1].replace("08:00:00Z", "07:00:00Z") + "\n")

    done = cicd(config_path, "events", "import", str(changed))

    assert done.returncode == 1
    assert "id 'c1' was imported before with other content: kept as it was" in done.stderr
    history = HistoryStore(load_control_config(config_path).history_db_url)
    try:
        [stored] = history.external_events("shop")["time"]
    finally:
        history.dispose()
    assert stored == datetime(2026, 1, 5, 8, tzinfo=UTC)


def test_a_period_without_deployments_says_no_data(config_path: Path, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(EVENTS) + "\n")
    assert cicd(config_path, "events", "import", str(events)).returncode == 0

    dora = cicd(
        config_path,
        "metrics",
        "dora",
        "--repo",
        "shop",
        "--since",
        "2025-06-01",
        "--until",
        "2025-06-30",
        "--json",
    )
    table = cicd(config_path, "metrics", "dora", "--since", "2025-06-01", "--until", "2025-06-30")

    assert dora.returncode == 0, dora.stderr
    [shop] = json.loads(dora.stdout)["repositories"]
    for metric in (
        "deployment_frequency",
        "lead_time_for_changes",
        "change_failure_rate",
        "time_to_restore",
    ):
        assert shop[metric]["level"] == "no data"
        assert shop[metric]["bucket"] is None
    assert shop["change_failure_rate"]["rate"] is None
    assert shop["deployment_frequency"]["deployments"] == 0
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("no data") == 4


def test_bad_arguments_exit_2(config_path: Path, tmp_path: Path) -> None:
    missing = cicd(config_path, "events", "import", str(tmp_path / "nope.jsonl"))
    unknown = cicd(config_path, "metrics", "dora", "--repo", "nope")
    backwards = cicd(
        config_path, "metrics", "dora", "--since", "2026-02-01", "--until", "2026-01-01"
    )

    assert (missing.returncode, unknown.returncode, backwards.returncode) == (2, 2, 2)
    assert "nope.jsonl: no such file" in missing.stderr
    assert "unknown repository 'nope'" in unknown.stderr
    assert "is not before the end of the period" in backwards.stderr


# --- from the history DB and git ------------------------------------------------------------


def commit_at(repo: Path, when: str, monkeypatch: pytest.MonkeyPatch, name: str) -> str:
    monkeypatch.setenv("GIT_COMMITTER_DATE", when)
    monkeypatch.setenv("GIT_AUTHOR_DATE", when)
    return commit(repo, {name: name})


def deployed(environment: str, commit_sha: str, at: datetime, status: str = "deployed"):
    return DeploymentRecord(
        environment=environment,
        commit_sha=commit_sha,
        strategy="rolling",
        status=status,
        version=commit_sha[:7],
        previous_version=None,
        reason="test",
        started_at=at - timedelta(minutes=5),
        finished_at=at,
    )


def test_production_deployments_bring_the_commits_since_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "shop"
    first = commit_at(repo, "2026-01-05T08:00:00+00:00", monkeypatch, "a")
    second = commit_at(repo, "2026-01-05T10:00:00+01:00", monkeypatch, "b")  # 09:00Z
    third = commit_at(repo, "2026-01-06T10:00:00+00:00", monkeypatch, "c")
    config = load_control_config(control_config(tmp_path, {"shop": repo}, extra=ENVIRONMENTS))
    history = HistoryStore(config.history_db_url)
    try:
        history.record_deployment(
            "shop", deployed("prod", second, datetime(2026, 1, 5, 10, tzinfo=UTC))
        )
        # Neither staging nor a rolled-back attempt is a production deployment.
        history.record_deployment(
            "shop", deployed("staging", third, datetime(2026, 1, 6, 11, tzinfo=UTC))
        )
        history.record_deployment(
            "shop", deployed("prod", third, datetime(2026, 1, 6, 11, 30, tzinfo=UTC), "rolled_back")
        )
        history.record_deployment(
            "shop", deployed("prod", third, datetime(2026, 1, 6, 12, tzinfo=UTC))
        )
        history.open_incident(
            "shop", "prod", third, "probe failed", at=datetime(2026, 1, 6, 13, tzinfo=UTC)
        )
        history.close_incident("shop", "prod", at=datetime(2026, 1, 6, 14, tzinfo=UTC))
        # A staging incident is not a production one.
        history.open_incident(
            "shop", "staging", third, "probe failed", at=datetime(2026, 1, 7, tzinfo=UTC)
        )

        events = delivery_events(config, history, "shop")
        metrics = dora_metrics(
            "shop", events, datetime(2026, 1, 4, tzinfo=UTC), datetime(2026, 1, 31, tzinfo=UTC)
        )
    finally:
        history.dispose()

    assert [set(changes) for changes in events.deployments["changes"]] == [
        {first, second},
        {third},
    ]
    # Lead times: first 10:00-08:00 = 120, second 10:00-09:00 = 60, third 12:00-10:00 = 120.
    assert (metrics.lead_time.value, metrics.lead_time.count) == (120, 3)
    assert (metrics.failed_deployments, metrics.change_failure_rate.value) == (1, 0.5)
    # Created at the deployment of its root cause (12:00), before it opened (13:00).
    assert (metrics.time_to_restore.value, metrics.incidents) == (120, 1)
    assert metrics.notes == []


def test_the_asset_has_numeric_metadata_and_a_chart_and_the_sensor_follows_history(
    tmp_path: Path,
) -> None:
    commit(tmp_path / "shop", {"README.md": "shop\n"})
    config_path = control_config(tmp_path, {"shop": tmp_path / "shop"}, extra=ENVIRONMENTS)
    now = datetime.now(UTC)
    lines = [
        event(
            id="c1",
            type="change",
            time=(now - timedelta(days=3, hours=2)).isoformat(),
            repository="shop",
            sha=sha("a1"),
        ),
        event(
            id="d1",
            type="deployment",
            time=(now - timedelta(days=3)).isoformat(),
            repository="shop",
            sha=sha("a1"),
        ),
        event(
            id="i1",
            type="incident",
            time=(now - timedelta(days=2)).isoformat(),
            repository="shop",
            root_cause=sha("a1"),
            resolved=(now - timedelta(days=2) + timedelta(minutes=30)).isoformat(),
        ),
    ]
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(lines) + "\n")
    resource = CicdResource(config_path=str(config_path), stream_logs=False)
    instance = DagsterInstance.ephemeral()
    sensor = analytics_sensor(analytics_job())

    with build_sensor_context(instance=instance, resources={"cicd": resource}) as context:
        first = sensor(context)
    assert cicd(config_path, "events", "import", str(events)).returncode == 0
    with build_sensor_context(
        instance=instance, resources={"cicd": resource}, cursor=first.cursor
    ) as context:
        after_import = sensor(context)
    with build_sensor_context(
        instance=instance, resources={"cicd": resource}, cursor=after_import.cursor
    ) as context:
        unchanged = sensor(context)
    result = materialize(
        analytics_dora_assets(load_control_config(config_path)),
        resources={"cicd": resource},
        instance=instance,
    )

    assert [len(first.run_requests), len(after_import.run_requests)] == [1, 1]
    assert after_import.cursor != first.cursor
    assert isinstance(unchanged, SkipReason)
    assert result.success
    [materialization] = result.asset_materializations_for_node("analytics__dora_metrics")
    assert materialization.asset_key == DORA_METRICS_KEY == AssetKey(["analytics", "dora_metrics"])
    metadata = materialization.metadata
    assert metadata["shop/deployments"].value == 1
    assert metadata["shop/lead_time_minutes"].value == 120
    assert metadata["shop/change_failure_rate"].value == 1
    # From the deployment of its root cause, a day before the incident opened.
    assert metadata["shop/time_to_restore_minutes"].value == 24 * 60 + 30
    assert metadata["deployments_chart"].value.startswith("![deployments](data:image/png;base64,")
    chart = Path(metadata["deployments_chart_path"].value)
    assert chart.parent == tmp_path / ".cicd" / "reports" / "analytics"
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
