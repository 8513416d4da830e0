"""What is in service: the commits whose stored artifacts must stay kept and scanned.

A commit is in service while an environment runs it (its current version) or keeps it
ready for a rollback (its previous version), and once it is released: users may run a
release long after every environment moved on. The nightly rescan scans these; artifact
retention never deletes what they reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cicd_dagster.config import ControlConfig
from cicd_dagster.deploy.infra import existing_environment
from cicd_dagster.store import HistoryStore

Role = Literal["live", "standby", "released"]


@dataclass(frozen=True)
class InService:
    repository: str
    commit: str
    role: Role
    environment: str | None = None  # live and standby
    tag: str | None = None  # released

    @property
    def where(self) -> str:
        """ "prod (live)", "v1.2.0 (released)"."""
        return f"{self.environment or self.tag} ({self.role})"

    @property
    def reason(self) -> str:
        """ "live in prod", "released as v1.2.0"."""
        if self.role == "released":
            return f"released as {self.tag}"
        return f"{self.role} in {self.environment}"


def deployed(config: ControlConfig) -> list[InService]:
    """Every (repository, commit, environment) live or standby, in cicd.yaml order; a
    commit live in several environments is listed once per environment."""
    found = []
    for repository in config.repositories:
        for environment in config.environments:
            env = existing_environment(config, repository.name, environment)
            if env is None:
                continue
            versions: list[tuple[str | None, Role]] = [
                (env.current_version(), "live"),
                (env.previous_version(), "standby"),
            ]
            found += [
                InService(repository.name, commit, role, environment=environment.name)
                for commit, role in versions
                if commit is not None
            ]
    return found


def in_service(config: ControlConfig, history: HistoryStore) -> list[InService]:
    """What is deployed (as `deployed`), then every release of the repositories of
    cicd.yaml, newest first."""
    names = {repository.name for repository in config.repositories}
    releases = history.releases()
    return deployed(config) + [
        InService(str(row.repository), str(row.commit), "released", tag=str(row.tag))
        for row in releases.itertuples()
        if row.repository in names
    ]
