"""Notifications delivered to real servers on 127.0.0.1: a webhook (http.server), an SMTP
server (aiosmtpd), one that accepts and never answers, and a port nobody listens on."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from dagster import (
    DagsterInstance,
    Failure,
    SkipReason,
    StaticPartitionsDefinition,
    asset,
    build_run_status_sensor_context,
    build_sensor_context,
    materialize,
)

from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.deploy.local import free_port
from cicd_dagster.notify import channels_for, deliver
from cicd_dagster.resources import CicdResource
from cicd_dagster.store import HistoryStore
from sensors.notifications import notification_sensor, run_failure_event_sensor
from tests.servers import Mailbox, Webhook
from tests.unit.test_history_store import database_url  # noqa: F401 (a fixture)

SHA = "1a2b3c4d5e6f" + "0" * 28


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A server that accepts connections (the kernel does) and never answers."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook/s3cr3tT0k3n"


@pytest.fixture
def refused_url() -> str:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook/s3cr3tT0k3n"


@pytest.fixture
def history(tmp_path: Path) -> Iterator[HistoryStore]:
    store = HistoryStore(f"sqlite:///{tmp_path / 'history.db'}")
    yield store
    store.dispose()


def config(tmp_path: Path, notifications: str, db: str | None = None) -> ControlConfig:
    path = tmp_path / "cicd.yaml"
    db = db or f"sqlite:///{tmp_path / 'history.db'}"
    path.write_text(
        "repositories: [{name: shop-api, url: /srv/git/shop-api}]\n"
        f"history_db: {db}\n"
        "notifications:\n" + notifications
    )
    return load_control_config(path)


class Clock:
    """A frozen clock that tests move forward: backoff without waiting."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def test_a_webhook_gets_slack_json_with_the_event(
    tmp_path: Path, history: HistoryStore, webhook: Webhook
) -> None:
    control = config(tmp_path, f"  - {{type: webhook, url: '{webhook.url}'}}\n")
    event_id = history.record_event(
        "shop-api", "deployed", "shop-api deployed in prod", environment="prod", commit_sha=SHA
    )

    [outcome] = deliver(history, channels_for(control.notifications))

    assert (outcome.status, outcome.event_id, outcome.attempts) == ("sent", event_id, 1)
    [request] = webhook.received
    assert request["path"] == "/services/T1/B2/s3cr3tT0k3n"
    assert request["type"] == "application/json"
    assert request["json"]["text"].startswith("*deployed: shop-api/prod @ 1a2b3c4d5e6f*")
    assert request["json"]["cicd"]["event_id"] == event_id
    assert request["json"]["cicd"]["commit"] == SHA
    [row] = history.deliveries().to_dict("records")
    assert (row["status"], row["attempts"], row["channel"]) == (
        "sent",
        1,
        outcome.channel,
    )
    assert "s3cr3t" not in row["channel"]


def test_a_mail_reaches_every_recipient_with_subject_and_bodies(
    tmp_path: Path, history: HistoryStore, mailbox: Mailbox
) -> None:
    control = config(
        tmp_path,
        f"  - {{type: smtp, url: '{mailbox.url}', to: [ops@example.com, dev@example.com],"
        " sender: cicd@example.com}\n",
    )
    history.record_event(
        "shop-api",
        "rolled_back",
        "health check failed\nsecond line",
        environment="prod",
        commit_sha=SHA,
    )

    [outcome] = deliver(history, channels_for(control.notifications))

    assert outcome.status == "sent"
    [envelope] = mailbox.envelopes
    assert envelope.mail_from == "cicd@example.com"
    assert envelope.rcpt_tos == ["ops@example.com", "dev@example.com"]
    [mail] = mailbox.messages()
    assert (
        mail["Subject"] == "[cicd] rolled back: shop-api/prod @ 1a2b3c4d5e6f: health check failed"
    )
    assert mail["To"] == "ops@example.com, dev@example.com"
    plain, rich = mail.get_body(("plain",)), mail.get_body(("html",))
    assert plain is not None
    assert "health check failed\nsecond line" in plain.get_content().replace("\r\n", "\n")
    assert rich is not None and "<pre" in rich.get_content()


def test_smtp_logs_in_with_the_password_from_its_secret(
    tmp_path: Path, history: HistoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    logins: list[tuple[bytes, bytes]] = []
    received: list[Any] = []

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
            received.append(envelope)
            return "250 OK"

    def authenticate(
        server: object, session: object, envelope: object, mechanism: str, data: Any
    ) -> AuthResult:
        logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"pa55word", handled=False)

    port = free_port()
    controller = Controller(
        Handler(),
        hostname="127.0.0.1",
        port=port,
        authenticator=authenticate,
        auth_require_tls=False,  # loopback only; smtps:// is for real servers
    )
    controller.start()
    try:
        control = config(
            tmp_path,
            f"  - {{type: smtp, url: 'smtp://127.0.0.1:{port}', to: [ops@example.com],"
            " username: cicd, password: {env: CICD_TEST_SMTP_PASSWORD}, retries: 0}\n",
        )
        channels = channels_for(control.notifications)
        monkeypatch.setenv("CICD_TEST_SMTP_PASSWORD", "wrong")
        history.record_event("shop-api", "deployed", "first")
        [refused] = deliver(history, channels)
        monkeypatch.setenv("CICD_TEST_SMTP_PASSWORD", "pa55word")
        history.record_event("shop-api", "deployed", "second")
        [sent] = deliver(history, channels)
    finally:
        controller.stop()

    assert (refused.status, refused.error) == (
        "failed",
        "SMTP 535 5.7.8 Authentication credentials invalid",
    )
    assert sent.status == "sent" and len(received) == 1
    # smtplib tries each mechanism the server offers before it gives up.
    assert set(logins[:-1]) == {(b"cicd", b"wrong")} and logins[-1] == (b"cicd", b"pa55word")
    assert "pa55word" not in history.deliveries().to_csv()


def test_a_commit_message_cannot_inject_mail_headers(
    tmp_path: Path, history: HistoryStore, mailbox: Mailbox
) -> None:
    control = config(tmp_path, f"  - {{type: smtp, url: '{mailbox.url}', to: [ops@example.com]}}\n")
    history.record_event(
        "shop-api", "failed", "feat: x\r\nBcc: evil@example.com\r\n\r\nforged body", commit_sha=SHA
    )

    [outcome] = deliver(history, channels_for(control.notifications))

    assert outcome.status == "sent"
    [envelope] = mailbox.envelopes
    assert envelope.rcpt_tos == ["ops@example.com"]
    [mail] = mailbox.messages()
    assert mail["Bcc"] is None
    assert mail["Subject"] == "[cicd] run failed: shop-api @ 1a2b3c4d5e6f: feat: x"
    header_block = envelope.content.split(b"\r\n\r\n", 1)[0]
    assert b"\r\nBcc:" not in header_block and b"\nBcc:" not in header_block


def test_a_silent_webhook_is_retried_with_backoff_then_failed_and_the_others_still_served(
    tmp_path: Path, history: HistoryStore, silent_url: str, mailbox: Mailbox
) -> None:
    control = config(
        tmp_path,
        f"  - {{type: webhook, url: '{silent_url}', timeout_s: 0.3, retries: 2, backoff_s: 60}}\n"
        f"  - {{type: smtp, url: '{mailbox.url}', to: [ops@example.com]}}\n",
    )
    channels = channels_for(control.notifications)
    hook, mail = (channel.id for channel in channels)
    history.record_event("shop-api", "deployed", "v1 live", environment="prod")
    clock = Clock()
    start = clock.now

    first = deliver(history, channels, clock=clock)

    assert [(o.channel, o.status, o.attempts) for o in first] == [
        (hook, "pending", 1),
        (mail, "sent", 1),
    ]
    assert first[0].retry_at == start + timedelta(seconds=60)
    assert first[0].error == "no answer: timed out after 0.3 s"
    assert len(mailbox.envelopes) == 1
    assert deliver(history, channels, clock=clock) == []  # not due yet, and mail sent once

    clock.advance(timedelta(seconds=60))
    [second] = deliver(history, channels, clock=clock)
    assert (second.status, second.attempts) == ("pending", 2)
    assert second.retry_at == start + timedelta(seconds=60 + 120)

    clock.advance(timedelta(seconds=120))
    [third] = deliver(history, channels, clock=clock)
    assert (third.status, third.attempts, third.retry_at) == ("failed", 3, None)

    clock.advance(timedelta(hours=5))
    assert deliver(history, channels, clock=clock) == []
    rows = {row["channel"]: row for row in history.deliveries().to_dict("records")}
    assert (rows[hook]["status"], rows[hook]["attempts"]) == ("failed", 3)
    assert rows[hook]["last_error"] == "no answer: timed out after 0.3 s"
    assert (rows[mail]["status"], rows[mail]["attempts"]) == ("sent", 1)
    assert len(mailbox.envelopes) == 1


def test_a_refused_connection_is_recorded_and_masked(
    tmp_path: Path, history: HistoryStore, refused_url: str
) -> None:
    control = config(tmp_path, f"  - {{type: webhook, url: '{refused_url}'}}\n")
    history.record_event("shop-api", "failed", "red")

    [outcome] = deliver(history, channels_for(control.notifications))

    assert outcome.status == "pending"
    assert outcome.error == "cannot connect: Connection refused"
    assert "s3cr3t" not in history.deliveries().to_csv()


def test_a_refusing_receiver_fails_at_once_and_the_channel_waits(
    tmp_path: Path, history: HistoryStore, webhook: Webhook
) -> None:
    webhook.status = 404
    control = config(tmp_path, f"  - {{type: webhook, url: '{webhook.url}'}}\n")
    history.record_event("shop-api", "failed", "first")
    history.record_event("shop-api", "failed", "second")
    channels = channels_for(control.notifications)

    [outcome] = deliver(history, channels)
    assert (outcome.status, outcome.attempts, outcome.error) == (
        "failed",
        1,
        "HTTP 404 Not Found",
    )
    assert len(webhook.received) == 1  # the second waits for the next run
    webhook.status = 200
    [later] = deliver(history, channels)
    assert later.status == "sent"
    assert sorted(history.deliveries()["status"]) == ["failed", "sent"]


def test_channels_get_only_the_kinds_they_subscribe_to(
    tmp_path: Path, history: HistoryStore, webhook: Webhook, mailbox: Mailbox
) -> None:
    control = config(
        tmp_path,
        f"  - {{type: webhook, url: '{webhook.url}', events: [released]}}\n"
        f"  - {{type: smtp, url: '{mailbox.url}', to: [ops@example.com], events: [failed]}}\n",
    )
    history.record_event("shop-api", "failed", "red build", commit_sha=SHA)
    history.record_event("shop-api", "released", "v1.4.0", commit_sha=SHA)
    history.record_event("shop-api", "drift", "a container was removed by hand")

    outcomes = deliver(history, channels_for(control.notifications))

    assert sorted((o.kind, o.status) for o in outcomes) == [
        ("failed", "sent"),
        ("released", "sent"),
    ]
    assert [r["json"]["cicd"]["kind"] for r in webhook.received] == ["released"]
    assert [m["X-Cicd-Event"].split()[1] for m in mailbox.messages()] == ["failed"]


def test_a_delivered_event_is_not_sent_again(
    tmp_path: Path, history: HistoryStore, webhook: Webhook
) -> None:
    control = config(tmp_path, f"  - {{type: webhook, url: '{webhook.url}'}}\n")
    history.record_event("shop-api", "deployed", "v1")
    channels = channels_for(control.notifications)

    assert [o.status for o in deliver(history, channels)] == ["sent"]
    assert deliver(history, channels) == []
    # Reloading cicd.yaml (a restart) names the channel the same.
    assert (
        deliver(
            history,
            channels_for(
                config(tmp_path, f"  - {{type: webhook, url: '{webhook.url}'}}\n").notifications
            ),
        )
        == []
    )
    assert len(webhook.received) == 1


def test_concurrent_delivery_runs_send_each_event_once(
    tmp_path: Path,
    database_url: str,  # noqa: F811
    webhook: Webhook,
    mailbox: Mailbox,
) -> None:
    control = config(
        tmp_path,
        f"  - {{type: webhook, url: '{webhook.url}'}}\n"
        f"  - {{type: smtp, url: '{mailbox.url}', to: [ops@example.com]}}\n",
        db=database_url,
    )
    stores = [HistoryStore(database_url) for _ in range(3)]
    events = [stores[0].record_event("shop-api", "deployed", f"v{n}") for n in range(15)]
    start = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def run(store: HistoryStore) -> None:
        start.wait()
        try:
            deliver(store, channels_for(control.notifications))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    deliveries = stores[0].deliveries()
    for store in stores:
        store.dispose()

    assert errors == []
    assert sorted(r["json"]["cicd"]["event_id"] for r in webhook.received) == sorted(events)
    assert sorted(int(m["X-Cicd-Event"].split()[0]) for m in mailbox.messages()) == sorted(events)
    assert set(deliveries["status"]) == {"sent"} and len(deliveries) == 2 * len(events)


def test_the_notification_sensor_delivers_and_never_fails_a_tick(
    tmp_path: Path, history: HistoryStore, webhook: Webhook, refused_url: str
) -> None:
    control = config(
        tmp_path,
        f"  - {{type: webhook, url: '{refused_url}', timeout_s: 0.5}}\n"
        f"  - {{type: webhook, url: '{webhook.url}'}}\n",
    )
    history.record_event("shop-api", "deployed", "v1 live")
    sensor = notification_sensor(control)
    resources = {"cicd": CicdResource(config_path=str(control.config_path))}

    with build_sensor_context(resources=resources) as context:
        result = sensor(context)

    assert isinstance(result, SkipReason)
    assert (result.skip_message or "").startswith("1 sent\npending event ")
    assert "s3cr3t" not in (result.skip_message or "")
    assert len(webhook.received) == 1
    assert "s3cr3t" not in (sensor.description or "")


def failed_run(
    instance: DagsterInstance,
    tags: dict[str, str],
    error: Exception | None = None,
) -> Any:
    partitions = StaticPartitionsDefinition([SHA])

    @asset(partitions_def=partitions)
    def deployment() -> None:
        raise error or RuntimeError("the blue slot never became healthy")

    result = materialize(
        [deployment], instance=instance, tags=tags, partition_key=SHA, raise_on_error=False
    )
    assert not result.success
    return result


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("the blue slot never became healthy"),
        Failure(description="refused: the blue slot never became healthy"),
    ],
)
def test_a_failed_run_becomes_a_failed_event(
    tmp_path: Path, history: HistoryStore, error: Exception
) -> None:
    control = config(tmp_path, "  []\n")
    instance = DagsterInstance.ephemeral()
    result = failed_run(instance, {"cicd/repository": "shop-api"}, error)
    sensor = run_failure_event_sensor()
    resources = {"cicd": CicdResource(config_path=str(control.config_path))}

    context = build_run_status_sensor_context(
        sensor_name=sensor.name,
        dagster_event=result.get_run_failure_event(),
        dagster_instance=instance,
        dagster_run=result.dagster_run,
        resources=resources,
    ).for_run_failure()
    sensor(context)

    [event] = history.events(kind="failed").to_dict("records")
    assert (event["repository"], event["commit"], event["environment"]) == ("shop-api", SHA, None)
    assert event["message"].startswith(
        f"{result.dagster_run.job_name} failed for shop-api@1a2b3c4d5e6f"
    )
    assert "the blue slot never became healthy" in event["message"]


def test_a_deployment_that_told_of_its_failure_is_not_told_twice(
    tmp_path: Path, history: HistoryStore
) -> None:
    control = config(tmp_path, "  []\n")
    instance = DagsterInstance.ephemeral()
    tags = {"cicd/repository": "shop-api", "cicd/environment": "prod"}
    result = failed_run(instance, tags)
    history.record_event(
        "shop-api", "rolled_back", "rolled back", environment="prod", commit_sha=SHA
    )
    other = failed_run(instance, {"team": "not ours"})
    sensor = run_failure_event_sensor()
    resources = {"cicd": CicdResource(config_path=str(control.config_path))}

    for run in (result, other):
        context = build_run_status_sensor_context(
            sensor_name=sensor.name,
            dagster_event=run.get_run_failure_event(),
            dagster_instance=instance,
            dagster_run=run.dagster_run,
            resources=resources,
        ).for_run_failure()
        sensor(context)

    assert history.events(kind="failed").empty


def cicd(control: ControlConfig, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cicd_dagster", "--config", str(control.config_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow  # seven runs of the cicd command
def test_the_cli_delivers_tests_channels_and_shows_the_deliveries(
    tmp_path: Path, history: HistoryStore, webhook: Webhook, refused_url: str
) -> None:
    control = config(
        tmp_path,
        f"  - {{type: webhook, url: '{webhook.url}'}}\n"
        f"  - {{type: webhook, url: '{refused_url}', timeout_s: 0.5}}\n",
    )
    event_id = history.record_event("shop-api", "deployed", "v1 live", environment="prod")

    delivered = cicd(control, "notify", "deliver", "--json")
    assert delivered.returncode == 1, delivered.stderr  # the refused channel
    outcomes = {row["status"]: row for row in json.loads(delivered.stdout)}
    assert outcomes["sent"]["event_id"] == event_id
    assert outcomes["pending"]["error"] == "cannot connect: Connection refused"

    shown = cicd(control, "history", "notifications", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    rows = json.loads(shown.stdout)
    assert sorted((row["status"], row["attempts"]) for row in rows) == [("pending", 1), ("sent", 1)]
    assert "s3cr3t" not in shown.stdout + delivered.stdout + delivered.stderr
    assert cicd(control, "history", "notifications", "--status", "done").returncode == 2

    tested = cicd(control, "notify", "test", "--channel", "0")
    assert tested.returncode == 0, tested.stderr
    assert webhook.received[-1]["json"]["cicd"]["kind"] == "test"
    failing = cicd(control, "notify", "test")
    assert failing.returncode == 1
    assert "failed: webhook http://127.0.0.1:" in failing.stderr
    assert "s3cr3t" not in failing.stderr
    assert cicd(control, "notify", "test", "--channel", "2").returncode == 2
    assert len(history.events()) == 1  # test notifications are not recorded
