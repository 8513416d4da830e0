"""Deploy strategies: a new version of a service into one environment, behind that
environment's stable address (its NginxRouter), verified, and rolled back by itself.

An Environment owns a state folder with state.json: the live slots (name, version, port,
router weight), the current version and the previous verified one, and the Release of
each of those two, so that recreate can bring the previous version back from another
process. A Release's env may hold secrets: state.json is written with mode 0600.

Deploys to one environment are serialised with a file lock: a second deploy waits until
the first is done, so the state never mixes two half-done deploys.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from cicd_dagster.config import StrategyConfig
from cicd_dagster.deploy.health import ProbeConfig, probe, wait_healthy
from cicd_dagster.deploy.local import free_port
from cicd_dagster.deploy.router import Backend, NginxRouter, RouterError
from cicd_dagster.deploy.target import Limits, ServiceSpec, ServiceTarget, SupervisorError
from cicd_dagster.locks import file_lock

DeployStatus = Literal["deployed", "rolled_back", "failed"]

DEFAULT_CANARY_STEPS = [10, 50, 100]
DEFAULT_MIN_SUCCESS_RATE = 0.95
DEFAULT_MAX_P95_MS = 2000.0
DEFAULT_PROBES_PER_STEP = 20
# Canary analysis judges the answers users get, not the health page.
ANALYSIS_PATH = "/"


@dataclass(frozen=True)
class Release:
    """How to run one replica of a version; PORT is set per replica."""

    version: str  # e.g. the commit sha
    command: str
    cwd: Path
    env: dict[str, str]  # settings only: never a secret's value
    secrets: dict[str, str] = field(default_factory=dict)
    """NAME -> reference ("env:VAR" or "file:/path"), read when a replica starts."""
    image: str | None = None  # docker: the image built for this version
    limits: Limits = field(default_factory=Limits)
    labels: dict[str, str] = field(default_factory=dict)
    config_digest: str = ""
    """Of the settings and the secrets' values: a change of config alone is a new release."""
    health_path: str = "/healthz"  # the service's health page (.cicd.yml service.health)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "cwd": str(self.cwd)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Release:
        return cls(**{**data, "cwd": Path(data["cwd"]), "limits": Limits(**data.get("limits", {}))})


@dataclass(frozen=True)
class DeployOutcome:
    status: DeployStatus
    version: str
    previous_version: str | None
    reason: str
    duration_s: float
    rollback_s: float | None  # from detecting the failure to the old version serving alone
    events: list[str]  # human-readable timeline


@dataclass(frozen=True)
class Slot:
    """One running replica and its weight in the router (0: running, no traffic)."""

    name: str
    version: str
    port: int
    weight: int

    def backend(self) -> Backend:
        return Backend(self.name, self.port, self.weight)


@dataclass
class _State:
    current_version: str | None = None
    previous_version: str | None = None
    slots: list[Slot] = field(default_factory=list)
    releases: dict[str, Release] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "current_version": self.current_version,
            "previous_version": self.previous_version,
            "slots": [asdict(slot) for slot in self.slots],
            "releases": {version: r.to_json() for version, r in self.releases.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _State:
        return cls(
            current_version=data["current_version"],
            previous_version=data["previous_version"],
            slots=[Slot(**slot) for slot in data["slots"]],
            releases={v: Release.from_json(r) for v, r in data["releases"].items()},
        )


class _Unhealthy(Exception):
    """A new slot failed to start or to verify; the message says how."""


class _Run:
    """One deploy in progress: the state it changes, its timeline and its clocks."""

    def __init__(self, release: Release, state: _State) -> None:
        self.release = release
        self.state = state
        self.previous_version = state.current_version
        self.events: list[str] = []
        self._started = time.monotonic()
        self._failure_detected: float | None = None
        self._old_serving_alone: float | None = None

    def log(self, text: str) -> None:
        self.events.append(f"{time.monotonic() - self._started:7.2f}s {text}")

    def serving(self) -> list[Slot]:
        return [slot for slot in self.state.slots if slot.weight > 0]

    def failure_detected(self, reason: str) -> None:
        self._failure_detected = time.monotonic()
        self.log(f"failure detected: {reason}")

    def old_serving_alone(self) -> None:
        """After a failure: the old version serves alone again (cleanup may follow)."""
        if self._failure_detected is not None:
            self._old_serving_alone = time.monotonic()

    def deployed(self) -> DeployOutcome:
        state = self.state
        kept = {self.release.version, self.previous_version}
        state.releases = {
            version: release for version, release in state.releases.items() if version in kept
        }
        state.releases[self.release.version] = self.release
        state.previous_version = self.previous_version
        state.current_version = self.release.version
        self.log(f"{self.release.version} deployed")
        return self._outcome("deployed", f"{self.release.version} verified and serving")

    def rolled_back(self, reason: str) -> DeployOutcome:
        """The old version serves alone again; without one, the deploy simply failed."""
        if self.previous_version is None:
            self.log("failed: no previous version to roll back to")
            return self._outcome("failed", reason)
        self.log(f"rolled back to {self.previous_version}")
        return self._outcome("rolled_back", reason)

    def failed(self, reason: str) -> DeployOutcome:
        self.log("failed")
        return self._outcome("failed", reason)

    def _outcome(self, status: DeployStatus, reason: str) -> DeployOutcome:
        now = time.monotonic()
        rollback_s = None
        if status == "rolled_back" and self._failure_detected is not None:
            rollback_s = (self._old_serving_alone or now) - self._failure_detected
        return DeployOutcome(
            status=status,
            version=self.release.version,
            previous_version=self.previous_version,
            reason=reason,
            duration_s=now - self._started,
            rollback_s=rollback_s,
            events=self.events,
        )


class Environment:
    def __init__(
        self,
        name: str,
        state_dir: Path,
        router: NginxRouter,
        target: ServiceTarget,
        probe: ProbeConfig,
    ) -> None:
        self.name = name
        self.state_dir = state_dir
        self.router = router
        self.target = target
        self.probe = probe
        self._state_path = state_dir / "state.json"
        self._lock_path = state_dir / "deploy.lock"

    def current_version(self) -> str | None:
        return self._load().current_version

    def previous_version(self) -> str | None:
        return self._load().previous_version

    def current_release(self) -> Release | None:
        """How the current version runs (None before the first deploy)."""
        state = self._load()
        return state.releases.get(state.current_version or "")

    def slots(self) -> list[Slot]:
        """The live slots, with their router weights."""
        return self._load().slots

    def deploy(self, release: Release, strategy: StrategyConfig) -> DeployOutcome:
        strategies: dict[str, Callable[[_Run, StrategyConfig], DeployOutcome]] = {
            "recreate": self._recreate,
            "rolling": self._rolling,
            "blue_green": self._blue_green,
            "canary": self._canary,
        }
        with file_lock(self._lock_path):
            run = _Run(release, self._load())
            slots_before = {slot.name for slot in run.state.slots}
            run.log(
                f"deploy {release.version} to {self.name} with {strategy.type} "
                f"(current {run.previous_version or 'none'})"
            )
            try:
                return strategies[strategy.type](run, strategy)
            except (RouterError, SupervisorError) as error:
                # The router keeps its previous config on a RouterError, so new slots
                # without traffic can go; the state records whatever else still runs.
                for slot in run.state.slots:
                    if slot.name not in slots_before and slot.weight == 0:
                        self._stop(run, slot)
                return run.failed(f"{type(error).__name__}: {error}")
            finally:
                self._save(run.state)

    def rollback(self, release: Release) -> DeployOutcome:
        """Deploy an older release (the caller passes it) with blue-green semantics."""
        return self.deploy(release, StrategyConfig(type="blue_green"))

    def down(self) -> None:
        """Stop every slot and the router; the environment is empty afterwards."""
        with file_lock(self._lock_path):
            for slot in self._load().slots:
                self.target.stop(slot.name)
            self.router.stop()
            self._save(_State())

    # --- strategies ----------------------------------------------------------------------

    def _blue_green(self, run: _Run, strategy: StrategyConfig) -> DeployOutcome:
        standby = self._standby_slot(run)
        self._end_rollback_window(run, keep=standby)
        old = run.serving()
        try:
            new = self._reused(run, standby) or self._start_verified(run, run.release)
        except _Unhealthy as failure:
            # No traffic ever reached the new slot: the old version never stopped serving.
            run.failure_detected(str(failure))
            return run.rolled_back(str(failure))
        self._route(run, [replace(new, weight=100), *(replace(s, weight=0) for s in old)])
        through_router = wait_healthy(self.router.url, self.probe)
        if not through_router.healthy:
            reason = f"health check through the router failed: {through_router.reason}"
            run.failure_detected(reason)
            self._serve_only(run, old)
            return run.rolled_back(reason)
        run.log(f"{new.name} verified through {self.router.url}")
        return run.deployed()  # the old slots stay, at weight 0, until the next deploy

    def _canary(self, run: _Run, strategy: StrategyConfig) -> DeployOutcome:
        self._end_rollback_window(run)
        stable = run.serving()
        if not stable:  # nothing to compare the canary against
            run.log("no stable version: deploying as blue-green")
            return self._blue_green(run, strategy)
        try:
            canary = self._start_verified(run, run.release)
        except _Unhealthy as failure:
            run.failure_detected(str(failure))
            return run.rolled_back(str(failure))
        analysis = strategy.analysis
        min_success_rate = analysis.get("min_success_rate", DEFAULT_MIN_SUCCESS_RATE)
        max_p95_ms = analysis.get("max_p95_ms", DEFAULT_MAX_P95_MS)
        probes_per_step = int(analysis.get("probes_per_step", DEFAULT_PROBES_PER_STEP))
        steps = strategy.steps or DEFAULT_CANARY_STEPS
        if steps[-1] != 100:
            steps = [*steps, 100]
        for percent in steps:
            # nginx weights are relative: share 100 - percent among the stable replicas.
            stable_weight = 0 if percent == 100 else max(1, (100 - percent) // len(stable))
            self._route(
                run,
                [
                    replace(canary, weight=percent),
                    *(replace(s, weight=stable_weight) for s in stable),
                ],
            )
            success_rate, p95_ms = self._analyse(probes_per_step)
            numbers = (
                f"success rate {success_rate:.2%} (min {min_success_rate:.2%}), "
                f"p95 {p95_ms:.0f} ms (max {max_p95_ms:.0f} ms) over {probes_per_step} probes"
            )
            run.log(f"canary at {percent}%: {numbers}")
            if success_rate < min_success_rate or p95_ms > max_p95_ms:
                reason = f"canary analysis failed at {percent}%: {numbers}"
                run.failure_detected(reason)
                self._serve_only(run, stable)
                return run.rolled_back(reason)
        self._serve_only(run, [replace(canary, weight=100)])
        return run.deployed()

    def _rolling(self, run: _Run, strategy: StrategyConfig) -> DeployOutcome:
        self._end_rollback_window(run)
        old = run.serving()
        new: list[Slot] = []
        for index in range(strategy.replicas):
            try:
                slot = self._start_verified(run, run.release)
            except _Unhealthy as failure:
                reason = f"replica {index + 1} of {strategy.replicas}: {failure}"
                run.failure_detected(reason)
                self._serve_only(run, old)
                return run.rolled_back(reason)
            new.append(replace(slot, weight=100))
            # One old replica leaves the pool per new one; it keeps running until the end,
            # so a later failure restores the old version by weights alone.
            retired = [replace(s, weight=0) for s in old[: index + 1]]
            self._route(run, [*new, *retired, *old[index + 1 :]])
        self._serve_only(run, new)
        return run.deployed()

    def _recreate(self, run: _Run, strategy: StrategyConfig) -> DeployOutcome:
        previous_release = run.state.releases.get(run.previous_version or "")
        old_replicas = len(run.serving()) or strategy.replicas
        self._stop_all(run)
        try:
            new = [self._start_verified(run, run.release) for _ in range(strategy.replicas)]
        except _Unhealthy as failure:
            run.failure_detected(str(failure))
            self._stop_all(run)
            if previous_release is None:
                return run.failed(f"{failure}; no previous release to restart")
            try:
                restored = [
                    self._start_verified(run, previous_release) for _ in range(old_replicas)
                ]
            except _Unhealthy as second:
                return run.failed(f"{failure}; restarting {previous_release.version}: {second}")
            self._route(run, [replace(slot, weight=100) for slot in restored])
            run.old_serving_alone()
            return run.rolled_back(str(failure))
        self._route(run, [replace(slot, weight=100) for slot in new])
        return run.deployed()

    # --- building blocks -----------------------------------------------------------------

    def _start_verified(self, run: _Run, release: Release) -> Slot:
        """Start a slot of `release` (weight 0, recorded in the state) and verify it on its
        own port; an unhealthy slot is stopped and _Unhealthy raised."""
        name = self._new_slot_name(run, release.version)
        port = free_port()
        run.log(f"start {name} on port {port}")
        try:
            self.target.start(
                ServiceSpec(
                    name,
                    release.command,
                    release.cwd,
                    dict(release.env),
                    port,
                    image=release.image,
                    limits=release.limits,
                    labels=release.labels,
                )
            )
        except SupervisorError as error:
            raise _Unhealthy(f"{name} did not start: {error}") from error
        slot = Slot(name, release.version, port, 0)
        run.state.slots.append(slot)
        return self._verified(run, slot)

    def _verified(self, run: _Run, slot: Slot) -> Slot:
        """`slot` once it is healthy on its own port; an unhealthy slot is stopped and
        _Unhealthy raised."""
        health = wait_healthy(
            f"http://127.0.0.1:{slot.port}", self.probe, stop=lambda: self._gave_up(slot.name)
        )
        if not health.healthy:
            self._stop(run, slot)
            raise _Unhealthy(
                f"health check of {slot.name} on {self.probe.path} failed: {health.reason}"
            )
        run.log(f"{slot.name} healthy: {health.reason}")
        return slot

    def _reused(self, run: _Run, standby: Slot | None) -> Slot | None:
        """The standby slot if it is still healthy (a rollback within the window is then
        a switch of weights); a standby that died is stopped and None returned."""
        if standby is None:
            return None
        run.log(f"reuse {standby.name} from the rollback window")
        try:
            return self._verified(run, standby)
        except _Unhealthy as failure:
            run.log(f"{failure}; starting a new slot instead")
            return None

    def _standby_slot(self, run: _Run) -> Slot | None:
        """A slot without traffic (the rollback window) that runs exactly the release
        being deployed, if there is one."""
        if run.state.releases.get(run.release.version) != run.release:
            return None
        return next(
            (
                slot
                for slot in run.state.slots
                if slot.weight == 0 and slot.version == run.release.version
            ),
            None,
        )

    def _gave_up(self, name: str) -> bool:
        state = self.target.status(name)
        return state is None or state.status in ("crashed", "stopped")

    def _new_slot_name(self, run: _Run, version: str) -> str:
        taken = {slot.name for slot in run.state.slots}
        index = 0
        while f"{self.name}.{version[:12]}.{index}" in taken:
            index += 1
        return f"{self.name}.{version[:12]}.{index}"

    def _route(self, run: _Run, slots: list[Slot]) -> None:
        """Apply `slots`' weights; they become the live slots of the state."""
        self.router.apply([slot.backend() for slot in slots])
        run.state.slots = slots
        run.log("route " + ", ".join(f"{slot.name}={slot.weight}" for slot in slots))

    def _serve_only(self, run: _Run, slots: list[Slot]) -> None:
        """`slots` serve alone, at their weights; every other slot is stopped. With no
        slots (a failed first deploy) the router is stopped, as it was before."""
        names = {slot.name for slot in slots}
        others = [slot for slot in run.state.slots if slot.name not in names]
        if slots:
            self._route(run, slots)
            run.old_serving_alone()
        else:
            self.router.stop()
            run.log("router stopped")
        for slot in others:
            self._stop(run, slot)

    def _end_rollback_window(self, run: _Run, keep: Slot | None = None) -> None:
        for slot in run.state.slots:
            if slot.weight == 0 and slot != keep:
                self._stop(run, slot)

    def _stop_all(self, run: _Run) -> None:
        for slot in list(run.state.slots):
            self._stop(run, slot)

    def _stop(self, run: _Run, slot: Slot) -> None:
        self.target.stop(slot.name)
        run.state.slots = [s for s in run.state.slots if s.name != slot.name]
        run.log(f"stopped {slot.name}")

    def _analyse(self, probes: int) -> tuple[float, float]:
        """Success rate and p95 latency (ms, nearest rank) of `probes` GETs of the router."""
        results = [
            probe(self.router.url + ANALYSIS_PATH, self.probe.timeout_s) for _ in range(probes)
        ]
        latencies = sorted(result.latency_ms for result in results)
        p95_ms = latencies[max(1, math.ceil(0.95 * len(latencies))) - 1]
        return sum(result.ok for result in results) / len(results), p95_ms

    def _load(self) -> _State:
        try:
            return _State.from_json(json.loads(self._state_path.read_text()))
        except FileNotFoundError:
            return _State()

    def _save(self, state: _State) -> None:
        # 0600: the stored releases carry their env, which may hold secrets.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        temporary = self._state_path.with_name(f"state.json.{os.getpid()}.tmp")
        temporary.unlink(missing_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(state.to_json(), indent=2) + "\n")
        temporary.replace(self._state_path)
