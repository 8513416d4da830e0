"""The CI stages as plain functions: each takes a StageContext and returns an outcome.

The Dagster assets call exactly one of these per asset; everything they record comes
from the returned outcome.
"""

from cicd_dagster.stages.context import StageContext, StageError

__all__ = ["StageContext", "StageError"]
