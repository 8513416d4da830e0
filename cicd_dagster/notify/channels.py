"""Notification channels of cicd.yaml `notifications[]`: webhooks and SMTP servers.

A channel sends one event or raises DeliveryError (PermanentDeliveryError when retrying
cannot help); every error message is masked, since webhook URLs carry tokens. Each call
is bounded by the channel's timeout_s per connection and per read.
"""

import hashlib
import http.client
import json
import smtplib
import ssl
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence

from cicd_dagster.config import NotificationConfig
from cicd_dagster.deploy.strategies import SecretUnavailable, resolve_secrets
from cicd_dagster.notify.messages import email_message, webhook_payload
from cicd_dagster.store.history import EventRecord

# How much of a webhook's answer is read (and ignored): Slack answers "ok".
_MAX_ANSWER_BYTES = 64 * 1024
# 4xx answers that may pass: a timeout of the request, rate limiting.
_RETRYABLE_CLIENT_ERRORS = (408, 429)


class DeliveryError(Exception):
    """A channel could not deliver an event; the message holds no secret."""


class PermanentDeliveryError(DeliveryError):
    """The receiver refused the event: retrying the same request cannot help."""


def mask_url(url: str) -> str:
    """scheme://host:port, with "/***" for any path or query: they may hold a token."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    hidden = "/***" if parts.path.strip("/") or parts.query or parts.fragment else ""
    return f"{parts.scheme}://{host}{port}{hidden}"


def channel_id(config: NotificationConfig) -> str:
    """What the deliveries table calls the channel: stable across restarts and reorderings
    of cicd.yaml, readable, and without the URL's secrets (a digest stands for them)."""
    digest = hashlib.sha256(json.dumps(config.destination).encode()).hexdigest()[:12]
    place = mask_url(config.url or "").split("://", 1)[1].removesuffix("/***")
    return f"{config.type}:{place[:200]}:{digest}"


class Channel(ABC):
    """One entry of cicd.yaml `notifications[]`."""

    def __init__(self, config: NotificationConfig) -> None:
        if config.url is None:
            raise ValueError("a notification channel needs a url")
        self.config = config
        self.url = config.url
        self.id = channel_id(config)
        self.description = f"{config.type} {mask_url(config.url)}"
        self._secrets = _url_secrets(config.url)

    @property
    def lease_s(self) -> float:
        """How long a claimed delivery may take before another run may retry it: longer
        than a send can take, a connection and a few reads of timeout_s each."""
        return max(60.0, 12 * self.config.timeout_s)

    def send(self, event: EventRecord) -> None:
        """Deliver `event` or raise DeliveryError with a masked message, whatever failed."""
        try:
            self._send(event)
        except PermanentDeliveryError as error:
            raise PermanentDeliveryError(self.mask(str(error))) from None
        except DeliveryError as error:
            raise DeliveryError(self.mask(str(error))) from None
        except Exception as error:  # a bug must not hide the event or stop the others
            raise DeliveryError(self.mask(f"{type(error).__name__}: {error}")) from None

    def mask(self, text: str) -> str:
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    @abstractmethod
    def _send(self, event: EventRecord) -> None: ...


class WebhookChannel(Channel):
    """POSTs Slack-compatible JSON; any 2xx answer is a delivery. Redirects are refused
    (urllib would turn the POST into a GET without the body)."""

    def _send(self, event: EventRecord) -> None:
        request = urllib.request.Request(  # noqa: S310 (the config allows http(s):// only)
            self.url,
            data=json.dumps(webhook_payload(event)).encode(),
            headers={"Content-Type": "application/json", "User-Agent": "cicd-dagster"},
            method="POST",
        )
        timeout = self.config.timeout_s
        try:
            with _OPENER.open(request, timeout=timeout) as answer:
                answer.read(_MAX_ANSWER_BYTES)
        except urllib.error.HTTPError as error:
            with error:
                reason = f"HTTP {error.code} {error.reason}".strip()
            if 300 <= error.code < 400:
                raise PermanentDeliveryError(f"{reason}: the webhook moved, fix its url") from None
            if 400 <= error.code < 500 and error.code not in _RETRYABLE_CLIENT_ERRORS:
                raise PermanentDeliveryError(reason) from None
            raise DeliveryError(reason) from None
        except urllib.error.URLError as error:
            raise DeliveryError(f"cannot connect: {_describe(error.reason, timeout)}") from None
        except (OSError, http.client.HTTPException) as error:
            raise DeliveryError(f"no answer: {_describe(error, timeout)}") from None


class SmtpChannel(Channel):
    """Mails the event to `to` through smtp://host:port (smtps:// for TLS from the start)."""

    def _send(self, event: EventRecord) -> None:
        config = self.config
        parts = urllib.parse.urlsplit(self.url)
        secure = parts.scheme.lower() == "smtps"
        host, port = parts.hostname or "", parts.port or (465 if secure else 25)
        message = email_message(event, config.sender, config.to)
        try:
            server = (
                smtplib.SMTP_SSL(
                    host, port, timeout=config.timeout_s, context=ssl.create_default_context()
                )
                if secure
                else smtplib.SMTP(host, port, timeout=config.timeout_s)
            )
            with server:
                if config.username is not None:
                    server.login(config.username, self._password())
                server.send_message(message, from_addr=config.sender, to_addrs=config.to)
        except smtplib.SMTPRecipientsRefused as error:
            codes = [code for code, _ in error.recipients.values()]
            refused = ", ".join(sorted(error.recipients))
            failure = PermanentDeliveryError if min(codes) >= 500 else DeliveryError
            raise failure(f"the server refused every recipient ({refused})") from None
        except smtplib.SMTPResponseException as error:
            answer = error.smtp_error
            text = answer.decode(errors="replace") if isinstance(answer, bytes) else str(answer)
            failure = PermanentDeliveryError if error.smtp_code >= 500 else DeliveryError
            raise failure(f"SMTP {error.smtp_code} {text}") from None
        except (smtplib.SMTPException, OSError) as error:
            raise DeliveryError(
                f"SMTP {host}:{port}: {_describe(error, config.timeout_s)}"
            ) from None

    def _password(self) -> str:
        source = self.config.password
        assert source is not None  # the config requires it with a username
        try:
            password = resolve_secrets({"password": source.reference})["password"]
        except SecretUnavailable as error:
            raise DeliveryError(str(error)) from None
        self._secrets.add(password)
        return password


def channel_for(config: NotificationConfig) -> Channel:
    return WebhookChannel(config) if config.type == "webhook" else SmtpChannel(config)


def channels_for(configs: Sequence[NotificationConfig]) -> list[Channel]:
    return [channel_for(config) for config in configs]


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # urllib then raises the 3xx answer as an HTTPError


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def _url_secrets(url: str) -> set[str]:
    """The parts of a URL that may be secret: itself, its userinfo, path and query."""
    parts = urllib.parse.urlsplit(url)
    candidates = {url, parts.path, parts.query, parts.password or "", parts.username or ""}
    return {part for part in candidates if len(part.strip("/")) > 1}


def _describe(error: BaseException | str, timeout_s: float) -> str:
    if isinstance(error, str):  # URLError.reason may be one
        return error
    if isinstance(error, TimeoutError):
        return f"timed out after {timeout_s:g} s"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
