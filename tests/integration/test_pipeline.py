"""Whole CI runs of real git commits through the same job definitions the UI uses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import AssetKey

from cicd_dagster.config import load_control_config
from cicd_dagster.definitions import build_definitions
from cicd_dagster.store import HistoryStore
from jobs.inprocess import run_commit, use_instance
from tests.support import (
    commit,
    control_config,
    junit_xml,
    pipeline_writing_reports,
    pytest_counts,
    run_pytest,
)

pytestmark = pytest.mark.slow  # each test runs Dagster jobs or the cicd CLI

CICD = [sys.executable, "-m", "cicd_dagster"]


def ci(config_path: Path, repository: str, sha: str, *, force: bool = False) -> dict:
    config = load_control_config(config_path)
    return run_commit(
        config, repository, sha, ref="main", branch="main", force=force, stream_logs=False
    )


@pytest.fixture
def repo(tmp_path):
    return tmp_path / "app"


def test_green_commit_reports_every_stage(tmp_path, repo):
    sha = commit(repo, {".cicd.yml": pipeline_writing_reports()})
    report = ci(control_config(tmp_path, {"app": repo}), "app", sha)
    assert report["status"] == "success"
    assert report["commit"] == sha
    assert report["stages"]["unit"] == {
        "status": "success",
        "duration_s": report["stages"]["unit"]["duration_s"],
        "tests": 3,
        "passed": 3,
        "failed": 0,
        "errors": 0,
        "skipped": 0,
    }
    for stage in ("integration", "e2e", "performance"):
        assert report["stages"][stage]["status"] == "not_configured"
    assert all(gate["passed"] for gate in report["gates"])


def test_failed_tests_fail_the_pass_rate_gate(tmp_path, repo):
    unit = junit_xml(passed=2, failed=1)
    sha = commit(repo, {".cicd.yml": pipeline_writing_reports(unit)})
    report = ci(control_config(tmp_path, {"app": repo}), "app", sha)
    assert report["status"] == "failed"
    gate = next(g for g in report["gates"] if g["name"] == "unit.min_pass_rate")
    assert gate["passed"] is False
    assert "2 of 3 tests passed" in gate["detail"]


def test_malformed_pipeline_fails_only_that_commit(tmp_path, repo):
    good = commit(repo, {".cicd.yml": pipeline_writing_reports()})
    bad = commit(repo, {".cicd.yml": "build:\n  stepz: [make]\n"}, "fix: typo")
    config = control_config(tmp_path, {"app": repo})
    bad_report = ci(config, "app", bad)
    assert bad_report["stages"]["source"]["status"] == "failed"
    detail = bad_report["stages"]["source"]["detail"]
    assert f"app@{bad[:12]}:.cicd.yml:2: build.stepz" in detail
    assert 'did you mean "steps"' in detail
    assert bad_report["stages"]["build"]["status"] == "skipped"
    assert ci(config, "app", good)["status"] == "success"


def test_rerun_with_unchanged_inputs_reuses_every_stage(tmp_path, repo):
    sha = commit(
        repo,
        {
            ".cicd.yml": pipeline_writing_reports().replace(
                "mkdir -p dist", "echo step-ran >> ../runs.log && mkdir -p dist"
            )
        },
    )
    config = control_config(tmp_path, {"app": repo})
    first = ci(config, "app", sha)
    second = ci(config, "app", sha)
    assert first["status"] == second["status"] == "success"
    assert second["stages"]["build"].get("reused") is True
    assert second["stages"]["unit"].get("reused") is True
    forced = ci(config, "app", sha, force=True)
    assert "reused" not in forced["stages"]["build"]


def test_step_timeout_fails_the_stage_with_the_log_tail(tmp_path, repo):
    pipeline = (
        pipeline_writing_reports()
        .replace("build:\n", "build:\n  timeout_s: 1\n")
        .replace('steps: ["mkdir', 'steps: ["echo about to hang; sleep 600; mkdir')
    )
    sha = commit(repo, {".cicd.yml": pipeline})
    report = ci(control_config(tmp_path, {"app": repo}), "app", sha)
    build = report["stages"]["build"]
    assert build["status"] == "failed"
    assert "timed out after" in build["detail"]
    assert "about to hang" in build["detail"]


def test_secret_printed_by_a_step_is_masked_everywhere(tmp_path, repo, monkeypatch):
    secret = "s3cr3t-T0KEN-value"
    monkeypatch.setenv("DEPLOY_TOKEN", secret)
    pipeline = pipeline_writing_reports().replace(
        'steps: ["mkdir', 'steps: ["echo token=$DEPLOY_TOKEN; exit 3", "mkdir'
    )
    sha = commit(repo, {".cicd.yml": pipeline})
    config = control_config(tmp_path, {"app": repo}, repo_extra="secrets: [DEPLOY_TOKEN]")
    report = ci(config, "app", sha)
    assert report["stages"]["build"]["status"] == "failed"
    assert "token=***" in report["stages"]["build"]["detail"]
    home = tmp_path / ".cicd"
    leaked = [p for p in home.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []
    dagster_home = Path(os.environ["DAGSTER_HOME"])
    assert not [
        p for p in dagster_home.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()
    ]


def test_missing_report_fails_the_stage_with_a_clear_error(tmp_path, repo):
    pipeline = pipeline_writing_reports().replace("printf", "true || printf")
    sha = commit(repo, {".cicd.yml": pipeline})
    report = ci(control_config(tmp_path, {"app": repo}), "app", sha)
    assert report["stages"]["unit"]["status"] == "failed"
    assert "no JUnit XML report matched '**/*.xml'" in report["stages"]["unit"]["detail"]


def test_corrupt_report_names_the_file(tmp_path, repo):
    sha = commit(repo, {".cicd.yml": pipeline_writing_reports("<testsuite><testcase")})
    report = ci(control_config(tmp_path, {"app": repo}), "app", sha)
    assert report["stages"]["unit"]["status"] == "failed"
    assert "unit.xml" in report["stages"]["unit"]["detail"]


def test_hostile_ref_names_reach_steps_only_as_data(tmp_path, repo):
    pipeline = (
        pipeline_writing_reports()
        .replace('steps: ["mkdir', 'steps: ["printf %s \\"$CICD_BRANCH\\" > branch.txt", "mkdir')
        .replace('artifacts: ["dist/*.txt"]', 'artifacts: ["dist/*.txt", "branch.txt"]')
    )
    commit(repo, {".cicd.yml": pipeline})
    hostile = "x$(touch${IFS}PWNED)"
    subprocess.run(["git", "-C", str(repo), "checkout", "-q", "-b", hostile], check=True)
    sha = commit(repo, {"f": "x"})
    config = load_control_config(control_config(tmp_path, {"app": repo}))
    report = run_commit(
        config, "app", sha, ref=f"refs/heads/{hostile}", branch=hostile, stream_logs=False
    )
    assert report["status"] == "success"
    recorded = (tmp_path / ".cicd" / "runs" / "app" / sha / "artifacts" / "branch.txt").read_text()
    assert recorded == hostile
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()


def test_two_runs_of_the_same_commit_at_once_both_finish(tmp_path, repo):
    commit(repo, {".cicd.yml": pipeline_writing_reports()})
    config_path = control_config(tmp_path, {"app": repo})
    env = {**os.environ, "CICD_CONFIG": str(config_path)}
    runs = [
        subprocess.Popen([*CICD, "run", "app", "--json"], env=env, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [json.loads(run.communicate(timeout=300)[0]) for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert {o["status"] for o in outputs} == {"success"}
    builds = HistoryStore(load_control_config(config_path).history_db_url).builds("app")
    assert len(builds) == 1


def test_cli_run_json_contract_and_exit_codes(tmp_path, repo):
    commit(repo, {".cicd.yml": pipeline_writing_reports(junit_xml(passed=1, failed=1))})
    config = control_config(tmp_path, {"app": repo})
    env = {**os.environ, "CICD_CONFIG": str(config)}
    done = subprocess.run([*CICD, "run", "app", "--json"], env=env, capture_output=True, text=True)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert set(report) >= {"repository", "commit", "status", "stages", "gates"}
    assert report["status"] == "failed"
    assert set(report["stages"]["unit"]) >= {
        "status",
        "duration_s",
        "tests",
        "passed",
        "failed",
        "errors",
        "skipped",
    }
    unknown = subprocess.run([*CICD, "run", "nope"], env=env, capture_output=True, text=True)
    assert unknown.returncode == 2
    assert "unknown repository 'nope'" in unknown.stderr
    bad_ref = subprocess.run(
        [*CICD, "run", "app", "--ref", "no-such-branch"], env=env, capture_output=True, text=True
    )
    assert bad_ref.returncode == 2


def test_history_builds_and_tests_in_every_format(tmp_path, repo):
    sha = commit(repo, {".cicd.yml": pipeline_writing_reports()})
    config = control_config(tmp_path, {"app": repo})
    ci(config, "app", sha)
    env = {**os.environ, "CICD_CONFIG": str(config)}

    def history(*args: str) -> str:
        done = subprocess.run(
            [*CICD, "history", *args], env=env, capture_output=True, text=True, check=True
        )
        return done.stdout

    builds = json.loads(history("builds", "--repo", "app", "--format", "json"))
    assert [b["commit"] for b in builds] == [sha]
    tests = json.loads(history("tests", "--repo", "app", "--since", "1d", "--format", "json"))
    assert len(tests) == 3
    assert history("tests", "--format", "csv").splitlines()[0].startswith("repository,")
    assert "app" in history("builds")


def test_unreachable_repository_is_a_usage_error(tmp_path):
    config = control_config(tmp_path, {"gone": tmp_path / "missing"})
    env = {**os.environ, "CICD_CONFIG": str(config)}
    done = subprocess.run([*CICD, "run", "gone"], env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert "missing" in done.stderr


def test_dependency_env_is_reused_while_cache_files_are_unchanged(tmp_path, repo):
    installs = tmp_path / "installs.log"
    pipeline = pipeline_writing_reports().replace(
        "build:\n",
        f'build:\n  install: "echo installed >> {installs}"\n  cache: [requirements.txt]\n',
    )
    config = control_config(tmp_path, {"app": repo})
    first = commit(repo, {".cicd.yml": pipeline, "requirements.txt": "six==1.16.0\n"})
    second = commit(repo, {"README": "docs only"}, "docs: readme")
    third = commit(repo, {"requirements.txt": "six==1.17.0\n"}, "build: bump six")
    for sha in (first, second, third):
        assert ci(config, "app", sha)["status"] == "success"
    # Installed for the first commit, reused by the second, again for the changed file.
    assert installs.read_text().count("installed") == 2


def benchmark_json(mean: float) -> str:
    stats = {
        "mean": mean,
        "median": mean,
        "stddev": 0.0,
        "min": mean,
        "max": mean,
        "rounds": 5,
        "ops": 1 / mean,
    }
    return json.dumps(
        {"benchmarks": [{"name": "test_total", "fullname": "bench.py::test_total", "stats": stats}]}
    )


def performance_pipeline(mean: float, max_regression: float) -> dict[str, str]:
    """Files of a commit whose performance stage reports one benchmark with this mean."""
    report = junit_xml(1)
    pipeline = pipeline_writing_reports() + (
        "  performance:\n"
        "    run:\n"
        f"      - printf '%s' '{report}' > \"$CICD_REPORTS_DIR/perf.xml\"\n"
        '      - cp bench.json "$CICD_REPORTS_DIR/"\n'
        f"gates:\n  max_perf_regression: {max_regression}\n"
    )
    return {".cicd.yml": pipeline, "bench.json": benchmark_json(mean)}


def perf_gate(report: dict) -> dict:
    return next(g for g in report["gates"] if g["name"] == "performance.max_perf_regression")


def test_benchmarks_are_compared_with_the_last_green_default_branch_run(tmp_path, repo):
    config = control_config(tmp_path, {"app": repo})
    first = ci(config, "app", commit(repo, performance_pipeline(0.010, 0.5)))
    assert first["status"] == "success"
    assert "no green baseline" in perf_gate(first)["detail"]

    slower = ci(config, "app", commit(repo, performance_pipeline(0.020, 0.5), "perf: slower"))
    assert perf_gate(slower)["passed"] is False
    assert "+100.0%" in perf_gate(slower)["detail"]
    assert slower["status"] == "failed"

    # The red run is no baseline: the next commit is compared with the green one.
    faster = ci(config, "app", commit(repo, performance_pipeline(0.012, 0.5), "perf: faster"))
    assert perf_gate(faster)["passed"] is True
    assert "+20.0%" in perf_gate(faster)["detail"]


@pytest.mark.slow
def test_real_project_counts_equal_what_pytest_reports(tmp_path, repo):
    """more-itertools' own suite through `cicd run`, against pytest run by hand."""
    download = tmp_path / "sdist"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
         ":all:", "more-itertools==10.5.0", "-d", str(download)],
        check=True,
    )  # fmt: skip
    archive = next(download.glob("more?itertools-*.tar.gz"))
    subprocess.run(["tar", "-xzf", str(archive), "-C", str(tmp_path)], check=True)
    source = next(tmp_path.glob("more?itertools-*/"))
    source.rename(repo)
    pipeline = (
        "build:\n"
        "  install: uv pip install --quiet pytest\n"
        "tests:\n"
        "  unit:\n"
        "    run: python -m pytest -q -p no:cacheprovider tests"
        ' --junitxml="$CICD_REPORTS_DIR/unit.xml"\n'
    )
    sha = commit(repo, {".cicd.yml": pipeline}, "ci: pipeline")
    report = ci(control_config(tmp_path, {"more-itertools": repo}), "more-itertools", sha)
    unit = report["stages"]["unit"]

    counts = pytest_counts(run_pytest(repo, "tests"))
    assert unit["passed"] == counts.get("passed", 0)
    assert unit["skipped"] == counts.get("skipped", 0)
    assert unit["failed"] == counts.get("failed", 0)
    assert unit["tests"] > 600


def test_retry_of_a_failed_test_stage_sees_the_build_outputs(tmp_path, repo):
    """A flaky test fails once; the retry reuses the build and still finds what it made."""
    flaky = tmp_path / "failed-once"
    pipeline = (
        "build:\n"
        "  steps: [echo generated > gen.txt]\n"
        "tests:\n"
        "  unit:\n"
        "    run:\n"
        f"      - test -f {flaky} || {{ touch {flaky}; exit 1; }}\n"
        "      - test -f gen.txt\n"
        f"      - printf '%s' '{junit_xml(1)}' > \"$CICD_REPORTS_DIR/unit.xml\"\n"
    )
    sha = commit(repo, {".cicd.yml": pipeline})
    config = control_config(tmp_path, {"app": repo})
    assert ci(config, "app", sha)["stages"]["unit"]["status"] == "failed"
    retry = ci(config, "app", sha)
    assert retry["stages"]["build"].get("reused") is True
    assert retry["stages"]["unit"]["status"] == "success"


def test_stage_materialized_before_its_source_says_what_to_do(tmp_path, repo):
    sha = commit(repo, {".cicd.yml": pipeline_writing_reports()})
    config = load_control_config(control_config(tmp_path, {"app": repo}))
    instance = use_instance(config)
    instance.add_dynamic_partitions("app_commits", [sha])
    job = build_definitions(config, stream_logs=False).resolve_job_def("app_ci")
    result = job.execute_in_process(
        instance=instance,
        partition_key=sha,
        asset_selection=[AssetKey(["app", "build"])],
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = result.get_step_failure_events()
    assert "materialize source" in failure.step_failure_data.user_failure_data.description
    stages = HistoryStore(config.history_db_url).stage_rows("app", sha)
    assert stages.set_index("name").loc["build", "status"] == "failed"
