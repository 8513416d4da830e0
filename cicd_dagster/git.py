"""Everything the control plane asks of git: remote refs, a bare mirror per repository,
commit metadata, file contents and isolated checkouts.

Every git call goes through `_git`: an argv list (never a shell), `--` or
`--end-of-options` between options and refs/paths so that a ref named `-rf` or
`x$(touch${IFS}p)` is only ever data, and an environment that cannot prompt for a
password or be redirected to another repository by inherited GIT_DIR-style variables.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import signal
import subprocess
import uuid
from collections.abc import Collection, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from cicd_dagster.locks import file_lock

_FULL_SHA = re.compile(r"[0-9a-f]{40}")
_COMMIT_SHA = re.compile(r"[0-9a-fA-F]{7,40}")
# `https://user:token@host/x` -> `https://***@host/x`: URLs end up in error messages and logs.
_URL_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")
# Variables that would point git at another repository than the one we name.
_REPOSITORY_LOCATION_VARIABLES = (
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_CEILING_DIRECTORIES",
)
_COMMIT_FORMAT = "%P%x00%an%x00%ae%x00%aI%x00%cI%x00%B"


class GitError(Exception):
    """A git command failed; the message names the command and carries git's stderr."""

    def __init__(self, message: str, argv: Sequence[str] = (), stderr: str = "") -> None:
        details = [message]
        if argv:
            details.append(f"command: {shlex.join(['git', *argv])}")
        if stderr.strip():
            details.append(f"stderr: {stderr.strip()}")
        super().__init__(_redact_credentials("\n".join(details)))


def _redact_credentials(text: str) -> str:
    return _URL_CREDENTIALS.sub("***@", text)


def _git_environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _REPOSITORY_LOCATION_VARIABLES}
    env["GIT_TERMINAL_PROMPT"] = "0"  # a missing credential fails instead of hanging
    env["LC_ALL"] = "C"  # stable, parseable messages
    return env


def _git(
    args: Sequence[str],
    *,
    cwd: Path | None = None,
    timeout_s: float = 600,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run `git ARGS`, returning raw stdout bytes; GitError on failure when `check`.

    git runs in its own session so a timeout can kill its helpers (ssh, remote-https)
    too: they inherit the pipes, and a surviving helper would block `communicate`.
    """
    argv = list(args)
    with subprocess.Popen(
        ["git", *argv],
        cwd=cwd,
        env=_git_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise GitError(f"git timed out after {timeout_s:g} s", argv) from None
    result = subprocess.CompletedProcess(["git", *argv], process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise GitError(f"git exited with status {result.returncode}", argv, _decode(result.stderr))
    return result


def _decode(data: bytes) -> str:
    # Replacement rather than surrogate escapes: names and messages are stored and shown,
    # and a lone surrogate would break every JSON/database write downstream.
    return data.decode("utf-8", errors="replace")


def _validate_sha(sha: str) -> str:
    """The sha, lowercased, if it is 7-40 hex digits; anything else never reaches git."""
    if not _COMMIT_SHA.fullmatch(sha):
        raise ValueError(f"not a commit sha (7-40 hex digits): {sha!r}")
    return sha.lower()


# --- remote refs -------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteRef:
    name: str  # full ref: refs/heads/main, refs/tags/v1.0
    kind: Literal["branch", "tag"]
    short: str  # main, v1.0, release/1.x
    sha: str  # 40 hex; for an annotated tag the commit it points at, not the tag object


@dataclass(frozen=True)
class RemoteState:
    refs: list[RemoteRef]
    default_branch: str | None


_BRANCH_PREFIX = "refs/heads/"
_TAG_PREFIX = "refs/tags/"
_PEELED_SUFFIX = "^{}"


def ls_remote(url: str, *, timeout_s: float = 60) -> RemoteState:
    """The branches, tags and default branch of the repository at `url` (a path or any URL
    git accepts), without cloning it."""
    args = ["ls-remote", "--symref", "--", url, "HEAD", "refs/heads/*", "refs/tags/*"]
    try:
        output = _decode(_git(args, timeout_s=timeout_s).stdout)
    except GitError as error:
        raise GitError(f"repository {url} is unreachable: {error}") from error

    default_branch: str | None = None
    shas: dict[str, str] = {}
    peeled: dict[str, str] = {}
    for line in output.splitlines():
        target, _, refname = line.partition("\t")
        if target.startswith("ref: "):
            symref_target = target.removeprefix("ref: ")
            if refname == "HEAD" and symref_target.startswith(_BRANCH_PREFIX):
                default_branch = symref_target.removeprefix(_BRANCH_PREFIX)
        elif refname.endswith(_PEELED_SUFFIX):
            peeled[refname.removesuffix(_PEELED_SUFFIX)] = target
        elif refname.startswith((_BRANCH_PREFIX, _TAG_PREFIX)):
            shas[refname] = target

    refs = []
    for refname, sha in shas.items():
        if refname.startswith(_BRANCH_PREFIX):
            refs.append(RemoteRef(refname, "branch", refname.removeprefix(_BRANCH_PREFIX), sha))
        else:
            tag = refname.removeprefix(_TAG_PREFIX)
            refs.append(RemoteRef(refname, "tag", tag, peeled.get(refname, sha)))
    return RemoteState(refs=sorted(refs, key=lambda ref: ref.name), default_branch=default_branch)


def select_refs(
    state: RemoteState,
    branches: Sequence[str] | None,
    tags: Sequence[str],
    default_branch: str | None = None,
) -> list[RemoteRef]:
    """The refs to build: branches whose short name matches a pattern in `branches` (None:
    only the default branch, `default_branch` overriding the remote's), tags matching a
    pattern in `tags`. Patterns are fnmatch, case-sensitive; `*` also matches `/`."""

    def matches(name: str, patterns: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

    def wanted(ref: RemoteRef) -> bool:
        if ref.kind == "tag":
            return matches(ref.short, tags)
        if branches is None:
            return ref.short == (default_branch or state.default_branch)
        return matches(ref.short, branches)

    return sorted(filter(wanted, state.refs), key=lambda ref: ref.name)


# --- commits -----------------------------------------------------------------------------


@dataclass(frozen=True)
class FileChange:
    path: str
    status: str  # A, M, D, R, C, T (first letter of git's status; rename scores dropped)
    added: int | None  # lines; None for a binary file
    deleted: int | None
    old_path: str | None = None  # the source path of a rename or copy


@dataclass(frozen=True)
class CommitInfo:
    sha: str
    parents: list[str]
    author_name: str
    author_email: str
    authored_at: datetime
    committed_at: datetime
    message: str  # full message, trailing newlines removed
    changed_files: list[FileChange]  # against the first parent; a root commit: everything

    @property
    def subject(self) -> str:
        return self.message.split("\n", 1)[0]


def _parse_name_status(output: bytes) -> list[tuple[str, str, str | None]]:
    """(status, path, old path) from `--name-status -z`: STATUS\\0PATH\\0, or for renames
    and copies STATUS\\0OLD\\0NEW\\0."""
    fields = [_decode(field) for field in output.split(b"\0")]
    entries: list[tuple[str, str, str | None]] = []
    index = 0
    while index < len(fields) and fields[index]:
        status = fields[index][0]
        if status in "RC":
            entries.append((status, fields[index + 2], fields[index + 1]))
            index += 3
        else:
            entries.append((status, fields[index + 1], None))
            index += 2
    return entries


def _parse_numstat(output: bytes) -> dict[str, tuple[int | None, int | None]]:
    """new path -> (added, deleted) from `--numstat -z`: ADDED\\tDELETED\\tPATH\\0, or for
    renames ADDED\\tDELETED\\t\\0OLD\\0NEW\\0; binary files count as `-`."""
    fields = output.split(b"\0")
    stats: dict[str, tuple[int | None, int | None]] = {}
    index = 0
    while index < len(fields) and fields[index]:
        added, deleted, path = fields[index].split(b"\t", 2)
        if path:
            index += 1
        else:
            path = fields[index + 2]
            index += 3
        stats[_decode(path)] = (
            None if added == b"-" else int(added),
            None if deleted == b"-" else int(deleted),
        )
    return stats


# --- tags --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TagRef:
    name: str  # short: v1.4.0
    sha: str  # the commit it points at (an annotated tag peeled)
    annotated: bool


class TagExistsError(GitError):
    """A tag of that name exists already; tags are never moved."""


def check_tag_name(name: str) -> str:
    """`name` if git accepts refs/tags/<name> (git check-ref-format) and it cannot be read
    as an option; ValueError otherwise."""
    if not name or name.startswith("-"):
        raise ValueError(f"not a valid tag name: {name!r}")
    if _git(["check-ref-format", f"{_TAG_PREFIX}{name}"], check=False).returncode != 0:
        raise ValueError(f"not a valid tag name (git check-ref-format): {name!r}")
    return name


# --- the mirror --------------------------------------------------------------------------


class Mirror:
    """A bare mirror clone of one repository: the source of every checkout and of commit
    metadata, so that the remote is contacted only by `fetch`."""

    def __init__(self, path: Path, url: str) -> None:
        self.path = path
        self.url = url
        # Beside the mirror, not inside it: the lock must exist before the clone does.
        self._lock_path = path.with_name(path.name + ".lock")

    def fetch(self, *, timeout_s: float = 600) -> None:
        """Make the mirror an exact copy of the remote's refs: cloning it the first time;
        later following URL changes, force-pushes (`--force`) and deleted refs (`--prune`).
        """
        with file_lock(self._lock_path):
            if self.path.exists():
                try:
                    _git(["remote", "set-url", "--", "origin", self.url], cwd=self.path)
                    _git(
                        ["fetch", "--prune", "--force", "origin"],
                        cwd=self.path,
                        timeout_s=timeout_s,
                    )
                except GitError as error:
                    raise GitError(
                        f"fetching {self.url} into {self.path} failed: {error}"
                    ) from error
            else:
                self._clone(timeout_s)

    def _clone(self, timeout_s: float) -> None:
        # Clone beside the final path and rename: an interrupted clone never leaves a
        # half-made mirror that a later `fetch` would take for a real one.
        partial = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _git(
                ["clone", "--mirror", "--quiet", "--", self.url, str(partial)], timeout_s=timeout_s
            )
        except GitError as error:
            shutil.rmtree(partial, ignore_errors=True)
            raise GitError(f"cloning {self.url} into {self.path} failed: {error}") from error
        partial.rename(self.path)

    def resolve(self, rev: str) -> str:
        """The 40-hex commit sha that a branch, tag or (abbreviated) sha names."""
        args = ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"]
        result = _git(args, cwd=self.path, check=False)
        if result.returncode != 0:
            raise GitError(f"no commit named {rev!r} in {self.url}", args, _decode(result.stderr))
        return _decode(result.stdout).strip()

    def has_commit(self, sha: str) -> bool:
        args = ["cat-file", "-e", f"{_validate_sha(sha)}^{{commit}}"]
        return _git(args, cwd=self.path, check=False).returncode == 0

    def _full_sha(self, sha: str) -> str:
        return self.resolve(_validate_sha(sha))

    def commit_info(self, sha: str) -> CommitInfo:
        full_sha = self._full_sha(sha)
        # %B last: the message is the only field that may contain anything but a NUL.
        header = _git(
            [
                "show",
                "--no-patch",
                "--no-show-signature",
                f"--format={_COMMIT_FORMAT}",
                full_sha,
                "--",
            ],
            cwd=self.path,
        ).stdout
        parents, author_name, author_email, authored, committed, message = _decode(header).split(
            "\0", 5
        )
        parent_shas = parents.split()
        return CommitInfo(
            sha=full_sha,
            parents=parent_shas,
            author_name=author_name,
            author_email=author_email,
            authored_at=datetime.fromisoformat(authored),
            committed_at=datetime.fromisoformat(committed),
            message=message.rstrip("\n"),
            changed_files=self._changed_files(full_sha, parent_shas),
        )

    def _changed_files(self, full_sha: str, parent_shas: list[str]) -> list[FileChange]:
        # Against the first parent explicitly: given only a merge, diff-tree shows nothing.
        return self._diff_tree([parent_shas[0], full_sha] if parent_shas else ["--root", full_sha])

    def _diff_tree(self, compared: list[str]) -> list[FileChange]:
        diff_tree = ["diff-tree", "-r", "-z", "-M", "--no-commit-id", *compared]
        statuses = _parse_name_status(
            _git([*diff_tree, "--name-status", "--"], cwd=self.path).stdout
        )
        line_counts = _parse_numstat(_git([*diff_tree, "--numstat", "--"], cwd=self.path).stdout)
        return [
            FileChange(path, status, *line_counts.get(path, (None, None)), old_path=old_path)
            for status, path, old_path in statuses
        ]

    def read_file(self, sha: str, path: str) -> str | None:
        """The text of `path` at commit `sha` (undecodable bytes replaced), None when there
        is no such file there (absent, or a directory)."""
        full_sha = self._full_sha(sha)
        # The argument starts with the sha, so no path can turn it into an option.
        result = _git(["cat-file", "blob", f"{full_sha}:{path}"], cwd=self.path, check=False)
        return _decode(result.stdout) if result.returncode == 0 else None

    def refs_containing(self, sha: str) -> list[str]:
        """The branches (short names) whose history contains the commit."""
        args = [
            "for-each-ref",
            "--format=%(refname)",
            "--contains",
            self._full_sha(sha),
            _BRANCH_PREFIX,
        ]
        output = _decode(_git(args, cwd=self.path).stdout)
        return [line.removeprefix(_BRANCH_PREFIX) for line in output.splitlines()]

    # --- releases: tags and ranges of commits ---

    def tags(self, *, merged_into: str | None = None) -> list[TagRef]:
        """The tags that point at commits, by name; with `merged_into`, only those whose
        commit is in that commit's history (the commit itself included)."""
        args = [
            "for-each-ref",
            "--format=%(refname)%00%(objecttype)%00%(objectname)%00%(*objecttype)%00%(*objectname)",
        ]
        if merged_into is not None:
            args += ["--merged", self._full_sha(merged_into)]
        output = _decode(_git([*args, _TAG_PREFIX], cwd=self.path).stdout)
        tags = []
        for line in output.splitlines():
            refname, kind, sha, peeled_kind, peeled_sha = line.split("\0")
            name = refname.removeprefix(_TAG_PREFIX)
            if kind == "commit":
                tags.append(TagRef(name, sha, annotated=False))
            elif kind == "tag" and peeled_kind == "commit":
                tags.append(TagRef(name, peeled_sha, annotated=True))
        return tags

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        """Whether `ancestor` is in the history of `descendant` (a commit is its own)."""
        args = ["merge-base", "--is-ancestor", self._full_sha(ancestor), self._full_sha(descendant)]
        result = _git(args, cwd=self.path, check=False)
        if result.returncode not in (0, 1):
            raise GitError(
                f"git exited with status {result.returncode}", args, _decode(result.stderr)
            )
        return result.returncode == 0

    def commits_between(self, since: str | None, until: str) -> list[CommitInfo]:
        """The commits in the history of `until` and not of `since` (None: all of them),
        newest first, each with its changed files."""
        revisions = [self._full_sha(until)]
        if since is not None:
            revisions.append(f"^{self._full_sha(since)}")
        log = ["log", "-z", "--no-show-signature", f"--format=%H%x00{_COMMIT_FORMAT}"]
        fields = _decode(_git([*log, *revisions, "--"], cwd=self.path).stdout).split("\0")
        commits = []
        # -z ends each commit with a NUL too: 7 fields per commit, then a last empty one.
        for index in range(0, len(fields) - 6, 7):
            sha, parents, name, email, authored, committed, message = fields[index : index + 7]
            parent_shas = parents.split()
            commits.append(
                CommitInfo(
                    sha=sha,
                    parents=parent_shas,
                    author_name=name,
                    author_email=email,
                    authored_at=datetime.fromisoformat(authored),
                    committed_at=datetime.fromisoformat(committed),
                    message=message.rstrip("\n"),
                    changed_files=self._changed_files(sha, parent_shas),
                )
            )
        return commits

    def changed_files_between(self, old: str, new: str) -> list[FileChange]:
        """What differs between the trees of two commits, renames detected."""
        return self._diff_tree([self._full_sha(old), self._full_sha(new)])

    def create_tag(
        self, name: str, sha: str, message: str, *, tagger_name: str, tagger_email: str
    ) -> None:
        """An annotated tag `name` at commit `sha` in the mirror; TagExistsError if the tag
        exists (a tag is never moved)."""
        check_tag_name(name)
        full_sha = self._full_sha(sha)
        with file_lock(self._lock_path):
            if self.has_tag(name):
                raise TagExistsError(f"tag {name!r} already exists in {self.url}: tags never move")
            identity = ["-c", f"user.name={tagger_name}", "-c", f"user.email={tagger_email}"]
            # verbatim: the default cleanup would drop the message's "#" lines (headings).
            tag = ["tag", "--no-sign", "--annotate", "--cleanup=verbatim", f"--message={message}"]
            tag.append("--end-of-options")
            _git([*identity, *tag, name, full_sha], cwd=self.path)

    def delete_tag(self, name: str) -> None:
        """Remove a tag from the mirror only (one whose push failed)."""
        check_tag_name(name)
        with file_lock(self._lock_path):
            _git(["tag", "--delete", "--end-of-options", name], cwd=self.path)

    def push_tag(self, name: str, *, timeout_s: float = 600) -> None:
        """Push the mirror's tag to the repository URL, never forced: GitError when the
        remote refuses it, for one because it has a tag of that name already."""
        check_tag_name(name)
        ref = f"{_TAG_PREFIX}{name}"
        # To the URL rather than origin: a mirror remote takes no refspecs.
        args = ["push", "--quiet", "--no-verify", "--", self.url, f"{ref}:{ref}"]
        try:
            _git(args, cwd=self.path, timeout_s=timeout_s)
        except GitError as error:
            raise GitError(f"pushing tag {name} to {self.url} failed: {error}") from error

    def has_tag(self, name: str) -> bool:
        """Whether the mirror has a tag of that name, whatever it points at."""
        args = ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{_TAG_PREFIX}{name}"]
        return _git(args, cwd=self.path, check=False).returncode == 0

    def checkout(self, sha: str, dest: Path) -> Path:
        """A work tree holding exactly commit `sha` at `dest`, reused if it already does.

        A `clone --shared` rather than a `git worktree`: the clone borrows the mirror's
        objects (cheap, no copy) but has its own refs and config, so a build script running
        git in it cannot move the mirror's branches, and deleting `dest` needs no
        `worktree prune`. The price: once a commit is force-pushed away, the mirror's gc may
        drop its objects after git's grace period (two weeks), breaking git commands (not
        the files) in a workspace that old; such a workspace is never reused, as it no
        longer passes the clean-tree check.
        """
        full_sha = self._full_sha(sha)
        with file_lock(dest.with_name(dest.name + ".lock")):
            if self._holds_clean_commit(dest, full_sha):
                os.utime(dest)  # recently used, as far as prune_workspaces is concerned
                return dest
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            _git(["clone", "--shared", "--no-checkout", "--quiet", "--", str(self.path), str(dest)])
            _git(["checkout", "--detach", "--force", "--quiet", full_sha, "--"], cwd=dest)
            (dest / ".git" / _CHECKOUT_ID).write_text(uuid.uuid4().hex)
        return dest

    @staticmethod
    def _holds_clean_commit(dest: Path, full_sha: str) -> bool:
        if not (dest / ".git").exists():
            return False
        head = _git(["rev-parse", "--verify", "--quiet", "HEAD"], cwd=dest, check=False)
        if _decode(head.stdout).strip() != full_sha:
            return False
        # Untracked files are what the build made, and a retried test stage needs them; a
        # changed tracked file means the commit itself was edited, so it is checked out anew.
        status = _git(["status", "--porcelain", "--untracked-files=no"], cwd=dest, check=False)
        return status.returncode == 0 and not status.stdout


_CHECKOUT_ID = "cicd-checkout-id"


def checkout_id(dest: Path) -> str:
    """Which checkout `dest` holds: a new id each time Mirror.checkout creates it anew, so
    results made in an earlier checkout (build outputs) are never paired with this one."""
    try:
        return (dest / ".git" / _CHECKOUT_ID).read_text()
    except OSError:
        return ""


# --- retention ---------------------------------------------------------------------------


def prune_workspaces(root: Path, keep: int, *, protect: Collection[Path] = ()) -> list[Path]:
    """Delete all but the `keep` most recently modified folders directly under `root`,
    never deleting a protected one; return the deleted paths."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, not {keep}")
    if not root.is_dir():
        return []
    protected = {path.resolve() for path in protect}
    # Symlinks are not ours to delete (and rmtree refuses them).
    folders = [entry for entry in root.iterdir() if entry.is_dir() and not entry.is_symlink()]
    folders.sort(key=lambda folder: folder.stat().st_mtime, reverse=True)
    removed = []
    for folder in folders[keep:]:
        if folder.resolve() in protected:
            continue
        shutil.rmtree(folder)
        removed.append(folder)
    return removed
