"""Offline dependency scanning: OSV advisory folders, exact range evaluation, bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from cicd_dagster.security.osv import (
    AdvisoryDatabaseError,
    DependencyVersionError,
    VulnerabilityFinding,
    cvss_base_score,
    load_advisories,
    match,
    severity_at_least,
)

# Real records of github.com/pypa/advisory-database, trimmed: the `versions` lists and the
# references are shortened, every field this module reads is as published.
JINJA2_PYSEC_2019_217 = """\
id: PYSEC-2019-217
details: In Pallets Jinja before 2.10.1, str.format_map allows a sandbox escape.
affected:
- package:
    name: jinja2
    ecosystem: PyPI
    purl: pkg:pypi:jinja2
  ranges:
  - type: ECOSYSTEM
    events:
    - introduced: "0"
    - fixed: 2.10.1
  versions:
  - "2.0"
  - 2.0rc1
  - "2.10"
  - 2.9.6
references:
- type: ARTICLE
  url: https://palletsprojects.com/blog/jinja-2-10-1-released
aliases:
- CVE-2019-10906
modified: "2021-11-22T04:57:52.862665Z"
published: "2019-04-07T00:29:00Z"
"""

REQUESTS_PYSEC_2023_74 = """\
id: PYSEC-2023-74
details: |+
  Requests is a HTTP library. Since Requests 2.3.0, Requests has been leaking Proxy-Authorization headers to destination servers when redirected to an HTTPS endpoint. This issue has been patched in version 2.31.0.

affected:
- package:
    name: requests
    ecosystem: PyPI
    purl: pkg:pypi/requests
  ranges:
  - type: GIT
    repo: https://github.com/psf/requests
    events:
    - introduced: "0"
    - fixed: 74ea7cf7a6a27a4eeb2ae24e162bcc942a6706d5
  - type: ECOSYSTEM
    events:
    - introduced: 2.3.0
    - fixed: 2.31.0
  versions:
  - 2.29.0
  - 2.3.0
  - 2.30.0
aliases:
- CVE-2023-32681
- GHSA-j8r2-6x86-q33q
modified: "2023-06-05T01:13:00.534973Z"
published: "2023-05-26T18:15:00Z"
"""  # noqa: E501

# Its ECOSYSTEM events are not in version order, as published.
URLLIB3_PYSEC_2023_212 = """\
id: PYSEC-2023-212
modified: 2023-10-25T18:28:34.811764Z
published: 2023-10-17T20:15:00Z
aliases:
- CVE-2023-45803
- GHSA-g4mx-q9vg-27p4
details: |
  urllib3 is a user-friendly HTTP client library for Python. urllib3 previously wouldn't remove the HTTP request body when an HTTP redirect response using status 301, 302, or 303 after the request had its method changed.
affected:
- package:
    ecosystem: PyPI
    name: urllib3
    purl: pkg:pypi/urllib3
  ranges:
  - type: GIT
    events:
    - introduced: "0"
    - fixed: 4e98d57809dacab1cbe625fddeec1a290c478ea9
    repo: https://github.com/urllib3/urllib3
  - type: ECOSYSTEM
    events:
    - introduced: 2.0.0
    - fixed: 2.0.7
    - introduced: "0"
    - fixed: 1.26.18
  versions:
  - 1.26.17
  - 2.0.6
severity:
- type: CVSS_V3
  score: CVSS:3.1/AV:A/AC:H/PR:H/UI:N/S:U/C:H/I:N/A:N
"""  # noqa: E501

# The GitHub advisory of CVE-2024-22195 as osv.dev exports it (JSON), trimmed.
JINJA2_GHSA_H5C8 = {
    "id": "GHSA-h5c8-rqwp-cp95",
    "summary": "Jinja vulnerable to HTML attribute injection when passing user input as keys to "
    "xmlattr filter",
    "aliases": ["CVE-2024-22195"],
    "modified": "2024-01-11T15:20:48Z",
    "affected": [
        {
            "package": {"ecosystem": "PyPI", "name": "jinja2", "purl": "pkg:pypi/jinja2"},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "3.1.3"}]}],
        }
    ],
    "severity": [{"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:U/C:L/I:L/A:N"}],
    "database_specific": {"cwe_ids": ["CWE-79"], "github_reviewed": True, "severity": "MODERATE"},
}


def write(folder: Path, name: str, content: str | bytes | dict[str, Any]) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, dict):
        path.write_text(json.dumps(content, indent=2))
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def first_line_cut(text: str, start: str) -> str:
    """A long first line of `details` as a summary: cut to 200 characters."""
    line = text[text.index(start) :].splitlines()[0].strip()
    assert len(line) > 200
    return line[:199] + "…"


def record(events: list[dict[str, str]] | None = None, **fields: Any) -> dict[str, Any]:
    """A hand-made advisory for package "demo" with one ECOSYSTEM range of these events."""
    affected: dict[str, Any] = {"package": {"ecosystem": "PyPI", "name": "demo"}}
    if events is not None:
        affected["ranges"] = [{"type": "ECOSYSTEM", "events": events}]
    return {"id": "TEST-1", "modified": "2024-01-01T00:00:00Z", "affected": [affected]} | fields


@pytest.fixture
def pypa_checkout(tmp_path: Path) -> Path:
    """A folder laid out like a checkout of the PyPI advisory database, plus a JSON export."""
    write(tmp_path, "vulns/jinja2/PYSEC-2019-217.yaml", JINJA2_PYSEC_2019_217)
    write(tmp_path, "vulns/requests/PYSEC-2023-74.yaml", REQUESTS_PYSEC_2023_74)
    write(tmp_path, "vulns/urllib3/PYSEC-2023-212.yaml", URLLIB3_PYSEC_2023_212)
    write(tmp_path, "osv/GHSA-h5c8-rqwp-cp95.json", JINJA2_GHSA_H5C8)
    write(tmp_path, "README.md", "# not an advisory\n")
    write(tmp_path, ".github/workflows/ci.yml", "on: push\njobs: {}\n")  # hidden: not read
    return tmp_path


def affected_versions(folder: Path, advisory: dict[str, Any], candidates: list[str]) -> list[str]:
    write(folder, "TEST-1.json", advisory)
    db = load_advisories(folder)
    assert db.warnings == ()
    findings = match(db, [("demo", version) for version in candidates])
    return [finding.installed_version for finding in findings if finding.package == "demo"]


# --- real advisories ----------------------------------------------------------------------


def test_vulnerable_pins_are_found_with_ids_aliases_fixes_and_severity(pypa_checkout: Path) -> None:
    db = load_advisories(pypa_checkout)

    findings = match(db, [("Jinja2", "2.10"), ("requests", "2.30.0"), ("urllib3", "1.26.17")])

    assert db.warnings == ()
    assert findings == [
        VulnerabilityFinding(
            advisory_id="GHSA-h5c8-rqwp-cp95",
            aliases=("CVE-2024-22195",),
            package="jinja2",
            installed_version="2.10",
            fixed_versions=("3.1.3",),
            severity="medium",
            summary=JINJA2_GHSA_H5C8["summary"],
            advisory_file=pypa_checkout / "osv/GHSA-h5c8-rqwp-cp95.json",
        ),
        VulnerabilityFinding(
            advisory_id="PYSEC-2019-217",
            aliases=("CVE-2019-10906",),
            package="jinja2",
            installed_version="2.10",
            fixed_versions=("2.10.1",),
            severity="unknown",
            summary="In Pallets Jinja before 2.10.1, str.format_map allows a sandbox escape.",
            advisory_file=pypa_checkout / "vulns/jinja2/PYSEC-2019-217.yaml",
        ),
        VulnerabilityFinding(
            advisory_id="PYSEC-2023-74",
            aliases=("CVE-2023-32681", "GHSA-j8r2-6x86-q33q"),
            package="requests",
            installed_version="2.30.0",
            fixed_versions=("2.31.0",),
            severity="unknown",
            summary=first_line_cut(REQUESTS_PYSEC_2023_74, "  Requests is"),
            advisory_file=pypa_checkout / "vulns/requests/PYSEC-2023-74.yaml",
        ),
        VulnerabilityFinding(
            advisory_id="PYSEC-2023-212",
            aliases=("CVE-2023-45803", "GHSA-g4mx-q9vg-27p4"),
            package="urllib3",
            installed_version="1.26.17",
            fixed_versions=("1.26.18", "2.0.7"),
            severity="medium",  # CVSS 4.2
            summary=first_line_cut(URLLIB3_PYSEC_2023_212, "  urllib3 is"),
            advisory_file=pypa_checkout / "vulns/urllib3/PYSEC-2023-212.yaml",
        ),
    ]


@pytest.mark.parametrize(
    ("package", "version"),
    [
        ("jinja2", "3.1.3"),
        ("requests", "2.31.0"),
        ("requests", "2.2.1"),  # before the ECOSYSTEM range; the GIT range is not evaluated
        ("urllib3", "1.26.18"),
        ("urllib3", "2.0.7"),
        ("flask", "0.1"),  # no advisory at all
    ],
)
def test_fixed_and_unaffected_versions_give_no_finding(
    pypa_checkout: Path, package: str, version: str
) -> None:
    assert match(load_advisories(pypa_checkout), [(package, version)]) == []


def test_real_unsorted_events_are_evaluated_in_version_order(pypa_checkout: Path) -> None:
    db = load_advisories(pypa_checkout)
    candidates = ["0.3", "1.26.17", "1.26.18", "1.27", "2.0.0rc1", "2.0.0", "2.0.6", "2.0.7"]

    findings = match(db, [("urllib3", version) for version in candidates])

    assert [f.installed_version for f in findings] == ["0.3", "1.26.17", "2.0.0", "2.0.6"]


def test_package_names_match_after_pep503_normalisation(tmp_path: Path) -> None:
    advisory = record([{"introduced": "0"}])
    advisory["affected"][0]["package"]["name"] = "Zope.Interface_Extra"
    write(tmp_path, "a.json", advisory)

    findings = match(load_advisories(tmp_path), [("zope-interface-extra", "1.0")])

    assert [f.package for f in findings] == ["zope-interface-extra"]


def test_other_ecosystems_and_withdrawn_advisories_give_no_finding(tmp_path: Path) -> None:
    npm = record([{"introduced": "0"}], id="NPM-1")
    npm["affected"][0]["package"]["ecosystem"] = "npm"
    write(tmp_path, "npm.json", npm)
    write(
        tmp_path,
        "withdrawn.yaml",
        "id: WITHDRAWN-1\nwithdrawn: 2024-02-01T00:00:00Z\naffected:\n"
        "- package: {ecosystem: PyPI, name: demo}\n  versions: ['1.0']\n",
    )

    db = load_advisories(tmp_path)

    assert db.warnings == ()
    assert {a.id: a.withdrawn for a in db.advisories} == {"NPM-1": False, "WITHDRAWN-1": True}
    assert match(db, [("demo", "1.0")]) == []


# --- the OSV evaluation algorithm, edge by edge -------------------------------------------


@pytest.mark.parametrize(
    ("events", "candidates", "affected"),
    [
        pytest.param(
            [{"introduced": "0"}, {"last_affected": "1.2"}],
            ["0.1", "1.2", "1.2.post1", "1.2.1", "1.3a1"],
            ["0.1", "1.2"],
            id="last_affected-includes-itself-only",
        ),
        pytest.param(
            [{"introduced": "1.0"}, {"limit": "2.0"}],
            ["0.9", "1.0", "1.9.9", "2.0", "2.1"],
            ["1.0", "1.9.9"],
            id="limit-excludes-itself-and-above",
        ),
        pytest.param(
            [{"introduced": "1.0"}, {"limit": "*"}],
            ["0.9", "1.0", "99.0"],
            ["1.0", "99.0"],
            id="limit-star-is-infinity",
        ),
        pytest.param(
            [{"introduced": "1.0"}, {"fixed": "1.5"}, {"limit": "1.2"}, {"limit": "1.4"}],
            ["1.1", "1.3", "1.4"],
            ["1.1", "1.3"],
            id="below-any-of-several-limits",
        ),
        pytest.param(
            [{"fixed": "3.2"}, {"introduced": "3.0"}, {"fixed": "1.2"}, {"introduced": "1.0"}],
            ["0.9", "1.1", "1.2", "2.0", "3.0", "3.1.9", "3.2"],
            ["1.1", "3.0", "3.1.9"],
            id="unsorted-events",
        ),
        pytest.param(
            [{"introduced": "1.0"}, {"fixed": "2.0"}],
            ["1.0a1", "1.0.dev0", "1.0rc1", "2.0.dev0", "2.0b1", "2.0rc1", "2.0"],
            ["2.0.dev0", "2.0b1", "2.0rc1"],
            id="pre-releases-sort-before-their-release",
        ),
        pytest.param(
            [{"introduced": "1.0"}, {"fixed": "2.0"}],
            ["0.9.post1", "1.0.post1", "1.9.post3", "2.0.post1"],
            ["1.0.post1", "1.9.post3"],
            id="post-releases-sort-after-their-release",
        ),
        pytest.param(
            [{"introduced": "1.0"}, {"fixed": "2.0"}],
            ["1.0+cpu", "1.9+ubuntu.1", "2.0+cpu", "0.9+local"],
            ["1.0+cpu", "1.9+ubuntu.1"],
            id="local-versions-sort-after-their-public-version",
        ),
        pytest.param(
            [{"introduced": "0"}, {"fixed": "2.0"}],
            ["0.0.dev0", "0a1", "0", "1!0.1"],
            ["0", "0.0.dev0", "0a1"],
            id="introduced-0-is-before-everything-and-epochs-count",
        ),
    ],
)
def test_range_events_follow_the_osv_evaluation_algorithm(
    tmp_path: Path, events: list[dict[str, str]], candidates: list[str], affected: list[str]
) -> None:
    assert affected_versions(tmp_path, record(events), candidates) == sorted(affected)


def test_a_version_in_any_of_several_ranges_is_affected(tmp_path: Path) -> None:
    advisory = record()
    advisory["affected"][0]["ranges"] = [
        {"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "1.0"}]},
        {"type": "ECOSYSTEM", "events": [{"introduced": "2.0"}, {"last_affected": "2.1"}]},
    ]
    candidates = ["0.5", "1.0", "2.0", "2.1", "2.2"]

    assert affected_versions(tmp_path, advisory, candidates) == ["0.5", "2.0", "2.1"]


def test_the_versions_list_alone_matches_by_pep440_equality(tmp_path: Path) -> None:
    advisory = record(None)
    advisory["affected"][0]["versions"] = ["1.0", "1.1+vendor", "0.5-legacy.build!x"]
    candidates = ["1.0", "1.0.0", "1.0+cpu", "1.0.1", "1.1", "1.1+vendor", "0.5"]

    affected = affected_versions(tmp_path, advisory, candidates)

    assert affected == ["1.0", "1.0+cpu", "1.0.0", "1.1+vendor"]


def test_affected_entries_of_one_advisory_for_one_package_give_one_finding(tmp_path: Path) -> None:
    advisory = record([{"introduced": "0"}, {"fixed": "1.5"}])
    advisory["affected"].append(
        {
            "package": {"ecosystem": "PyPI", "name": "demo"},
            "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "1.0"}, {"fixed": "1.2"}]}],
        }
    )
    write(tmp_path, "a.json", advisory)

    findings = match(load_advisories(tmp_path), [("demo", "1.1"), ("demo", "1.1")])

    assert [(f.advisory_id, f.fixed_versions) for f in findings] == [("TEST-1", ("1.2", "1.5"))]


def test_a_non_pep440_dependency_version_is_an_error_only_where_advisories_exist(
    tmp_path: Path,
) -> None:
    write(tmp_path, "a.json", record([{"introduced": "0"}]))
    db = load_advisories(tmp_path)

    assert match(db, [("unrelated", "not-a-version")]) == []
    with pytest.raises(
        DependencyVersionError,
        match=r"Demo 'not-a-version' is not a PEP 440 .* advisories for demo",
    ):
        match(db, [("Demo", "not-a-version")])


# --- bad input: invalid ranges --------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "field", "reason"),
    [
        pytest.param(
            [{"introduced": "0"}, {"fixed": "1.0-final-final!"}],
            "affected[0].ranges[0].events[1].fixed",
            "'1.0-final-final!' is not a PEP 440 version",
            id="unparsable-version",
        ),
        pytest.param(
            [{"introduced": "2.0"}, {"fixed": "1.0"}],
            "affected[0].ranges[0].events[1].fixed",
            "events out of order: fixed 1.0 ends no range",
            id="fixed-before-introduced",
        ),
        pytest.param(
            [{"introduced": "1.0"}, {"fixed": "1.5"}, {"introduced": "2.0"}, {"fixed": "1.8"}],
            "affected[0].ranges[0].events[3].fixed",
            "events out of order: fixed 1.8 ends no range",
            id="second-pair-reversed",
        ),
        pytest.param(
            [{"fixed": "1.0"}],
            "affected[0].ranges[0].events",
            "a range needs at least one introduced event",
            id="no-introduced",
        ),
        pytest.param(
            [{"introduced": "0"}, {"fixed": "1.0"}, {"last_affected": "2.0"}],
            "affected[0].ranges[0].events",
            "fixed or last_affected events, not both",
            id="fixed-and-last_affected",
        ),
        pytest.param(
            [{"introduced": "0", "fixed": "1.0"}],
            "affected[0].ranges[0].events[0]",
            "an event has exactly one of introduced, fixed, last_affected, limit",
            id="two-kinds-in-one-event",
        ),
        pytest.param(
            [{"introduced": "0"}, {"limit": "next-year"}],
            "affected[0].ranges[0].events[1].limit",
            "'next-year' is not a PEP 440 version",
            id="unparsable-limit",
        ),
    ],
)
def test_an_advisory_with_an_invalid_range_is_skipped_with_a_warning(
    pypa_checkout: Path, events: list[dict[str, str]], field: str, reason: str
) -> None:
    bad = write(pypa_checkout, "vulns/demo/TEST-1.json", record(events))

    db = load_advisories(pypa_checkout)

    [warning] = db.warnings
    assert (warning.file, warning.advisory_id, warning.field) == (bad, "TEST-1", field)
    assert reason in warning.reason
    assert str(warning).startswith(f"{bad}: TEST-1: {field}: ")
    assert "TEST-1" not in {a.id for a in db.advisories}
    assert len(db.advisories) == 4  # the others are used
    assert match(db, [("demo", "0.1"), ("jinja2", "2.10")]) != []


def test_a_range_of_unknown_type_is_skipped_with_a_warning(tmp_path: Path) -> None:
    advisory = record([{"introduced": "0"}])
    advisory["affected"][0]["ranges"][0]["type"] = "CALVER"
    write(tmp_path, "a.json", advisory)

    [warning] = load_advisories(tmp_path).warnings

    assert warning.field == "affected[0].ranges[0].type"
    assert "unknown range type 'CALVER'" in warning.reason


def test_an_unquoted_yaml_version_read_as_a_number_is_refused(tmp_path: Path) -> None:
    # YAML reads `fixed: 2.10` as the float 2.1: taking it would move the fix to 2.1.
    bad = write(
        tmp_path,
        "PYSEC-X.yaml",
        "id: PYSEC-X\naffected:\n- package: {ecosystem: PyPI, name: demo}\n  ranges:\n"
        "  - type: ECOSYSTEM\n    events:\n    - introduced: '0'\n    - fixed: 2.10\n",
    )

    [warning] = load_advisories(tmp_path).warnings

    assert (warning.file, warning.advisory_id) == (bad, "PYSEC-X")
    assert warning.field == "affected[0].ranges[0].events[1].fixed"
    assert "valid string" in warning.reason


# --- bad input: malformed files -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("broken.json", '{"id": "X", "affected": [', "not valid JSON: Expecting value at line 1"),
        ("broken.yaml", "id: X\naffected: [\n  {a: b\n", "not valid YAML"),
        ("tabs.yml", "id: X\n\taffected: []\n", "not valid YAML"),
        ("latin1.yaml", "id: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 7)"),
        ("empty.yaml", "", "the top level is empty, not a mapping"),
        ("list.json", "[1, 2]", "the top level is a list, not a mapping"),
        ("noid.json", '{"affected": []}', "Field required"),
        ("noaffected.yaml", "id: X\nsummary: nothing\n", "Field required"),
        ("types.json", '{"id": "X", "affected": [], "aliases": "CVE-1"}', "valid list"),
        ("twodocs.yaml", "id: X\naffected: []\n---\nid: Y\naffected: []\n", "not valid YAML"),
    ],
)
def test_a_malformed_file_is_skipped_with_a_warning_naming_it(
    pypa_checkout: Path, name: str, content: str | bytes, reason: str
) -> None:
    bad = write(pypa_checkout, f"vulns/demo/{name}", content)

    db = load_advisories(pypa_checkout)

    [warning] = db.warnings
    assert warning.file == bad
    assert reason in warning.reason and warning.reason.endswith("; skipped")
    assert str(warning).startswith(str(bad))
    assert len(db.advisories) == 4
    assert len(match(db, [("jinja2", "2.10"), ("urllib3", "2.0.0")])) == 3


def test_wrong_types_name_the_advisory_and_the_field(tmp_path: Path) -> None:
    advisory = record([{"introduced": "0"}])
    advisory["affected"][0]["package"]["name"] = ["demo"]
    advisory["severity"] = "HIGH"
    bad = write(tmp_path, "a.json", advisory)

    [warning] = load_advisories(tmp_path).warnings

    assert (warning.file, warning.advisory_id) == (bad, "TEST-1")
    assert warning.field == "affected[0].package.name"
    assert warning.reason == "Input should be a valid string (and 1 more problems); skipped"


def test_the_later_modified_of_two_records_with_one_id_is_kept(tmp_path: Path) -> None:
    older = write(
        tmp_path,
        "a/TEST-1.yaml",
        "id: TEST-1\nmodified: 2020-01-01T00:00:00Z\n"
        "affected:\n- package: {ecosystem: PyPI, name: demo}\n  versions: ['1.0']\n",
    )
    newer = write(tmp_path, "b/TEST-1.json", record([{"introduced": "0"}, {"fixed": "1.0"}]))

    db = load_advisories(tmp_path)

    [warning] = db.warnings
    assert (warning.file, warning.advisory_id) == (older, "TEST-1")
    assert f"duplicate of {newer}" in warning.reason
    assert [a.file for a in db.advisories] == [newer]
    assert match(db, [("demo", "1.0")]) == []


def test_a_link_out_of_the_folder_is_not_followed(tmp_path: Path) -> None:
    outside = write(tmp_path, "outside/secret.yaml", JINJA2_PYSEC_2019_217)
    db_folder = tmp_path / "advisories"
    write(db_folder, "vulns/requests/PYSEC-2023-74.yaml", REQUESTS_PYSEC_2023_74)
    (db_folder / "vulns/jinja2").mkdir(parents=True)
    (db_folder / "vulns/jinja2/PYSEC-2019-217.yaml").symlink_to(outside)
    (db_folder / "vulns/elsewhere").symlink_to(outside.parent, target_is_directory=True)
    (db_folder / "vulns/requests-again").symlink_to("requests", target_is_directory=True)

    db = load_advisories(db_folder)

    outside_message = "links outside the advisory folder; not read"
    assert [str(w) for w in db.warnings] == [
        f"{db_folder}/vulns/elsewhere: {outside_message}",
        f"{db_folder}/vulns/jinja2/PYSEC-2019-217.yaml: {outside_message}",
    ]
    assert [a.id for a in db.advisories] == ["PYSEC-2023-74"]


def test_pipes_and_dangling_links_are_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.json")
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "gone.yaml")
    write(tmp_path, "a.json", record([{"introduced": "0"}]))

    db = load_advisories(tmp_path)

    assert [str(w) for w in db.warnings] == [
        f"{tmp_path}/dangling.yaml: not a regular file; not read",
        f"{tmp_path}/pipe.json: not a regular file; not read",
    ]
    assert [a.id for a in db.advisories] == ["TEST-1"]


def test_a_missing_folder_or_a_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(AdvisoryDatabaseError, match="does not exist"):
        load_advisories(tmp_path / "nowhere")
    with pytest.raises(AdvisoryDatabaseError, match="is not a folder"):
        load_advisories(write(tmp_path, "file.json", "{}"))


def test_a_folder_without_advisory_files_warns(tmp_path: Path) -> None:
    write(tmp_path, "README.md", "# empty checkout\n")

    db = load_advisories(tmp_path)

    assert db.advisories == ()
    assert [str(w) for w in db.warnings] == [
        f"{tmp_path}: no advisory files (*.json, *.yaml, *.yml) found"
    ]


# --- severity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vector", "score"),
    [
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H", 9.8),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:C/C:H/I:H/A:H", 10.0),
        ("CVSS:3.1/AV:N/AC:L/PR:H/UI:N/S:C/C:H/I:H/A:H", 9.1),
        ("CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:H/I:H/A:H", 7.8),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H", 7.5),
        ("CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:C/C:L/I:L/A:N", 6.4),
        ("CVSS:3.0/AV:N/AC:L/PR:N/UI:R/S:C/C:L/I:L/A:N", 6.1),
        ("CVSS:3.1/AV:N/AC:L/PR:N/UI:R/S:U/C:L/I:L/A:N", 5.4),
        ("CVSS:3.1/AV:N/AC:L/PR:L/UI:N/S:U/C:L/I:N/A:N/E:P/RL:O", 4.3),
        ("CVSS:3.1/AV:A/AC:H/PR:H/UI:N/S:U/C:H/I:N/A:N", 4.2),
        ("CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:N/I:N/A:N", 0.0),
    ],
)
def test_cvss3_base_scores_match_the_specification(vector: str, score: float) -> None:
    assert cvss_base_score("CVSS_V3", vector) == score


@pytest.mark.parametrize(
    "vector",
    [
        "AV:N/AC:L/Au:N/C:P/I:P/A:P",  # CVSS v2, not v3
        "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H",  # A missing
        "CVSS:3.1/AV:X/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",
        "CVSS:3.1/AV:N/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H",
        "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H/",
    ],
)
def test_malformed_cvss3_vectors_are_refused(vector: str) -> None:
    with pytest.raises(ValueError, match="CVSS"):
        cvss_base_score("CVSS_V3", vector)


CRITICAL_V3 = {"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:H/I:H/A:H"}  # 9.8
HIGH_V3 = {"type": "CVSS_V3", "score": "CVSS:3.1/AV:N/AC:L/PR:N/UI:N/S:U/C:N/I:N/A:H"}  # 7.5
NONE_V3 = {"type": "CVSS_V3", "score": "CVSS:3.1/AV:L/AC:L/PR:L/UI:N/S:U/C:N/I:N/A:N"}  # 0.0
CRITICAL_V4 = {
    "type": "CVSS_V4",
    "score": "CVSS:4.0/AV:N/AC:L/AT:N/PR:N/UI:N/VC:H/VI:H/VA:H/SC:N/SI:N/SA:N",
}


@pytest.mark.parametrize(
    ("fields", "severity"),
    [
        ({"database_specific": {"severity": "MODERATE"}}, "medium"),
        ({"database_specific": {"severity": "CRITICAL"}}, "critical"),
        ({"database_specific": {"severity": "LOW"}, "severity": [CRITICAL_V3]}, "low"),
        ({"severity": [CRITICAL_V3]}, "critical"),
        ({"severity": [CRITICAL_V4, HIGH_V3]}, "critical"),  # the highest rating wins
        ({"severity": [CRITICAL_V4]}, "critical"),
        ({"database_specific": {"severity": "whatever"}}, "unknown"),
        ({}, "unknown"),
    ],
)
def test_severity_comes_from_the_database_label_or_a_cvss3_vector(
    tmp_path: Path, fields: dict[str, Any], severity: str
) -> None:
    write(tmp_path, "a.json", record([{"introduced": "0"}], **fields))

    [finding] = match(load_advisories(tmp_path), [("demo", "1.0")])

    assert finding.severity == severity


def test_a_package_severity_overrides_the_advisory_severity(tmp_path: Path) -> None:
    advisory = record([{"introduced": "0"}])
    advisory["severity"] = [NONE_V3]
    advisory["affected"][0]["severity"] = [HIGH_V3]
    write(tmp_path, "a.json", advisory)

    [finding] = match(load_advisories(tmp_path), [("demo", "1.0")])

    assert finding.severity == "high"


def test_a_malformed_cvss_vector_warns_and_leaves_the_advisory_in_use(tmp_path: Path) -> None:
    advisory = record([{"introduced": "0"}], severity=[{"type": "CVSS_V3", "score": "9.8"}])
    path = write(tmp_path, "a.json", advisory)

    db = load_advisories(tmp_path)

    assert [str(w) for w in db.warnings] == [
        f"{path}: TEST-1: severity[0].score: CVSS vector '9.8' (CVSS_V3) is malformed: "
        'Malformed CVSS3 vector "9.8" is missing mandatory prefix or uses unsupported CVSS '
        "version; severity left unknown"
    ]
    assert [f.severity for f in match(db, [("demo", "1.0")])] == ["unknown"]


@pytest.mark.parametrize(
    ("severity", "reached"),
    [
        ("low", ["low"]),
        ("medium", ["low", "medium"]),
        ("high", ["low", "medium", "high"]),
        ("critical", ["low", "medium", "high", "critical"]),
        ("unknown", ["low", "medium", "high", "critical"]),  # fails closed
    ],
)
def test_severity_at_least_orders_low_medium_high_critical(
    tmp_path: Path, severity: str, reached: list[str]
) -> None:
    label = {"low": "LOW", "medium": "MODERATE", "high": "HIGH", "critical": "CRITICAL"}
    fields = {"database_specific": {"severity": label[severity]}} if severity in label else {}
    write(tmp_path, "a.json", record([{"introduced": "0"}], **fields))
    [finding] = match(load_advisories(tmp_path), [("demo", "1.0")])

    thresholds = ("low", "medium", "high", "critical")
    assert [t for t in thresholds if severity_at_least(finding, t)] == reached


def test_an_unknown_threshold_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "a.json", record([{"introduced": "0"}]))
    [finding] = match(load_advisories(tmp_path), [("demo", "1.0")])

    with pytest.raises(ValueError, match="'severe' is not one of low, medium, high, critical"):
        severity_at_least(finding, "severe")  # type: ignore[arg-type]
