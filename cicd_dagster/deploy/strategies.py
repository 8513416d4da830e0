"""Deploy strategies: a new version of a service into one environment, behind that
environment's stable address (its NginxRouter), verified, and rolled back by itself.

An Environment owns a state folder with state.json: the live slots (name, version, port,
router weight, when a slot left traffic), the current version and the previous verified
one, and the Release of each of those two, so that recreate can bring the previous
version back from another process. A Release holds settings and secret references only:
secret values are read when a replica starts and go to that replica alone.

A new replica counts once its health page (Release.health_path) answers and, when the
environment has a smoke command, that command passes against the replica's own port.
Blue-green keeps the previous slot, without traffic, for the rollback window, so that a
rollback within it is a switch of weights; end_expired_rollback_window stops it after.

Deploys to one environment are serialised with a file lock: a second deploy waits until
the first is done, so the state never mixes two half-done deploys.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from cicd_dagster.config import StrategyConfig
from cicd_dagster.deploy.health import ProbeConfig, probe, wait_healthy
from cicd_dagster.deploy.local import free_port
from cicd_dagster.deploy.router import Backend, NginxRouter, RouterError
from cicd_dagster.deploy.target import Limits, ServiceSpec, ServiceTarget, SupervisorError
from cicd_dagster.locks import file_lock
from cicd_dagster.runner import SecretMasker, base_environment, run_step
from cicd_dagster.sandbox import StepSandbox

DeployStatus = Literal["deployed", "rolled_back", "failed"]

DEFAULT_CANARY_STEPS = [10, 50, 100]
DEFAULT_MIN_SUCCESS_RATE = 0.95
DEFAULT_MAX_P95_MS = 2000.0
DEFAULT_PROBES_PER_STEP = 20
# Canary analysis judges the answers users get, not the health page.
ANALYSIS_PATH = "/"
DEFAULT_ROLLBACK_WINDOW_S = 3600.0
_SMOKE_TAIL_LINES = 15


class SecretUnavailable(Exception):
    """A secret's reference cannot be read; the message names the secret and its
    reference, never a value."""


def resolve_secrets(references: Mapping[str, str]) -> dict[str, str]:
    """NAME -> value for NAME -> "env:VAR" (a variable of this process) or "file:/path" (the
    file's text without its final newline)."""
    values = {}
    for name, reference in references.items():
        kind, _, where = reference.partition(":")
        if kind == "env":
            value = os.environ.get(where)
            if value is None:
                raise SecretUnavailable(f"secret {name} ({reference}): the variable is not set")
        elif kind == "file":
            try:
                value = Path(where).read_text().removesuffix("\n")
            except (OSError, UnicodeDecodeError) as error:
                detail = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
                raise SecretUnavailable(
                    f"secret {name} ({reference}): cannot read the file: {detail}"
                ) from None
        else:
            raise SecretUnavailable(f"secret {name}: unknown reference {reference!r}")
        values[name] = value
    return values


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

    def runs_like(self, other: Release) -> bool:
        """Whether a replica of `other` is one of this release: the same version, command
        and config (compared by digest when both have one: the machine's own variables,
        PATH say, may differ between the process that deployed and this one)."""

        def identity(release: Release) -> tuple[object, ...]:
            config = release.config_digest or sorted(release.env.items())
            return (
                release.version,
                release.command,
                release.cwd,
                release.image,
                release.health_path,
                sorted(release.secrets.items()),
                config,
            )

        return identity(self) == identity(other)

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
    strategy: str = ""  # as run: a rollback within the window is a blue-green switch
    config_digest: str = ""  # of the release deployed (Release.config_digest)


@dataclass(frozen=True)
class Slot:
    """One running replica and its weight in the router (0: running, no traffic)."""

    name: str
    version: str
    port: int
    weight: int
    standby_since: float | None = None
    """Epoch seconds when the slot left traffic (weight > 0 -> 0): its rollback window."""

    def backend(self) -> Backend:
        return Backend(self.name, self.port, self.weight, self.version)


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

    def __init__(self, release: Release, state: _State, strategy: str = "") -> None:
        self.release = release
        self.state = state
        self.strategy = strategy
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
            strategy=self.strategy,
            config_digest=self.release.config_digest,
        )


class Environment:
    def __init__(
        self,
        name: str,
        state_dir: Path,
        router: NginxRouter,
        target: ServiceTarget,
        probe: ProbeConfig,
        *,
        smoke: str | None = None,
        smoke_timeout_s: float = 60.0,
        smoke_sandbox: StepSandbox | None = None,
        rollback_window_s: float = DEFAULT_ROLLBACK_WINDOW_S,
    ) -> None:
        """`probe` says how to probe (its path is replaced by each release's health_path);
        `smoke` is a bash command run after the probes pass, with URL set to the replica,
        in `smoke_sandbox` when given."""
        self.name = name
        self.state_dir = state_dir
        self.router = router
        self.target = target
        self.probe = probe
        self.smoke = smoke
        self.smoke_timeout_s = smoke_timeout_s
        self.smoke_sandbox = smoke_sandbox
        self.rollback_window_s = rollback_window_s
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

    def is_live(self, release: Release) -> bool:
        """Whether `release` is the current one and every slot serving it runs."""
        state = self._load()
        current = state.releases.get(state.current_version or "")
        serving = [slot for slot in state.slots if slot.weight > 0]
        if current is None or not current.runs_like(release) or not serving:
            return False
        return all(not self._gave_up(slot.name) for slot in serving)

    def in_rollback_window(self, release: Release) -> bool:
        """Whether a slot without traffic still runs `release`: deploying it (rollback)
        is then a switch of weights."""
        return bool(self._standby_slots(_Run(release, self._load())))

    def end_expired_rollback_window(self, now: float | None = None) -> list[str]:
        """Stop the slots without traffic whose rollback window has passed (a slot at
        weight 0 that never served is a leftover and goes too); returns their names."""
        now = time.time() if now is None else now
        if not self._state_path.exists():
            return []
        with file_lock(self._lock_path):
            state = self._load()
            expired = [
                slot
                for slot in state.slots
                if slot.weight == 0
                and (
                    slot.standby_since is None or now >= slot.standby_since + self.rollback_window_s
                )
            ]
            if expired:
                names = {slot.name for slot in expired}
                state.slots = [slot for slot in state.slots if slot.name not in names]
                if state.slots:  # out of the router's upstream first, then stopped
                    self.router.apply([slot.backend() for slot in state.slots])
                for slot in expired:
                    self.target.stop(slot.name)
                self._save(state)
        return [slot.name for slot in expired]

    def deploy(self, release: Release, strategy: StrategyConfig) -> DeployOutcome:
        strategies: dict[str, Callable[[_Run, StrategyConfig], DeployOutcome]] = {
            "recreate": self._recreate,
            "rolling": self._rolling,
            "blue_green": self._blue_green,
            "canary": self._canary,
        }
        with file_lock(self._lock_path):
            run = _Run(release, self._load(), strategy.type)
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
                reason = f"{type(error).__name__}: {error}"
                for slot in list(run.state.slots):
                    if slot.name not in slots_before and slot.weight == 0:
                        try:
                            self._stop(run, slot)
                        except SupervisorError as cleanup:  # e.g. the engine is gone
                            # Kept in the state, so the next deploy or `cicd down` stops it.
                            reason += f"; {slot.name} left without traffic: {cleanup}"
                return run.failed(reason)
            finally:
                self._save(run.state)

    def rollback(self, release: Release, replicas: int = 1) -> DeployOutcome:
        """Deploy an older release (the caller passes it) with blue-green semantics: its
        slots still in the rollback window come back by a switch of weights."""
        return self.deploy(release, StrategyConfig(type="blue_green", replicas=replicas))

    def down(self) -> None:
        """Stop every slot and the router; the environment is empty afterwards."""
        with file_lock(self._lock_path):
            for slot in self._load().slots:
                self.target.stop(slot.name)
            self.router.stop()
            self._save(_State())

    # --- strategies ----------------------------------------------------------------------

    def _blue_green(self, run: _Run, strategy: StrategyConfig) -> DeployOutcome:
        standby = self._standby_slots(run)[: strategy.replicas]
        self._end_rollback_window(run, keep=standby)
        old = run.serving()
        new = self._reused(run, standby)
        try:
            while len(new) < strategy.replicas:
                new.append(self._start_verified(run, run.release))
        except _Unhealthy as failure:
            # No traffic ever reached the new slots: the old version never stopped serving.
            run.failure_detected(str(failure))
            for slot in new:
                self._stop(run, slot)
            return run.rolled_back(str(failure))
        self._route(
            run, [*(replace(s, weight=100) for s in new), *(replace(s, weight=0) for s in old)]
        )
        through_router = wait_healthy(self.router.url, self._probe_of(run.release))
        if not through_router.healthy:
            reason = f"health check through the router failed: {through_router.reason}"
            run.failure_detected(reason)
            self._serve_only(run, old)
            return run.rolled_back(reason)
        run.log(f"{', '.join(s.name for s in new)} verified through {self.router.url}")
        if self.rollback_window_s <= 0:
            self._serve_only(run, [replace(s, weight=100) for s in new])
        # Otherwise the old slots stay, at weight 0, for the rollback window.
        return run.deployed()

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
        canaries = [canary]
        for percent in steps:
            if percent == 100:
                # The whole load goes to the new version: at its full replica count.
                try:
                    while len(canaries) < strategy.replicas:
                        canaries.append(self._start_verified(run, run.release))
                except _Unhealthy as failure:
                    reason = f"scaling the canary to {strategy.replicas} replicas: {failure}"
                    run.failure_detected(reason)
                    self._serve_only(run, stable)
                    return run.rolled_back(reason)
            # nginx weights are relative: share the percentages among the replicas.
            stable_weight = 0 if percent == 100 else max(1, (100 - percent) // len(stable))
            canary_weight = max(1, percent // len(canaries))
            self._route(
                run,
                [
                    *(replace(c, weight=canary_weight) for c in canaries),
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
        self._serve_only(run, [replace(c, weight=100) for c in canaries])
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
        spec = self._service_spec(name, port, release)  # _Unhealthy: a secret is unreadable
        try:
            self.target.start(spec)
        except SupervisorError as error:
            raise _Unhealthy(f"{name} did not start: {error}") from error
        slot = Slot(name, release.version, port, 0)
        run.state.slots.append(slot)
        return self._verified(run, slot, release)

    def _verified(self, run: _Run, slot: Slot, release: Release, probes: int | None = None) -> Slot:
        """`slot` once it is healthy on its own port (`probes` 2xx in a row; default: the
        environment's success threshold) and passed the smoke test; an unhealthy slot is
        stopped and _Unhealthy raised."""
        url = f"http://127.0.0.1:{slot.port}"
        probe = self._probe_of(release)
        if probes is not None:
            probe = replace(probe, success_threshold=probes)
        health = wait_healthy(url, probe, stop=lambda: self._gave_up(slot.name))
        if not health.healthy:
            self._stop(run, slot)
            raise _Unhealthy(
                f"health check of {slot.name} on {release.health_path} failed: {health.reason}"
            )
        run.log(f"{slot.name} healthy: {health.reason}")
        if self.smoke is not None:
            failure = self._smoke_failure(slot, release, url)
            if failure is not None:
                self._stop(run, slot)
                raise _Unhealthy(failure)
            run.log(f"{slot.name} passed the smoke test")
        return slot

    def _smoke_failure(self, slot: Slot, release: Release, url: str) -> str | None:
        """Why the smoke command failed against `url` (the slot's own port), or None."""
        assert self.smoke is not None
        secrets = self._secrets_of(release, slot.name)
        try:
            result = run_step(
                self.smoke,
                cwd=release.cwd,
                # base_environment: a container release carries no PATH of this machine.
                env=base_environment({**release.env, **secrets, "URL": url}),
                timeout_s=self.smoke_timeout_s,
                log_path=self.state_dir / "smoke" / f"{slot.name}.log",
                masker=SecretMasker(secrets.values()),
                tail_lines=_SMOKE_TAIL_LINES,
                sandbox=self.smoke_sandbox,
            )
        except OSError as error:  # the release folder is gone, say
            return f"smoke test of {slot.name} could not run: {error}"
        if result.ok:
            return None
        how = (
            f"timed out after {self.smoke_timeout_s:g} s"
            if result.timed_out
            else f"exited {result.exit_code}"
        )
        return f"smoke test of {slot.name} {how}: {self.smoke}\n{result.log_tail}"

    def _secrets_of(self, release: Release, slot_name: str) -> dict[str, str]:
        try:
            return resolve_secrets(release.secrets)
        except SecretUnavailable as error:
            raise _Unhealthy(f"{slot_name} did not start: {error}") from error

    def _probe_of(self, release: Release) -> ProbeConfig:
        return replace(self.probe, path=release.health_path)

    def _reused(self, run: _Run, standby: list[Slot]) -> list[Slot]:
        """The standby slots that still answer (a rollback within the window is then a
        switch of weights); one that died is stopped and left out. They were verified
        when they were deployed: one 2xx each is enough now."""
        alive = []
        for slot in standby:
            run.log(f"reuse {slot.name} from the rollback window")
            try:
                alive.append(self._verified(run, slot, run.release, probes=1))
            except _Unhealthy as failure:
                run.log(f"{failure}; starting a new slot instead")
        return alive

    def _standby_slots(self, run: _Run) -> list[Slot]:
        """The slots without traffic (the rollback window) that run exactly the release
        being deployed."""
        known = run.state.releases.get(run.release.version)
        if known is None or not known.runs_like(run.release):
            return []
        return [
            slot
            for slot in run.state.slots
            if slot.weight == 0 and slot.version == run.release.version
        ]

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
        """Apply `slots`' weights; they become the live slots of the state, a slot that
        leaves traffic recording when (its rollback window starts then)."""
        before = {slot.name: slot for slot in run.state.slots}
        now = time.time()

        def clocked(slot: Slot) -> Slot:
            if slot.weight > 0:
                return replace(slot, standby_since=None)
            was = before.get(slot.name)
            return replace(slot, standby_since=now) if was and was.weight > 0 else slot

        slots = [clocked(slot) for slot in slots]
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

    def _end_rollback_window(self, run: _Run, keep: list[Slot] | None = None) -> None:
        for slot in run.state.slots:
            if slot.weight == 0 and slot not in (keep or []):
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
        # 0600: the releases' settings are the owner's business, though no secret is there.
        self.state_dir.mkdir(parents=True, exist_ok=True)
        temporary = self._state_path.with_name(f"state.json.{os.getpid()}.tmp")
        temporary.unlink(missing_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(json.dumps(state.to_json(), indent=2) + "\n")
        temporary.replace(self._state_path)

    # --- repair (cicd infra apply) -------------------------------------------------------

    def restart_slots(self, names: Collection[str]) -> None:
        """Restart the named live slots from their release (limits included), each on its
        own name and port, so the router and the state stay as they are; returns once each
        is healthy. SupervisorError names a slot that does not come back."""
        with file_lock(self._lock_path):
            state = self._load()
            for slot in state.slots:
                if slot.name in names:
                    release = state.releases.get(slot.version)
                    if release is None:
                        raise SupervisorError(f"slot {slot.name}: its release is no longer known")
                    self._restart(slot, release)

    def _restart(self, slot: Slot, release: Release) -> None:
        self.target.stop(slot.name)
        try:
            self.target.start(self._service_spec(slot.name, slot.port, release))
        except _Unhealthy as error:
            raise SupervisorError(str(error)) from error
        health = wait_healthy(
            f"http://127.0.0.1:{slot.port}",
            self._probe_of(release),
            stop=lambda: self._gave_up(slot.name),
        )
        if not health.healthy:
            raise SupervisorError(f"slot {slot.name} restarted unhealthy: {health.reason}")

    def _service_spec(self, name: str, port: int, release: Release) -> ServiceSpec:
        return ServiceSpec(
            name,
            release.command,
            release.cwd,
            {**release.env, **self._secrets_of(release, name)},
            port,
            image=release.image,
            limits=release.limits,
            labels=release.labels,
        )
