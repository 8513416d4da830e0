"""security_rescan: each repository's in-service commits against today's advisories.

Unpartitioned: one materialization per rescan (the security_rescan schedule's job, or
`cicd rescan`), so the UI plots new and blocking findings night after night. Its check
stays failed while anything in service has an unsuppressed finding at or above fail_on,
or cannot be rescanned.
"""

from datetime import UTC, date, datetime
from typing import Any

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.artifact import artifact_key
from assets.common import table
from cicd_dagster.config import RepositoryConfig
from cicd_dagster.resources import CicdResource
from cicd_dagster.stages import StageError
from cicd_dagster.stages.rescan import STAGE, CommitRescan, Rescan, rescan_in_service
from cicd_dagster.stages.security import location
from cicd_dagster.store.history import FindingRecord

RESCAN_GROUP = "security_rescan"
CHECK_NAME = "no_vulnerabilities_in_service"
FINDING_COLUMNS = [
    "commit",
    "where",
    "rule",
    "severity",
    "location",
    "message",
    "new",
    "suppressed",
]


def rescan_key(repository: RepositoryConfig) -> AssetKey:
    return AssetKey([repository.name, STAGE])


def rescan_asset(repository: RepositoryConfig) -> AssetsDefinition:
    key = rescan_key(repository)

    @asset(
        key=key,
        deps=[artifact_key(repository)],
        group_name=RESCAN_GROUP,
        kinds={"osv"},
        description=f"The SBOMs of {repository.name}'s commits in service (live or kept for a "
        "rollback), matched against today's advisory database.",
        check_specs=[
            AssetCheckSpec(
                CHECK_NAME,
                asset=key,
                description="Nothing in service has an unsuppressed dependency finding at or "
                "above security.fail_on, and every commit in service could be rescanned.",
            )
        ],
    )
    def security_rescan(context: AssetExecutionContext, cicd: CicdResource) -> MaterializeResult:
        config = cicd.control_config()
        try:
            rescan = rescan_in_service(
                config,
                cicd.history(),
                repository.name,
                now=datetime.now(UTC),
                today=date.today(),
            )
        except StageError as error:
            raise Failure(description=str(error), allow_retries=False) from error
        for warning in rescan.warnings:
            context.log.warning(warning)
        for commit in rescan.commits:
            if commit.new:
                context.log.error(
                    f"{len(commit.new)} new finding(s) in {commit.commit[:12]} "
                    f"({', '.join(commit.where)})"
                )
        blocking = rescan.blocking(config.security.fail_on)
        check = AssetCheckResult(
            check_name=CHECK_NAME,
            passed=not blocking and not rescan.errors,
            severity=AssetCheckSeverity.ERROR,
            metadata={"detail": _detail(rescan, blocking, config.security.fail_on)},
        )
        return MaterializeResult(
            metadata=rescan_metadata(rescan, len(blocking)), check_results=[check]
        )

    return security_rescan


def rescan_metadata(rescan: Rescan, blocking: int) -> dict[str, Any]:
    rows = [
        {
            "commit": commit.commit[:12],
            "where": ", ".join(commit.where),
            "rule": finding.rule,
            "severity": finding.severity,
            "location": location(finding),
            "message": finding.message,
            "new": finding in commit.new,
            "suppressed": finding.suppressed,
        }
        for commit in rescan.commits
        for finding in commit.findings
    ]
    metadata: dict[str, Any] = {
        "commits_rescanned": len(rescan.commits) - len(rescan.errors),
        "new_findings": sum(len(c.new) for c in rescan.commits),
        "blocking_findings": blocking,
        "unscannable_commits": len(rescan.errors),
        "duration_s": round(rescan.duration_s, 3),
        "findings": table(
            pd.DataFrame(rows, columns=FINDING_COLUMNS).astype({"new": bool, "suppressed": bool}),
            FINDING_COLUMNS,
            limit=200,
        ),
        "in_service": MetadataValue.md(
            "\n".join(
                f"- `{c.commit[:12]}` in {', '.join(c.where)}: "
                + (f"cannot be rescanned: {c.error}" if c.error else f"{c.dependencies} libraries")
                for c in rescan.commits
            )
            or "nothing in service"
        ),
    }
    if rescan.advisories is not None:
        metadata["advisories"] = rescan.advisories
    if rescan.warnings:
        metadata["warnings"] = MetadataValue.md("\n".join(f"- {w}" for w in rescan.warnings))
    return metadata


def _detail(
    rescan: Rescan, blocking: list[tuple[CommitRescan, FindingRecord]], fail_on: str
) -> str:
    if rescan.advisories is None:
        return "no security.advisory_db configured: nothing was matched"
    parts = [
        f"{commit.commit[:12]} cannot be rescanned: {commit.error}" for commit in rescan.errors
    ]
    parts += [
        f"{finding.rule} {finding.severity} {location(finding)} in {commit.commit[:12]} "
        f"({', '.join(commit.where)})"
        for commit, finding in blocking
    ]
    if not parts:
        scanned = len(rescan.commits)
        return f"no unsuppressed dependency finding at or above {fail_on} in {scanned} commit(s)"
    return "; ".join(parts)
