"""no_drift: whether an environment still runs as its deployment left it.

A non-blocking check on each deployment_<env> asset. It is not partitioned: drift is a
property of the environment now, whichever commit runs there. Executing it (from the UI)
computes the plan of `cicd infra apply`; the drift sensor reports the same evaluation on
an interval.
"""

from dagster import (
    AssetCheckResult,
    AssetChecksDefinition,
    AssetCheckSeverity,
    MetadataValue,
    asset_check,
)

from assets.deploy import deployment_key
from cicd_dagster.config import ControlConfig, EnvironmentConfig, RepositoryConfig
from cicd_dagster.deploy.infra import Change, plan
from cicd_dagster.resources import CicdResource

NO_DRIFT = "no_drift"


def drift_of(changes: list[Change], repository: str, environment: str) -> list[Change]:
    """The drift of one environment among a plan's changes."""
    return [
        change
        for change in changes
        if change.is_drift and (change.repository, change.environment) == (repository, environment)
    ]


def drift_metadata(drift: list[Change]) -> dict[str, MetadataValue]:
    rows = "\n".join(f"| {c.action} | {c.resource} | `{c.name}` | {c.reason} |" for c in drift)
    table = "| action | resource | name | reason |\n|---|---|---|---|\n" + rows
    return {
        "changes": MetadataValue.int(len(drift)),
        "plan": MetadataValue.md(table if drift else "No drift: runs as deployed."),
        "fix": MetadataValue.text("cicd infra apply" if drift else ""),
    }


def no_drift_check(
    repository: RepositoryConfig, environment: EnvironmentConfig
) -> AssetChecksDefinition:
    @asset_check(
        asset=deployment_key(repository, environment),
        name=NO_DRIFT,
        blocking=False,
        description=f"{environment.name} of {repository.name} runs as deployed: every live "
        "slot up with its release's limits, the router running with the state's weights, "
        "nothing running that no state knows. `cicd infra apply` repairs drift.",
    )
    def no_drift(cicd: CicdResource) -> AssetCheckResult:
        drift = drift_of(plan(cicd.control_config()), repository.name, environment.name)
        return AssetCheckResult(
            passed=not drift,
            severity=AssetCheckSeverity.ERROR,
            metadata=drift_metadata(drift),
        )

    return no_drift


def drift_checks(config: ControlConfig) -> list[AssetChecksDefinition]:
    return [
        no_drift_check(repository, environment)
        for repository in config.repositories
        for environment in config.environments
    ]
