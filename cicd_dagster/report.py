"""The result of one CI run of a commit, in the shape the `cicd run --json` contract fixes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cicd_dagster.stages.tests import TEST_STAGES

STAGES = ("source", "build", *TEST_STAGES, "security_scan", "sbom", "artifact")
_TEST_FIELDS = ("tests", "passed", "failed", "errors", "skipped")


def stage_of_asset(asset_name: str) -> str:
    """`unit_tests` -> `unit`; `source` and `build` are their own stage."""
    return asset_name.removesuffix("_tests")


def run_report(
    *,
    repository: str,
    commit: str,
    ref: str,
    branch: str | None,
    run_id: str,
    stages: Mapping[str, Mapping[str, Any]],
    gates: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """`stages` maps a stage to what its asset recorded; a stage the run never reached
    (an upstream stage failed) is reported as skipped."""
    shaped: dict[str, dict[str, Any]] = {}
    for name in STAGES:
        recorded = stages.get(name, {"status": "skipped"})
        stage: dict[str, Any] = {
            "status": recorded["status"],
            "duration_s": round(float(recorded.get("duration_s") or 0.0), 3),
        }
        if name in TEST_STAGES and "tests" in recorded:
            stage.update({key: int(recorded.get(key) or 0) for key in _TEST_FIELDS})
        if recorded.get("reused"):
            stage["reused"] = True
        if recorded.get("detail"):
            stage["detail"] = recorded["detail"]
        shaped[name] = stage
    gate_list = [
        {
            "name": f"{gate['stage']}.{gate['name']}",
            "stage": gate["stage"],
            "passed": bool(gate["passed"]),
            "detail": gate["detail"],
        }
        for gate in sorted(gates, key=lambda g: (STAGES.index(g["stage"]), g["name"]))
    ]
    green = all(s["status"] in ("success", "not_configured") for s in shaped.values()) and all(
        gate["passed"] for gate in gate_list
    )
    return {
        "repository": repository,
        "commit": commit,
        "ref": ref,
        "branch": branch,
        "run_id": run_id,
        "status": "success" if green else "failed",
        "stages": shaped,
        "gates": gate_list,
    }
