"""Delivery of the outbox: the events table of the history DB, to every channel that wants them.

For each channel, a delivery run
1. adds a pending delivery for each new event of the kinds the channel subscribes to (a new
   channel starts with the events of the last NEW_CHANNEL_LOOKBACK; events older than
   MAX_EVENT_AGE are never sent: a daemon down for days does not flood anyone with stale news);
2. claims the due deliveries one at a time, oldest event first, and sends them; a claimed
   delivery is leased, so concurrent runs (two daemons, the CLI and a daemon) never send an
   event twice;
3. records each outcome: sent; pending again after backoff_s * 2^(attempts-1); failed
   after 1 + retries attempts, or at once when the receiver refused it (a 4xx answer,
   an SMTP 5xx).
After a failed attempt the channel's other deliveries wait for the next run, so a channel
that is down costs a run one timeout, and the other channels are served all the same.

Delivery is at least once: a run that dies between sending and recording sends again after
the lease.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cicd_dagster.notify.channels import Channel, DeliveryError, PermanentDeliveryError
from cicd_dagster.store.history import HistoryStore

MAX_EVENT_AGE = timedelta(days=1)
NEW_CHANNEL_LOOKBACK = timedelta(minutes=15)
MAX_BACKOFF = timedelta(hours=6)
# Per channel and run: a backlog drains over several runs, each of them short.
MAX_DELIVERIES_PER_RUN = 100


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one attempt to deliver an event to a channel came to."""

    channel: str
    event_id: int
    repository: str
    kind: str
    status: str
    """sent, pending (retried at retry_at) or failed (given up)."""
    attempts: int
    error: str | None = None
    retry_at: datetime | None = None

    def describe(self) -> str:
        where = f"event {self.event_id} ({self.kind} of {self.repository}) to {self.channel}"
        if self.status == "sent":
            return f"sent {where}"
        retry = f", retry at {self.retry_at.isoformat()}" if self.retry_at else ""
        return f"{self.status} {where} after {self.attempts} attempt(s): {self.error}{retry}"


def _utc_now() -> datetime:
    return datetime.now(UTC)


def deliver(
    history: HistoryStore,
    channels: Sequence[Channel],
    *,
    clock: Callable[[], datetime] = _utc_now,
) -> list[DeliveryOutcome]:
    """One delivery run over every channel; returns what each attempt came to.

    Channel failures are recorded, never raised; history DB errors are raised."""
    outcomes: list[DeliveryOutcome] = []
    for channel in channels:
        now = clock()
        history.enqueue_deliveries(
            channel.id,
            channel.config.events,
            not_before=now - MAX_EVENT_AGE,
            new_channel_since=now - NEW_CHANNEL_LOOKBACK,
        )
        for _ in range(MAX_DELIVERIES_PER_RUN):
            now = clock()
            claimed = history.claim_delivery(
                channel.id, now=now, lease_until=now + timedelta(seconds=channel.lease_s)
            )
            if claimed is None:
                break
            event = claimed.event
            try:
                channel.send(event)
            except DeliveryError as error:
                gives_up = (
                    isinstance(error, PermanentDeliveryError)
                    or claimed.attempts > channel.config.retries
                )
                retry_at = None if gives_up else clock() + backoff(channel, claimed.attempts)
                history.mark_delivery_failed(claimed.id, str(error), retry_at=retry_at)
                outcomes.append(
                    DeliveryOutcome(
                        channel=channel.id,
                        event_id=event.id,
                        repository=event.repository,
                        kind=event.kind,
                        status="failed" if gives_up else "pending",
                        attempts=claimed.attempts,
                        error=str(error),
                        retry_at=retry_at,
                    )
                )
                break  # the channel is down or refusing: its other deliveries wait
            history.mark_delivered(claimed.id, at=clock())
            outcomes.append(
                DeliveryOutcome(
                    channel=channel.id,
                    event_id=event.id,
                    repository=event.repository,
                    kind=event.kind,
                    status="sent",
                    attempts=claimed.attempts,
                )
            )
    return outcomes


def backoff(channel: Channel, attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed attempt: backoff_s, doubled each time."""
    seconds = channel.config.backoff_s * 2 ** min(attempts - 1, 32)
    return min(timedelta(seconds=seconds), MAX_BACKOFF)
