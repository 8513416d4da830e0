"""DORA formulas on small frames: what fourkeys leaves out, and no data."""

from datetime import UTC, datetime

import pandas as pd

from cicd_dagster.analytics.dora import change_failure_rate, lead_time_for_changes

T0 = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)


def test_changes_of_unknown_time_and_non_positive_lead_times_are_left_out() -> None:
    deployments = pd.DataFrame({"time_created": [T0], "changes": [["a", "b", "c", "d"]]})
    changes = pd.DataFrame(
        {
            "change_id": ["a", "b", "c", "d"],
            "time_created": [
                T0 - pd.Timedelta(minutes=90),
                None,  # a commit the mirror no longer has: time unknown
                T0 + pd.Timedelta(minutes=5),  # after the deploy: an automated push
                T0 - pd.Timedelta(minutes=30, seconds=59),  # truncated to 30
            ],
        }
    )
    metric = lead_time_for_changes(deployments, changes)
    assert (metric.value, metric.count) == (60.0, 2)  # median of 90 and 30


def test_nothing_to_measure_is_no_data_never_a_division_by_zero() -> None:
    deployments = pd.DataFrame({"time_created": [T0], "changes": [["a"]]})
    unknown = pd.DataFrame({"change_id": ["a"], "time_created": [None]})
    assert lead_time_for_changes(deployments, unknown).level == "no data"
    assert change_failure_rate(0, 0).level == "no data"
