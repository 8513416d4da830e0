"""`cicd validate`: cicd.yaml and the .cicd.yml at every watched head, exit 2 naming file:line."""

import os
import subprocess
import sys

import pytest

from tests.support import commit, control_config, git, pipeline_writing_reports

pytestmark = pytest.mark.slow  # each test starts the cicd CLI

CICD = [sys.executable, "-m", "cicd_dagster"]


def validate(config) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CICD_CONFIG": str(config)}
    return subprocess.run([*CICD, "validate"], env=env, capture_output=True, text=True)


def test_valid_control_plane_and_pipelines_pass(tmp_path):
    repo = tmp_path / "app"
    commit(repo, {".cicd.yml": pipeline_writing_reports()})
    done = validate(control_config(tmp_path, {"app": repo}))
    assert done.returncode == 0, done.stderr
    assert "app@main:.cicd.yml" in done.stderr


def test_bad_pipeline_on_a_watched_branch_names_file_line_and_field(tmp_path):
    repo = tmp_path / "app"
    commit(repo, {".cicd.yml": pipeline_writing_reports()})
    git(repo, "checkout", "-q", "-b", "release/2.0")
    commit(repo, {".cicd.yml": "gates:\n  min_pass_rate: lots\n"})
    config = control_config(tmp_path, {"app": repo}, repo_extra='branches: ["main", "release/*"]')
    done = validate(config)
    assert done.returncode == 2
    assert "app@release/2.0:.cicd.yml:2: gates.min_pass_rate" in done.stderr
    assert "app@main:.cicd.yml" in done.stderr  # the good branch is still reported


def test_bad_control_config_exits_2_with_file_and_line(tmp_path):
    config = tmp_path / "cicd.yaml"
    config.write_text("repositories:\n  - name: app\n    url: /x\n    brnaches: [main]\n")
    done = validate(config)
    assert done.returncode == 2
    assert "cicd.yaml:4: repositories[0].brnaches" in done.stderr
    assert 'did you mean "branches"' in done.stderr


def test_malformed_yaml_exits_2(tmp_path):
    config = tmp_path / "cicd.yaml"
    config.write_text("repositories: [\n")
    done = validate(config)
    assert done.returncode == 2
    assert "cicd.yaml:" in done.stderr


def test_unreachable_repository_is_reported_and_others_checked(tmp_path):
    good = tmp_path / "good"
    commit(good, {".cicd.yml": pipeline_writing_reports()})
    config = control_config(tmp_path, {"gone": tmp_path / "vanished", "good": good})
    done = validate(config)
    assert done.returncode == 2
    assert "gone:" in done.stderr
    assert "good@main:.cicd.yml" in done.stderr
