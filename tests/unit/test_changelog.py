"""Changelog markdown grouped by type, forge links, and notes HTML that never passes
through what an untrusted commit message says."""

import html
import re
from datetime import date

import pytest
from markdown_it import MarkdownIt

from cicd_dagster.release.changelog import (
    ChangelogEntry,
    escape,
    forge_of,
    render_changelog,
    render_html,
)
from cicd_dagster.release.conventional import IssueRef, parse_message

SHA = "0123456789abcdef0123456789abcdef01234567"


def entry(message, sha=SHA, author="Ada Lovelace", merge=False):
    return ChangelogEntry(sha, author, parse_message(message), merge)


def changelog(entries, url="/srv/git/shop", previous="1.3.0", previous_tag="v1.3.0"):
    return render_changelog(
        repository="shop",
        version="1.4.0",
        previous=previous,
        released_on=date(2024, 5, 1),
        entries=entries,
        url=url,
        tag="v1.4.0",
        previous_tag=previous_tag,
    )


def test_sections_in_order_with_shas_authors_and_refs():
    text = changelog(
        [
            entry("chore: tidy"),
            entry("fix(api): handle empty body\n\nCloses #12", sha="b" * 40),
            entry("Update README", sha="c" * 40),
            entry("feat!: new config\n\nBREAKING CHANGE: old keys are gone", sha="d" * 40),
            entry("feat: add search PROJ-7", sha="e" * 40, author="Grace Hopper"),
            entry("perf: faster", sha="f" * 40),
        ]
    )
    titles = [line for line in text.splitlines() if line.startswith("### ")]
    assert titles == [
        "### Breaking changes",
        "### Features",
        "### Fixes",
        "### Performance",
        "### Chores",
        "### Other",
    ]
    assert text.startswith("## shop 1.4.0 (2024-05-01)\n\n6 changes, since 1.3.0.")
    assert "- **api:** handle empty body (`bbbbbbb`) by Ada Lovelace, closes #12" in text
    assert (
        "- feat: new config (`ddddddd`) by Ada Lovelace\n  BREAKING CHANGE: old keys are gone"
        in (text)
    )
    assert "- add search PROJ-7 (`eeeeeee`) by Grace Hopper, PROJ-7" in text
    assert "- Update README (`ccccccc`)" in text


def test_merge_commits_that_are_not_conventional_are_left_out():
    text = changelog(
        [entry("Merge branch 'x'", merge=True), entry("feat: merged in", sha="a" * 40)]
    )
    assert "Merge branch" not in text
    assert "1 change, since 1.3.0." in text


def test_first_release():
    assert "1 change, first release." in changelog([entry("feat: x")], previous=None)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://github.com/org/shop.git", "https://github.com/org/shop"),
        ("https://user:token@github.com/org/shop", "https://github.com/org/shop"),
        ("git@github.com:org/shop.git", "https://github.com/org/shop"),
        ("ssh://git@gitlab.com/group/sub/shop.git", "https://gitlab.com/group/sub/shop"),
        ("https://bitbucket.org/team/shop", "https://bitbucket.org/team/shop"),
        ("https://codeberg.org/org/shop.git", "https://codeberg.org/org/shop"),
    ],
)
def test_known_forges(url, base):
    forge = forge_of(url)
    assert forge is not None and forge.base == base


@pytest.mark.parametrize(
    "url",
    [
        "/srv/git/shop",
        "file:///srv/git/shop",
        "https://git.example.com/org/shop.git",
        "https://github.com/org",
        "../shop",
        "C:/repos/shop",
    ],
)
def test_unknown_forges_give_plain_text(url):
    assert forge_of(url) is None


def test_links_on_github():
    text = changelog(
        [entry("fix: x\n\nFixes org/other#5, #6 and GH-7, JIRA-1")],
        url="https://github.com/org/shop.git",
    )
    assert "[shop 1.4.0](<https://github.com/org/shop/compare/v1.3.0...v1.4.0>)" in text
    assert f"[`0123456`](<https://github.com/org/shop/commit/{SHA}>)" in text
    assert "fixes [org/other#5](<https://github.com/org/other/issues/5>)" in text
    assert "[#6](<https://github.com/org/shop/issues/6>)" in text
    assert "[#7](<https://github.com/org/shop/issues/7>)" in text
    assert ", JIRA-1" in text  # no tracker known: plain


def test_links_on_gitlab():
    forge = forge_of("https://gitlab.com/g/shop")
    assert forge is not None
    assert forge.issue_url(IssueRef("forge", "3")) == "https://gitlab.com/g/shop/-/issues/3"
    assert forge.commit_url(SHA) == f"https://gitlab.com/g/shop/-/commit/{SHA}"


@pytest.mark.parametrize(
    "subject",
    [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        "[click](javascript:alert(1))",
        "![pixel](https://evil.example/p.png)",
        "<https://evil.example>",
        "**bold** _em_ `code` ~~strike~~",
        "&lt;b&gt; entity",
        "back\\slash \\<b>",
    ],
)
def test_untrusted_messages_render_as_plain_text(subject):
    text = changelog([entry(f"fix: {subject}", author="<b>Mallory</b>")])
    body = render_html(text, "shop 1.4.0").split("<body>")[1]
    # No tag, link or image of the message's own: only the changelog's structure.
    assert set(re.findall(r"<([a-zA-Z][a-zA-Z0-9]*)", body)) <= {
        "h2",
        "h3",
        "p",
        "ul",
        "li",
        "code",
    }
    item = re.search(r"<li>(.*?)</li>", body, re.DOTALL)
    assert item is not None
    shown = html.unescape(re.sub(r"<[^>]+>", "", item[1]))
    assert shown == f"{subject} (0123456) by <b>Mallory</b>"


def test_escape_round_trips_to_the_same_text():
    tricky = "a *b* _c_ [d](e) <f> `g` !h &amp; ~i~ |j| \\k # 1. - +"
    html = MarkdownIt("commonmark", {"html": False}).render(escape(tricky))
    expected = tricky.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert html == f"<p>{expected}</p>\n"


def test_escape_keeps_messages_on_one_line():
    assert escape("a\nb\r\n\tc") == "a b c"


def test_html_page_title_is_escaped():
    page = render_html("# x", 'a <b> & "c"')
    assert "<title>a &lt;b&gt; &amp; &quot;c&quot;</title>" in page
    assert "<h1>x</h1>" in page
