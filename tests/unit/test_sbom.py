"""CycloneDX SBOMs of a real environment, checked with CycloneDX's own JSON schema validator."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from cicd_dagster.security.dependencies import Dependency, resolved_dependencies
from cicd_dagster.security.sbom import ArtifactFile, SbomError, build_sbom, sbom_libraries
from tests.unit.test_dependencies import make_env

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHA = "ab" * 32


def assert_valid(text: str) -> None:
    errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text, all_errors=True)
    assert errors is None, errors


@pytest.fixture(scope="module")
def environment(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Dependency], dict]:
    env, wheels = make_env(tmp_path_factory.mktemp("venv"))
    return resolved_dependencies(env).dependencies, wheels


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / "app-1.0.whl").write_bytes(b"the built wheel")
    (tmp_path / "dist" / "notes.txt").write_text("release notes")
    return tmp_path


def test_sbom_of_a_real_environment_is_valid_cyclonedx_1_6(environment, checkout):
    dependencies, wheels = environment
    artifacts = [ArtifactFile.from_file(checkout, Path("dist/app-1.0.whl"))]
    sbom = build_sbom(
        "shop-api", COMMIT, dependencies, artifacts, repository_url="https://git.example/shop.git"
    )
    assert_valid(sbom.json)
    document = json.loads(sbom.json)
    assert document["specVersion"] == "1.6"
    assert document["serialNumber"] == sbom.serial_number
    root = document["metadata"]["component"]
    assert (root["name"], root["version"], root["bom-ref"]) == (
        "shop-api",
        COMMIT,
        f"shop-api@{COMMIT}",
    )
    assert root["externalReferences"] == [{"type": "vcs", "url": "https://git.example/shop.git"}]

    components = {c["bom-ref"]: c for c in document["components"]}
    assert sorted(components) == [
        "file:dist/app-1.0.whl",
        "pkg:pypi/gamma@0.3",
        "pkg:pypi/helper-lib@2.0",
        "pkg:pypi/tiny-pkg@1.2.0",
    ]
    tiny = components["pkg:pypi/tiny-pkg@1.2.0"]
    assert (tiny["type"], tiny["name"], tiny["purl"]) == (
        "library",
        "tiny-pkg",
        "pkg:pypi/tiny-pkg@1.2.0",
    )
    assert tiny["licenses"] == [{"expression": "MIT OR Apache-2.0"}]
    assert tiny["description"] == "A tiny package"
    wheel_digest = hashlib.sha256(wheels["Tiny_Pkg"].read_bytes()).hexdigest()
    assert tiny["hashes"] == [{"alg": "SHA-256", "content": wheel_digest}]
    assert components["pkg:pypi/helper-lib@2.0"]["licenses"] == [
        {"license": {"id": "GPL-3.0-only"}}
    ]
    artifact = components["file:dist/app-1.0.whl"]
    assert artifact["type"] == "file"
    assert artifact["hashes"] == [
        {"alg": "SHA-256", "content": hashlib.sha256(b"the built wheel").hexdigest()}
    ]

    graph = {d["ref"]: d.get("dependsOn", []) for d in document["dependencies"]}
    # helper-lib is required by tiny-pkg, so only tiny-pkg and gamma hang off the repository.
    assert graph[f"shop-api@{COMMIT}"] == ["pkg:pypi/gamma@0.3", "pkg:pypi/tiny-pkg@1.2.0"]
    assert graph["pkg:pypi/tiny-pkg@1.2.0"] == ["pkg:pypi/helper-lib@2.0"]

    assert sbom.summary.component_count == 4
    assert (sbom.summary.library_count, sbom.summary.file_count) == (3, 1)
    assert sbom.summary.licenses == {"Apache-2.0": 1, "GPL-3.0-only": 1, "MIT OR Apache-2.0": 1}


def test_licences_that_are_not_spdx_become_named_licences_and_stay_valid():
    dependencies = [
        Dependency("a", "1", "BSD License OR Apache-2.0", "classifiers", None),
        Dependency("b", "2", None, None, None),
        Dependency("c", "3", "mit", "License", "lower-case id"),
    ]
    sbom = build_sbom("repo", COMMIT, dependencies, [])
    assert_valid(sbom.json)
    licenses = {c["name"]: c.get("licenses") for c in json.loads(sbom.json)["components"]}
    assert licenses == {
        "a": [{"license": {"name": "BSD License OR Apache-2.0"}}],
        "b": None,
        "c": [{"license": {"id": "MIT"}}],
    }
    assert sbom.summary.licenses == {"BSD License OR Apache-2.0": 1, "mit": 1, "unknown": 1}


def test_same_inputs_with_fixed_time_and_serial_give_the_same_document(environment, checkout):
    dependencies, _wheels = environment
    artifacts = [ArtifactFile.from_file(checkout, Path("dist/notes.txt"))]
    fixed = {
        "timestamp": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "serial_number": UUID("12345678-1234-5678-1234-567812345678"),
    }
    first = build_sbom("repo", COMMIT, dependencies, artifacts, **fixed)
    second = build_sbom("repo", COMMIT, list(reversed(dependencies)), artifacts, **fixed)
    assert first.json == second.json
    assert first.serial_number == "urn:uuid:12345678-1234-5678-1234-567812345678"
    assert json.loads(first.json)["metadata"]["timestamp"] == "2026-01-02T03:04:05+00:00"


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "dist/../../outside.txt"])
def test_an_artifact_outside_the_checkout_is_refused(checkout, path):
    with pytest.raises(SbomError, match=re.escape(f"artifact {path}: outside {checkout}")):
        ArtifactFile.from_file(checkout, Path(path))


def test_an_artifact_linking_out_of_the_checkout_is_refused(checkout, tmp_path_factory):
    secret = tmp_path_factory.mktemp("elsewhere") / "secret.txt"
    secret.write_text("not yours")
    (checkout / "dist" / "link.txt").symlink_to(secret)
    with pytest.raises(SbomError, match=re.escape("artifact dist/link.txt: outside")):
        ArtifactFile.from_file(checkout, Path("dist/link.txt"))


@pytest.mark.parametrize("path", ["dist", "dist/missing.whl"])
def test_an_artifact_that_is_not_a_file_is_refused(checkout, path):
    with pytest.raises(SbomError, match=re.escape(f"artifact {path}: not a file")):
        ArtifactFile.from_file(checkout, Path(path))


@pytest.mark.parametrize(
    ("commit", "dependencies", "artifacts", "message"),
    [
        ("main", [], [], "commit 'main' is not a full hex commit id"),
        (COMMIT.upper(), [], [], "is not a full hex commit id"),
        (COMMIT, [], [ArtifactFile("a.whl", "abc")], "artifact a.whl: sha256 'abc' is not 64 hex"),
        (
            COMMIT,
            [],
            [ArtifactFile("a.whl", SHA), ArtifactFile("a.whl", SHA)],
            "artifact listed more than once: file:a.whl",
        ),
        (
            COMMIT,
            [Dependency("x", "1", None, None, None)] * 2,
            [],
            "dependency listed more than once: pkg:pypi/x@1",
        ),
    ],
)
def test_bad_input_is_an_error_naming_the_field(commit, dependencies, artifacts, message):
    with pytest.raises(SbomError, match=re.escape(message)):
        build_sbom("repo", commit, dependencies, artifacts)


def test_a_rescan_reads_back_the_libraries_an_sbom_lists(environment, checkout):
    dependencies, _ = environment
    artifacts = [ArtifactFile.from_file(checkout, Path("dist/app-1.0.whl"))]
    sbom = build_sbom("shop-api", COMMIT, dependencies, artifacts)
    assert sorted(sbom_libraries(sbom.json, "sbom.cdx.json")) == sorted(
        (d.name, d.version) for d in dependencies
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a CycloneDX SBOM"),
        ('{"bomFormat": "SPDX"}', "not a CycloneDX SBOM"),
        ('{"bomFormat": "CycloneDX", "components": {}}', "components is not a list"),
        (
            '{"bomFormat": "CycloneDX", "components": [{"purl": "pkg:pypi/flask"}]}',
            "components[0].purl 'pkg:pypi/flask' has no version",
        ),
    ],
)
def test_an_unusable_sbom_is_named_with_what_is_wrong(text, problem):
    with pytest.raises(SbomError, match=re.escape(problem)) as caught:
        sbom_libraries(text, "app@0123/sbom.cdx.json")
    assert str(caught.value).startswith("app@0123/sbom.cdx.json: ")
