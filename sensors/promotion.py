"""The promotion sensor: green commits of the default branch into `auto_deploy` environments,
and QA of what goes live in the environment with `qa: true`.

For each auto_deploy environment it takes the newest green commit of the default branch
(past the first environment: the newest one verified in the previous environment, and
after a QA environment one whose QA there passed) and, unless that commit was already
attempted there, requests one run of the environment's deploy job for it (run key
"<env>:<sha>", so it is requested once). Only the newest: an older commit never overtakes
the one live, and a newest commit whose tests still run is waited for rather than skipped.

For the QA environment it requests the QA job of the commit live there once (run key
"qa:<env>:<sha>") unless that commit's QA already ran: `cicd qa` runs it again.
"""

from collections.abc import Sequence

from dagster import (
    DefaultSensorStatus,
    RunRequest,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition

from assets.common import BRANCH_TAG, REF_TAG
from assets.deploy import TRIGGER_TAG
from cicd_dagster.config import EnvironmentConfig, RepositoryConfig
from cicd_dagster.git import GitError, ls_remote
from cicd_dagster.resources import CicdResource
from cicd_dagster.stages.deploy import QA_STAGE, unfit_build, unpassed_qa
from cicd_dagster.store import HistoryStore
from jobs import deploy_job_name, qa_job_name

PROMOTION_INTERVAL_S = 30
PROMOTION_TRIGGER = "sensor:promotion"


def promotion_sensors(
    repository: RepositoryConfig,
    environments: Sequence[EnvironmentConfig],
    deploy_jobs: Sequence[UnresolvedAssetJobDefinition],
    qa_jobs: Sequence[UnresolvedAssetJobDefinition] = (),
) -> list[SensorDefinition]:
    """The repository's promotion sensor, or none when no environment has auto_deploy or
    qa. `deploy_jobs` are the environments' deploy jobs, in the same order; `qa_jobs` the
    QA job of the QA environment, if there is one."""
    auto_deploy = [env.name for env in environments if env.auto_deploy]
    qa = [env for env in environments if env.qa]
    if not auto_deploy and not qa:
        return []
    does = [f"Runs QA of what goes live in {env.name}" for env in qa]
    if auto_deploy:
        does.insert(
            0,
            f"Deploys green commits of {repository.name}'s default branch to "
            + ", ".join(auto_deploy),
        )
    auto_deploy_jobs = [
        job for env, job in zip(environments, deploy_jobs, strict=True) if env.auto_deploy
    ]

    @sensor(
        name=f"{repository.identifier}_promotion",
        jobs=[*auto_deploy_jobs, *qa_jobs],
        minimum_interval_seconds=PROMOTION_INTERVAL_S,
        default_status=DefaultSensorStatus.RUNNING,
        description="; ".join(does) + ".",
    )
    def promote(context: SensorEvaluationContext, cicd: CicdResource) -> SensorResult | SkipReason:
        try:
            branch = repository.default_branch or ls_remote(repository.url).default_branch
        except GitError as error:
            return SkipReason(f"{repository.name}: {error}")
        if branch is None:
            return SkipReason(f"{repository.name}: the remote names no default branch")
        history = cicd.history()
        builds = history.builds(repository=repository.name, branch=branch)
        green = [str(sha) for sha in builds.loc[builds["status"] == "success", "commit"]]
        requests: list[RunRequest] = []
        notes: list[str] = []
        for environment in qa:
            request, note = _qa_request(history, repository, environment, branch)
            if request is None:
                notes.append(f"qa in {environment.name}: {note}")
            else:
                requests.append(request)
        for index, environment in enumerate(environments):
            if not environment.auto_deploy:
                continue
            previous = environments[index - 1] if index else None
            sha, note = _candidate(history, repository.name, environment.name, previous, green)
            if sha is None:
                notes.append(f"{environment.name}: {note}")
                continue
            context.log.info(f"{repository.name}: promote {sha[:12]} to {environment.name}")
            requests.append(
                RunRequest(
                    run_key=f"{environment.name}:{sha}",
                    job_name=deploy_job_name(repository, environment),
                    partition_key=sha,
                    tags={TRIGGER_TAG: PROMOTION_TRIGGER, REF_TAG: branch, BRANCH_TAG: branch},
                )
            )
        if not requests:
            return SkipReason("; ".join(notes))
        return SensorResult(run_requests=requests)

    return [promote]


def _qa_request(
    history: HistoryStore, repository: RepositoryConfig, environment: EnvironmentConfig, branch: str
) -> tuple[RunRequest | None, str]:
    """(the run of QA for the commit live in `environment`, "") or (None, why there is none)."""
    live = history.last_verified_deployment(repository.name, environment.name)
    if live is None:
        return None, "nothing is live"
    sha = str(live["commit"])
    stages = history.stage_rows(repository.name, sha)
    if (stages["name"] == QA_STAGE).any():
        return None, f"{sha[:12]} has been through QA"
    request = RunRequest(
        run_key=f"qa:{environment.name}:{sha}",
        job_name=qa_job_name(repository, environment),
        partition_key=sha,
        tags={TRIGGER_TAG: PROMOTION_TRIGGER, REF_TAG: branch, BRANCH_TAG: branch},
    )
    return request, ""


def _candidate(
    history: HistoryStore,
    repository: str,
    environment: str,
    previous: EnvironmentConfig | None,
    green: list[str],
) -> tuple[str | None, str]:
    """(the commit to deploy to `environment`, "") or (None, why there is none)."""
    if previous is not None:
        deployed = history.deployments(repository=repository, environment=previous.name)
        verified = set(deployed.loc[deployed["status"] == "deployed", "commit"])
        green = [sha for sha in green if sha in verified]
        if previous.qa:
            green = [
                sha for sha in green if unpassed_qa(history, repository, previous.name, sha) is None
            ]
    if not green:
        where = f" verified in {previous.name}" if previous else ""
        if previous is not None and previous.qa:
            where += " that passed QA there"
        return None, f"no green commit{where}"
    newest = green[0]
    attempts = history.deployments(repository=repository, environment=environment)
    if (attempts["commit"] == newest).any():
        return None, f"{newest[:12]} was already attempted"
    unfit = unfit_build(history, repository, newest)
    if unfit is not None:
        return None, unfit
    return newest, ""
