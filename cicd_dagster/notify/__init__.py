"""Notifications: the events of the history DB (the outbox) told to webhook and SMTP channels,
each delivery retried with backoff and recorded. No Dagster in here."""

from cicd_dagster.notify.channels import (
    Channel,
    DeliveryError,
    PermanentDeliveryError,
    SmtpChannel,
    WebhookChannel,
    channel_for,
    channels_for,
    mask_url,
)
from cicd_dagster.notify.outbox import DeliveryOutcome, deliver

__all__ = [
    "Channel",
    "DeliveryError",
    "DeliveryOutcome",
    "PermanentDeliveryError",
    "SmtpChannel",
    "WebhookChannel",
    "channel_for",
    "channels_for",
    "deliver",
    "mask_url",
]
