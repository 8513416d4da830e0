"""Conventional Commits 1.0 parsing of real-world commit messages."""

import pytest

from cicd_dagster.release.conventional import (
    Footer,
    IssueRef,
    find_issue_refs,
    normalise,
    parse_message,
)


@pytest.mark.parametrize(
    ("message", "type_", "scope", "subject", "breaking"),
    [
        ("feat: allow provided config object to extend other configs", "feat", None,
         "allow provided config object to extend other configs", False),
        ("fix(parser): handle empty input", "fix", "parser", "handle empty input", False),
        ("feat(api)!: send an email to the customer when a product is shipped", "feat", "api",
         "send an email to the customer when a product is shipped", True),
        ("chore!: drop support for Node 6", "chore", None, "drop support for Node 6", True),
        ("FEAT: upper-case type", "feat", None, "upper-case type", False),
        ("Fix(UI): mixed case", "fix", "UI", "mixed case", False),
        ("docs: correct spelling of CHANGELOG", "docs", None, "correct spelling of CHANGELOG",
         False),
        ("perf(db)!: index builds by commit", "perf", "db", "index builds by commit", True),
        ("feat: ✨ add emoji picker", "feat", None, "✨ add emoji picker", False),
        ("feat(scope with spaces): ok", "feat", "scope with spaces", "ok", False),
        ("build(deps-dev): bump pytest from 8.0 to 8.1", "build", "deps-dev",
         "bump pytest from 8.0 to 8.1", False),
    ],
)  # fmt: skip
def test_conventional_headers(message, type_, scope, subject, breaking):
    parsed = parse_message(message)
    assert (parsed.type, parsed.scope, parsed.subject, parsed.breaking) == (
        type_,
        scope,
        subject,
        breaking,
    )
    assert parsed.conventional


@pytest.mark.parametrize(
    "message",
    [
        "Merge branch 'feature/x' into main",
        "Merge pull request #12 from org/feature\n\nfeat: add thing",
        "fixup! feat: add thing",
        "squash! fix: x",
        "amend! fix: x",
        "✨ feat: gitmoji in front",
        ":sparkles: add feature",
        "Update README.md",
        "feat:no space after the colon",
        "feat : space before the colon",
        "feat: ",
        "feat:",
        "(scope): no type",
        "feat(): empty scope",
        "feat(a)(b): two scopes",
        "WIP",
        "",
        "   ",
    ],
)
def test_non_conventional_messages_are_other(message):
    parsed = parse_message(message)
    assert parsed.type == "other"
    assert not parsed.conventional
    assert not parsed.breaking
    assert parsed.subject == message.split("\n")[0].strip()


def test_body_and_footers_are_split_from_the_header():
    parsed = parse_message(
        "fix: prevent racing of requests\n\n"
        "Introduce a request id and a reference to latest request. Dismiss\n"
        "incoming responses other than from latest request.\n\n"
        "Remove timeouts which were used to mitigate the racing issue but are\n"
        "obsolete now.\n\n"
        "Reviewed-by: Z\n"
        "Refs: #123\n"
    )
    assert parsed.type == "fix"
    assert parsed.body.startswith("Introduce a request id")
    assert parsed.body.endswith("obsolete now.")
    assert parsed.footers == (Footer("Reviewed-by", "Z"), Footer("Refs", "#123"))
    assert parsed.refs == (IssueRef("forge", "123"),)
    assert not parsed.breaking


@pytest.mark.parametrize("token", ["BREAKING CHANGE", "BREAKING-CHANGE"])
def test_breaking_change_footer_makes_a_commit_breaking(token):
    parsed = parse_message(
        f"feat: allow config objects to extend others\n\n{token}: `extends` key in config "
        "file is now used for extending other config files"
    )
    assert parsed.breaking
    assert parsed.breaking_note == (
        "`extends` key in config file is now used for extending other config files"
    )
    assert parsed.body == ""


def test_a_multi_line_footer_value_continues_until_the_next_token():
    parsed = parse_message(
        "refactor!: rename the API\n\nBREAKING CHANGE: the old names are gone;\n"
        "  use the new ones\nSigned-off-by: A <a@example.com>"
    )
    assert parsed.breaking_note == "the old names are gone;\nuse the new ones"
    assert parsed.footers[-1] == Footer("Signed-off-by", "A <a@example.com>")


def test_lowercase_breaking_change_is_not_a_breaking_footer():
    parsed = parse_message("feat: x\n\nbreaking change: not per the spec")
    assert not parsed.breaking


def test_breaking_footer_on_a_non_conventional_message_never_bumps():
    parsed = parse_message("Rework everything\n\nBREAKING CHANGE: all of it")
    assert parsed.type == "other"
    assert not parsed.breaking


def test_footer_with_hash_separator():
    parsed = parse_message("fix: x\n\nFixes #4\nCloses #5")
    assert parsed.footers == (Footer("Fixes", "4"), Footer("Closes", "5"))
    assert [ref.id for ref in parsed.refs] == ["4", "5"]
    assert [ref.action for ref in parsed.refs] == ["fixes", "closes"]


def test_a_body_paragraph_that_is_not_a_footer_stays_body():
    parsed = parse_message("feat: x\n\nThis explains why.\nOn two lines.")
    assert parsed.body == "This explains why.\nOn two lines."
    assert parsed.footers == ()


def test_git_revert_messages():
    sha = "0123456789abcdef0123456789abcdef01234567"
    parsed = parse_message(f'Revert "feat: add thing"\n\nThis reverts commit {sha}.')
    assert parsed.type == "revert"
    assert parsed.subject == "feat: add thing"
    assert parsed.reverts == sha


def test_conventional_revert_messages():
    parsed = parse_message("revert: let us never again speak of the noodle incident\n\n"
                           "Refs: 676104e, a215868\n\nThis reverts commit ABCDEF1.")  # fmt: skip
    assert parsed.type == "revert"
    assert parsed.reverts == "abcdef1"


def test_crlf_trailing_whitespace_and_leading_blank_lines():
    parsed = parse_message("\r\n\r\nfix(io):   handle CRLF   \r\n\r\nbody line   \r\nmore\t\r\n")
    assert parsed.type == "fix"
    assert parsed.scope == "io"
    assert parsed.subject == "handle CRLF"
    assert parsed.body == "body line\nmore"


def test_lone_cr_line_ends_and_control_characters():
    assert normalise("feat: a\x1b[31m\rbody\x07") == "feat: a[31m\nbody"


def test_empty_body():
    parsed = parse_message("feat: x\n\n\n")
    assert (parsed.body, parsed.footers) == ("", ())


def test_header_ish_junk_in_the_body_stays_in_the_body():
    """A message pretending to carry mail headers or HTML is only text."""
    parsed = parse_message(
        "fix: x\r\nBcc: victim@example.com\r\nSubject: injected\r\n\r\n<script>alert(1)</script>"
    )
    assert parsed.subject == "x"
    assert "\n" not in parsed.subject and "\r" not in parsed.subject
    # Lines right under the header are body, however they look; never a header of ours.
    assert parsed.body == "Bcc: victim@example.com\nSubject: injected\n\n<script>alert(1)</script>"
    assert parsed.footers == ()


@pytest.mark.parametrize(
    ("text", "refs"),
    [
        ("fix: crash (#123)", [IssueRef("forge", "123")]),
        ("see GH-12", [IssueRef("forge", "12")]),
        ("Closes #4", [IssueRef("forge", "4", action="closes")]),
        ("closed: #4", [IssueRef("forge", "4", action="closes")]),
        ("Fixes org/repo#5", [IssueRef("forge", "5", "org/repo", "fixes")]),
        ("Resolves ABC-123", [IssueRef("jira", "ABC-123", action="resolves")]),
        ("PROJ-9 and PROJ-10", [IssueRef("jira", "PROJ-9"), IssueRef("jira", "PROJ-10")]),
        ("#1, #1 and fixes #1", [IssueRef("forge", "1", action="fixes")]),
        ("utf-8 and UTF-8, SHA-256, ISO-8601, CVE-2024-1234, RFC-2616", []),
        ("page#12 https://x.org/a/b#12 a/b/c#3 #0 #12abc abcGH-1 ABC-12-x", []),
        ("colour #fff", []),
        ("lower-case abc-123 is not a key", []),
    ],
)
def test_issue_references(text, refs):
    assert list(find_issue_refs(text)) == refs


def test_issue_reference_text():
    assert IssueRef("forge", "5", "org/repo").text == "org/repo#5"
    assert IssueRef("forge", "5").text == "#5"
    assert IssueRef("jira", "ABC-1").text == "ABC-1"
