"""Loopback servers that receive notifications in tests: a webhook (http.server) and an
SMTP server (aiosmtpd). conftest.py makes `webhook` and `mailbox` fixtures of them."""

from __future__ import annotations

import email
import email.policy
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from cicd_dagster.deploy.local import free_port


@dataclass
class Webhook:
    """A loopback webhook that answers `status` and keeps what it was sent."""

    url: str
    status: int = 200
    received: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hook.received.append(
                {"path": self.path, "type": self.headers["Content-Type"], "json": json.loads(body)}
            )
            self.send_response(hook.status)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook.url = f"http://127.0.0.1:{server.server_port}/services/T1/B2/s3cr3tT0k3n"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hook
    server.shutdown()
    server.server_close()
    thread.join()


@dataclass
class Mailbox:
    url: str
    envelopes: list[Any] = field(default_factory=list)

    def messages(self) -> list[EmailMessage]:
        return [
            email.message_from_bytes(envelope.content, policy=email.policy.default)  # type: ignore[misc]
            for envelope in self.envelopes
        ]


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    port = free_port()
    box = Mailbox(url=f"smtp://127.0.0.1:{port}")

    class Handler:
        async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
            box.envelopes.append(envelope)
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    yield box
    controller.stop()
