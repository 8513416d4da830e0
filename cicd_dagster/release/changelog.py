"""The changelog of a release in markdown, grouped by type, and its notes rendered to HTML.

Commit messages and author names are untrusted: every piece of them is markdown-escaped
before it joins the changelog, and the HTML renderer takes no raw HTML, so what a message
says is only ever shown, never interpreted (no links, no tags, no headings of its own).
Issue references and commits link to the forge when the repository URL is on a known one
(GitHub, GitLab, Bitbucket, Codeberg); elsewhere they stay plain text.
"""

from __future__ import annotations

import html
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from markdown_it import MarkdownIt

from cicd_dagster.release.conventional import OTHER, ConventionalCommit, IssueRef

BREAKING = "breaking"
# Section titles, in the order they appear; types not named here go to "Other".
SECTIONS = {
    BREAKING: "Breaking changes",
    "feat": "Features",
    "fix": "Fixes",
    "perf": "Performance",
    "revert": "Reverts",
    "refactor": "Refactoring",
    "docs": "Documentation",
    "test": "Tests",
    "build": "Build",
    "ci": "Continuous integration",
    "style": "Style",
    "chore": "Chores",
    OTHER: "Other",
}
# What CommonMark reads as inline syntax (emphasis, code, links, images, autolinks, raw
# HTML, entities); backslash-escaping ASCII punctuation is always allowed, so the text comes
# out exactly as written. Block syntax (#, -, 1.) only counts at the start of a line, and
# no line of the changelog starts with untrusted text.
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_\[\]<>!&~|])")
_SCP_URL = re.compile(r"(?:[^@/]+@)?(?P<host>[^:/]+):(?P<path>.+)")


@dataclass(frozen=True)
class ChangelogEntry:
    """A commit as the changelog shows it."""

    sha: str
    author: str
    commit: ConventionalCommit
    merge: bool = False


@dataclass(frozen=True)
class Forge:
    """Where a repository's web pages are: the kind of forge and the project's base URL."""

    kind: str  # github, gitlab, bitbucket, gitea
    base: str  # https://github.com/org/repo
    host: str

    def commit_url(self, sha: str) -> str:
        part = {"gitlab": "/-/commit/", "bitbucket": "/commits/"}.get(self.kind, "/commit/")
        return f"{self.base}{part}{sha}"

    def issue_url(self, ref: IssueRef) -> str | None:
        if ref.kind != "forge":
            return None
        base = f"https://{self.host}/{ref.repository}" if ref.repository else self.base
        part = "/-/issues/" if self.kind == "gitlab" else "/issues/"
        return f"{base}{part}{ref.id}"


_FORGES = {
    "github.com": "github",
    "gitlab.com": "gitlab",
    "bitbucket.org": "bitbucket",
    "codeberg.org": "gitea",
}


def forge_of(url: str) -> Forge | None:
    """The forge of a clone URL (https://, ssh:// or scp-style git@host:org/repo.git), or
    None when the host is not a known forge (a local path, a private server)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme in ("http", "https", "ssh", "git") and parsed.hostname:
        host, path = parsed.hostname, parsed.path
    elif not parsed.scheme and (match := _SCP_URL.fullmatch(url)) and "/" not in match["host"]:
        host, path = match["host"], match["path"]
    else:
        return None
    kind = _FORGES.get(host.lower())
    project = path.strip("/").removesuffix(".git")
    if kind is None or project.count("/") < 1 or not re.fullmatch(r"[\w.\-/]+", project):
        return None
    return Forge(kind, f"https://{host.lower()}/{project}", host.lower())


def escape(text: str) -> str:
    """Untrusted text as markdown that renders as exactly that text, on one line."""
    return _MARKDOWN_SYNTAX.sub(r"\\\1", " ".join(text.split()))


def render_changelog(
    *,
    repository: str,
    version: str,
    previous: str | None,
    released_on: date,
    entries: Sequence[ChangelogEntry],
    url: str,
    tag: str,
    previous_tag: str | None = None,
) -> str:
    """The release's changelog in markdown: a heading, then one section per kind of
    change (SECTIONS order), newest commit first in each. Merges that are not themselves
    conventional are left out: the commits they merge are listed."""
    forge = forge_of(url)
    heading = f"## {escape(repository)} {escape(version)} ({released_on.isoformat()})"
    if forge is not None and previous_tag is not None:
        compare = f"{forge.base}/compare/{_quote(previous_tag)}...{_quote(tag)}"
        heading = f"## [{escape(repository)} {escape(version)}](<{compare}>) ({released_on})"
    lines = [heading, ""]
    since = f"since {escape(previous)}" if previous else "first release"
    shown = [e for e in entries if e.commit.conventional or not e.merge]
    lines += [f"{len(shown)} change{'s' if len(shown) != 1 else ''}, {since}.", ""]
    sections: dict[str, list[ChangelogEntry]] = {}
    for entry in shown:
        commit = entry.commit
        key = BREAKING if commit.breaking else commit.type
        sections.setdefault(key if key in SECTIONS else OTHER, []).append(entry)
    for key, title in SECTIONS.items():
        if key in sections:
            lines += [f"### {title}", ""]
            lines += [_entry_line(entry, forge) for entry in sections[key]]
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _entry_line(entry: ChangelogEntry, forge: Forge | None) -> str:
    commit = entry.commit
    scope = f"**{escape(commit.scope)}:** " if commit.scope else ""
    kind = f"{escape(commit.type)}: " if commit.breaking and commit.type != OTHER else ""
    short = entry.sha[:7]
    sha = f"[`{short}`](<{forge.commit_url(entry.sha)}>)" if forge else f"`{short}`"
    line = f"- {kind}{scope}{escape(commit.subject)} ({sha}) by {escape(entry.author)}"
    refs = [_ref_text(ref, forge) for ref in commit.refs]
    if refs:
        line += f", {', '.join(refs)}"
    if commit.breaking_note:
        line += f"\n  BREAKING CHANGE: {escape(commit.breaking_note)}"
    return line


def _ref_text(ref: IssueRef, forge: Forge | None) -> str:
    text = escape(ref.text)
    url = forge.issue_url(ref) if forge else None
    linked = f"[{text}](<{url}>)" if url else text
    return f"{ref.action} {linked}" if ref.action else linked


def _quote(tag: str) -> str:
    return urllib.parse.quote(tag, safe="/@+")


def render_html(markdown: str, title: str) -> str:
    """A standalone HTML page of release notes; raw HTML in the markdown is not passed
    through (it shows as text), and only http(s) links become links."""
    renderer = MarkdownIt("commonmark", {"html": False, "linkify": False})
    body = renderer.render(markdown)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n"
        "<style>body{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;"
        "padding:0 1rem;line-height:1.5}code{background:#f3f3f3;padding:0 .2em}</style>\n"
        f"</head>\n<body>\n{body}</body>\n</html>\n"
    )
