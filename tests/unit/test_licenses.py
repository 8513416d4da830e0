"""Declared licences and allow/deny checks."""

from __future__ import annotations

import pytest

from cicd_dagster.security.dependencies import Dependency
from cicd_dagster.security.licenses import (
    LicenseFinding,
    LicensePolicyError,
    check_licenses,
    declared_license,
    spdx_from_name,
)

MIT_CLASSIFIER = "License :: OSI Approved :: MIT License"


def dep(license_: str | None, name: str = "pkg", version: str = "1.0") -> Dependency:
    return Dependency(name, version, license_, "License-Expression" if license_ else None, None)


def kinds(findings: list[LicenseFinding]) -> list[tuple[str, str]]:
    return [(f.dependency, f.kind) for f in findings]


@pytest.mark.parametrize(
    ("name", "spdx"),
    [
        ("mit", "MIT"),
        ("MIT License", "MIT"),
        ("apache-2.0", "Apache-2.0"),
        ("Apache License, Version 2.0", "Apache-2.0"),
        ("GPL-2.0", "GPL-2.0-only"),  # the deprecated id's meaning
        ("mit or apache-2.0", "MIT OR Apache-2.0"),
        ("GNU General Public License v3 or later (GPLv3+)", "GPL-3.0-or-later"),
        ("BSD License", None),  # which BSD is not said
        ("Custom Licence", None),
        ("MIT OR", None),
    ],
)
def test_spdx_from_name(name, spdx):
    assert spdx_from_name(name) == spdx


def test_license_expression_wins_over_license_field_and_classifiers():
    got = declared_license("mit or apache-2.0", "BSD", [MIT_CLASSIFIER])
    assert got == ("MIT OR Apache-2.0", "License-Expression")


def test_an_unrecognised_license_expression_is_kept_as_written():
    assert declared_license(" Foo AND ", None, []) == ("Foo AND", "License-Expression")


def test_license_field_naming_spdx_wins_over_classifiers():
    assert declared_license(None, "Apache 2.0", [MIT_CLASSIFIER]) == ("Apache-2.0", "License")


def test_classifiers_map_to_spdx_and_several_are_alternatives():
    classifiers = [
        "Programming Language :: Python",
        "License :: OSI Approved",
        MIT_CLASSIFIER,
        "License :: OSI Approved :: BSD License",
        "License :: OSI Approved :: MIT License",
    ]
    assert declared_license(None, None, classifiers) == ("MIT OR BSD License", "classifiers")


def test_full_licence_text_in_the_license_field_is_not_a_name():
    text = "Copyright (c) someone\n\nPermission is hereby granted, free of charge..."
    assert declared_license(None, text, []) == (None, None)
    assert declared_license(None, "x" * 101, []) == (None, None)
    assert declared_license(None, "Proprietary", []) == ("Proprietary", "License")
    assert declared_license(None, "  ", []) == (None, None)


def test_allow_list_matches_ids_in_any_case_and_aliases():
    deps = [dep("MIT", "a"), dep("GPL-2.0-only", "b"), dep("Apache-2.0", "c")]
    assert check_licenses(deps, allow=["mit", "GPL-2.0", "APACHE-2.0"]) == []


def test_or_needs_one_allowed_alternative_and_and_needs_all():
    deps = [
        dep("MIT OR GPL-3.0-only", "either"),
        dep("MIT AND GPL-3.0-only", "both"),
        dep("(MIT OR BSD-3-Clause) AND (Zlib OR ISC)", "nested"),
    ]
    findings = check_licenses(deps, allow=["MIT"])
    assert findings == [
        LicenseFinding(
            "both",
            "1.0",
            "MIT AND GPL-3.0-only",
            "not_allowed",
            "not in the allow list: GPL-3.0-only",
        ),
        LicenseFinding(
            "nested",
            "1.0",
            "(MIT OR BSD-3-Clause) AND (Zlib OR ISC)",
            "not_allowed",
            "not in the allow list: Zlib, ISC",
        ),
    ]


def test_deny_list_blocks_unless_an_alternative_avoids_it():
    deps = [
        dep("AGPL-3.0-only", "agpl"),
        dep("agpl-3.0-only OR MIT", "dual"),
        dep("MIT AND AGPL-3.0-only", "bundled"),
    ]
    findings = check_licenses(deps, deny=["AGPL-3.0-only"])
    assert kinds(findings) == [("agpl", "denied"), ("bundled", "denied")]
    assert findings[0].reason == "denied: AGPL-3.0-only"


def test_deny_wins_over_allow_for_the_same_licence():
    findings = check_licenses([dep("GPL-3.0-only")], allow=["GPL-3.0-only"], deny=["gpl-3.0-only"])
    assert kinds(findings) == [("pkg", "denied")]


def test_a_licence_exception_follows_its_base_licence_unless_listed_whole():
    classpath = dep("GPL-2.0-only WITH Classpath-exception-2.0")
    assert check_licenses([classpath], allow=["GPL-2.0-only"]) == []
    assert kinds(check_licenses([classpath], deny=["GPL-2.0-only"])) == [("pkg", "denied")]
    whole = ["GPL-2.0-only WITH Classpath-exception-2.0"]
    assert check_licenses([classpath], allow=whole, deny=["GPL-2.0-only"]) == []
    assert kinds(check_licenses([classpath], allow=["MIT"])) == [("pkg", "not_allowed")]


def test_unknown_licences_are_findings_only_with_an_allow_list():
    deps = [dep(None, "none"), dep("Custom Licence", "custom"), dep("Foo (Bar) OR", "garbled")]
    assert check_licenses(deps, deny=["AGPL-3.0-only"]) == []
    findings = check_licenses(deps, allow=["MIT"])
    assert kinds(findings) == [("none", "unknown"), ("custom", "unknown"), ("garbled", "unknown")]
    assert findings[0].reason == "declares no licence"
    assert findings[0].license is None
    assert findings[1].reason == "not SPDX licence ids and not in the allow list: Custom Licence"
    assert findings[2].reason == "not an SPDX licence expression and not in the allow list"


def test_non_spdx_names_match_policy_entries_literally():
    deps = [dep("BSD License", "bsd"), dep("Foo (Bar) OR", "garbled")]
    assert check_licenses(deps, allow=["bsd license", "foo (bar) or"]) == []
    assert kinds(check_licenses(deps, deny=["FOO (BAR) OR"])) == [("garbled", "denied")]


def test_the_most_serious_blocker_names_the_finding():
    findings = check_licenses(
        [dep("Custom AND GPL-3.0-only AND AGPL-3.0-only")], allow=["MIT"], deny=["AGPL-3.0-only"]
    )
    assert kinds(findings) == [("pkg", "denied")]
    assert findings[0].reason == (
        "denied: AGPL-3.0-only; not SPDX licence ids and not in the allow list: Custom; "
        "not in the allow list: GPL-3.0-only"
    )


@pytest.mark.parametrize("entry", ["", "  ", None])
def test_an_empty_policy_entry_is_an_error_naming_the_list(entry):
    with pytest.raises(LicensePolicyError, match=r"licenses\.deny"):
        check_licenses([dep("MIT")], deny=[entry])
