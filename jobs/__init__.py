"""Asset jobs: what a new commit (or `cicd run`) materializes."""

from dagster import (
    AssetKey,
    AssetSelection,
    DynamicPartitionsDefinition,
    define_asset_job,
    in_process_executor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from cicd_dagster.config import EnvironmentConfig, RepositoryConfig


def ci_job_name(repository: RepositoryConfig) -> str:
    return f"{repository.identifier}_ci"


def ci_job(
    repository: RepositoryConfig, partitions: DynamicPartitionsDefinition
) -> UnresolvedAssetJobDefinition:
    """Source, build and every test report of one commit of `repository`."""
    return define_asset_job(
        name=ci_job_name(repository),
        selection=AssetSelection.groups(repository.identifier),
        partitions_def=partitions,
        description=f"CI of one commit of {repository.name}: source, build, test reports, gates.",
        tags={"cicd/repository": repository.name},
        # One process per run: a step process costs seconds of imports, and benchmarks
        # measured beside other test stages would measure the neighbours.
        executor_def=in_process_executor,
    )


def deploy_job_name(repository: RepositoryConfig, environment: EnvironmentConfig) -> str:
    return f"{repository.identifier}_deploy_{environment.identifier}"


def deploy_job(
    repository: RepositoryConfig,
    environment: EnvironmentConfig,
    partitions: DynamicPartitionsDefinition,
) -> UnresolvedAssetJobDefinition:
    """Deploys one commit to one environment: that environment's deployment asset only
    (its no_drift check is the drift sensor's: it plans every environment)."""
    return define_asset_job(
        name=deploy_job_name(repository, environment),
        selection=AssetSelection.assets(
            AssetKey([repository.name, f"deployment_{environment.name}"])
        ).without_checks(),
        partitions_def=partitions,
        description=f"Deploy one commit of {repository.name} to {environment.name}.",
        tags={"cicd/repository": repository.name, "cicd/environment": environment.name},
        executor_def=in_process_executor,
    )
