"""One dynamic partition set per repository: a partition is a commit's 40-hex sha."""

from dagster import DynamicPartitionsDefinition

from cicd_dagster.config import RepositoryConfig


def commit_partitions(repository: RepositoryConfig) -> DynamicPartitionsDefinition:
    return DynamicPartitionsDefinition(name=f"{repository.identifier}_commits")
