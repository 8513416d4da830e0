"""Asset jobs and schedules: what a new commit (or `cicd run`) materializes, what a deploy
runs, and the nightly rescan."""

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DynamicPartitionsDefinition,
    ScheduleDefinition,
    define_asset_job,
    in_process_executor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from assets.deploy import deployment_key, qa_key
from assets.release import release_key
from assets.rescan import RESCAN_GROUP
from cicd_dagster.config import ControlConfig, EnvironmentConfig, RepositoryConfig


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
        selection=AssetSelection.assets(deployment_key(repository, environment)).without_checks(),
        partitions_def=partitions,
        description=f"Deploy one commit of {repository.name} to {environment.name}.",
        tags={"cicd/repository": repository.name, "cicd/environment": environment.name},
        executor_def=in_process_executor,
    )


def qa_job_name(repository: RepositoryConfig, environment: EnvironmentConfig) -> str:
    return f"{repository.identifier}_qa_{environment.identifier}"


def qa_job(
    repository: RepositoryConfig,
    environment: EnvironmentConfig,
    partitions: DynamicPartitionsDefinition,
) -> UnresolvedAssetJobDefinition:
    """Runs the QA suite of the commit live in `environment` (its qa asset and gate)."""
    return define_asset_job(
        name=qa_job_name(repository, environment),
        selection=AssetSelection.assets(qa_key(repository, environment)),
        partitions_def=partitions,
        description=f"QA of the commit of {repository.name} live in {environment.name}.",
        tags={"cicd/repository": repository.name, "cicd/environment": environment.name},
        executor_def=in_process_executor,
    )


def release_job_name(repository: RepositoryConfig) -> str:
    return f"{repository.identifier}_release"


def release_job(
    repository: RepositoryConfig, partitions: DynamicPartitionsDefinition
) -> UnresolvedAssetJobDefinition:
    """Releases one commit of `repository`: its release asset only (`cicd release`)."""
    return define_asset_job(
        name=release_job_name(repository),
        selection=AssetSelection.assets(release_key(repository)),
        partitions_def=partitions,
        description=f"Release one commit of {repository.name}: version, tag, changelog, notes.",
        tags={"cicd/repository": repository.name},
        executor_def=in_process_executor,
    )


RESCAN_JOB = "security_rescan"


def rescan_job() -> UnresolvedAssetJobDefinition:
    """Every repository's security_rescan asset (the assets of the security_rescan group)."""
    return define_asset_job(
        name=RESCAN_JOB,
        selection=AssetSelection.groups(RESCAN_GROUP),
        description="Rescan what is in service against today's advisory database.",
        executor_def=in_process_executor,
    )


def rescan_schedule(config: ControlConfig, job: UnresolvedAssetJobDefinition) -> ScheduleDefinition:
    """security.rescan_schedule (nightly by default), in UTC; on as soon as the daemon runs,
    since a rescan nobody turned on catches nothing."""
    return ScheduleDefinition(
        name=f"{RESCAN_JOB}_schedule",
        cron_schedule=config.security.rescan_schedule,
        execution_timezone="UTC",
        job=job,
        default_status=DefaultScheduleStatus.RUNNING,
        description="Rescans the commits in service (live or standby) for new advisories.",
    )
