"""The plan diff of `cicd infra`: observed environments in, changes out."""

import os
import resource
from pathlib import Path

from cicd_dagster.deploy.infra import ObservedEnvironment, ObservedSlot, diff, orphans
from cicd_dagster.deploy.local import process_limits
from cicd_dagster.deploy.target import Limits

LIMITS = Limits(memory_mb=512, max_open_files=256)


def live(**overrides) -> ObservedEnvironment:
    """A healthy live environment: two slots running behind a running router."""
    values = dict(
        repository="shop",
        environment="prod",
        configured=True,
        folder=Path("/home/environments/shop/prod"),
        folder_exists=True,
        port=18080,
        live_version="a" * 40,
        router_url="http://127.0.0.1:18080",
        router_config=True,
        router_running=True,
        router_weights={"prod.a.0": 100, "prod.a.1": 100},
        slots=[
            ObservedSlot("prod.a.0", 100, "running", LIMITS, LIMITS),
            ObservedSlot("prod.a.1", 100, "running", LIMITS, None),
        ],
    )
    return ObservedEnvironment(**{**values, **overrides})


def actions(changes) -> list[tuple[str, str, str]]:
    return [(c.action, c.resource, c.name) for c in changes]


def test_an_environment_running_as_deployed_needs_nothing():
    assert diff(live()) == []


def test_a_never_provisioned_environment_needs_its_folder_and_port_which_are_not_drift():
    changes = diff(ObservedEnvironment("shop", "dev", True, Path("/h/dev"), False, None, None))
    assert actions(changes) == [
        ("create", "folder", "/h/dev"),
        ("create", "port", "dev"),
    ]
    assert not any(change.is_drift for change in changes)


def test_slots_gone_crashed_or_with_other_limits_are_drift():
    slots = [
        ObservedSlot("prod.a.0", 100, None, LIMITS),
        ObservedSlot("prod.a.1", 100, "crashed", LIMITS),
        ObservedSlot("prod.a.2", 0, "running", LIMITS, Limits(memory_mb=512, max_open_files=64)),
        ObservedSlot("prod.a.3", 100, "restarting", LIMITS),  # its supervisor is on it
    ]
    weights = {"prod.a.0": 100, "prod.a.1": 100, "prod.a.2": 0, "prod.a.3": 100}
    changes = diff(live(slots=slots, router_weights=weights))
    assert actions(changes) == [
        ("create", "slot", "prod.a.0"),
        ("restart", "slot", "prod.a.1"),
        ("update", "limits", "prod.a.2"),
    ]
    assert all(change.is_drift for change in changes)
    assert "max_open_files=64" in changes[2].reason


def test_a_container_of_another_image_is_drift_before_its_limits():
    release = "cicd/shop:aaaaaaaaaaaa-0123456789ab"
    slots = [
        ObservedSlot("prod.a.0", 100, "running", LIMITS, LIMITS, release, release),
        ObservedSlot("prod.a.1", 100, "running", LIMITS, Limits(), release, "busybox:latest"),
    ]
    changes = diff(live(slots=slots))
    assert actions(changes) == [("update", "image", "prod.a.1")]
    assert changes[0].is_drift
    assert changes[0].reason == f"runs image busybox:latest, the release's is {release}"


def test_a_slot_the_target_cannot_read_is_drift_with_the_reason():
    reason = "slot prod.a.0: the container name cicd-x is taken by a container that is not ours"
    slots = [
        ObservedSlot("prod.a.0", 100, None, LIMITS, unreadable=reason),
        ObservedSlot("prod.a.1", 100, "running", LIMITS),
    ]
    [change] = diff(live(slots=slots))
    assert (change.action, change.resource, change.name, change.reason) == (
        "restart",
        "slot",
        "prod.a.0",
        reason,
    )


def test_limits_the_release_leaves_unset_are_not_compared():
    found = Limits(memory_mb=512, max_open_files=256)
    slots = [ObservedSlot("prod.a.0", 100, "running", Limits(max_open_files=256), found)]
    assert diff(live(slots=slots, router_weights={"prod.a.0": 100})) == []


def test_router_missing_stopped_or_reweighted():
    url = "http://127.0.0.1:18080"
    assert actions(diff(live(router_config=False, router_running=False))) == [
        ("create", "router", url)
    ]
    assert actions(diff(live(router_running=False))) == [("restart", "router", url)]
    changes = diff(live(router_weights={"prod.a.0": 100}))
    assert actions(changes) == [("update", "router", url)]


def test_a_router_left_running_without_a_live_version_is_deleted():
    observed = live(live_version=None, slots=[], router_weights={})
    assert actions(diff(observed)) == [("delete", "router", "http://127.0.0.1:18080")]


def test_an_environment_removed_from_cicd_yaml_is_deleted_only_while_something_runs():
    running = live(configured=False)
    assert actions(diff(running)) == [("delete", "environment", "prod")]
    stopped = live(
        configured=False,
        router_running=False,
        slots=[ObservedSlot("prod.a.0", 100, "stopped", LIMITS)],
    )
    assert diff(stopped) == []


def test_orphans_are_running_slots_no_state_knows():
    changes = orphans(
        "shop",
        running=["prod.a.0", "prod.b.0", "qa.c.0"],
        known={"prod.a.0"},
        configured={"prod"},
    )
    assert actions(changes) == [("delete", "slot", "prod.b.0"), ("delete", "slot", "qa.c.0")]
    assert [c.environment for c in changes] == ["prod", "qa"]
    assert "not in cicd.yaml" in changes[1].reason


def test_process_limits_reads_the_soft_rlimits_of_a_live_process():
    limits = process_limits(os.getpid())
    assert limits is not None
    soft_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert limits.max_open_files == (None if soft_files == resource.RLIM_INFINITY else soft_files)
    assert process_limits(None) is None
