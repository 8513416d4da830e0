"""cicd.yaml and .cicd.yml: what loads, what it loads as, and how errors point at the problem."""

from collections.abc import Callable
from pathlib import Path
from textwrap import dedent

import pytest

from cicd_dagster import config
from cicd_dagster.config import (
    ConfigError,
    ControlConfig,
    RepositoryConfig,
    load_control_config,
    load_pipeline_config,
    parse_pipeline_config,
)

# The examples of DESIGN.md ("Contracts users rely on"), verbatim.
DESIGN_CICD_YAML = """\
home: .cicd                      # state: workspaces, caches, artifact store, DB (relative to this file)
history_db: sqlite:///.cicd/history.db     # any SQLAlchemy URL, e.g. postgresql+psycopg://...
repositories:
  - name: shop-api               # [a-z0-9][a-z0-9_-]*, used in asset keys
    url: /srv/git/shop-api       # anything `git clone` accepts
    branches: ["main", "release/*"]   # fnmatch patterns; default: the default branch
    tags: ["v*"]
environments:                    # the promotion chain, in order
  - name: dev
    target: {type: local}
    auto_deploy: true            # deploy every green commit of the default branch
  - name: staging
    target: {type: docker}
    strategy: {type: rolling}
  - name: prod
    strategy: {type: blue_green} # or {type: canary, steps: [10, 50, 100], analysis: {...}}
    approvals: {required: 1, roles: [release-manager]}
users: {ops-lead: {roles: [release-manager]}}   # access control; tokens stored only as hashes
notifications: [{type: webhook, url: "http://127.0.0.1:9000/hook", events: [failed, deployed, rolled_back, released]}]
security: {advisory_db: ./advisories, fail_on: high, licenses: {deny: [AGPL-3.0-only]}}
"""  # noqa: E501

DESIGN_PIPELINE_YAML = """\
build:
  install: pip install -r requirements.txt   # string or list; runs in an isolated env per build
  cache: [requirements.txt, pyproject.toml]  # content hash keys the dependency cache
  steps: [python -m build --wheel]           # compilation, asset building
  artifacts: ["dist/*.whl"]                  # globs relative to the checkout
tests:                                       # any of unit, integration, e2e, performance
  unit: {run: 'pytest tests/unit --junitxml="$CICD_REPORTS_DIR/unit.xml"'}
  performance: {run: 'pytest bench --benchmark-json="$CICD_REPORTS_DIR/bench.json"'}
gates: {min_pass_rate: 1.0, max_perf_regression: 0.10}
service: {run: 'python -m app --port "$PORT"', health: /healthz}
"""

SOURCE = "shop-api@1a2b3c4:.cicd.yml"

WriteConfig = Callable[[str], Path]


@pytest.fixture
def write_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WriteConfig:
    """Writes cicd.yaml into tmp_path, the working directory, and returns the relative path
    "cicd.yaml", so errors name the file exactly as a user passes it."""
    monkeypatch.chdir(tmp_path)

    def write(text: str) -> Path:
        path = Path("cicd.yaml")
        path.write_text(dedent(text), encoding="utf-8")
        return path

    return write


def control_config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        load_control_config(path)
    return raised.value


def pipeline_config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        parse_pipeline_config(dedent(text), SOURCE)
    return raised.value


# --- cicd.yaml that loads ------------------------------------------------------------------


def test_design_example_of_cicd_yaml_loads(tmp_path: Path) -> None:
    path = tmp_path / "cicd.yaml"
    path.write_text(DESIGN_CICD_YAML, encoding="utf-8")

    loaded = load_control_config(path)

    assert loaded.config_path == path
    assert loaded.base_dir == tmp_path
    assert loaded.home == tmp_path / ".cicd"
    assert loaded.history_db_url == f"sqlite:///{tmp_path}/.cicd/history.db"
    [repository] = loaded.repositories
    assert repository.name == "shop-api"
    assert repository.url == "/srv/git/shop-api"
    assert repository.branches == ["main", "release/*"]
    assert repository.tags == ["v*"]
    assert repository.default_branch is None
    assert (repository.poll_interval_s, repository.keep_workspaces) == (30, 20)
    dev, staging, prod = loaded.environments
    assert (dev.name, dev.target.type, dev.auto_deploy) == ("dev", "local", True)
    assert (staging.target.type, staging.strategy.type) == ("docker", "rolling")
    assert (prod.target.type, prod.strategy.type) == ("local", "blue_green")
    assert prod.approvals is not None
    assert (prod.approvals.required, prod.approvals.roles) == (1, ["release-manager"])
    assert loaded.users["ops-lead"].roles == ["release-manager"]
    [notification] = loaded.notifications
    assert notification.url == "http://127.0.0.1:9000/hook"
    assert notification.events == ["failed", "deployed", "rolled_back", "released"]
    assert loaded.security.advisory_db == tmp_path / "advisories"
    assert loaded.security.fail_on == "high"
    assert loaded.security.licenses.deny == ["AGPL-3.0-only"]


def test_minimal_cicd_yaml_gets_defaults_under_its_folder(write_config: WriteConfig) -> None:
    loaded = load_control_config(
        write_config("""\
            repositories:
              - name: shop-api
                url: https://git.example.com/shop-api.git
            """)
    )

    home = Path.cwd() / ".cicd"
    assert loaded.home == home
    assert loaded.dagster_home == home / "dagster"
    assert loaded.git_dir == home / "git"
    assert loaded.workspaces_dir == home / "workspaces"
    assert loaded.runs_dir == home / "runs"
    assert loaded.envs_dir == home / "envs"
    assert loaded.history_db_url == f"sqlite:///{home}/history.db"
    assert loaded.repositories[0].branches is None
    assert loaded.environments == []
    assert loaded.notifications == []
    assert loaded.security.advisory_db is None


def test_relative_home_and_sqlite_url_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "deploy"
    config_dir.mkdir()
    (config_dir / "cicd.yaml").write_text(
        dedent("""\
            home: state/../var/cicd
            history_db: sqlite+pysqlite:///db/history.db?timeout=30
            repositories: [{name: app, url: /srv/git/app}]
            """),
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)  # somewhere else than the config's folder

    loaded = load_control_config(Path("deploy/cicd.yaml"))

    assert loaded.base_dir == config_dir
    assert loaded.home == config_dir / "var" / "cicd"
    assert loaded.history_db_url == f"sqlite+pysqlite:///{config_dir}/db/history.db?timeout=30"


@pytest.mark.parametrize(
    "history_db",
    [
        "sqlite:////var/lib/cicd/history.db",
        "sqlite://",
        "sqlite:///:memory:",
        "postgresql+psycopg://cicd@db.example.com/cicd",
    ],
)
def test_absolute_memory_and_server_db_urls_are_kept(
    write_config: WriteConfig, history_db: str
) -> None:
    loaded = load_control_config(
        write_config(f"""\
            history_db: "{history_db}"
            repositories: [{{name: app, url: /srv/git/app}}]
            """)
    )

    assert loaded.history_db_url == history_db


def test_relative_repository_urls_resolve_against_the_config_folder(
    write_config: WriteConfig,
) -> None:
    Path("demo").mkdir()
    loaded = load_control_config(
        write_config("""\
            repositories:
              - {name: dot-slash, url: ./demo}
              - {name: dot-dot, url: ../elsewhere}
              - {name: existing, url: demo}
              - {name: not-on-disk, url: missing-repo}
              - {name: absolute, url: /srv/git/app}
              - {name: https, url: "https://git.example.com/app.git"}
              - {name: ssh, url: "ssh://git@git.example.com/app.git"}
              - {name: file, url: "file:///srv/git/app"}
              - {name: scp, url: "git@git.example.com:team/app.git"}
            """)
    )

    base_dir = Path.cwd()
    urls = {repository.name: repository.url for repository in loaded.repositories}
    assert urls == {
        "dot-slash": str(base_dir / "demo"),
        "dot-dot": str(base_dir.parent / "elsewhere"),
        "existing": str(base_dir / "demo"),
        "not-on-disk": "missing-repo",
        "absolute": "/srv/git/app",
        "https": "https://git.example.com/app.git",
        "ssh": "ssh://git@git.example.com/app.git",
        "file": "file:///srv/git/app",
        "scp": "git@git.example.com:team/app.git",
    }


def test_canary_without_steps_gets_10_50_100(write_config: WriteConfig) -> None:
    loaded = load_control_config(
        write_config("""\
            repositories: [{name: app, url: /srv/git/app}]
            environments:
              - {name: prod, strategy: {type: canary, analysis: {max_error_rate: 0.01}}}
            """)
    )

    strategy = loaded.environments[0].strategy
    assert strategy.steps == [10, 50, 100]
    assert strategy.analysis == {"max_error_rate": 0.01}


def test_notification_events_default_to_all(write_config: WriteConfig) -> None:
    loaded = load_control_config(
        write_config("""\
            repositories: [{name: app, url: /srv/git/app}]
            notifications: [{type: smtp, url: "smtp://127.0.0.1:2525", to: [ops@example.com]}]
            """)
    )

    assert loaded.notifications[0].events == [
        "failed",
        "deployed",
        "rolled_back",
        "approval_requested",
        "released",
        "security_finding",
    ]


def test_models_built_in_code_resolve_against_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    built = ControlConfig(repositories=[RepositoryConfig(name="app", url="./app")])

    assert built.config_path == tmp_path / "cicd.yaml"
    assert built.home == tmp_path / ".cicd"
    assert built.repositories[0].url == str(tmp_path / "app")


# --- cicd.yaml errors: file, line, field ---------------------------------------------------


def test_wrong_type_deep_in_a_list_names_line_and_field(write_config: WriteConfig) -> None:
    error = control_config_error(
        write_config("""\
            repositories:
              - name: shop-api
                url: /srv/git/shop-api
              - name: billing
                url: /srv/git/billing
                tags: [v*]
                branches: main
            """)
    )

    assert str(error) == "cicd.yaml:7: repositories[1].branches: Input should be a valid list"
    assert (error.path, error.line, error.field) == ("cicd.yaml", 7, "repositories[1].branches")


def test_unknown_key_suggests_the_closest_field(write_config: WriteConfig) -> None:
    error = control_config_error(
        write_config("""\
            repositories:
              - name: shop-api
                url: /srv/git/shop-api
                brnaches: [main]
            """)
    )

    assert str(error) == (
        'cicd.yaml:4: repositories[0].brnaches: unknown field "brnaches" (did you mean "branches"?)'
    )


def test_unknown_key_in_a_mapping_of_models_suggests_the_closest_field(
    write_config: WriteConfig,
) -> None:
    error = control_config_error(
        write_config("""\
            repositories: [{name: app, url: /srv/git/app}]
            users:
              ops-lead: {rolez: [release-manager]}
            """)
    )

    assert str(error) == (
        'cicd.yaml:3: users.ops-lead.rolez: unknown field "rolez" (did you mean "roles"?)'
    )


def test_unknown_key_with_nothing_close_lists_the_allowed_fields(
    write_config: WriteConfig,
) -> None:
    error = control_config_error(
        write_config("""\
            repositories: [{name: app, url: /srv/git/app}]
            environments:
              - name: prod
                target: {type: docker, colour: blue}
            """)
    )

    assert str(error) == (
        'cicd.yaml:4: environments[0].target.colour: unknown field "colour" '
        "(allowed: type, base_image, dockerfile, memory_mb, cpus, max_open_files)"
    )
    assert "did you mean" not in str(error)


def test_unclosed_bracket_names_where_the_parser_stopped_and_where_it_opened(
    write_config: WriteConfig,
) -> None:
    error = control_config_error(
        write_config("""\
            repositories:
              - name: app
                url: /srv/git/app
                branches: [main, release/*
                tags: [v*]
            """)
    )

    assert str(error) == (
        "cicd.yaml:5: expected ',' or ']', but got ':'"
        " (while parsing a flow sequence started at line 4)"
    )


def test_tab_indentation_is_a_yaml_error_on_its_line(write_config: WriteConfig) -> None:
    error = control_config_error(
        write_config("repositories:\n  - name: app\n\turl: /srv/git/app\n")
    )

    assert error.line == 3
    assert str(error).startswith("cicd.yaml:3: found character '\\t' that cannot start any token")
    assert "indent with spaces" in str(error)


def test_duplicate_key_is_an_error_on_the_second_occurrence(write_config: WriteConfig) -> None:
    error = control_config_error(
        write_config("""\
            repositories:
              - name: app
                url: /srv/git/app
                url: /srv/git/other
            """)
    )

    assert str(error) == (
        'cicd.yaml:4: found duplicate key "url" with value "/srv/git/other"'
        ' (original value: "/srv/git/app")'
    )


def test_duplicate_repository_name_points_at_the_second_one(write_config: WriteConfig) -> None:
    error = control_config_error(
        write_config("""\
            repositories:
              - name: shop-api
                url: /srv/git/shop-api
              - name: billing
                url: /srv/git/billing
              - url: /srv/git/shop-api-fork
                name: shop-api
            """)
    )

    assert str(error) == (
        'cicd.yaml:7: repositories[2].name: duplicate name "shop-api"'
        " (first used by repositories[0])"
    )


def test_names_that_share_a_dagster_name_are_refused(write_config: WriteConfig) -> None:
    error = control_config_error(
        write_config("""\
            repositories:
              - name: shop-api
                url: /srv/git/shop-api
              - name: shop_api
                url: /srv/git/shop_api
            """)
    )

    assert str(error) == (
        'cicd.yaml:4: repositories[1].name: name "shop_api" clashes with "shop-api"'
        " (repositories[0]): Dagster names turn '-' into '_'"
    )


def test_duplicate_environment_name_points_at_the_second_one(write_config: WriteConfig) -> None:
    error = control_config_error(
        write_config("""\
            repositories: [{name: app, url: /srv/git/app}]
            environments:
              - name: prod
              - name: prod
            """)
    )

    assert str(error) == (
        'cicd.yaml:4: environments[1].name: duplicate name "prod" (first used by environments[0])'
    )


@pytest.mark.parametrize("name", ["Shop API", "../x", "-leading-dash", "a" * 65])
def test_repository_names_outside_the_asset_key_alphabet_are_rejected(
    write_config: WriteConfig, name: str
) -> None:
    error = control_config_error(
        write_config(f"""\
            repositories:
              - url: /srv/git/app
                name: "{name}"
            """)
    )

    assert str(error) == (
        f'cicd.yaml:3: repositories[0].name: "{name}" is not a valid name: use lowercase'
        ' letters, digits, "-" and "_", starting with a letter or digit, at most 64 characters'
    )


def test_secret_name_with_a_dollar_is_rejected(write_config: WriteConfig) -> None:
    error = control_config_error(
        write_config("""\
            repositories:
              - name: app
                url: /srv/git/app
                secrets:
                  - DEPLOY_TOKEN
                  - $PYPI_TOKEN
            """)
    )

    assert str(error) == (
        'cicd.yaml:6: repositories[0].secrets[1]: "$PYPI_TOKEN" is not a valid environment'
        ' variable name: use letters, digits and "_", not starting with a digit'
        ' (write the name without "$")'
    )


def test_canary_steps_must_increase(write_config: WriteConfig) -> None:
    error = control_config_error(
        write_config("""\
            repositories: [{name: app, url: /srv/git/app}]
            environments:
              - name: prod
                strategy:
                  type: canary
                  steps: [10, 50, 25]
            """)
    )

    assert str(error) == (
        "cicd.yaml:6: environments[0].strategy.steps: steps must increase, but 50 is followed by 25"
    )


def test_webhook_without_url_is_rejected(write_config: WriteConfig) -> None:
    error = control_config_error(
        write_config("""\
            repositories: [{name: app, url: /srv/git/app}]
            notifications:
              - type: webhook
                events: [failed]
            """)
    )

    assert str(error) == "cicd.yaml:3: notifications[0]: a webhook notification needs a url"


def test_missing_repositories_is_reported_at_the_top(write_config: WriteConfig) -> None:
    error = control_config_error(write_config("home: .cicd\n"))

    assert str(error) == "cicd.yaml:1: repositories: Field required"


def test_every_problem_is_reported_in_line_order(write_config: WriteConfig) -> None:
    error = control_config_error(
        write_config("""\
            repositories:
              - name: app
                url: /srv/git/app
                poll_interval_s: 1
            environments: {name: prod}
            """)
    )

    assert str(error).splitlines() == [
        "cicd.yaml:4: repositories[0].poll_interval_s: Input should be greater than or equal to 5",
        "cicd.yaml:5: environments: Input should be a valid list",
    ]
    assert len(error.further_errors) == 1


def test_empty_cicd_yaml_is_an_error(write_config: WriteConfig) -> None:
    assert str(control_config_error(write_config("# nothing yet\n"))) == "cicd.yaml: is empty"


def test_missing_cicd_yaml_is_an_error(write_config: WriteConfig) -> None:
    error = control_config_error(Path("cicd.yaml"))

    assert str(error) == "cicd.yaml: does not exist"


def test_top_level_list_is_an_error(write_config: WriteConfig) -> None:
    error = control_config_error(write_config("- name: app\n  url: /srv/git/app\n"))

    assert str(error) == "cicd.yaml:1: must be a mapping of settings, not a list"


def test_bytes_that_are_not_utf8_name_their_line(write_config: WriteConfig) -> None:
    path = write_config("")
    path.write_bytes(b"repositories:\n  - name: caf\xe9\n")

    assert str(control_config_error(path)) == "cicd.yaml:2: is not valid UTF-8 text"


# --- .cicd.yml -----------------------------------------------------------------------------


def test_design_example_of_pipeline_yaml_loads() -> None:
    pipeline = parse_pipeline_config(DESIGN_PIPELINE_YAML, SOURCE)

    assert pipeline.build.install == ["pip install -r requirements.txt"]
    assert pipeline.build.cache == ["requirements.txt", "pyproject.toml"]
    assert pipeline.build.steps == ["python -m build --wheel"]
    assert pipeline.build.artifacts == ["dist/*.whl"]
    assert pipeline.build.timeout_s == 1800
    unit = pipeline.tests.unit
    performance = pipeline.tests.performance
    assert unit is not None
    assert performance is not None
    assert unit.run == ['pytest tests/unit --junitxml="$CICD_REPORTS_DIR/unit.xml"']
    assert (unit.reports, unit.benchmarks) == ("**/*.xml", None)
    assert performance.benchmarks == "**/*.json"
    assert pipeline.tests.stages() == {
        "unit": unit,
        "integration": None,
        "e2e": None,
        "performance": performance,
    }
    assert (pipeline.gates.min_pass_rate, pipeline.gates.max_perf_regression) == (1.0, 0.10)
    assert pipeline.gates.min_coverage is None
    assert pipeline.service is not None
    assert pipeline.service.run == 'python -m app --port "$PORT"'
    assert (pipeline.service.health, pipeline.service.port_env) == ("/healthz", "PORT")


def test_load_pipeline_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / ".cicd.yml"
    path.write_text(DESIGN_PIPELINE_YAML, encoding="utf-8")

    assert load_pipeline_config(path) == parse_pipeline_config(DESIGN_PIPELINE_YAML, SOURCE)


def test_commands_accept_a_string_or_a_list() -> None:
    pipeline = parse_pipeline_config(
        dedent("""\
            build:
              install:
                - pip install -U pip
                - pip install -e .
              steps: make
            tests:
              unit: {run: pytest}
              e2e:
                run: [./start.sh, pytest e2e]
            """),
        SOURCE,
    )

    assert pipeline.build.install == ["pip install -U pip", "pip install -e ."]
    assert pipeline.build.steps == ["make"]
    assert pipeline.tests.stages()["unit"] == config.TestStageConfig(run=["pytest"])
    e2e = pipeline.tests.e2e
    assert e2e is not None
    assert e2e.run == ["./start.sh", "pytest e2e"]


def test_sections_left_out_or_empty_take_their_defaults() -> None:
    pipeline = parse_pipeline_config("build: {}\n", SOURCE)

    assert pipeline.build == config.BuildConfig()
    assert pipeline.tests.stages() == dict.fromkeys(["unit", "integration", "e2e", "performance"])
    assert pipeline.env == {}


def test_hostile_but_valid_strings_load_unchanged() -> None:
    pipeline = parse_pipeline_config(
        dedent("""\
            build:
              steps:
                - $(touch /tmp/p)
                - echo "`id`; rm -rf ~" && printf '%s' "$HOME"
                - echo 'héllo wörld ✓ 🚀 日本語'
            env:
              GREETING: "ünïcödé $(whoami) ${PATH} \\u202e"
            """),
        SOURCE,
    )

    assert pipeline.build.steps == [
        "$(touch /tmp/p)",
        'echo "`id`; rm -rf ~" && printf \'%s\' "$HOME"',
        "echo 'héllo wörld ✓ 🚀 日本語'",
    ]
    assert pipeline.env == {"GREETING": "ünïcödé $(whoami) ${PATH} \u202e"}


def test_env_values_written_as_integers_or_booleans_become_text() -> None:
    pipeline = parse_pipeline_config("env: {PORT: 8080, DEBUG: true, NAME: app}\n", SOURCE)

    assert pipeline.env == {"PORT": "8080", "DEBUG": "true", "NAME": "app"}


def test_env_value_with_a_decimal_point_must_be_quoted() -> None:
    error = pipeline_config_error("""\
        env:
          PYTHON_VERSION: 3.10
        """)

    assert str(error) == (
        f"{SOURCE}:2: env.PYTHON_VERSION: YAML reads this as the number 3.1"
        " (3.10 would become 3.1): put the value in quotes to keep it as written"
    )


def test_env_value_that_is_a_list_is_rejected() -> None:
    error = pipeline_config_error("""\
        env:
          PATHS: [a, b]
        """)

    assert str(error) == f"{SOURCE}:2: env.PATHS: Input should be a valid string"


def test_env_name_must_be_a_variable_name() -> None:
    error = pipeline_config_error("""\
        env:
          OK: "1"
          NOT OK: "2"
        """)

    assert str(error) == (
        f'{SOURCE}:3: env.NOT OK: "NOT OK" is not a valid environment variable name:'
        ' use letters, digits and "_", not starting with a digit'
    )


def test_python_version_must_be_quoted() -> None:
    error = pipeline_config_error("build:\n  python: 3.10\n")

    assert (error.line, error.field) == (2, "build.python")
    assert "put the value in quotes" in error.message
    assert parse_pipeline_config('build: {python: "3.10"}\n', SOURCE).build.python == "3.10"


def test_artifact_glob_that_climbs_out_of_the_checkout_is_rejected() -> None:
    error = pipeline_config_error("""\
        build:
          artifacts:
            - dist/*.whl
            - ../../etc/passwd
        """)

    assert str(error) == (
        f'{SOURCE}:4: build.artifacts[1]: "../../etc/passwd" must stay inside its folder:'
        ' ".." is not allowed'
    )


def test_absolute_artifact_path_is_rejected() -> None:
    error = pipeline_config_error("""\
        build:
          artifacts: [/etc/passwd]
        """)

    assert str(error) == (
        f'{SOURCE}:2: build.artifacts[0]: "/etc/passwd" must be a relative path (it is absolute)'
    )


def test_report_glob_that_climbs_out_of_the_reports_folder_is_rejected() -> None:
    error = pipeline_config_error("""\
        tests:
          unit:
            run: pytest
            reports: junit/../../../secrets/*.xml
        """)

    assert error.line == 4
    assert error.field == "tests.unit.reports"
    assert '".." is not allowed' in error.message


def test_unknown_test_stage_suggests_the_closest_one() -> None:
    error = pipeline_config_error("""\
        tests:
          units: {run: pytest}
        """)

    assert str(error) == f'{SOURCE}:2: tests.units: unknown field "units" (did you mean "unit"?)'


def test_test_stage_needs_a_command() -> None:
    error = pipeline_config_error("""\
        tests:
          unit: {reports: "*.xml"}
        """)

    assert str(error) == f"{SOURCE}:2: tests.unit.run: Field required"


def test_blank_command_is_rejected() -> None:
    error = pipeline_config_error("""\
        build:
          steps:
            - make
            - "  "
        """)

    assert str(error) == f"{SOURCE}:4: build.steps[1]: a command must not be empty"


def test_pass_rate_above_one_is_rejected() -> None:
    error = pipeline_config_error("gates: {min_pass_rate: 95}\n")

    assert str(error) == (
        f"{SOURCE}:1: gates.min_pass_rate: Input should be less than or equal to 1"
    )


def test_pipeline_yaml_syntax_error_names_the_commit_source() -> None:
    error = pipeline_config_error("build:\n  steps: [make\n")

    assert error.path == SOURCE
    assert error.line == 3


def test_empty_pipeline_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / ".cicd.yml"
    path.write_text("", encoding="utf-8")

    with pytest.raises(ConfigError) as raised:
        load_pipeline_config(path)

    assert str(raised.value) == f"{path}: is empty"


def test_missing_pipeline_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / ".cicd.yml"

    with pytest.raises(ConfigError) as raised:
        load_pipeline_config(path)

    assert str(raised.value) == f"{path}: does not exist"


def test_pipeline_top_level_scalar_is_an_error() -> None:
    error = pipeline_config_error("pytest tests\n")

    assert str(error) == f"{SOURCE}: must be a mapping of settings, not the value 'pytest tests'"


@pytest.mark.timeout(60)  # guards against a hang; not a timing assertion
def test_nested_aliases_do_not_expand_into_a_billion_items() -> None:
    anchors = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 10)}]" for level in range(1, 10)
    ]
    # 10**10 strings if every alias were copied; the anchors sit under unknown keys.
    text = "\n".join(anchors) + "\nbuild:\n  steps: *a9\n"

    error = pipeline_config_error(text)

    assert str(error).splitlines()[0] == (
        f'{SOURCE}:1: a0: unknown field "a0" '
        "(allowed: build, tests, gates, service, qa, env, security)"
    )


def test_env_value_left_empty_must_be_written_as_empty_string() -> None:
    error = pipeline_config_error("""\
        env:
          EMPTY:
        """)

    assert str(error) == f'{SOURCE}:2: env.EMPTY: has no value: write "" for an empty string'


def test_merge_keys_share_settings_and_errors_point_at_the_merging_entry(
    write_config: WriteConfig,
) -> None:
    loaded = load_control_config(
        write_config("""\
            repositories:
              - &shared {name: app, url: /srv/git/app, poll_interval_s: 60}
              - <<: *shared
                name: app-fork
            """)
    )
    assert [(r.name, r.poll_interval_s) for r in loaded.repositories] == [
        ("app", 60),
        ("app-fork", 60),
    ]

    error = control_config_error(
        write_config("""\
            repositories:
              - name: app
                <<: {url: /srv/git/app, poll_interval_s: 1}
            """)
    )
    assert str(error) == (
        "cicd.yaml:2: repositories[0].poll_interval_s: Input should be greater than or equal to 5"
    )


@pytest.mark.parametrize(
    ("schedule", "problem"),
    [
        ("0 3 * *", "cron expression '0 3 * *' needs 5 fields"),
        ("61 3 * * *", "cron minute '61' in '61 3 * * *' is not in 0-59"),
        ("0 3 * 13 *", "cron month '13' in '0 3 * 13 *' is not in 1-12"),
        ("0 5-2 * * *", "cron hour range '5-2' in '0 5-2 * * *' is reversed"),
        ("0 3 * * */0", "cron day of week step 0"),
        ("0 3 ? * *", "cron day of month '?' in '0 3 ? * *' is not valid"),
    ],
)
def test_a_bad_rescan_schedule_is_named_at_its_line(
    write_config: WriteConfig, schedule: str, problem: str
) -> None:
    error = control_config_error(
        write_config(f"""\
            repositories: [{{name: app, url: /srv/git/app}}]
            security:
              rescan_schedule: "{schedule}"
            """)
    )
    assert str(error).startswith("cicd.yaml:3: security.rescan_schedule: ")
    assert problem in str(error)


@pytest.mark.parametrize("schedule", ["30 1 * * *", "*/15 1-5 * jan-mar mon-fri", "@daily"])
def test_cron_schedules_in_common_forms_are_accepted(
    write_config: WriteConfig, schedule: str
) -> None:
    path = write_config(f"""\
        repositories: [{{name: app, url: /srv/git/app}}]
        security: {{rescan_schedule: "{schedule}"}}
        """)
    assert config.load_control_config(path).security.rescan_schedule == schedule
