"""Approvals: who may let a commit into an environment that requires them.

An environment with `approvals: {required: N, roles: [...]}` deploys a commit only once N
distinct users holding one of the roles approved that commit for it (`cicd approve`).
Every attempt is recorded in the history DB, the refused ones with the reason: an unknown
or revoked token, a removed user, a missing role, the commit's own author (unless
`allow_self_approval`), a commit the repository does not have, an environment that
requires no approvals. Approvals are counted when a deployment asks, so a user removed or
a role taken away since no longer counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from cicd_dagster.access import AccessDenied, User, authenticate, find_user
from cicd_dagster.config import ControlConfig, EnvironmentConfig
from cicd_dagster.git import CommitInfo, GitError
from cicd_dagster.stages.source import mirror_of
from cicd_dagster.store import HistoryStore


class ApprovalStatus(NamedTuple):
    have: int
    """Distinct approvers who count (active users holding one of the roles)."""
    required: int
    approvers: list[str]


@dataclass(frozen=True)
class ApprovalOutcome:
    approved: bool
    """The user's approval stands (given now, or before: a duplicate adds nothing)."""
    reason: str
    user: str | None
    commit: str
    """The full sha when the commit exists, else as given."""
    status: ApprovalStatus | None
    """The commit's approvals after this one; None for an environment without approvals."""

    def to_json(self) -> dict[str, Any]:
        status = self.status
        return {
            "approved": self.approved,
            "reason": self.reason,
            "user": self.user,
            "commit": self.commit,
            "have": status.have if status else None,
            "required": status.required if status else None,
            "approvers": status.approvers if status else [],
        }


def approve(
    config: ControlConfig,
    history: HistoryStore,
    repository: str,
    environment: str,
    sha: str,
    token: str,
) -> ApprovalOutcome:
    """Approve `sha` of `repository` for `environment` as the token's user, or refuse;
    either is recorded. KeyError for a repository or environment not in cicd.yaml,
    ValueError for a sha that is not 7-40 hex digits, GitError if the repository cannot
    be fetched."""
    repo = config.repository(repository)
    env = config.environment(environment)
    mirror = mirror_of(config, repo)
    if not mirror.path.exists() or not mirror.has_commit(sha):
        mirror.fetch()  # pushed since the last fetch, perhaps
    commit: CommitInfo | None = None
    if mirror.has_commit(sha):
        try:
            commit = mirror.commit_info(sha)
        except GitError:  # an abbreviation of more than one object
            commit = None
    full_sha = commit.sha if commit else sha.lower()

    def decide(approved: bool, reason: str, user: str | None) -> ApprovalOutcome:
        decision = "approved" if approved else "refused"
        added = history.record_approval(
            repository,
            environment,
            full_sha,
            user=user,
            decision=decision,
            reason=reason,
            at=datetime.now(UTC),
        )
        if approved and not added:
            reason = f"{user} approved {full_sha[:12]} for {environment} before"
        status = approval_status(history, config, repository, environment, full_sha)
        return ApprovalOutcome(approved, reason, user, full_sha, status if env.approvals else None)

    try:
        user = authenticate(config, history, token)
    except AccessDenied as denied:
        return decide(False, denied.reason, denied.user)
    if env.approvals is None:
        return decide(False, f"{environment} requires no approvals", user.name)
    if commit is None:
        return decide(False, f"{repository} has no commit {sha}", user.name)
    if not _may_approve(user, env):
        return decide(False, _role_refusal(user, env), user.name)
    if not env.approvals.allow_self_approval and _authored(user, commit):
        return decide(
            False,
            f"{user.name} authored {commit.sha[:12]} and may not approve their own change "
            f"(approvals.allow_self_approval is false for {environment})",
            user.name,
        )
    return decide(True, f"approved by {user.name}", user.name)


def approval_status(
    history: HistoryStore, config: ControlConfig, repository: str, environment: str, sha: str
) -> ApprovalStatus:
    """The approvals of `sha` for `environment` that count now: by users not removed who
    still hold one of the environment's roles; required is 0 without approvals."""
    env = config.environment(environment)
    if env.approvals is None:
        return ApprovalStatus(0, 0, [])
    rows = history.approvals(repository, environment, sha)
    approvers: list[str] = []
    for name in rows.loc[rows["decision"] == "approved", "user"]:
        user = find_user(config, history, str(name))
        if user is not None and user.name not in approvers and _may_approve(user, env):
            approvers.append(user.name)
    return ApprovalStatus(len(approvers), env.approvals.required, approvers)


def approval_refusal(
    config: ControlConfig, history: HistoryStore, repository: str, environment: str, sha: str
) -> str | None:
    """Why `sha` may not deploy to `environment` for want of approvals, or None. The first
    time a commit waits, an approval_requested event tells the approvers."""
    env = config.environment(environment)
    if env.approvals is None:
        return None
    status = approval_status(history, config, repository, environment, sha)
    if status.have >= status.required:
        return None
    reason = waiting_reason(env, status)
    history.record_event(
        repository,
        "approval_requested",
        f"{repository} {sha[:12]} -> {environment}: {reason}",
        environment=environment,
        commit_sha=sha,
        once=True,
    )
    return reason


def waiting_reason(environment: EnvironmentConfig, status: ApprovalStatus) -> str:
    """E.g. "waiting for approval: 0 of 1 (roles: release-manager)"."""
    assert environment.approvals is not None
    roles = ", ".join(environment.approvals.roles) or "any user"
    return f"waiting for approval: {status.have} of {status.required} (roles: {roles})"


def _may_approve(user: User, environment: EnvironmentConfig) -> bool:
    assert environment.approvals is not None
    wanted = environment.approvals.roles
    return not wanted or not user.roles.isdisjoint(wanted)


def _role_refusal(user: User, environment: EnvironmentConfig) -> str:
    assert environment.approvals is not None
    has = ", ".join(sorted(user.roles)) or "none"
    wanted = ", ".join(environment.approvals.roles)
    return f"{user.name} has no role that may approve {environment.name} ({wanted}; has: {has})"


def _authored(user: User, commit: CommitInfo) -> bool:
    """Whether the commit's author (by email or name) is this user (by email or name)."""
    author = {commit.author_email.casefold(), commit.author_name.casefold()}
    identities = {user.name.casefold()} | ({user.email.casefold()} if user.email else set())
    return not author.isdisjoint(identities)
