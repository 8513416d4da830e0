"""The CI and deployment assets of one repository, key-prefixed by its name."""

from dagster import AssetsDefinition, DynamicPartitionsDefinition

from assets.artifact import artifact_assets
from assets.build import build_asset
from assets.deploy import deployment_assets
from assets.drift import drift_checks
from assets.qa import qa_assets
from assets.security import security_asset
from assets.source import source_asset
from assets.tests import report_assets
from cicd_dagster.config import RepositoryConfig


def ci_assets(
    repository: RepositoryConfig, partitions: DynamicPartitionsDefinition
) -> list[AssetsDefinition]:
    return [
        source_asset(repository, partitions),
        build_asset(repository, partitions),
        *report_assets(repository, partitions),
        security_asset(repository, partitions),
        *artifact_assets(repository, partitions),
    ]


__all__ = ["ci_assets", "deployment_assets", "drift_checks", "qa_assets"]
