"""repositories[].release in cicd.yaml: errors name the file, line and field."""

from pathlib import Path

import pytest

from cicd_dagster.config import ConfigError, load_control_config


def load(tmp_path: Path, release: str):
    path = tmp_path / "cicd.yaml"
    path.write_text(f"repositories:\n  - name: shop\n    url: /srv/shop\n    release: {release}\n")
    return load_control_config(path)


def test_defaults(tmp_path: Path) -> None:
    release = load(tmp_path, "{}").repository("shop").release
    assert (release.tag_format, release.initial_version) == ("v{version}", "0.1.0")


def test_custom_values(tmp_path: Path) -> None:
    config = load(tmp_path, "{tag_format: 'shop/{version}', initial_version: 1.0.0}")
    release = config.repository("shop").release
    assert (release.tag_format, release.initial_version) == ("shop/{version}", "1.0.0")


@pytest.mark.parametrize(
    ("release", "field", "message"),
    [
        ("{tag_format: 'v'}", "tag_format", "must contain {version} once"),
        ("{tag_format: '{version}-{version}'}", "tag_format", "must contain {version} once"),
        ("{tag_format: 'v{verison}'}", "tag_format", "must contain {version} once"),
        ("{tag_format: '{name}/{version}'}", "tag_format", "the only field it may hold"),
        ("{tag_format: 'v {version}'}", "tag_format", "makes tags git refuses"),
        ("{tag_format: '-{version}'}", "tag_format", "makes tags git refuses"),
        ("{initial_version: '1.0'}", "initial_version", "not a final SemVer 2.0 version"),
        ("{initial_version: 'v1.0.0'}", "initial_version", "not a final SemVer 2.0 version"),
        ("{initial_version: 1.0.0-rc.1}", "initial_version", "not a final SemVer 2.0 version"),
        ("{tag_fromat: 'v{version}'}", "tag_fromat", 'unknown field "tag_fromat"'),
    ],
)
def test_bad_release_settings(tmp_path: Path, release: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, release)
    error = raised.value
    assert (error.line, error.field) == (4, f"repositories[0].release.{field}")
    assert message in error.message
    assert str(error).startswith(f"{tmp_path / 'cicd.yaml'}:4: repositories[0].release.{field}")
