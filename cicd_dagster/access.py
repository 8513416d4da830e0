"""Users and their API tokens: who may act on the control plane (approve deployments).

A user lives in the history DB (`cicd users add`), with roles there; cicd.yaml's
`users.NAME` may give the same name more roles and an email. A user's roles are the union
of both, read at every use, so a role taken out of cicd.yaml counts no more from then on.

A token is `cicd_` and 32 random bytes (urlsafe base64); it is shown once, when issued, and
only its sha256 is stored. A lookup is by that hash: with 256 random bits per token, the
hash of a guess tells nothing about a real token, so an indexed equality lookup is as good
as a constant-time comparison.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd
from pydantic import TypeAdapter, ValidationError

from cicd_dagster.config import ControlConfig, Email, ResourceName
from cicd_dagster.store import HistoryStore

TOKEN_PREFIX = "cicd_"  # noqa: S105 (not a secret: what every token starts with)
_TOKEN_BYTES = 32
_NAMES = TypeAdapter(ResourceName)
_EMAILS = TypeAdapter(Email)


class AccessError(Exception):
    """A user name, role or email that cannot be used, or a user that does not exist."""


class AccessDenied(Exception):
    """A token that identifies no one who may act: unknown, revoked, of a removed user.

    `user` names the token's owner when there is one (a revoked token, a removed user).
    """

    def __init__(self, reason: str, user: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.user = user


@dataclass(frozen=True)
class User:
    """A user who may act now, with the roles of the DB and cicd.yaml together."""

    name: str
    email: str | None
    roles: frozenset[str]


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(_TOKEN_BYTES)


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_user(
    config: ControlConfig,
    history: HistoryStore,
    name: str,
    *,
    roles: Sequence[str] = (),
    email: str | None = None,
    revoke_others: bool = False,
) -> tuple[User, str]:
    """Create the user (or update its roles and email: given roles replace the DB's) and
    issue a token; returns the user and the token, whose value is never stored.
    AccessError for an invalid name, role or email."""
    _check(_NAMES, name, "user name")
    for role in roles:
        _check(_NAMES, role, "role")
    if email is not None:
        _check(_EMAILS, email, "email")
    now = datetime.now(UTC)
    history.save_user(name, roles=list(roles) or None, email=email, at=now)
    token = new_token()
    history.add_token(name, token_sha256(token), at=now, revoke_others=revoke_others)
    user = find_user(config, history, name)
    assert user is not None
    return user, token


def remove_user(history: HistoryStore, name: str) -> None:
    """Mark the user removed and revoke its tokens; AccessError if there is no such user."""
    if not history.remove_user(name, at=datetime.now(UTC)):
        raise AccessError(f"no user {name!r} (or removed already); see `cicd users list`")


def find_user(config: ControlConfig, history: HistoryStore, name: str) -> User | None:
    """The user if it exists in the DB and is not removed, with all its roles."""
    record = history.user(name)
    if record is None or record.removed_at is not None:
        return None
    return _merged(config, record.name, record.email, record.roles)


def authenticate(config: ControlConfig, history: HistoryStore, token: str) -> User:
    """The user whose token this is; AccessDenied for an unknown or revoked token or a
    removed user. Marks the token used."""
    owner = history.token_owner(token_sha256(token), used_at=datetime.now(UTC))
    if owner is None:
        raise AccessDenied("unknown API token")
    record = owner.user
    if record.removed_at is not None:
        raise AccessDenied(f"user {record.name} was removed", record.name)
    if owner.revoked_at is not None:
        raise AccessDenied(f"this token of {record.name} was revoked", record.name)
    return _merged(config, record.name, record.email, record.roles)


def list_users(config: ControlConfig, history: HistoryStore) -> pd.DataFrame:
    """One row per user who may act: name, email, roles (the DB's and cicd.yaml's, comma-separated),
    tokens (active), created_at, last_used_at. Never a token or its hash."""
    frame = history.users()
    users = [
        _merged(config, name, None if pd.isna(email) else email, roles)
        for name, email, roles in zip(frame["name"], frame["email"], frame["roles"], strict=True)
    ]
    frame["email"] = [user.email for user in users]
    frame["roles"] = [",".join(sorted(user.roles)) for user in users]
    return frame[["name", "email", "roles", "tokens", "created_at", "last_used_at"]]


def _merged(config: ControlConfig, name: str, email: str | None, roles: Sequence[str]) -> User:
    configured = config.users.get(name)
    if configured is None:
        return User(name, email, frozenset(roles))
    return User(name, email or configured.email, frozenset(roles) | set(configured.roles))


def _check(adapter: TypeAdapter[str], value: str, what: str) -> None:
    try:
        adapter.validate_python(value)
    except ValidationError as error:
        raise AccessError(f"{what}: {error.errors()[0]['msg']}") from error
