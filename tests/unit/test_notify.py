"""Notification channels in cicd.yaml, and what a notification says: no network here."""

import email
import email.policy
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import get_args

import pytest

from cicd_dagster.config import (
    ConfigError,
    NotificationConfig,
    NotificationEvent,
    load_control_config,
)
from cicd_dagster.notify import channel_for, mask_url
from cicd_dagster.notify.channels import channel_id
from cicd_dagster.notify.messages import email_message, one_line, subject, webhook_payload
from cicd_dagster.store.history import EventRecord
from cicd_dagster.store.models import EVENT_KINDS

SECRET_HOOK = "https://hooks.example.com/services/T0001/B0002/s3cr3tT0k3n"


def load(tmp_path: Path, notifications: str) -> list[NotificationConfig]:
    path = tmp_path / "cicd.yaml"
    path.write_text(
        "repositories: [{name: app, url: /srv/git/app}]\n"
        + "notifications:\n"
        + textwrap.indent(textwrap.dedent(notifications), "  ")
    )
    return load_control_config(path).notifications


def config_error(tmp_path: Path, notifications: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, notifications)
    return str(raised.value).removeprefix(f"{tmp_path}/")


def event(message: str = "deployed v1.2.0", **fields: object) -> EventRecord:
    values: dict[str, object] = {
        "id": 7,
        "repository": "shop-api",
        "kind": "deployed",
        "environment": "prod",
        "commit_sha": "1a2b3c4d5e6f" + "0" * 28,
        "at": datetime(2026, 11, 26, 12, 30, tzinfo=UTC),
        "message": message,
    }
    values.update(fields)
    return EventRecord(**values)  # type: ignore[arg-type]


def test_channel_settings_and_their_defaults(tmp_path: Path) -> None:
    webhook, mail = load(
        tmp_path,
        """\
        - {type: webhook, url: "https://hooks.example.com/x", events: [failed, drift]}
        - type: smtp
          url: smtps://mail.example.com
          to: [ops@example.com]
          sender: cicd@example.com
          username: cicd
          password: {env: SMTP_PASSWORD}
          timeout_s: 2.5
          retries: 0
          backoff_s: 5
        """,
    )
    assert (webhook.events, webhook.timeout_s, webhook.retries, webhook.backoff_s) == (
        ["failed", "drift"],
        5.0,
        5,
        30.0,
    )
    assert webhook.sender == "cicd@localhost"
    assert (mail.sender, mail.username, mail.timeout_s, mail.retries) == (
        "cicd@example.com",
        "cicd",
        2.5,
        0,
    )
    assert mail.password is not None and mail.password.reference == "env:SMTP_PASSWORD"


def test_every_event_kind_of_the_history_db_can_be_subscribed_to() -> None:
    assert set(get_args(NotificationEvent)) == set(EVENT_KINDS)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            '- {type: webhook, url: "ftp://hooks.example.com/x"}',
            "cicd.yaml:3: notifications[0].url: expected a URL starting with http:// or "
            "https://, with a host",
        ),
        (
            '- {type: webhook, url: "https:///no-host"}',
            "cicd.yaml:3: notifications[0].url: expected a URL starting with http:// or "
            "https://, with a host",
        ),
        (
            '- {type: smtp, url: "smtp://mail:25x", to: [a@example.com]}',
            "cicd.yaml:3: notifications[0].url: expected a URL starting with smtp:// or "
            "smtps://, with a host",
        ),
        (
            '- {type: smtp, url: "smtp://mail", to: ["ops\\r\\nBcc: evil@example.com"]}',
            'cicd.yaml:3: notifications[0].to[0]: "ops\r\nBcc: evil@example.com" is not an '
            "email address (name@domain)",
        ),
        (
            '- {type: webhook, url: "https://h.example.com/x", to: [a@example.com]}',
            'cicd.yaml:3: notifications[0]: "to", "username" and "password" are for smtp '
            "notifications",
        ),
        (
            '- {type: smtp, url: "smtp://mail", to: [a@example.com], username: me}',
            'cicd.yaml:3: notifications[0]: an smtp login needs both "username" and "password"',
        ),
        (
            '- {type: webhook, url: "https://h.example.com/x", timeout_s: 0}',
            "cicd.yaml:3: notifications[0].timeout_s: Input should be greater than 0",
        ),
        (
            '- {type: webhook, url: "https://h.example.com/x", retries: -1}',
            "cicd.yaml:3: notifications[0].retries: Input should be greater than or equal to 0",
        ),
        (
            '- {type: webhook, url: "https://h.example.com/x", events: [deploy]}',
            "cicd.yaml:3: notifications[0].events[0]: Input should be 'failed', 'deployed',",
        ),
    ],
)
def test_bad_channels_are_reported_at_their_line(tmp_path: Path, entry: str, message: str) -> None:
    assert config_error(tmp_path, entry).startswith(message)


def test_a_bad_webhook_url_is_not_repeated_in_the_error(tmp_path: Path) -> None:
    error = config_error(tmp_path, '- {type: webhook, url: "hooks.example.com/s3cr3tT0k3n"}')
    assert "s3cr3tT0k3n" not in error


def test_two_channels_to_one_destination_are_refused(tmp_path: Path) -> None:
    error = config_error(
        tmp_path,
        f"""\
        - {{type: webhook, url: "{SECRET_HOOK}", events: [failed]}}
        - type: webhook
          url: "{SECRET_HOOK}"
          events: [deployed]
        """,
    )
    assert error == (
        "cicd.yaml:5: notifications[1].url: the same destination as notifications[0]: "
        "list all its events there"
    )


def test_the_channel_id_is_stable_readable_and_holds_no_token() -> None:
    first = NotificationConfig(type="webhook", url=SECRET_HOOK, events=["failed"])
    same_place = NotificationConfig(type="webhook", url=SECRET_HOOK, timeout_s=1)
    other = NotificationConfig(type="webhook", url=SECRET_HOOK + "x")

    assert channel_id(first) == channel_id(same_place) != channel_id(other)
    assert channel_id(first).startswith("webhook:hooks.example.com:")
    assert "s3cr3t" not in channel_id(first) and "T0001" not in channel_id(first)
    mail = NotificationConfig(type="smtp", url="smtp://127.0.0.1:2525", to=["b@x.io", "a@x.io"])
    reordered = NotificationConfig(
        type="smtp", url="smtp://127.0.0.1:2525", to=["a@x.io", "b@x.io"]
    )
    assert channel_id(mail) == channel_id(reordered)
    assert channel_id(mail).startswith("smtp:127.0.0.1:2525:")


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (SECRET_HOOK, "https://hooks.example.com/***"),
        ("http://user:pw@127.0.0.1:9000/hook?token=abc", "http://127.0.0.1:9000/***"),
        ("https://example.com", "https://example.com"),
        ("smtp://[::1]:2525", "smtp://[::1]:2525"),
    ],
)
def test_urls_are_masked_down_to_scheme_host_and_port(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_channel_errors_are_masked() -> None:
    channel = channel_for(NotificationConfig(type="webhook", url=SECRET_HOOK))
    said = channel.mask(f"cannot POST {SECRET_HOOK} (path /services/T0001/B0002/s3cr3tT0k3n)")
    assert "s3cr3tT0k3n" not in said and "T0001" not in said
    assert channel.description == "webhook https://hooks.example.com/***"


def test_the_webhook_payload_is_slack_text_blocks_and_the_event() -> None:
    payload = webhook_payload(event("shop-api 1a2b3c4d5e6f deployed in prod: 3 healthy"))

    assert payload["text"] == (
        "*deployed: shop-api/prod @ 1a2b3c4d5e6f*\n"
        "shop-api 1a2b3c4d5e6f deployed in prod: 3 healthy"
    )
    assert payload["blocks"][0] == {
        "type": "section",
        "text": {"type": "mrkdwn", "text": payload["text"]},
    }
    assert payload["cicd"] == {
        "event_id": 7,
        "kind": "deployed",
        "repository": "shop-api",
        "environment": "prod",
        "commit": "1a2b3c4d5e6f" + "0" * 28,
        "at": "2026-11-26T12:30:00+00:00",
        "message": "shop-api 1a2b3c4d5e6f deployed in prod: 3 healthy",
    }


def test_commit_messages_cannot_ping_or_link_in_slack() -> None:
    payload = webhook_payload(event("fix: <!channel> see <https://evil.example|here> & more"))
    assert "<!channel>" not in payload["text"]
    assert "&lt;!channel&gt; see &lt;https://evil.example|here&gt; &amp; more" in payload["text"]
    # The structured copy keeps the text as it was.
    assert payload["cicd"]["message"] == "fix: <!channel> see <https://evil.example|here> & more"


def test_a_long_message_fits_a_slack_section() -> None:
    payload = webhook_payload(event("x" * 10_000))
    assert len(payload["blocks"][0]["text"]["text"]) == 3000
    assert payload["text"].endswith("x" * 100)


@pytest.mark.parametrize(
    "message",
    [
        "feat: x\r\nBcc: evil@example.com",
        "feat: x\nBcc: evil@example.com",
        "feat: x\rBcc: evil@example.com",
        "feat: x\x00\x0bBcc: evil@example.com",
        "feat: x\u2028Bcc: evil@example.com",
        "feat: x\x85Bcc: evil@example.com",
        "feat: x\u202eBcc: evil@example.com",
    ],
)
def test_the_subject_is_one_line_whatever_the_message_holds(message: str) -> None:
    said = subject(event(message, kind="failed"))
    assert said.isprintable()
    assert said.startswith("[cicd] run failed: shop-api/prod @ 1a2b3c4d5e6f: feat: x")

    mail = email_message(event(message), "cicd@localhost", ["ops@example.com"])
    parsed = email.message_from_bytes(bytes(mail), policy=email.policy.default)
    assert parsed["Bcc"] is None
    assert "\n" not in str(parsed["Subject"]) and "\r" not in str(parsed["Subject"])
    assert sorted(parsed.keys()) == sorted(
        [
            "Subject",
            "From",
            "To",
            "Date",
            "Message-ID",
            "Auto-Submitted",
            "X-Cicd-Event",
            "MIME-Version",
            "Content-Type",
        ]
    )


def test_one_line_cuts_long_text_with_an_ellipsis() -> None:
    assert one_line("a  b\t\tc", 10) == "a b c"
    assert one_line("word " * 100, 20) == "word word word word…"


def test_the_mail_has_a_text_body_and_an_escaped_html_alternative() -> None:
    mail = email_message(
        event("fix: <script>alert(1)</script>\n\nBody line"), "cicd@localhost", ["a@example.com"]
    )
    plain = mail.get_body(("plain",))
    rich = mail.get_body(("html",))
    assert plain is not None and rich is not None
    assert "fix: <script>alert(1)</script>\n\nBody line" in plain.get_content()
    assert "Commit: 1a2b3c4d5e6f" in plain.get_content()
    assert "<script>" not in rich.get_content()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rich.get_content()
