"""`cicd events import FILE`: changes, deployments and incidents from other systems, as
JSON lines with fourkeys' fields (dora-team/fourkeys: its changes, deployments and
incidents tables):

    {"id": "c1", "type": "change", "time": "2026-01-05T09:00:00Z", "repository": "shop",
     "sha": "<commit>"}
    {"id": "d1", "type": "deployment", "time": "...", "repository": "shop", "sha": "<main
     commit>", "changes": ["<commit>", ...]}
    {"id": "i1", "type": "incident", "time": "...", "repository": "shop",
     "root_cause": "<commit>", "resolved": "..."}

Times are ISO 8601 with an offset (any offset; stored in UTC); a time without one is an
error for that line, as is an unknown type, a missing field or an unknown field. Bad
lines are reported by number and skipped; the others are stored, keyed by (repository,
id), so importing a file again changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from cicd_dagster.config import ResourceName
from cicd_dagster.store.history import ExternalEventRecord, HistoryStore, ImportResult

# A commit id: hexadecimal, abbreviated or whole (SHA-1 or SHA-256); compared lowercased.
Sha = Annotated[
    str, StringConstraints(pattern=r"^[0-9a-fA-F]{7,64}$", to_lower=True, strip_whitespace=True)
]
UtcTime = Annotated[AwareDatetime, AfterValidator(lambda moment: moment.astimezone(UTC))]
SourceId = Annotated[str, StringConstraints(min_length=1, max_length=255, strip_whitespace=True)]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: SourceId
    time: UtcTime
    repository: ResourceName


class ChangeEvent(_Event):
    type: Literal["change"]
    sha: Sha


class DeploymentEvent(_Event):
    type: Literal["deployment"]
    sha: Sha
    changes: list[Sha] = []


class IncidentEvent(_Event):
    type: Literal["incident"]
    root_cause: Sha | None = None
    resolved: UtcTime | None = None


_EVENT = TypeAdapter(
    Annotated[ChangeEvent | DeploymentEvent | IncidentEvent, Field(discriminator="type")]
)


@dataclass(frozen=True)
class LineError:
    line: int
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class EventImport:
    """The outcome of importing one file: what the store did, and the lines skipped."""

    path: Path
    result: ImportResult
    errors: list[LineError]

    def to_json(self) -> dict[str, object]:
        return {
            "file": str(self.path),
            "imported": len(self.result.imported),
            "unchanged": len(self.result.unchanged),
            "conflicting": self.result.conflicting,
            "errors": [{"line": e.line, "message": e.message} for e in self.errors],
        }


def parse_events(lines: Iterable[str]) -> tuple[list[ExternalEventRecord], list[LineError]]:
    """The events of the good lines, and an error per bad line (numbered from 1); blank
    lines are skipped. An id seen on an earlier line of the same file is an error too."""
    events: list[ExternalEventRecord] = []
    errors: list[LineError] = []
    seen: dict[tuple[str, str], int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            event = _EVENT.validate_python(json.loads(line))
        except json.JSONDecodeError as error:
            errors.append(LineError(number, f"not JSON: {error.msg} (column {error.colno})"))
            continue
        except ValidationError as error:
            errors.append(LineError(number, _describe(error)))
            continue
        key = (event.repository, event.id)
        if key in seen:
            errors.append(
                LineError(number, f"duplicate id {event.id!r} (first on line {seen[key]})")
            )
            continue
        seen[key] = number
        events.append(_record(event))
    return events, errors


def import_events(history: HistoryStore, path: Path, *, now: datetime) -> EventImport:
    """Parse the file and store its good lines (see the module's docstring)."""
    with path.open(encoding="utf-8", errors="replace") as lines:
        events, errors = parse_events(lines)
    return EventImport(path, history.import_events(events, at=now), errors)


def _record(event: ChangeEvent | DeploymentEvent | IncidentEvent) -> ExternalEventRecord:
    if isinstance(event, IncidentEvent):
        return ExternalEventRecord(
            event.repository,
            event.id,
            event.type,
            event.time,
            root_cause=event.root_cause,
            resolved_at=event.resolved,
        )
    changes = tuple(dict.fromkeys(event.changes)) if isinstance(event, DeploymentEvent) else ()
    return ExternalEventRecord(
        event.repository, event.id, event.type, event.time, sha=event.sha, changes=changes
    )


def _describe(error: ValidationError) -> str:
    """pydantic's errors as `field: message`, without the union's branch names."""
    messages = []
    for detail in error.errors(include_url=False):
        # The tagged union puts the type first in the location: it adds nothing.
        location = [str(part) for part in detail["loc"][1:] if part not in _TYPES]
        if detail["type"] == "union_tag_invalid":
            tag = detail.get("ctx", {}).get("tag")
            messages.append(f"type: {tag!r} is not one of change, deployment, incident")
        elif detail["type"] == "union_tag_not_found":
            messages.append("type: missing (change, deployment or incident)")
        elif detail["type"] == "string_pattern_mismatch":
            field = ".".join(location)
            messages.append(f"{field}: {detail['input']!r} is not a commit sha (7-64 hex digits)")
        else:
            messages.append(f"{'.'.join(location) or 'line'}: {detail['msg']}")
    return "; ".join(messages)


_TYPES = ("change", "deployment", "incident")
