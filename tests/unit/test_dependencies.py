"""Reading a real virtual environment: wheels built here with uv, installed with pip, offline."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from uv import find_uv_bin

from cicd_dagster.security.dependencies import (
    Dependency,
    DependencyError,
    lock_digest,
    resolved_dependencies,
)

# name -> the [project] table lines after name/version (uv_build writes core metadata 2.4).
PROJECTS = {
    ("Tiny_Pkg", "1.2.0"): """
        description = "A tiny package"
        license = "MIT OR Apache-2.0"
        dependencies = ["helper.lib>=1", "absent-lib; python_version >= '3'",
                        "gamma; extra == 'fancy'"]
    """,
    ("helper.lib", "2.0"): """
        description = "Helps"
        classifiers = ["License :: OSI Approved :: GNU General Public License v3 (GPLv3)"]
    """,
    ("gamma", "0.3"): """
        license = {text = "Apache 2.0"}
    """,
}


def build_wheel(folder: Path, name: str, version: str, project: str) -> Path:
    module = name.lower().replace(".", "_").replace("-", "_")
    (folder / "src" / module).mkdir(parents=True)
    (folder / "src" / module / "__init__.py").write_text("VALUE = 1\n")
    (folder / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "{version}"\n'
        + textwrap.dedent(project)
        + '[build-system]\nrequires = ["uv_build>=0.9,<0.14"]\nbuild-backend = "uv_build"\n'
        + f'[tool.uv.build-backend]\nmodule-name = "{module}"\n'
    )
    dist = folder / "dist"
    subprocess.run(
        [find_uv_bin(), "build", "--wheel", "--offline", "--quiet", "-o", str(dist), str(folder)],
        check=True,
    )
    return next(dist.glob("*.whl"))


def empty_env(path: Path) -> Path:
    subprocess.run(
        [find_uv_bin(), "venv", "--quiet", "--python", sys.executable, str(path)], check=True
    )
    return path


def make_env(root: Path) -> tuple[Path, dict[str, Path]]:
    """A virtual environment with the PROJECTS installed by pip; returns it and the wheels."""
    wheels = {
        name: build_wheel(root / "src" / name, name, version, project)
        for (name, version), project in PROJECTS.items()
    }
    env = empty_env(root / "env")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install",
         "--quiet", "--no-index", "--no-deps", *map(str, wheels.values())],
        check=True,
    )  # fmt: skip
    return env, wheels


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return make_env(tmp_path_factory.mktemp("venv"))


def site_packages(env: Path) -> Path:
    return next(env.glob("lib/python*/site-packages"))


def write_dist_info(env: Path, folder: str, metadata: str | None) -> Path:
    dist_info = site_packages(env) / folder
    dist_info.mkdir()
    if metadata is not None:
        (dist_info / "METADATA").write_text(textwrap.dedent(metadata))
    return dist_info


def test_reads_installed_distributions_with_normalised_names_and_licences(installed):
    env, _wheels = installed
    resolved = resolved_dependencies(env)
    assert resolved.warnings == []
    assert resolved.site_packages == [site_packages(env)]
    by_name = {d.name: d for d in resolved.dependencies}
    # pip itself is absent: uv venv makes a bare environment.
    assert sorted(by_name) == ["gamma", "helper-lib", "tiny-pkg"]
    tiny = by_name["tiny-pkg"]
    assert (tiny.version, tiny.summary) == ("1.2.0", "A tiny package")
    assert (tiny.license, tiny.license_source) == ("MIT OR Apache-2.0", "License-Expression")
    helper = by_name["helper-lib"]
    assert (helper.license, helper.license_source) == ("GPL-3.0-only", "classifiers")
    assert (by_name["gamma"].license, by_name["gamma"].license_source) == ("Apache-2.0", "License")
    assert by_name["gamma"].summary is None


def test_requires_lists_installed_requirements_but_not_extras(installed):
    env, _wheels = installed
    by_name = {d.name: d for d in resolved_dependencies(env).dependencies}
    # absent-lib is not installed; gamma is installed but only wanted by the "fancy" extra.
    assert by_name["tiny-pkg"].requires == ("helper-lib",)
    assert by_name["helper-lib"].requires == ()


def test_hashes_are_those_of_the_installed_wheel_and_record(installed):
    env, wheels = installed
    by_name = {d.name: d for d in resolved_dependencies(env).dependencies}
    tiny = by_name["tiny-pkg"]
    assert tiny.archive_sha256 == hashlib.sha256(wheels["Tiny_Pkg"].read_bytes()).hexdigest()
    record = site_packages(env) / tiny.dist_info / "RECORD"
    assert tiny.record_sha256 == hashlib.sha256(record.read_bytes()).hexdigest()


def test_lock_digest_ignores_order_and_changes_with_any_version(installed):
    env, _wheels = installed
    dependencies = resolved_dependencies(env).dependencies
    digest = lock_digest(dependencies)
    assert digest == lock_digest(list(reversed(dependencies)))
    lines = "\n".join(sorted(f"{d.name}=={d.version}" for d in dependencies))
    assert digest == hashlib.sha256(lines.encode()).hexdigest()
    bumped = [Dependency("gamma", "0.4", None, None, None), *dependencies[1:]]
    assert dependencies[0].name == "gamma"
    assert lock_digest(bumped) != digest


def test_malformed_metadata_is_skipped_with_a_warning_naming_the_file(tmp_path):
    env = empty_env(tmp_path / "env")
    write_dist_info(env, "good-1.0.dist-info", "Metadata-Version: 2.1\nName: Good\nVersion: 1.0\n")
    no_version = write_dist_info(
        env, "noversion-1.0.dist-info", "Metadata-Version: 2.1\nName: nv\n"
    )
    no_metadata = write_dist_info(env, "nometa-1.0.dist-info", None)
    bad_name = write_dist_info(env, "bad-1.0.dist-info", "Name: -bad name-\nVersion: 1\n")
    odd = write_dist_info(
        env,
        "odd-2.0.dist-info",
        """\
        Metadata-Version: 2.1
        Name: odd
        Version: 2.0
        Requires-Dist: good >= 1
        Requires-Dist: not a requirement !!
        """,
    )
    (odd / "direct_url.json").write_text("{not json")
    undecodable = write_dist_info(env, "undecodable-1.0.dist-info", None)
    (undecodable / "METADATA").write_bytes(b"Name: undecodable\nVersion: 1.0\nSummary: \xff\xfe\n")

    resolved = resolved_dependencies(env)

    assert [(d.name, d.version, d.summary) for d in resolved.dependencies] == [
        ("good", "1.0", None),
        ("odd", "2.0", None),
        ("undecodable", "1.0", None),
    ]
    assert resolved.dependencies[1].requires == ("good",)
    assert resolved.dependencies[1].archive_sha256 is None
    warnings = "\n".join(resolved.warnings)
    assert f"{no_version / 'METADATA'}: skipped, no Version field" in warnings
    assert f"{no_metadata / 'METADATA'}: skipped, cannot read" in warnings
    assert f"{bad_name / 'METADATA'}: skipped, invalid Name '-bad name-'" in warnings
    assert f"{odd / 'METADATA'}: Requires-Dist 'not a requirement !!' ignored" in warnings
    assert f"{odd / 'direct_url.json'}: unreadable direct_url.json ignored" in warnings
    assert f"{undecodable / 'METADATA'}: fields not understood and ignored: summary" in warnings
    assert len(resolved.warnings) == 6


def test_dist_info_linking_outside_site_packages_is_skipped(tmp_path):
    env = empty_env(tmp_path / "env")
    outside = tmp_path / "elsewhere" / "evil-1.0.dist-info"
    outside.mkdir(parents=True)
    (outside / "METADATA").write_text("Name: evil\nVersion: 1.0\n")
    link = site_packages(env) / "evil-1.0.dist-info"
    link.symlink_to(outside, target_is_directory=True)
    resolved = resolved_dependencies(env)
    assert resolved.dependencies == []
    assert resolved.warnings == [f"{link}: skipped, links outside {site_packages(env)}"]


def test_a_distribution_installed_twice_is_counted_once_and_warned(tmp_path):
    env = empty_env(tmp_path / "env")
    write_dist_info(env, "dup-1.0.dist-info", "Name: dup\nVersion: 1.0\n")
    write_dist_info(env, "Dup-1.0.dist-info", "Name: Dup\nVersion: 1.0\n")
    write_dist_info(env, "dup-2.0.dist-info", "Name: dup\nVersion: 2.0\n")
    resolved = resolved_dependencies(env)
    assert [(d.name, d.version) for d in resolved.dependencies] == [("dup", "1.0"), ("dup", "2.0")]
    assert resolved.warnings == [
        "dup-1.0.dist-info: dup 1.0 is installed twice (also Dup-1.0.dist-info); counted once",
        f"{env}: dup is installed in several versions: 1.0, 2.0",
    ]


def test_the_environment_python_is_never_run(tmp_path):
    env = empty_env(tmp_path / "env")
    write_dist_info(env, "good-1.0.dist-info", "Name: good\nVersion: 1.0\n")
    marker = tmp_path / "ran"
    for python in (env / "bin").glob("python*"):
        python.unlink()
        python.write_text(f"#!/bin/sh\ntouch {marker}\n")
        python.chmod(0o755)
    assert [d.name for d in resolved_dependencies(env).dependencies] == ["good"]
    assert not marker.exists()


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_a_folder_that_is_not_a_virtual_environment_is_an_error(tmp_path, make):
    folder = make(tmp_path)
    with pytest.raises(DependencyError, match=re.escape(str(folder))):
        resolved_dependencies(folder)
