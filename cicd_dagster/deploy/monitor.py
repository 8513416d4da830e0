"""Monitoring of a live environment: probes of its stable address, tracebacks in its
services' logs, and incidents from the first failed probe until the first healthy check.

observe() is what the deployment-health sensor calls on every tick. Sensors keep nothing
in memory between ticks, so how far each slot's output has been scanned (the target's log
cursor: a byte offset locally, the engine's timestamp on docker) is kept in the
environment's state folder (monitor.json); whether an incident is open is the history
DB's to say.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from cicd_dagster.config import ControlConfig
from cicd_dagster.deploy.health import probe
from cicd_dagster.deploy.infra import existing_environment
from cicd_dagster.deploy.strategies import Environment
from cicd_dagster.deploy.target import ACTIVE_STATUSES
from cicd_dagster.store import HistoryStore, ProbeRecord

Health = Literal["healthy", "degraded", "down", "not_deployed"]

TRACEBACK_START = "Traceback (most recent call last):"
# Between two tracebacks of one chained exception.
_CHAINED = (
    "During handling of the above exception, another exception occurred:",
    "The above exception was the direct cause of the following exception:",
)
DEFAULT_PROBES = 3
# Bounds the work of one scan; a service that logs faster is caught up over later ticks.
_MAX_SCAN_BYTES = 1024 * 1024
_MAX_EVENT_CHARS = 4000


@dataclass(frozen=True)
class Traceback:
    exception: str  # its last line, e.g. "ValueError: bad price"
    text: str  # the whole block, chained tracebacks included


@dataclass(frozen=True)
class ServiceError:
    slot: str
    traceback: Traceback


@dataclass(frozen=True)
class Observation:
    repository: str
    environment: str
    health: Health
    commit_sha: str | None
    url: str | None
    probes: list[ProbeRecord]
    errors: list[ServiceError]
    slots_running: int
    slots_expected: int
    incident: Literal["opened", "closed"] | None = None  # what this observation changed

    @property
    def ok_probes(self) -> int:
        return sum(p.ok for p in self.probes)

    @property
    def latency_ms(self) -> float | None:
        """The median latency of the answered probes."""
        answered = [p.latency_ms for p in self.probes if p.status_code is not None]
        return statistics.median(answered) if answered else None

    def summary(self) -> str:
        if self.health == "not_deployed":
            return f"{self.repository}/{self.environment}: not deployed"
        latency = f", median {self.latency_ms:.0f} ms" if self.latency_ms is not None else ""
        failures = sorted({p.error for p in self.probes if p.error})
        text = (
            f"{self.repository}/{self.environment} {self.health}: {self.ok_probes}/"
            f"{len(self.probes)} probes ok{latency}, {self.slots_running}/"
            f"{self.slots_expected} slots running"
        )
        if failures:
            text += f" ({'; '.join(failures)})"
        if self.errors:
            text += f", {len(self.errors)} new traceback(s)"
        if self.incident:
            text += f", incident {self.incident}"
        return text


def scan_tracebacks(data: bytes) -> tuple[list[Traceback], int]:
    """The complete Python tracebacks in `data` (log output) and how many of its bytes are
    done with: up to the end of the last complete line, or to the start of a traceback
    still being written, so that the next scan starts there."""
    lines = data.split(b"\n")[:-1]  # the last piece has no newline yet
    texts = [line.decode("utf-8", errors="replace").rstrip("\r") for line in lines]
    ends = []  # the byte offset after each line
    position = 0
    for line in lines:
        position += len(line) + 1
        ends.append(position)
    found: list[Traceback] = []
    consumed = 0
    index = 0
    while index < len(texts):
        if texts[index].rstrip() != TRACEBACK_START:
            consumed = ends[index]
            index += 1
            continue
        last = _traceback_end(texts, index)
        if last is None:
            break  # still being written
        block = texts[index : last + 1]
        found.append(Traceback(exception=texts[last].strip(), text="\n".join(block)))
        consumed = ends[last]
        index = last + 1
    return found, consumed


def _traceback_end(texts: list[str], start: int) -> int | None:
    """The index of the exception line ending the traceback that starts at `start`
    (following chained tracebacks that are already complete), None if not there yet."""
    index = start + 1
    while index < len(texts) and (not texts[index] or texts[index][0].isspace()):
        index += 1  # frames and source lines are indented
    if index == len(texts):
        return None
    last = index
    # A chained exception: blank lines, the chaining sentence, blank lines, a traceback.
    following = index + 1
    while following < len(texts) and not texts[following].strip():
        following += 1
    if following < len(texts) and texts[following].strip() in _CHAINED:
        following += 1
        while following < len(texts) and not texts[following].strip():
            following += 1
        if following < len(texts) and texts[following].rstrip() == TRACEBACK_START:
            chained = _traceback_end(texts, following)
            if chained is not None:
                return chained
    return last


def probe_environment(
    env: Environment, count: int = DEFAULT_PROBES
) -> tuple[str | None, list[ProbeRecord]]:
    """GETs of the environment's stable address + its release's health page; (url, probes),
    or (None, []) when no version is live."""
    release = env.current_release()
    if release is None:
        return None, []
    url = env.router.url.rstrip("/") + "/" + release.health_path.lstrip("/")
    records = []
    for _ in range(count):
        at = datetime.now(UTC)
        result = probe(url, env.probe.timeout_s)
        records.append(
            ProbeRecord(
                environment=env.name,
                commit_sha=release.version,
                at=at,
                ok=result.ok,
                status_code=result.status,
                latency_ms=round(result.latency_ms, 3),
                error=result.error,
            )
        )
    return env.router.url, records


def health_of(probes: list[ProbeRecord], slots_running: int, slots_expected: int) -> Health:
    """healthy: every probe ok and every live slot running; down: no probe ok."""
    if not probes:
        return "not_deployed"
    ok = sum(p.ok for p in probes)
    if ok == 0:
        return "down"
    if ok < len(probes) or slots_running < slots_expected:
        return "degraded"
    return "healthy"


def check(env: Environment, repository: str, count: int = DEFAULT_PROBES) -> Observation:
    """The environment's health now, recording nothing (for `cicd status`)."""
    url, probes = probe_environment(env, count)
    running, expected = _slots_running(env)
    return Observation(
        repository=repository,
        environment=env.name,
        health=health_of(probes, running, expected),
        commit_sha=env.current_version(),
        url=url,
        probes=probes,
        errors=[],
        slots_running=running,
        slots_expected=expected,
    )


def observe(
    env: Environment, repository: str, history: HistoryStore, count: int = DEFAULT_PROBES
) -> Observation:
    """check(), the tracebacks logged since the last scan, and what they mean: probes and
    service_error events recorded; a failed probe opens an incident (from the first
    failing probe), an observation with every probe ok closes it."""
    observation = check(env, repository, count)
    if observation.health == "not_deployed":
        return observation
    errors = scan_slot_logs(env)
    sha = observation.commit_sha
    history.record_probes(repository, observation.probes)
    for error in errors:
        message = f"{error.slot}: {error.traceback.exception}\n{error.traceback.text}"
        history.record_event(
            repository,
            "service_error",
            message[:_MAX_EVENT_CHARS],
            environment=env.name,
            commit_sha=sha,
        )
    incident: Literal["opened", "closed"] | None = None
    failed = [p for p in observation.probes if not p.ok]
    if failed:
        if not _has_open_incident(history, repository, env.name):
            reason = (
                f"{len(failed)} of {len(observation.probes)} probes of {observation.url} "
                f"failed: {failed[0].error}"
            )
            history.open_incident(repository, env.name, sha, reason, at=failed[0].at)
            history.record_event(
                repository, "incident_opened", reason, environment=env.name, commit_sha=sha
            )
            incident = "opened"
    else:
        at = observation.probes[-1].at
        if history.close_incident(repository, env.name, at=at):
            history.record_event(
                repository,
                "incident_closed",
                f"{env.name} healthy again at {observation.url}",
                environment=env.name,
                commit_sha=sha,
                at=at,
            )
            incident = "closed"
    return replace(observation, errors=errors, incident=incident)


def scan_slot_logs(env: Environment, max_bytes: int = _MAX_SCAN_BYTES) -> list[ServiceError]:
    """The tracebacks each live slot logged since the last scan, read through its target;
    the cursors reached are saved in the environment's state folder."""
    cursors_path = env.state_dir / "monitor.json"
    try:
        cursors: dict[str, str] = json.loads(cursors_path.read_text())["log_cursors"]
    except (OSError, ValueError, KeyError):
        cursors = {}
    errors: list[ServiceError] = []
    for slot in env.slots():
        chunk = env.target.log_since(slot.name, cursors.get(slot.name), max_bytes)
        tracebacks, consumed = scan_tracebacks(chunk.data)
        if consumed == 0 and len(chunk.data) >= max_bytes:
            consumed = len(chunk.data)  # a "traceback" that large is not one worth waiting for
        cursor = chunk.cursor_after(consumed)
        if cursor is not None:
            cursors[slot.name] = cursor
        errors.extend(ServiceError(slot.name, traceback) for traceback in tracebacks)
    # A slot the target no longer has will not be scanned again (docker: a container of
    # that name later is a new one, with a new log); locally its log stays and so does
    # its offset, so that a slot started again under that name is not scanned twice.
    known = {state.name for state in env.target.all()}
    kept = {name: cursor for name, cursor in cursors.items() if name in known}
    _write_atomically(cursors_path, json.dumps({"log_cursors": kept}, indent=2) + "\n")
    return errors


def _slots_running(env: Environment) -> tuple[int, int]:
    slots = env.slots()
    states = [env.target.status(slot.name) for slot in slots]
    running = sum(1 for s in states if s is not None and s.status in ACTIVE_STATUSES)
    return running, len(slots)


def _has_open_incident(history: HistoryStore, repository: str, environment: str) -> bool:
    incidents = history.incidents(repository, environment)
    return bool(incidents["closed_at"].isna().any())


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


@dataclass(frozen=True)
class EnvironmentStatus:
    """One line of `cicd status`."""

    repository: str
    environment: str
    health: Health
    commit: str | None
    version: str | None
    url: str | None
    since: datetime | None  # when the live version was deployed
    strategy: str
    target: str
    replicas: int  # slots serving traffic
    slots_running: int
    incident_since: datetime | None  # the open incident's start
    incident_reason: str | None

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        for key in ("since", "incident_since"):
            value = data[key]
            data[key] = value.isoformat() if value is not None else None
        return data


def environment_statuses(
    config: ControlConfig, history: HistoryStore, count: int = DEFAULT_PROBES
) -> list[EnvironmentStatus]:
    """Every repository x environment of cicd.yaml, probed now (nothing is recorded)."""
    statuses = []
    for repository in config.repositories:
        for environment in config.environments:
            env = existing_environment(config, repository.name, environment)
            observation = (
                check(env, repository.name, count)
                if env is not None
                else Observation(
                    repository.name, environment.name, "not_deployed", None, None, [], [], 0, 0
                )
            )
            release = env.current_release() if env is not None else None
            serving = [s for s in env.slots() if s.weight > 0] if env is not None else []
            deployments = history.deployments(repository.name, environment.name)
            live = deployments[
                (deployments["status"] == "deployed")
                & (deployments["commit"] == observation.commit_sha)
            ]
            incidents = history.incidents(repository.name, environment.name)
            open_incidents = incidents[incidents["closed_at"].isna()]
            statuses.append(
                EnvironmentStatus(
                    repository=repository.name,
                    environment=environment.name,
                    health=observation.health,
                    commit=observation.commit_sha,
                    version=release.version if release is not None else None,
                    url=observation.url,
                    since=_timestamp(live["finished_at"].iloc[0]) if not live.empty else None,
                    strategy=environment.strategy.type,
                    target=environment.target.type,
                    replicas=len(serving),
                    slots_running=observation.slots_running,
                    incident_since=_timestamp(open_incidents["opened_at"].iloc[0])
                    if not open_incidents.empty
                    else None,
                    incident_reason=str(open_incidents["reason"].iloc[0])
                    if not open_incidents.empty
                    else None,
                )
            )
    return statuses


def _timestamp(value: Any) -> datetime | None:
    """A DataFrame cell (a pandas Timestamp or NaT) as a datetime."""
    return None if pd.isna(value) else value.to_pydatetime()
