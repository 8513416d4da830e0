"""What a notification says: a headline, a Slack-compatible webhook payload, an email.

Event messages carry untrusted text (commit messages, branch names). It is escaped for
Slack's mrkdwn (a commit message cannot ping <!channel>), escaped in HTML, and flattened
to one line in the email subject, so that no CR, LF or other control character ever
reaches a mail header.
"""

import html
import unicodedata
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any

from cicd_dagster.store.history import EventRecord

SUBJECT_LIMIT = 160
# Slack rejects a section block whose text is longer.
SLACK_SECTION_LIMIT = 3000

_KIND_LABELS = {
    "failed": "run failed",
    "deployed": "deployed",
    "rolled_back": "rolled back",
    "approval_requested": "approval requested",
    "released": "released",
    "security_finding": "new security finding",
    "incident_opened": "incident opened",
    "incident_closed": "incident closed",
    "service_error": "service error",
    "drift": "drift",
    "test": "test notification",
}


def one_line(text: str, limit: int) -> str:
    """`text` without control or format characters (CR, LF, NUL, bidi overrides...) and with
    whitespace runs made single spaces, cut to `limit` characters with an ellipsis."""
    printable = "".join(" " if unicodedata.category(char)[0] == "C" else char for char in text)
    flat = " ".join(printable.split())  # also splits at U+2028/U+2029 line separators
    return flat if len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def headline(event: EventRecord) -> str:
    """ "deployed: shop-api/prod @ 1a2b3c4d5e6f"."""
    label = _KIND_LABELS.get(event.kind, event.kind)
    where = event.repository + (f"/{event.environment}" if event.environment else "")
    commit = f" @ {event.commit_sha[:12]}" if event.commit_sha else ""
    return one_line(f"{label}: {where}{commit}", SUBJECT_LIMIT)


def subject(event: EventRecord) -> str:
    """The email subject: the headline and the message's first line, on one line."""
    first_line = next(iter(event.message.strip().splitlines()), "")
    summary = f"[cicd] {headline(event)}" + (f": {first_line}" if first_line else "")
    return one_line(summary, SUBJECT_LIMIT)


def event_fields(event: EventRecord) -> dict[str, Any]:
    """The event as structured data (the "cicd" object of the webhook payload)."""
    return {
        "event_id": event.id,
        "kind": event.kind,
        "repository": event.repository,
        "environment": event.environment,
        "commit": event.commit_sha,
        "at": event.at.isoformat(),
        "message": event.message,
    }


def slack_escape(text: str) -> str:
    """Slack's control characters as entities: no links, mentions or <!channel> from text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def webhook_payload(event: EventRecord) -> dict[str, Any]:
    """Slack-compatible JSON ("text" and "blocks"), plus the event itself under "cicd"."""
    title = slack_escape(headline(event))
    message = slack_escape(event.message.strip())
    text = f"*{title}*" + (f"\n{message}" if message else "")
    context = f"{event.kind} · event {event.id} · {event.at.isoformat(timespec='seconds')}"
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": _cut(text)}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": context}]},
        ],
        "cicd": event_fields(event),
    }


def email_message(event: EventRecord, sender: str, recipients: list[str]) -> EmailMessage:
    """A plain-text mail with an HTML alternative; the addresses come from cicd.yaml."""
    message = EmailMessage()  # the default policy: it refuses CR/LF in header values
    message["Subject"] = subject(event)
    message["From"] = Address(addr_spec=sender)
    message["To"] = [Address(addr_spec=recipient) for recipient in recipients]
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid("cicd", domain=Address(addr_spec=sender).domain)
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies
    message["X-Cicd-Event"] = f"{event.id} {event.kind}"
    details = _details(event)
    text = "\n".join(
        [headline(event), "", event.message.strip(), ""]
        + [f"{name}: {value}" for name, value in details]
    )
    message.set_content(text + "\n")
    rows = "".join(
        f"<tr><th align='left'>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>"
        for name, value in details
    )
    message.add_alternative(
        "<!DOCTYPE html><html><body>"
        f"<h3>{html.escape(headline(event))}</h3>"
        f"<pre style='white-space: pre-wrap'>{html.escape(event.message.strip())}</pre>"
        f"<table>{rows}</table></body></html>\n",
        subtype="html",
    )
    return message


def _details(event: EventRecord) -> list[tuple[str, str]]:
    details = [("Repository", event.repository)]
    if event.environment:
        details.append(("Environment", event.environment))
    if event.commit_sha:
        details.append(("Commit", event.commit_sha))
    details.append(("Event", f"{event.kind} #{event.id} at {event.at.isoformat()}"))
    return [(name, one_line(value, 200)) for name, value in details]


def _cut(text: str) -> str:
    return text if len(text) <= SLACK_SECTION_LIMIT else text[: SLACK_SECTION_LIMIT - 1] + "…"
