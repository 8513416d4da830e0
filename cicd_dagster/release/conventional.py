"""Commit messages read per Conventional Commits 1.0: `type(scope)!: subject`, a body, and
footers (`Token: value`, `Token #value`, `BREAKING CHANGE: ...`), plus the issue references
people write in them (#123, GH-12, org/repo#5, "Closes #4", JIRA-style ABC-123).

A message that does not follow the format (a merge, `fixup! ...`, free text) is kept as type
"other": listed in changelogs, never a reason for a release. Messages are untrusted text;
this module only reads them, and escaping is the renderer's job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OTHER = "other"
REVERT = "revert"

# type(scope)!: subject. The colon and one space are required (spec item 1); the type is a
# noun, compared lowercased (spec item 15: case-insensitive, BREAKING CHANGE excepted).
_HEADER = re.compile(
    r"(?P<type>[A-Za-z][A-Za-z0-9_-]*)(?:\((?P<scope>[^()\n]+)\))?(?P<bang>!)?: (?P<subject>.*\S)"
)
# git's own revert message: Revert "<header of the reverted commit>"
_GIT_REVERT = re.compile(r'Revert "(?P<subject>.+)"')
_REVERTS_COMMIT = re.compile(r"This reverts commit (?P<sha>[0-9a-fA-F]{7,40})")
# A footer line (spec items 8-10): a token (words joined by "-", or BREAKING CHANGE) and
# ": " or " #" before its value.
_FOOTER = re.compile(
    r"(?P<token>BREAKING CHANGE|BREAKING-CHANGE|[A-Za-z][A-Za-z0-9-]*)(?P<sep>: | #)(?P<value>.*)"
)
_BREAKING_TOKENS = ("BREAKING CHANGE", "BREAKING-CHANGE")
# C0/C1 controls other than tab and newline: nothing a person meant to write.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# Issue references. The lookbehind keeps `page#12`, `a/b/c#1` parts and words like
# `abcGH-1` out; the lookahead keeps `#12abc` and `ABC-12-x` out.
_CLOSING = r"(?:(?P<action>close[sd]?|fix(?:e[sd])?|resolve[sd]?)\s*:?\s+)?"
_ISSUE = re.compile(
    r"(?<![\w/#-])" + _CLOSING + r"(?:"
    r"(?P<repo>[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)?#(?P<number>[1-9][0-9]*)"
    r"|GH-(?P<gh>[1-9][0-9]*)"
    r"|(?P<jira>(?P<project>[A-Z][A-Z0-9_]+)-[1-9][0-9]*)"
    r")(?![\w-])",
    re.IGNORECASE,
)
# Upper-case words followed by a number that are standards and identifiers, not issue keys.
_NOT_ISSUE_KEYS = frozenset(
    {
        "AES", "ASCII", "CVE", "CWE", "GHSA", "HTTP", "ISO", "IPV", "MD", "PEP", "RFC",
        "RSA", "SHA", "SSL", "TLS", "UCS", "UTF", "WIN", "X",
    }
)  # fmt: skip


@dataclass(frozen=True)
class IssueRef:
    """An issue or pull request named in a message."""

    kind: str  # "forge" (#12, GH-12, org/repo#12) or "jira" (ABC-123)
    id: str  # "12" for forge references, "ABC-123" for JIRA-style keys
    repository: str | None = None  # "org/repo" of a cross-repository reference
    action: str | None = None  # "closes", "fixes", "resolves" (normalised), or None

    @property
    def text(self) -> str:
        """How the reference is written in a changelog: #12, org/repo#12, ABC-123."""
        if self.kind == "jira":
            return self.id
        return f"{self.repository or ''}#{self.id}"


@dataclass(frozen=True)
class Footer:
    token: str
    value: str


@dataclass(frozen=True)
class ConventionalCommit:
    """One commit message, parsed. `type` is lowercased, or "other" when the header does
    not follow the format; `subject` is then the whole first line."""

    type: str
    scope: str | None
    subject: str
    body: str
    footers: tuple[Footer, ...]
    breaking: bool
    breaking_note: str | None  # the BREAKING CHANGE footer's text, if any
    refs: tuple[IssueRef, ...]
    reverts: str | None = None  # the sha a revert names ("This reverts commit ..."), if any

    @property
    def conventional(self) -> bool:
        return self.type != OTHER


def normalise(message: str) -> str:
    """The message with CRLF/CR line ends made LF, control characters dropped, trailing
    whitespace of every line and blank lines at both ends removed."""
    text = _CONTROL.sub("", message.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [line.rstrip() for line in text.split("\n")]
    return "\n".join(lines).strip("\n")


def parse_message(message: str) -> ConventionalCommit:
    """Parse a full commit message (header, body, footers)."""
    text = normalise(message)
    header, _, rest = text.partition("\n")
    header = header.strip()
    body, footers = _split_footers(rest.strip("\n"))
    refs = find_issue_refs(text)
    reverts = _REVERTS_COMMIT.search(text)
    reverted_sha = reverts["sha"].lower() if reverts else None

    git_revert = _GIT_REVERT.fullmatch(header)
    if git_revert is not None:
        return ConventionalCommit(
            REVERT, None, git_revert["subject"], body, footers, False, None, refs, reverted_sha
        )
    match = _HEADER.fullmatch(header)
    if match is None:
        return ConventionalCommit(OTHER, None, header, body, footers, False, None, refs)
    notes = [f.value for f in footers if f.token in _BREAKING_TOKENS]
    commit_type = match["type"].lower()
    return ConventionalCommit(
        type=commit_type,
        scope=match["scope"].strip() if match["scope"] else None,
        subject=match["subject"].strip(),
        body=body,
        footers=footers,
        breaking=bool(match["bang"]) or bool(notes),
        breaking_note="\n".join(notes) or None,
        refs=refs,
        reverts=reverted_sha if commit_type == REVERT else None,
    )


def _split_footers(text: str) -> tuple[str, tuple[Footer, ...]]:
    """(body, footers): the footers are the last paragraph when its first line is one; a
    line that is not a footer continues the value of the footer before it (spec item 9)."""
    if not text:
        return "", ()
    paragraphs = text.split("\n\n")
    last = paragraphs[-1].split("\n")
    if _FOOTER.fullmatch(last[0]) is None:
        return text, ()
    footers: list[list[str]] = []
    for line in last:
        match = _FOOTER.fullmatch(line)
        if match is not None:
            footers.append([match["token"], match["value"].strip()])
        else:
            footers[-1][1] = f"{footers[-1][1]}\n{line.strip()}".strip()
    body = "\n\n".join(paragraphs[:-1]).strip("\n")
    return body, tuple(Footer(token, value) for token, value in footers)


def find_issue_refs(text: str) -> tuple[IssueRef, ...]:
    """The issue references in `text`, each once, in order of appearance; a closing
    keyword (Closes #4) is kept as the reference's action."""
    found: dict[tuple[str, str, str | None], IssueRef] = {}
    for match in _ISSUE.finditer(text):
        action = _ACTIONS[match["action"].lower()[:3]] if match["action"] else None
        if match["jira"] is not None:
            project = match["project"]
            # The pattern is case-insensitive for the keywords; an issue key is upper case.
            if not project.isupper() or project in _NOT_ISSUE_KEYS:
                continue
            ref = IssueRef("jira", match["jira"], action=action)
        elif match["gh"] is not None:
            ref = IssueRef("forge", match["gh"], action=action)
        else:
            ref = IssueRef("forge", match["number"], match["repo"], action)
        key = (ref.kind, ref.id, ref.repository)
        if key not in found or (found[key].action is None and action is not None):
            found[key] = ref
    return tuple(found.values())


_ACTIONS = {"clo": "closes", "fix": "fixes", "res": "resolves"}
