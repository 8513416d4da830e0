"""Asset jobs: what a new commit (or `cicd run`) materializes."""

from dagster import AssetSelection, DynamicPartitionsDefinition, define_asset_job
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from cicd_dagster.config import RepositoryConfig


def ci_job_name(repository: str) -> str:
    return f"{repository}_ci"


def ci_job(
    repository: RepositoryConfig, partitions: DynamicPartitionsDefinition
) -> UnresolvedAssetJobDefinition:
    """Source, build and every test report of one commit of `repository`."""
    return define_asset_job(
        name=ci_job_name(repository.name),
        selection=AssetSelection.groups(repository.name),
        partitions_def=partitions,
        description=f"CI of one commit of {repository.name}: source, build, test reports, gates.",
        tags={"cicd/repository": repository.name},
    )
