"""What is in service: the commits whose stored artifacts must stay kept and scanned.

A commit is in service while an environment runs it (its current version) or keeps it
ready for a rollback (its previous version). The nightly rescan scans these; artifact
retention never deletes what they reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cicd_dagster.config import ControlConfig
from cicd_dagster.deploy.infra import existing_environment

Role = Literal["live", "standby"]


@dataclass(frozen=True)
class InService:
    repository: str
    commit: str
    environment: str
    role: Role

    @property
    def where(self) -> str:
        return f"{self.environment} ({self.role})"


def in_service(config: ControlConfig) -> list[InService]:
    """Every (repository, commit, environment) in service, in cicd.yaml order; a commit
    live in several environments is listed once per environment."""
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
                InService(repository.name, commit, environment.name, role)
                for commit, role in versions
                if commit is not None
            ]
    return found


def commits_in_service(config: ControlConfig, repository: str) -> set[str]:
    return {item.commit for item in in_service(config) if item.repository == repository}
