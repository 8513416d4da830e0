"""Where a repository's environments live in the cicd home: the one place that says it,
for the deploy stage (stages.deploy.environment_for) and for `cicd infra` alike.

    home/environments/<repo>/<env>/   an environment's state (state.json, monitor.json)
    home/routers/<repo>-<env>/        its nginx router; port: its stable port, kept
    home/services/<repo>/             the local target's slots of every environment
    docker scope <repo>-<home id>     the docker target's containers (label cicd.scope)

Slot names are "<env>.<version>.<n>", so one supervisor folder or container scope holds
the slots of all of a repository's environments.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def environment_dir(home: Path, repository: str, environment: str) -> Path:
    return home / "environments" / repository / environment


def router_dir(home: Path, repository: str, environment: str) -> Path:
    return home / "routers" / f"{repository}-{environment}"


def services_dir(home: Path, repository: str) -> Path:
    return home / "services" / repository


def docker_scope(home: Path, repository: str) -> str:
    """The scope of the repository's containers. Container names are engine-wide, so the
    scope also names the home: two homes on one engine never share a container."""
    home_id = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:8]
    return f"{repository}-{home_id}"
