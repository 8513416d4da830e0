"""The result of one CI run of a commit, as the `cicd run --json` contract shapes it."""

from __future__ import annotations

import math
from typing import Any

from cicd_dagster.stages.tests import TEST_STAGES
from cicd_dagster.store import HistoryStore

STAGES = ("source", "build", *TEST_STAGES)
_COUNTS = ("tests", "passed", "failed", "errors", "skipped")


def run_report(
    history: HistoryStore, repository: str, sha: str, run_id: str, *, ref: str, branch: str | None
) -> dict[str, Any]:
    """Stages this run did not reach (an upstream failed) are reported as skipped."""
    rows = {row["name"]: row for row in history.stage_rows(repository, sha).to_dict("records")}
    stages: dict[str, dict[str, Any]] = {}
    for name in STAGES:
        row = rows.get(name)
        if row is None or row["run_id"] != run_id:
            stages[name] = {"status": "skipped", "duration_s": 0.0}
            continue
        stage: dict[str, Any] = {
            "status": row["status"],
            "duration_s": round(float(row["duration_s"] or 0.0), 3),
        }
        if name in TEST_STAGES and row["status"] != "not_configured":
            stage.update({key: _int(row[key]) for key in _COUNTS})
        if row.get("reused"):
            stage["reused"] = True
        if row.get("detail") and row["status"] == "failed":
            stage["detail"] = row["detail"]
        stages[name] = stage
    gate_rows = history.gate_rows(repository, sha).to_dict("records")
    gates = [
        {
            "name": f"{gate['stage']}.{gate['name']}",
            "stage": gate["stage"],
            "passed": bool(gate["passed"]),
            "detail": gate["detail"],
        }
        for gate in gate_rows
        if stages.get(gate["stage"], {}).get("status") not in (None, "skipped")
    ]
    green = all(s["status"] in ("success", "not_configured") for s in stages.values()) and all(
        g["passed"] for g in gates
    )
    return {
        "repository": repository,
        "commit": sha,
        "ref": ref,
        "branch": branch,
        "run_id": run_id,
        "status": "success" if green else "failed",
        "stages": stages,
        "gates": gates,
    }


def _int(value: Any) -> int:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0
    return int(value)
