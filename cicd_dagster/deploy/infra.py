"""Infrastructure as code: the environments of cicd.yaml are the desired state.

plan() compares it with what runs and lists the changes that would make them agree;
apply() makes them, idempotently, so that a plan right after an apply is empty. What runs
is read from the environments' state folders (their live slots and releases), the
targets (which slots run, with which limits, and on docker which image) and the routers
(nginx running, with the weights of the state).

plan() changes nothing: an environment never provisioned shows its folder and port as
"create", and applying provisions them as a deploy would (environment_for).

Drift is a change to something that was provisioned: a slot gone, crashed or changed by
hand (its limits, its container's image), a router stopped or reconfigured, a slot or
environment that runs without cicd.yaml knowing it (an environment removed from it still
runs on the target its release ran on). Folders and ports not yet provisioned are not
drift.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cicd_dagster.config import ControlConfig, EnvironmentConfig, TargetConfig
from cicd_dagster.deploy.layout import environment_dir, router_dir, services_dir
from cicd_dagster.deploy.local import LocalSupervisor
from cicd_dagster.deploy.router import NginxRouter, RouterError, find_nginx
from cicd_dagster.deploy.strategies import Environment
from cicd_dagster.deploy.target import (
    ACTIVE_STATUSES,
    Limits,
    ServiceStatus,
    ServiceTarget,
    SupervisorError,
)
from cicd_dagster.stages.deploy import environment_for

Action = Literal["create", "update", "delete", "restart"]
Resource = Literal["folder", "port", "router", "slot", "limits", "image", "environment"]
_PROVISIONING: frozenset[Resource] = frozenset({"folder", "port"})
# Repaired by restarting the slot from its release.
_SLOT_REPAIRS: frozenset[Resource] = frozenset({"slot", "limits", "image"})


@dataclass(frozen=True)
class Change:
    repository: str
    environment: str
    action: Action
    resource: Resource
    name: str  # the folder, the router's address, the slot
    reason: str

    @property
    def is_drift(self) -> bool:
        return self.resource not in _PROVISIONING

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "drift": self.is_drift}


def existing_environment(
    config: ControlConfig, repository: str, environment: EnvironmentConfig
) -> Environment | None:
    """The environment if it was ever provisioned (a state folder or a router port), else
    None: unlike environment_for, this allocates nothing."""
    provisioned = (
        environment_dir(config.home, repository, environment.name).is_dir()
        or (router_dir(config.home, repository, environment.name) / "port").is_file()
    )
    return environment_for(config, repository, environment) if provisioned else None


# --- what runs, as plain data -------------------------------------------------------------


@dataclass(frozen=True)
class ObservedSlot:
    name: str
    weight: int
    status: ServiceStatus | None  # None: the target has no such slot
    wanted: Limits  # the release's
    found: Limits | None = None  # in force on what runs, when the target can tell
    image: str | None = None  # the release's (docker)
    found_image: str | None = None  # the container's
    unreadable: str | None = None  # why the target cannot tell the slot's state


@dataclass(frozen=True)
class ObservedEnvironment:
    repository: str
    environment: str
    configured: bool  # in cicd.yaml
    folder: Path
    folder_exists: bool
    port: int | None
    live_version: str | None
    router_url: str | None = None
    router_config: bool = False
    router_running: bool = False
    router_weights: dict[str, int] = field(default_factory=dict)
    slots: list[ObservedSlot] = field(default_factory=list)


def diff(observed: ObservedEnvironment) -> list[Change]:
    """The changes that bring one environment to what cicd.yaml wants."""
    repo, env = observed.repository, observed.environment

    def change(action: Action, resource: Resource, name: str, reason: str) -> Change:
        return Change(repo, env, action, resource, name, reason)

    running_slots = [s.name for s in observed.slots if s.status in ACTIVE_STATUSES]
    if not observed.configured:
        if running_slots or observed.router_running:
            what = ", ".join([*running_slots, *(["router"] if observed.router_running else [])])
            return [change("delete", "environment", env, f"not in cicd.yaml but runs {what}")]
        return []
    changes = []
    if not observed.folder_exists:
        changes.append(change("create", "folder", str(observed.folder), "state folder missing"))
    if observed.port is None:
        changes.append(change("create", "port", env, "no stable router port allocated"))
    url = observed.router_url or env
    if observed.live_version is None:
        if observed.router_running:
            changes.append(change("delete", "router", url, "router runs but no version is live"))
        return changes
    for slot in observed.slots:
        if slot.unreadable is not None:
            changes.append(change("restart", "slot", slot.name, slot.unreadable))
        elif slot.status is None:
            changes.append(change("create", "slot", slot.name, "live slot missing on the target"))
        elif slot.status not in ACTIVE_STATUSES:
            changes.append(change("restart", "slot", slot.name, f"live slot is {slot.status}"))
        elif slot.image is not None and slot.found_image != slot.image:
            changes.append(
                change(
                    "update",
                    "image",
                    slot.name,
                    f"runs image {slot.found_image}, the release's is {slot.image}",
                )
            )
        elif slot.found is not None and _limits_differ(slot.wanted, slot.found):
            changes.append(
                change(
                    "update",
                    "limits",
                    slot.name,
                    f"runs with {_limits_text(slot.found)}, "
                    f"the release wants {_limits_text(slot.wanted)}",
                )
            )
    wanted_weights = {slot.name: slot.weight for slot in observed.slots}
    if not observed.router_config:
        changes.append(change("create", "router", url, "router config missing"))
    elif not observed.router_running:
        changes.append(change("restart", "router", url, "nginx is not running"))
    elif observed.router_weights != wanted_weights:
        changes.append(
            change(
                "update",
                "router",
                url,
                f"weights {observed.router_weights} differ from the state's {wanted_weights}",
            )
        )
    return changes


def orphans(
    repository: str, running: list[str], known: set[str], configured: set[str]
) -> list[Change]:
    """Running slots that no environment's state knows (named "<env>.<version>.<n>")."""
    return [
        Change(
            repository,
            name.split(".", 1)[0],
            "delete",
            "slot",
            name,
            "runs, but no environment's state knows it"
            + ("" if name.split(".", 1)[0] in configured else " (environment not in cicd.yaml)"),
        )
        for name in sorted(set(running) - known)
    ]


def _limits_differ(wanted: Limits, found: Limits) -> bool:
    """Whether a limit the release sets is not the one in force (an unset one is the
    machine's default, not ours to check)."""
    return any(
        want is not None and want != getattr(found, name) for name, want in asdict(wanted).items()
    )


def _limits_text(limits: Limits) -> str:
    parts = [
        f"memory_mb={limits.memory_mb}" if limits.memory_mb is not None else "",
        f"cpus={limits.cpus:g}" if limits.cpus is not None else "",
        f"max_open_files={limits.max_open_files}" if limits.max_open_files is not None else "",
    ]
    return ", ".join(p for p in parts if p) or "no limits"


# --- observing ----------------------------------------------------------------------------


def _observe(
    config: ControlConfig, repository: str, name: str, env: Environment | None, configured: bool
) -> ObservedEnvironment:
    folder = environment_dir(config.home, repository, name)
    port_file = router_dir(config.home, repository, name) / "port"
    port = int(port_file.read_text()) if port_file.is_file() else None
    if env is None:
        return ObservedEnvironment(
            repository, name, configured, folder, folder.is_dir(), port, None
        )
    release = env.current_release()
    wanted = release.limits if release is not None else Limits()
    slots = []
    for slot in env.slots():
        try:
            status = env.target.status(slot.name)
        except SupervisorError as error:  # e.g. its container name taken by another one
            slots.append(ObservedSlot(slot.name, slot.weight, None, wanted, unreadable=str(error)))
            continue
        # What runs is compared for the current release's slots; a standby slot of the
        # previous one runs that release.
        current = status is not None and release is not None and slot.version == release.version
        slots.append(
            ObservedSlot(
                slot.name,
                slot.weight,
                status.status if status is not None else None,
                wanted=wanted,
                found=status.limits if current and status is not None else None,
                image=release.image if current and release is not None else None,
                found_image=status.image if current and status is not None else None,
            )
        )
    try:
        weights = env.router.weights()
    except RouterError:
        weights = {}
    return ObservedEnvironment(
        repository,
        name,
        configured,
        folder,
        folder.is_dir(),
        port,
        release.version if release is not None else None,
        router_url=env.router.url,
        router_config=env.router.config_path.is_file(),
        router_running=env.router.running(),
        router_weights=weights,
        slots=slots,
    )


@dataclass(frozen=True)
class _Known:
    """An environment of the home: configured, or left over from an older cicd.yaml."""

    repository: str
    name: str
    env: Environment | None  # None: never provisioned
    configured: bool


def _known_environments(config: ControlConfig) -> list[_Known]:
    configured_repos = {repo.name for repo in config.repositories}
    repositories = set(configured_repos)
    for folder in ("environments", "services"):
        root = config.home / folder
        if root.is_dir():
            repositories |= {path.name for path in root.iterdir() if path.is_dir()}
    known = []
    for repository in sorted(repositories):
        configured = config.environments if repository in configured_repos else []
        known += [
            _Known(repository, e.name, existing_environment(config, repository, e), True)
            for e in configured
        ]
        root = config.home / "environments" / repository
        names = {e.name for e in configured}
        for path in sorted(root.iterdir()) if root.is_dir() else []:
            if path.is_dir() and path.name not in names:
                leftover = _leftover_environment(config, repository, path.name)
                known.append(_Known(repository, path.name, leftover, False))
    return known


def _leftover_environment(config: ControlConfig, repository: str, name: str) -> Environment:
    """An environment whose config is gone, on the target its live release ran on: docker
    if the release has an image, else local (the default)."""
    env = environment_for(config, repository, EnvironmentConfig(name=name))
    release = env.current_release()
    if release is not None and release.image is not None:
        docker = EnvironmentConfig(name=name, target=TargetConfig(type="docker"))
        env = environment_for(config, repository, docker)
    return env


def _targets(config: ControlConfig, known: list[_Known]) -> dict[str, list[ServiceTarget]]:
    """Per repository, every target its slots may run on (its local folder at least)."""
    targets: dict[str, dict[str, ServiceTarget]] = {}
    for entry in known:
        local = LocalSupervisor(services_dir(config.home, entry.repository))
        targets.setdefault(entry.repository, {f"LocalSupervisor:{local.state_dir}": local})
        if entry.env is not None:
            target = entry.env.target
            # A local target is its folder, a docker target its scope.
            where = getattr(target, "state_dir", getattr(target, "scope", ""))
            key = f"{type(target).__name__}:{where}"
            targets[entry.repository].setdefault(key, target)
    return {repository: list(found.values()) for repository, found in targets.items()}


def plan(config: ControlConfig) -> list[Change]:
    """What apply() would change, in the order it would; changes nothing."""
    known = _known_environments(config)
    changes: list[Change] = []
    slot_names: dict[str, set[str]] = {}
    for entry in known:
        observed = _observe(config, entry.repository, entry.name, entry.env, entry.configured)
        changes.extend(diff(observed))
        slot_names.setdefault(entry.repository, set()).update(s.name for s in observed.slots)
    configured_names = {environment.name for environment in config.environments}
    for repository, targets in _targets(config, known).items():
        running = [s.name for t in targets for s in t.all() if s.status in ACTIVE_STATUSES]
        changes.extend(
            orphans(repository, running, slot_names.get(repository, set()), configured_names)
        )
    return changes


def apply(config: ControlConfig) -> list[Change]:
    """Make the changes plan() lists; returns them. RouterError or SupervisorError if one
    cannot be made (those before it stay made: apply again once the cause is fixed)."""
    changes = plan(config)
    known = _known_environments(config)
    targets = _targets(config, known)
    environments = {(entry.repository, entry.name): entry for entry in known}
    pending: dict[tuple[str, str], list[Change]] = {}
    for change in changes:
        pending.setdefault((change.repository, change.environment), []).append(change)
    for (repository, name), todo in pending.items():
        for change in todo:
            if change.resource == "slot" and change.action == "delete":
                for target in targets.get(repository, []):
                    target.stop(change.name)  # a no-op on the targets that do not run it
        entry = environments.get((repository, name))
        if entry is None:
            continue  # an orphan slot of an environment no state folder knows
        if not entry.configured:
            if entry.env is not None and any(c.resource == "environment" for c in todo):
                entry.env.down()
            continue
        env = entry.env
        if env is None or any(c.resource in _PROVISIONING for c in todo):
            env = environment_for(config, repository, config.environment(name))  # the port
            env.state_dir.mkdir(parents=True, exist_ok=True)
        repair = [c.name for c in todo if c.resource in _SLOT_REPAIRS and c.action != "delete"]
        if repair:
            env.restart_slots(repair)
        router = [c for c in todo if c.resource == "router"]
        if any(c.action == "delete" for c in router):
            env.router.stop()
        elif router:
            env.router.apply([slot.backend() for slot in env.slots()])
    return changes


def down(config: ControlConfig, repository: str | None = None) -> list[str]:
    """Stop every environment (of `repository`, or of all) and whatever else the project
    runs for it: left-over environments, orphan slots and, for all, every router.
    Returns what it stopped."""
    known = [e for e in _known_environments(config) if repository in (None, e.repository)]
    stopped: list[str] = []
    for entry in known:
        if entry.env is None:
            continue
        slots = [slot.name for slot in entry.env.slots()]
        router = entry.env.router.running()
        entry.env.down()
        stopped += [f"{entry.repository}/{entry.name} slot {slot}" for slot in slots]
        if router:
            stopped.append(f"{entry.repository}/{entry.name} router {entry.env.router.url}")
    for repo, targets in _targets(config, known).items():
        for target in targets:
            for state in target.all():
                if state.status in ACTIVE_STATUSES or state.pid or state.child_pid:
                    target.stop(state.name)
                    stopped.append(f"{repo} slot {state.name}")
    routers = config.home / "routers"
    if repository is None and routers.is_dir():
        for root in sorted(routers.iterdir()):
            port_file = root / "port"
            if not port_file.is_file():
                continue
            nginx = NginxRouter(root, int(port_file.read_text()), nginx=find_nginx() or "nginx")
            if nginx.running():
                nginx.stop()
                stopped.append(f"router {root.name} {nginx.url}")
    return stopped
