"""Asset jobs: what a new commit (or `cicd run`) materializes."""

from dagster import (
    AssetSelection,
    DynamicPartitionsDefinition,
    define_asset_job,
    in_process_executor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from cicd_dagster.config import RepositoryConfig


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
