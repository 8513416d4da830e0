"""The asset graph for a two-repository config, compared with a snapshot.

An accidental change to asset keys, checks, jobs or sensors shows up here as a diff.
Regenerate deliberately with CICD_UPDATE_SNAPSHOTS=1.
"""

import json
import os
from pathlib import Path

from dagster import Definitions

from cicd_dagster.config import load_control_config
from cicd_dagster.definitions import build_definitions

SNAPSHOT = Path(__file__).with_name("snapshots") / "definitions.json"


def two_repository_definitions(tmp_path: Path) -> Definitions:
    config = tmp_path / "cicd.yaml"
    config.write_text(
        "repositories:\n"
        "  - {name: shop-api, url: /srv/git/shop-api, poll_interval_s: 60}\n"
        "  - {name: billing, url: 'https://example.invalid/billing.git', tags: ['v*']}\n"
        "environments:\n"
        "  - {name: dev, qa: true}\n"
        "  - name: prod-eu\n"
        "    strategy: {type: blue_green}\n"
        "    approvals: {required: 1, roles: [release-manager]}\n"
    )
    return build_definitions(load_control_config(config))


def graph_of(defs: Definitions) -> dict:
    repository = defs.get_repository_def()
    graph = repository.asset_graph
    return {
        "assets": {
            "/".join(key.path): {
                "group": graph.get(key).group_name,
                "deps": sorted("/".join(dep.path) for dep in graph.get(key).parent_keys),
                "partitions": getattr(graph.get(key).partitions_def, "name", None),
            }
            for key in sorted(graph.get_all_asset_keys())
        },
        "checks": sorted(
            f"{'/'.join(check.asset_key.path)}:{check.name}" for check in graph.asset_check_keys
        ),
        "blocking_checks": sorted(
            f"{'/'.join(spec.asset_key.path)}:{spec.name}"
            for assets_def in repository.assets_defs_by_key.values()
            for spec in assets_def.check_specs
            if spec.blocking
        ),
        "jobs": sorted(job.name for job in repository.get_all_jobs()),
        "sensors": {
            sensor.name: sensor.minimum_interval_seconds for sensor in repository.sensor_defs
        },
        "schedules": {
            schedule.name: [
                schedule.cron_schedule,
                schedule.job_name,
                schedule.default_status.value,
            ]
            for schedule in repository.schedule_defs
        },
    }


def test_definitions_load_and_validate(tmp_path):
    defs = two_repository_definitions(tmp_path)
    Definitions.validate_loadable(defs)


def test_asset_graph_matches_the_snapshot(tmp_path):
    graph = graph_of(two_repository_definitions(tmp_path))
    if os.environ.get("CICD_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(graph, indent=2, sort_keys=True) + "\n")
    assert graph == json.loads(SNAPSHOT.read_text())


def test_the_rescan_schedule_follows_cicd_yaml(tmp_path):
    config = tmp_path / "cicd.yaml"
    config.write_text(
        "repositories: [{name: app, url: /srv/git/app}]\n"
        "security: {rescan_schedule: '30 1 * * mon-fri'}\n"
    )
    schedule = build_definitions(load_control_config(config)).resolve_schedule_def(
        "security_rescan_schedule"
    )
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("30 1 * * mon-fri", "UTC")
