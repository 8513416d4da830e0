"""Next versions from conventional commits; release tags read through the tag format."""

import pytest
from semver import Version

from cicd_dagster.release.conventional import parse_message
from cicd_dagster.release.versioning import (
    Bump,
    VersioningError,
    check_pre,
    check_tag_format,
    counted,
    format_tag,
    next_version,
    parse_tags,
    required_bump,
)

V = Version.parse
INITIAL = V("0.1.0")


def bump(messages, base):
    return required_bump(map(parse_message, messages), V(base) if base else None)


@pytest.mark.parametrize(
    ("messages", "base", "expected"),
    [
        (["fix: a"], "1.2.3", Bump.PATCH),
        (["perf: a"], "1.2.3", Bump.PATCH),
        (['Revert "feat: a"'], "1.2.3", Bump.PATCH),
        (["feat: a", "fix: b"], "1.2.3", Bump.MINOR),
        (["fix: a", "feat!: b", "feat: c"], "1.2.3", Bump.MAJOR),
        (["fix: a\n\nBREAKING CHANGE: gone"], "1.2.3", Bump.MAJOR),
        # 0.x: a breaking change bumps the minor, as does a feat; a fix the patch.
        (["feat!: b"], "0.4.1", Bump.MINOR),
        (["feat: b"], "0.4.1", Bump.MINOR),
        (["fix: b"], "0.4.1", Bump.PATCH),
        # Nothing release-worthy.
        (["docs: a", "chore(deps): b", "ci: c", "refactor: d", "test: e", "style: f"], "1.0.0",
         None),
        (["Merge branch 'x'", "Update README", "fixup! fix: a", "WIP"], "1.0.0", None),
        (["Rework everything\n\nBREAKING CHANGE: all of it"], "1.0.0", None),
        ([], "1.0.0", None),
    ],
)  # fmt: skip
def test_required_bump(messages, base, expected):
    assert bump(messages, base) == expected


@pytest.mark.parametrize(
    ("base", "bump_", "pre", "existing", "expected"),
    [
        ("1.3.0", Bump.MINOR, None, [], "1.4.0"),
        ("1.3.0", Bump.PATCH, None, [], "1.3.1"),
        ("1.3.0", Bump.MAJOR, None, [], "2.0.0"),
        ("1.3.0", Bump.MINOR, "rc", [], "1.4.0-rc.1"),
        ("1.3.0", Bump.MINOR, "rc", ["1.4.0-rc.1"], "1.4.0-rc.2"),
        ("1.3.0", Bump.MINOR, "rc", ["1.4.0-rc.1", "1.4.0-rc.9", "1.4.0-beta.12"], "1.4.0-rc.10"),
        ("1.3.0", Bump.MINOR, "beta", ["1.4.0-rc.3"], "1.4.0-beta.1"),
        # rcs of another version do not count.
        ("1.3.0", Bump.MAJOR, "rc", ["1.4.0-rc.2"], "2.0.0-rc.1"),
        # A final after rcs of the same version drops the suffix.
        ("1.3.0", Bump.MINOR, None, ["1.4.0-rc.1", "1.4.0-rc.2"], "1.4.0"),
        # Build metadata of the base is not carried over.
        ("1.3.0+build.7", Bump.PATCH, None, [], "1.3.1"),
        # No release yet: the initial version, whatever the commits.
        (None, None, None, [], "0.1.0"),
        (None, None, "rc", ["0.1.0-rc.1"], "0.1.0-rc.2"),
    ],
)
def test_next_version(base, bump_, pre, existing, expected):
    version = next_version(
        V(base) if base else None,
        bump_,
        initial=INITIAL,
        pre=pre,
        existing=[V(v) for v in existing],
    )
    assert str(version) == expected


def test_no_bump_makes_no_version():
    with pytest.raises(VersioningError, match="no release-worthy change"):
        next_version(V("1.0.0"), None, initial=INITIAL)


@pytest.mark.parametrize("pre", ["", "rc.1", "r c", "1", "rc!", "ünï"])
def test_bad_pre_release_identifiers(pre):
    with pytest.raises(VersioningError, match="--pre"):
        check_pre(pre)


def test_good_pre_release_identifiers():
    assert [check_pre(p) for p in ("rc", "beta", "alpha-2", None)] == [
        "rc",
        "beta",
        "alpha-2",
        None,
    ]


def test_parse_tags_orders_by_semver_and_warns_about_the_rest():
    tags, warnings = parse_tags(
        [
            ("v1.10.0", "a" * 40),
            ("v1.9.0", "b" * 40),
            ("v1.10.0-rc.1", "c" * 40),
            ("v1.2", "d" * 40),  # not SemVer
            ("release-2024", "e" * 40),  # not the format
            ("v01.2.3", "f" * 40),  # leading zero: not SemVer
            ("latest", "0" * 40),
        ],
        "v{version}",
    )
    assert [tag.name for tag in tags] == ["v1.10.0", "v1.10.0-rc.1", "v1.9.0"]
    assert len(warnings) == 4
    assert any("'v1.2'" in w and "not a SemVer" in w for w in warnings)
    assert any("'release-2024'" in w and "does not match" in w for w in warnings)
    assert any("'v01.2.3'" in w for w in warnings)


def test_parse_tags_with_a_prefix_and_suffix_format():
    tags, warnings = parse_tags(
        [("shop/1.0.0-final", "a" * 40), ("v1.0.0", "b" * 40)], "shop/{version}-final"
    )
    # "1.0.0-final" minus the suffix: 1.0.0; the v-tag is another product's.
    assert [(t.name, str(t.version)) for t in tags] == [("shop/1.0.0-final", "1.0.0")]
    assert warnings == [
        "tag 'v1.0.0' ignored: it does not match the tag format 'shop/{version}-final'"
    ]


def test_format_tag():
    assert format_tag("v{version}", V("1.4.0-rc.1")) == "v1.4.0-rc.1"
    assert format_tag("api/{version}", V("2.0.0")) == "api/2.0.0"


@pytest.mark.parametrize(
    "tag_format",
    ["v", "{version}{version}", "v{verison}", "{version}-{name}", "v {version}", "-{version}",
     "a..{version}", "a~{version}", "{version}.lock", "a/.{version}", "{version}/", "a:{version}",
     "a@{{version}", "a\\{version}", "a//{version}", "a\t{version}"],
)  # fmt: skip
def test_bad_tag_formats(tag_format):
    with pytest.raises(VersioningError, match="tag format"):
        check_tag_format(tag_format)


def test_a_revert_and_its_target_in_the_range_cancel_out():
    target = "1" * 40
    commits = [
        ("2" * 40, parse_message(f'Revert "feat: x"\n\nThis reverts commit {target[:10]}.')),
        ("3" * 40, parse_message("docs: y")),
        (target, parse_message("feat: x")),
    ]
    assert [sha for sha, _ in counted(commits)] == ["3" * 40]
    assert required_bump((c for _, c in counted(commits)), V("1.0.0")) is None


def test_a_revert_of_an_earlier_release_counts_as_a_fix():
    commits = [("2" * 40, parse_message(f'Revert "feat: x"\n\nThis reverts commit {"9" * 40}.'))]
    assert required_bump((c for _, c in counted(commits)), V("1.0.0")) is Bump.PATCH
