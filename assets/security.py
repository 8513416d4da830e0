"""security_scan: static analysis, dependency advisories, licences and secrets of a commit.

The scan's findings are the asset's metadata and history rows; its four gates are
blocking checks, so a finding that is not suppressed stops everything downstream.
"""

from collections import Counter
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime
from typing import Any

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DynamicPartitionsDefinition,
    MaterializeResult,
    MetadataValue,
)

from assets.build import build_key
from assets.common import (
    commit_asset,
    fail_stage,
    gate_results,
    gate_specs,
    stage_context,
    table,
)
from cicd_dagster.config import RepositoryConfig
from cicd_dagster.resources import CicdResource
from cicd_dagster.security.sast import SEVERITIES
from cicd_dagster.stages import StageError
from cicd_dagster.stages.build import load_build
from cicd_dagster.stages.security import (
    GATE_KINDS,
    STAGE,
    SecurityScan,
    evaluate_security_gates,
    location,
    run_security_scan,
)
from cicd_dagster.stages.source import load_source
from cicd_dagster.store import StageRecord
from cicd_dagster.store.history import FindingRecord

GATE_DESCRIPTIONS = {
    "no_vulnerabilities": "No unsuppressed dependency advisory at or above security.fail_on "
    "(an advisory of unknown severity counts as failing).",
    "licenses_allowed": "No dependency under a denied licence, nor (with an allow list) "
    "under a licence that is not allowed or not known.",
    "no_secrets": "No unsuppressed secret committed in the checkout.",
    "no_sast_findings": "No unsuppressed static-analysis finding at or above security.fail_on.",
}
FINDING_COLUMNS = ["kind", "rule", "severity", "location", "message", "suppressed", "reason"]


def security_key(repository: RepositoryConfig) -> AssetKey:
    return AssetKey([repository.name, STAGE])


def security_asset(
    repository: RepositoryConfig, partitions: DynamicPartitionsDefinition
) -> AssetsDefinition:
    key = security_key(repository)

    @commit_asset(
        repository,
        partitions,
        key=key,
        deps=[build_key(repository)],
        kinds={"bandit", "sarif"},
        description="SAST, dependency advisories (offline OSV), licences and secrets of the "
        "commit; the SARIF logs stay in its reports folder.",
        check_specs=gate_specs(key, GATE_DESCRIPTIONS, partitions),
    )
    def security_scan(
        context: AssetExecutionContext, cicd: CicdResource
    ) -> Iterator[MaterializeResult | AssetCheckResult]:
        ctx = stage_context(context, cicd, repository.name)
        started_at = datetime.now(UTC)
        try:
            pipeline, _, _ = load_source(ctx)
            build = load_build(ctx, pipeline)
            scan = run_security_scan(ctx, pipeline, build, today=date.today())
        except StageError as error:
            raise fail_stage(context, cicd, ctx, STAGE, started_at, error) from error
        for warning in ctx.warnings:
            context.log.warning(warning)
        gates = evaluate_security_gates(scan, cicd.control_config().security.fail_on)
        history = cicd.history()
        history.record_findings(
            repository.name, ctx.sha, "build", scan.findings, found_at=scan.scanned_at
        )
        status = "success" if all(gate.passed for gate in gates) else "failed"
        history.record_stage(
            repository.name,
            ctx.sha,
            StageRecord(
                name=STAGE,
                status=status,
                started_at=started_at,
                duration_s=scan.duration_s,
                reused=scan.reused,
                run_id=context.run_id,
            ),
        )
        history.record_gates(repository.name, ctx.sha, STAGE, gates)
        yield MaterializeResult(metadata=scan_metadata(scan, status))
        yield from gate_results(
            gates,
            lambda gate: {
                "blocking_findings": int(gate.value or 0),
                "findings": findings_table(scan.of_kind(GATE_KINDS[gate.name])),
            },
        )

    return security_scan


def scan_metadata(scan: SecurityScan, status: str) -> dict[str, Any]:
    """Counts per kind and per severity as numbers (so the UI plots them over commits)."""
    kinds = Counter(f.kind for f in scan.findings if not f.suppressed)
    severities = Counter(f.severity for f in scan.findings if not f.suppressed)
    metadata: dict[str, Any] = {
        "status": status,
        "duration_s": round(scan.duration_s, 3),
        "reused": scan.reused,
        **{f"{kind}_findings": kinds[kind] for kind in GATE_KINDS.values()},
        **{f"{severity}_findings": severities[severity] for severity in (*SEVERITIES, "unknown")},
        "suppressed_findings": sum(f.suppressed for f in scan.findings),
        "dependencies": scan.dependencies,
        "findings": findings_table(scan.findings),
        "sarif": ", ".join(str(path) for path in scan.sarif),
        "tools": ", ".join(scan.tools),
    }
    if scan.advisories is not None:
        metadata["advisories"] = scan.advisories
    if scan.expired:
        metadata["expired_suppressions"] = ", ".join(
            f"{entry.rule} ({entry.expires.isoformat()})" for entry in scan.expired
        )
    if scan.warnings:
        metadata["warnings"] = MetadataValue.md("\n".join(f"- {w}" for w in scan.warnings))
    return metadata


def findings_table(findings: Sequence[FindingRecord]) -> MetadataValue:
    """rule, severity, file:line or package==version, message (never a secret in clear:
    the scanners redact them)."""
    frame = pd.DataFrame(
        [
            {
                "kind": f.kind,
                "rule": f.rule,
                "severity": f.severity,
                "location": location(f),
                "message": f.message,
                "suppressed": f.suppressed,
                "reason": f.suppression_reason or "",
            }
            for f in findings
        ],
        columns=FINDING_COLUMNS,
    ).astype({"suppressed": bool})
    return table(frame, FINDING_COLUMNS, limit=200)
