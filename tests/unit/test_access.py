"""Users, API tokens and approvals in the history DB (SQLite and PostgreSQL), and the
access rules on top of them: token hashing, roles from the DB and cicd.yaml together."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from cicd_dagster.access import (
    AccessDenied,
    AccessError,
    add_user,
    authenticate,
    find_user,
    list_users,
    new_token,
    remove_user,
    token_sha256,
)
from cicd_dagster.config import ConfigError, ControlConfig, load_control_config
from cicd_dagster.store import HistoryStore
from tests.support import control_config
from tests.unit import test_history_store

# The history store tests' fixture: SQLite, and PostgreSQL (marked postgres).
database_url = test_history_store.database_url

AT = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
SHA = "ab" * 20


@pytest.fixture
def store(database_url: str) -> Iterator[HistoryStore]:
    history = HistoryStore(database_url)
    yield history
    history.dispose()


@pytest.fixture
def config(tmp_path: Path) -> ControlConfig:
    users = "users:\n  ops-lead: {roles: [release-manager], email: lead@example.com}\n"
    return load_control_config(control_config(tmp_path, {"app": tmp_path / "app"}, users))


def test_a_token_is_long_random_and_stored_only_as_its_sha256(config, store, database_url):
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(re.fullmatch(r"cicd_[A-Za-z0-9_-]{43}", token) for token in tokens)

    _, token = add_user(config, store, "ada", roles=["dev"])

    assert token_sha256(token) == hashlib.sha256(token.encode()).hexdigest()
    # What someone who reads the DB sees.
    engine = sa.create_engine(database_url)
    with engine.connect() as connection:
        rows = [
            *connection.execute(sa.text("SELECT * FROM users")),
            *connection.execute(sa.text("SELECT * FROM api_tokens")),
        ]
    engine.dispose()
    dump = "\n".join(map(str, rows))
    assert token not in dump
    assert token_sha256(token) in dump


def test_roles_are_the_union_of_the_db_and_cicd_yaml(config, store):
    user, _ = add_user(config, store, "ops-lead", roles=["dev"])
    assert user.roles == {"dev", "release-manager"}
    assert user.email == "lead@example.com"  # from cicd.yaml, none given in the DB

    again, _ = add_user(config, store, "ops-lead", roles=["qa"], email="ops@example.com")
    # Roles given again replace the DB's; the DB's email wins over cicd.yaml's.
    assert again.roles == {"qa", "release-manager"}
    assert again.email == "ops@example.com"

    kept, _ = add_user(config, store, "ops-lead")  # no roles given: the DB's stay
    assert kept.roles == {"qa", "release-manager"}

    listed = list_users(config, store)
    assert list(listed.columns) == [
        "name",
        "email",
        "roles",
        "tokens",
        "created_at",
        "last_used_at",
    ]
    row = listed.iloc[0]
    assert (row["name"], row["roles"], row["tokens"]) == ("ops-lead", "qa,release-manager", 3)


def test_authenticate_finds_the_user_and_marks_the_token_used(config, store):
    _, token = add_user(config, store, "ada", roles=["release-manager"])
    assert pd.isna(store.users().iloc[0]["last_used_at"])

    user = authenticate(config, store, token)

    assert (user.name, user.roles) == ("ada", {"release-manager"})
    assert not pd.isna(store.users().iloc[0]["last_used_at"])


@pytest.mark.parametrize("token", ["", "cicd_", "cicd_not-a-token", "x" * 10_000])
def test_unknown_tokens_are_denied_without_a_user(config, store, token):
    add_user(config, store, "ada", roles=["dev"])
    with pytest.raises(AccessDenied) as denied:
        authenticate(config, store, token)
    assert (denied.value.reason, denied.value.user) == ("unknown API token", None)


def test_a_removed_user_and_its_tokens_count_no_more(config, store):
    _, first = add_user(config, store, "ada", roles=["dev"])
    _, second = add_user(config, store, "ada")

    remove_user(store, "ada")

    for token in (first, second):
        with pytest.raises(AccessDenied, match="user ada was removed") as denied:
            authenticate(config, store, token)
        assert denied.value.user == "ada"
    assert find_user(config, store, "ada") is None
    assert list_users(config, store).empty
    with pytest.raises(AccessError, match="no user 'ada'"):
        remove_user(store, "ada")

    # Added back: a new token works, the old ones stay revoked.
    _, third = add_user(config, store, "ada")
    assert authenticate(config, store, third).name == "ada"
    with pytest.raises(AccessDenied, match="this token of ada was revoked"):
        authenticate(config, store, first)


def test_rotating_revokes_the_earlier_tokens(config, store):
    _, old = add_user(config, store, "ada", roles=["dev"])
    _, new = add_user(config, store, "ada", revoke_others=True)

    assert authenticate(config, store, new).name == "ada"
    with pytest.raises(AccessDenied, match="revoked"):
        authenticate(config, store, old)
    assert store.users().iloc[0]["tokens"] == 1


@pytest.mark.parametrize(
    ("name", "roles", "email", "message"),
    [
        ("Ada Lovelace", [], None, 'user name: "Ada Lovelace" is not a valid name'),
        ("", [], None, 'user name: "" is not a valid name'),
        ("a" * 65, [], None, "is not a valid name"),
        ("ada", ["Release Manager"], None, 'role: "Release Manager" is not a valid name'),
        ("ada", ["dev"], "ada at example", 'email: "ada at example" is not an email address'),
        ("ada", ["dev"], "ada@example.com\nBcc: x@y", "is not an email address"),
    ],
)
def test_bad_names_roles_and_emails_are_refused(config, store, name, roles, email, message):
    with pytest.raises(AccessError, match=re.escape(message)):
        add_user(config, store, name, roles=roles, email=email)
    assert store.users(include_removed=True).empty


def test_a_token_needs_a_user_who_is_not_removed(store):
    with pytest.raises(LookupError, match="no user 'ghost'"):
        store.add_token("ghost", "0" * 64, at=AT)
    store.save_user("ada", roles=["dev"], email=None, at=AT)
    store.remove_user("ada", at=AT)
    with pytest.raises(LookupError):
        store.add_token("ada", "0" * 64, at=AT)


def test_an_approval_is_recorded_once_per_user_and_refusals_every_time(store):
    def record(user: str | None, decision: str, minutes: int) -> bool:
        return store.record_approval(
            "app",
            "prod",
            SHA,
            user=user,
            decision=decision,
            reason=f"{decision} {minutes}",
            at=AT + timedelta(minutes=minutes),
        )

    assert record("ada", "approved", 1)
    assert not record("ada", "approved", 2)
    assert record("bob", "refused", 3)
    assert record("bob", "refused", 4)
    assert record(None, "refused", 5)
    assert record("bob", "approved", 6)
    with pytest.raises(ValueError, match="unknown decision 'maybe'"):
        record("ada", "maybe", 7)

    rows = store.approvals("app", "prod", SHA)
    assert list(rows.columns) == [
        "repository",
        "environment",
        "commit",
        "user",
        "decision",
        "reason",
        "at",
    ]
    users = [None if pd.isna(user) else user for user in rows["user"]]
    assert list(zip(users, rows["decision"], rows["reason"], strict=True)) == [
        ("ada", "approved", "approved 1"),
        ("bob", "refused", "refused 3"),
        ("bob", "refused", "refused 4"),
        (None, "refused", "refused 5"),
        ("bob", "approved", "approved 6"),
    ]
    assert rows["at"].iloc[0] == AT + timedelta(minutes=1)
    assert store.approvals("app", "staging").empty
    assert store.approvals("other").empty


def test_an_event_recorded_once_is_recorded_the_first_time_only(store):
    first = store.record_event(
        "app", "approval_requested", "waiting", environment="prod", commit_sha=SHA, once=True
    )
    again = store.record_event(
        "app", "approval_requested", "still", environment="prod", commit_sha=SHA, once=True
    )
    other_env = store.record_event(
        "app", "approval_requested", "waiting", environment="qa", commit_sha=SHA, once=True
    )
    no_env = store.record_event("app", "approval_requested", "x", commit_sha=SHA, once=True)
    no_env_again = store.record_event("app", "approval_requested", "y", commit_sha=SHA, once=True)

    assert first == again
    assert len({first, other_env, no_env}) == 3
    assert no_env_again == no_env
    assert list(store.events("app")["message"]) == ["waiting", "waiting", "x"]


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ('users: {"Ops Lead": {roles: [x]}}', 'cicd.yaml:5: users.Ops Lead: "Ops Lead" is not'),
        ("users: {ops: {roles: [Release Manager]}}", "cicd.yaml:5: users.ops.roles[0]: "),
        ("users: {ops: {email: ops}}", 'cicd.yaml:5: users.ops.email: "ops" is not an email'),
        (
            "environments: [{name: prod, approvals: {allow_self_approval: maybe}}]",
            "cicd.yaml:5: environments[0].approvals.allow_self_approval: ",
        ),
        (
            "environments: [{name: prod, approvals: {roles: [Ops]}}]",
            "cicd.yaml:5: environments[0].approvals.roles[0]: ",
        ),
    ],
)
def test_bad_users_and_approvals_in_cicd_yaml_name_the_line(tmp_path, yaml, message):
    with pytest.raises(ConfigError) as error:
        load_control_config(control_config(tmp_path, {"app": tmp_path / "app"}, yaml + "\n"))
    assert message in str(error.value)


def test_approvals_default_to_one_approver_of_any_role_not_the_author(tmp_path):
    yaml = "environments: [{name: prod, approvals: {}}]\nusers: {ops: {}}\n"
    config = load_control_config(control_config(tmp_path, {"app": tmp_path / "app"}, yaml))
    approvals = config.environment("prod").approvals
    assert approvals is not None
    assert (approvals.required, approvals.roles, approvals.allow_self_approval) == (1, [], False)
    assert (config.users["ops"].roles, config.users["ops"].email) == ([], None)
