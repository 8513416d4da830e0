"""What every stage asset shares: run tags, its decorator, the stage context, failures with
a log tail, gates as blocking checks."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DynamicPartitionsDefinition,
    Failure,
    MetadataValue,
    PreviewWarning,
    TableColumn,
    TableRecord,
    TableSchema,
    asset,
)

from cicd_dagster.config import RepositoryConfig
from cicd_dagster.resources import CicdResource
from cicd_dagster.stages import StageContext
from cicd_dagster.store import GateRecord, StageRecord

# Run tags set by the repository sensor and by `cicd run`.
REF_TAG = "cicd/ref"
BRANCH_TAG = "cicd/branch"
FORCE_TAG = "cicd/force"
DETECTED_AT_TAG = "cicd/detected_at"


def commit_asset(
    repository: RepositoryConfig,
    partitions: DynamicPartitionsDefinition,
    *,
    key: AssetKey,
    kinds: set[str],
    description: str,
    deps: Sequence[AssetKey] = (),
    check_specs: Sequence[AssetCheckSpec] = (),
) -> Callable[[Callable[..., Any]], AssetsDefinition]:
    """The decorator of a CI stage asset: in the repository's group, one partition per commit."""
    return asset(
        key=key,
        deps=list(deps),
        group_name=repository.identifier,
        partitions_def=partitions,
        kinds=kinds,
        description=description,
        check_specs=list(check_specs),
    )


def stage_context(
    context: AssetExecutionContext, cicd: CicdResource, repository: str
) -> StageContext:
    tags = context.run.tags
    return StageContext.for_commit(
        cicd.control_config(),
        repository,
        context.partition_key,
        ref=tags.get(REF_TAG),
        branch=tags.get(BRANCH_TAG) or None,
        on_line=cicd.log_line,
        force=tags.get(FORCE_TAG) == "true",
    )


def fail_stage(
    context: AssetExecutionContext,
    cicd: CicdResource,
    ctx: StageContext,
    stage: str,
    started_at: datetime,
    error: Exception,
) -> Failure:
    """Record a failed stage in the history DB and build the Failure that shows why."""
    message = ctx.masker.mask(str(error))
    history = cicd.history()
    record = StageRecord(
        name=stage,
        status="failed",
        started_at=started_at,
        duration_s=(datetime.now(UTC) - started_at).total_seconds(),
        detail=message[-4000:],
        run_id=context.run_id,
    )
    try:
        history.record_stage(ctx.repository.name, ctx.sha, record)
    except LookupError:
        # A stage materialized before this commit's source ever was: no build row yet.
        history.record_build(
            ctx.repository.name, ctx.sha, ref=ctx.ref, branch=ctx.branch, run_id=context.run_id
        )
        history.record_stage(ctx.repository.name, ctx.sha, record)
    return Failure(
        description=message,
        metadata={"status": "failed", "error": MetadataValue.md(f"```\n{message}\n```")},
        allow_retries=False,
    )


def gate_specs(
    key: AssetKey, gates: Mapping[str, str], partitions: DynamicPartitionsDefinition
) -> list[AssetCheckSpec]:
    """Gates (name -> description) as blocking checks, recorded per commit (partitions_def),
    not as one result for all commits. That argument is a Dagster preview: its warning is
    known and silenced here, so it does not fill every CLI run and daemon log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=PreviewWarning)
        return [
            AssetCheckSpec(
                name,
                asset=key,
                blocking=True,
                partitions_def=partitions,
                description=description,
            )
            for name, description in gates.items()
        ]


def gate_results(
    gates: Iterable[GateRecord], extra_metadata: Callable[[GateRecord], Mapping[str, Any]]
) -> Iterator[AssetCheckResult]:
    """The result of each gate's blocking check (see gate_specs) at ERROR severity, with the
    gate's detail, then `extra_metadata(gate)`, as metadata."""
    for gate in gates:
        yield AssetCheckResult(
            check_name=gate.name,
            passed=gate.passed,
            severity=AssetCheckSeverity.ERROR,
            metadata={"detail": gate.detail, **extra_metadata(gate)},
        )


def table(frame: pd.DataFrame, columns: Iterable[str], limit: int = 50) -> MetadataValue:
    """A DataFrame as a metadata table (the first `limit` rows), typed for the UI."""
    names = list(columns)
    records = [
        TableRecord({name: _plain(row[name]) for name in names})
        for _, row in frame[names].head(limit).iterrows()
    ]
    schema = [TableColumn(name, _column_type(frame[name])) for name in names]
    return MetadataValue.table(records, schema=TableSchema(columns=schema))


def _plain(value: object) -> str | int | float | bool | None:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return None
    if isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item"):  # numpy scalars
        plain: str | int | float | bool = value.item()
        return plain
    return str(value)


def _column_type(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "float"
    return "string"
