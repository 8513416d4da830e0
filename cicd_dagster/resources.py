"""Dagster resources: the one door from the Dagster layer into the engine."""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

from dagster import ConfigurableResource

from cicd_dagster.config import ControlConfig, load_control_config
from cicd_dagster.store import HistoryStore


@lru_cache(maxsize=8)
def _control_config(path: str) -> ControlConfig:
    return load_control_config(Path(path))


@lru_cache(maxsize=8)
def _history_store(url: str) -> HistoryStore:
    return HistoryStore(url)


class CicdResource(ConfigurableResource):
    """The control-plane config (cicd.yaml), the history DB and how step logs are shown."""

    config_path: str
    # Step output goes to stderr, which Dagster captures as the step's compute log;
    # the CLI turns it off so that its progress display stays readable.
    stream_logs: bool = True

    def control_config(self) -> ControlConfig:
        return _control_config(self.config_path)

    def history(self) -> HistoryStore:
        return _history_store(self.control_config().history_db_url)

    def log_line(self, line: str) -> None:
        if self.stream_logs:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
