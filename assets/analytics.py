"""The analytics assets: unpartitioned, group `analytics`, key prefix `analytics`, each one
covering every repository. Each concern builds its assets in its own module; this list is
the one place that gathers them (for definitions.py and the analytics job)."""

from dagster import AssetsDefinition

from assets.analytics_dora import analytics_dora_assets
from assets.analytics_flaky import analytics_flaky_assets
from assets.analytics_performance import analytics_performance_assets
from cicd_dagster.config import ControlConfig

GROUP = "analytics"


def analytics_assets(config: ControlConfig) -> list[AssetsDefinition]:
    return [
        *analytics_dora_assets(config),
        *analytics_flaky_assets(config),
        *analytics_performance_assets(config),
    ]
