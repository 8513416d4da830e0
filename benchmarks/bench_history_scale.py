"""(f) History and analytics queries at a realistic size, on SQLite and PostgreSQL.

A migrated history DB is seeded with a year of 20 repositories' work: 100 000 builds
(commits, 6 or 7 stages each, gates), 5 000 000 test cases (50 per build, 3 flaky tests
per repository), benchmarks, security findings, 5 000 deployments through dev, staging
and prod, and production incidents. Rows go in with bulk inserts (SQLAlchemy Core
executemany on SQLite, COPY on PostgreSQL), then ANALYZE (what housekeeping's vacuum
runs). Seeding is timed apart from the queries.

Then the queries users run are timed, median of N runs after an untimed first run: the
`cicd history builds/tests/deployments/scans` paths of HistoryStore with typical filters
(one repository, the last 30 days, one branch) and the analytics of
cicd_dagster/analytics (flaky ranking, performance report, DORA metrics from the
history's deployments and incidents: the repositories are not in the cicd.yaml given,
so no git mirror is read). The SQL each one sends is captured during the first run and
explained (SQLite: EXPLAIN QUERY PLAN; PostgreSQL: EXPLAIN ANALYZE); tables a plan reads
in full are listed beside the figures.

Everything is measured twice: at the baseline revision (default 0006, before the
analytics indexes of 0007: the store is opened at head, then alembic downgrades) and
again at head, so the JSON holds before and after for every index.

    .venv/bin/python benchmarks/bench_history_scale.py [--scale 1] [--runs 3]
        [--backend sqlite] [--backend postgresql] [--baseline-revision 0006 | --no-baseline]

PostgreSQL needs CICD_TEST_POSTGRES_URL (a server where the user may CREATE DATABASE):
the benchmark creates a database of its own there and drops it at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import sqlalchemy as sa
from _common import loadavg, median, metadata, print_table, scratch_dir, write_results
from alembic import command
from alembic.config import Config

from cicd_dagster.analytics.dora import all_dora_metrics
from cicd_dagster.analytics.flaky import flaky_ranking
from cicd_dagster.analytics.performance import (
    BUILD_ENV_COLUMNS,
    RUN_COLUMNS,
    performance_report,
)
from cicd_dagster.config import load_control_config
from cicd_dagster.store import HistoryStore
from cicd_dagster.store.models import Base

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "cicd_dagster" / "store" / "migrations"
REPOSITORIES = 20
BUILDS = 100_000
DEPLOYMENTS = 5_000
ENVIRONMENTS = ("dev", "staging", "prod")
UNIT_TESTS, INTEGRATION_TESTS = 40, 10
FLAKY_TESTS = 3  # per repository: fail now and then, and pass on a re-run
PERFORMANCE_EVERY = 10  # one build in 10 runs the performance stage (5 benchmarks)
FINDINGS_EVERY = 5  # one build in 5 has two findings
BATCH_BUILDS = 2_000  # builds generated and written per batch (100 000 test cases)
SEED = 6
# The repository the one-repository queries ask about: every repository looks alike.
ONE = "service-07"


# --- seeding --------------------------------------------------------------------------------


@dataclass
class Rows:
    """A batch of rows per table, as tuples in the order of COLUMNS[table]."""

    tables: dict[str, list[tuple[Any, ...]]]

    def add(self, table: str, row: tuple[Any, ...]) -> None:
        self.tables.setdefault(table, []).append(row)


COLUMNS = {
    "repositories": ("id", "name", "url"),
    "commits": (
        "id",
        "repository_id",
        "sha",
        "parents",
        "author_name",
        "author_email",
        "authored_at",
        "message",
        "detected_at",
        "run_requested_at",
    ),
    "builds": (
        "id",
        "repository_id",
        "commit_sha",
        "ref",
        "branch",
        "run_id",
        "created_at",
        "updated_at",
    ),
    "stages": (
        "id",
        "build_id",
        "name",
        "status",
        "started_at",
        "duration_s",
        "tests",
        "passed",
        "failed",
        "errors",
        "skipped",
        "flaky",
        "pass_rate",
        "coverage",
        "detail",
        "reused",
        "run_id",
    ),
    "test_cases": (
        "id",
        "stage_id",
        "report",
        "suite",
        "classname",
        "name",
        "file",
        "duration_s",
        "status",
        "message",
        "flaky",
    ),
    "gate_results": ("id", "build_id", "stage", "name", "passed", "value", "threshold", "detail"),
    "benchmarks": (
        "id",
        "stage_id",
        "name",
        "fullname",
        "mean_s",
        "median_s",
        "stddev_s",
        "min_s",
        "max_s",
        "rounds",
        "baseline_mean_s",
        "regression",
    ),
    "findings": (
        "id",
        "build_id",
        "source",
        "kind",
        "tool",
        "rule",
        "severity",
        "message",
        "file",
        "line",
        "package",
        "version",
        "suppressed",
        "suppression_reason",
        "found_at",
    ),
    "deployments": (
        "id",
        "repository_id",
        "commit_sha",
        "environment",
        "strategy",
        "status",
        "version",
        "previous_version",
        "reason",
        "started_at",
        "finished_at",
        "duration_s",
        "rollback_s",
        "run_id",
        "triggered_by",
        "config_digest",
    ),
    "incidents": (
        "id",
        "repository_id",
        "environment",
        "commit_sha",
        "opened_at",
        "closed_at",
        "reason",
    ),
}
JSON_COLUMNS = {("commits", "parents")}


@dataclass(frozen=True)
class Sizes:
    builds: int
    deployments: int

    @classmethod
    def at(cls, scale: float) -> Sizes:
        return cls(
            builds=max(REPOSITORIES, round(BUILDS * scale)), deployments=round(DEPLOYMENTS * scale)
        )


class History:
    """Generates the history, batch by batch, with explicit ids (no read-back needed)."""

    def __init__(self, sizes: Sizes, now: datetime) -> None:
        self.random = random.Random(SEED)
        self.sizes = sizes
        self.now = now
        self.start = now - timedelta(days=365)
        self.ids = dict.fromkeys(COLUMNS, 0)
        self.main_builds: dict[int, list[tuple[str, datetime]]] = {}  # repo id -> main commits
        self.tests = [
            (f"tests.unit.test_module{k // 8}", f"test_case_{k}") for k in range(UNIT_TESTS)
        ] + [
            (f"tests.integration.test_api{k // 5}", f"test_flow_{k}")
            for k in range(INTEGRATION_TESTS)
        ]
        self.mean_duration = [self.random.lognormvariate(-3, 1.2) for _ in self.tests]

    def next_id(self, table: str) -> int:
        self.ids[table] += 1
        return self.ids[table]

    def repositories(self) -> Rows:
        rows = Rows({})
        for index in range(1, REPOSITORIES + 1):
            rows.add(
                "repositories", (index, repository_name(index), f"https://git.example/{index}.git")
            )
        return rows

    def build_batches(self) -> Iterator[Rows]:
        """The builds of every repository in time order, BATCH_BUILDS at a time."""
        per_repo = self.sizes.builds // REPOSITORIES
        step = (self.now - self.start) / per_repo
        rows = Rows({})
        count = 0
        for index in range(per_repo):
            for repo in range(1, REPOSITORIES + 1):
                at = (
                    self.start
                    + step * index
                    + timedelta(seconds=self.random.uniform(0, step.total_seconds()))
                )
                self.build(rows, repo, index, at)
                count += 1
                if count % BATCH_BUILDS == 0:
                    yield rows
                    rows = Rows({})
        if rows.tables:
            yield rows

    def build(self, rows: Rows, repo: int, index: int, at: datetime) -> None:
        rnd = self.random
        sha = hashlib.sha1(f"{repo}:{index}".encode()).hexdigest()
        parent = hashlib.sha1(f"{repo}:{index - 1}".encode()).hexdigest()
        branch = "main" if rnd.random() < 0.7 else f"feature/topic-{rnd.randrange(60)}"
        if branch == "main":
            self.main_builds.setdefault(repo, []).append((sha, at))
        rows.add(
            "commits",
            (
                self.next_id("commits"),
                repo,
                sha,
                [parent],
                f"Developer {index % 17}",
                f"dev{index % 17}@example.com",
                at - timedelta(minutes=rnd.uniform(1, 600)),
                f"change {index} of {repository_name(repo)}",
                at - timedelta(seconds=5),
                at - timedelta(seconds=1),
            ),
        )
        build_id = self.next_id("builds")
        run_id = f"run-{build_id:08d}"
        ends = at

        def stage(
            name: str, status: str, duration: float, stage_id: int | None = None, **counts: Any
        ) -> int:
            nonlocal ends
            stage_id = stage_id or self.next_id("stages")
            summary = (
                counts.get("tests"),
                counts.get("passed"),
                counts.get("failed"),
                0 if counts else None,
                counts.get("skipped"),
                counts.get("flaky"),
                counts["passed"] / (counts["passed"] + counts["failed"]) if counts else None,
                rnd.uniform(0.7, 0.95) if name == "unit" else None,
            )
            rows.add(
                "stages",
                (stage_id, build_id, name, status, ends, duration, *summary, None, False, run_id),
            )
            ends += timedelta(seconds=duration)
            return stage_id

        stage("source", "success", rnd.uniform(0.2, 1.5))
        stage("build", "success", rnd.lognormvariate(3, 0.4))
        unit_failed = False
        for name, cases in (
            ("unit", range(UNIT_TESTS)),
            ("integration", range(UNIT_TESTS, len(self.tests))),
        ):
            stage_id = self.next_id("stages")
            counts = {"tests": 0, "passed": 0, "failed": 0, "skipped": 0, "flaky": 0}
            for case in cases:
                status, flaky = self.outcome(case)
                counts["tests"] += 1
                counts[status] += 1
                counts["flaky"] += flaky
                classname, test = self.tests[case]
                rows.add(
                    "test_cases",
                    (
                        self.next_id("test_cases"),
                        stage_id,
                        f"{name}.xml",
                        name,
                        classname,
                        test,
                        classname.replace(".", "/") + ".py",
                        None
                        if status == "skipped"
                        else self.mean_duration[case] * rnd.uniform(0.7, 1.4),
                        status,
                        "AssertionError: expected 200, got 503" if status == "failed" else None,
                        flaky,
                    ),
                )
            failed = counts["failed"] > 0
            unit_failed |= failed
            duration = sum(self.mean_duration[c] for c in cases) + rnd.uniform(1, 4)
            stage(name, "failed" if failed else "success", duration, stage_id, **counts)
        if index % PERFORMANCE_EVERY == repo % PERFORMANCE_EVERY:
            stage_id = stage("performance", "success", rnd.uniform(20, 40))
            for bench in range(5):
                mean = 0.001 * (bench + 1) * rnd.uniform(0.9, 1.2)
                baseline = 0.001 * (bench + 1)
                rows.add(
                    "benchmarks",
                    (
                        self.next_id("benchmarks"),
                        stage_id,
                        f"test_bench_{bench}",
                        f"bench/test_perf.py::test_bench_{bench}",
                        mean,
                        mean * 0.98,
                        mean * 0.05,
                        mean * 0.9,
                        mean * 1.3,
                        100,
                        baseline,
                        mean / baseline - 1,
                    ),
                )
            self.gate(rows, build_id, "performance", "max_perf_regression", 0.1)
        stage("security_scan", "success", rnd.uniform(2, 6))
        if index % FINDINGS_EVERY == 0:
            for finding in range(2):
                rows.add(
                    "findings",
                    (
                        self.next_id("findings"),
                        build_id,
                        "build",
                        "dependency" if finding else "sast",
                        "osv" if finding else "bandit",
                        f"PYSEC-2026-{rnd.randrange(500)}" if finding else "B105",
                        rnd.choice(("low", "medium", "high")),
                        "a finding",
                        None if finding else "src/app.py",
                        None if finding else rnd.randrange(1, 400),
                        "requests" if finding else None,
                        "2.31.0" if finding else None,
                        False,
                        None,
                        ends,
                    ),
                )
        stage("artifact", "skipped" if unit_failed else "success", rnd.uniform(0.5, 2))
        self.gate(rows, build_id, "unit", "min_pass_rate", 0.95)
        self.gate(rows, build_id, "security_scan", "max_high_findings", 0)
        rows.add(
            "builds",
            (build_id, repo, sha, f"refs/heads/{branch}", branch, run_id, at, ends),
        )

    def outcome(self, case: int) -> tuple[str, bool]:
        """(status, flaky) of one test case: the first FLAKY_TESTS sometimes fail, and pass
        on a re-run more often than not; the last two are always skipped."""
        if case >= len(self.tests) - 2:
            return "skipped", False
        if case < FLAKY_TESTS and self.random.random() < 0.08:
            retried = self.random.random() < 0.6
            return ("passed" if retried else "failed"), True
        return "passed", False

    def gate(self, rows: Rows, build_id: int, stage: str, name: str, threshold: float) -> None:
        value = (
            self.random.uniform(0.9, 1.0)
            if name == "min_pass_rate"
            else self.random.uniform(0, 0.12)
        )
        rows.add(
            "gate_results",
            (
                self.next_id("gate_results"),
                build_id,
                stage,
                name,
                value >= threshold if name == "min_pass_rate" else value <= threshold,
                value,
                threshold,
                "gate",
            ),
        )

    def deliveries(self) -> Rows:
        """Deployments of main commits through dev, staging and prod, and prod incidents."""
        rows = Rows({})
        rnd = self.random
        per_repo = self.sizes.deployments // REPOSITORIES
        for repo, commits in self.main_builds.items():
            picked = sorted(rnd.sample(range(len(commits)), min(per_repo, len(commits))))
            versions: dict[str, str | None] = dict.fromkeys(ENVIRONMENTS)
            for position, index in enumerate(picked):
                sha, built_at = commits[index]
                environment = ENVIRONMENTS[position % len(ENVIRONMENTS)]
                started = built_at + timedelta(minutes=20 + 30 * (position % 3))
                if started >= self.now:
                    continue
                status = "rolled_back" if rnd.random() < 0.05 else "deployed"
                duration = rnd.uniform(20, 90)
                rows.add(
                    "deployments",
                    (
                        self.next_id("deployments"),
                        repo,
                        sha,
                        environment,
                        "blue_green",
                        status,
                        sha[:12],
                        versions[environment],
                        "promoted",
                        started,
                        started + timedelta(seconds=duration),
                        duration,
                        rnd.uniform(1, 5) if status == "rolled_back" else None,
                        f"deploy-{self.ids['deployments']:08d}",
                        "sensor",
                        None,
                    ),
                )
                if status == "deployed":
                    versions[environment] = sha[:12]
                if environment == "prod" and status == "deployed" and rnd.random() < 0.1:
                    opened = started + timedelta(hours=rnd.uniform(1, 48))
                    rows.add(
                        "incidents",
                        (
                            self.next_id("incidents"),
                            repo,
                            "prod",
                            sha,
                            opened,
                            opened + timedelta(minutes=rnd.uniform(5, 600)),
                            "health probe failed",
                        ),
                    )
        return rows


def repository_name(index: int) -> str:
    return f"service-{index:02d}"


class Writer:
    """Bulk inserts into the seeded database, in one transaction per batch."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)
        self.dialect = self.engine.dialect.name
        self.tables = Base.metadata.tables

    def write(self, rows: Rows) -> None:
        # Parents before children: the order of COLUMNS.
        batches = [(table, rows.tables[table]) for table in COLUMNS if rows.tables.get(table)]
        if self.dialect == "postgresql":
            self._copy(batches)
        else:
            with self.engine.begin() as connection:
                for table, batch in batches:
                    names = COLUMNS[table]
                    connection.execute(
                        sa.insert(self.tables[table]),
                        [dict(zip(names, row, strict=True)) for row in batch],
                    )

    def _copy(self, batches: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        raw = self.engine.raw_connection()
        try:
            with raw.driver_connection.cursor() as cursor:  # type: ignore[union-attr]
                for table, batch in batches:
                    names = COLUMNS[table]
                    json_at = [i for i, name in enumerate(names) if (table, name) in JSON_COLUMNS]
                    with cursor.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as copy:
                        for row in batch:
                            if json_at:
                                row = tuple(
                                    json.dumps(v) if i in json_at else v for i, v in enumerate(row)
                                )
                            copy.write_row(row)
            raw.commit()
        finally:
            raw.close()

    def finish(self) -> None:
        """Sequences past the explicit ids (PostgreSQL), then fresh planner statistics."""
        with self.engine.connect() as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT")
            if self.dialect == "postgresql":
                for table in COLUMNS:
                    connection.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                        f" (SELECT coalesce(max(id), 1) FROM {table}))"
                    )
            connection.exec_driver_sql("ANALYZE")

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as connection:
            return {
                table: connection.execute(
                    sa.select(sa.func.count()).select_from(self.tables[table])
                ).scalar_one()
                for table in COLUMNS
            }

    def migrate(self, revision: str, *, down: bool) -> float:
        """Up- or downgrade to the revision; returns the seconds it took (index builds)."""
        started = time.perf_counter()
        with self.engine.begin() as connection:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            config.attributes["connection"] = connection
            (command.downgrade if down else command.upgrade)(config, revision)
        if not down:
            self.finish()  # statistics of the new indexes
        return time.perf_counter() - started


def seed(url: str, sizes: Sizes, now: datetime) -> dict[str, Any]:
    writer = Writer(url)
    history = History(sizes, now)
    started = time.perf_counter()
    writer.write(history.repositories())
    for batch in history.build_batches():
        writer.write(batch)
    writer.write(history.deliveries())
    inserted = time.perf_counter() - started
    writer.finish()
    seeding = {
        "insert_s": round(inserted, 1),
        "analyze_s": round(time.perf_counter() - started - inserted, 1),
        "rows": writer.counts(),
    }
    writer.engine.dispose()
    return seeding


# --- the queries ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    name: str
    run: Callable[[], int]  # returns the number of rows it produced


def queries(store: HistoryStore, config_path: Path, now: datetime, prefix: str) -> list[Query]:
    day = timedelta(days=1)
    month = now - 30 * day
    names = [repository_name(i) for i in range(1, REPOSITORIES + 1)]
    config = load_control_config(config_path)
    no_envs = pd.DataFrame({c: pd.Series(dtype="object") for c in BUILD_ENV_COLUMNS})
    no_runs = pd.DataFrame({c: pd.Series(dtype="object") for c in RUN_COLUMNS})
    for column in ("timestamp", "created_at", "started_at", "ended_at"):
        for frame in (no_envs, no_runs):
            if column in frame:
                frame[column] = pd.to_datetime(frame[column], utc=True)

    def flaky(repository: str) -> int:
        return len(flaky_ranking(store.test_outcomes(repository, month)))

    def performance(repository: str | None) -> int:
        report = performance_report(
            store, since=month, until=now, build_envs=no_envs, runs=no_runs, repository=repository
        )
        return len(report.builds) + len(report.slowest_tests) + len(report.benchmarks)

    def dora(repositories: list[str]) -> int:
        results = all_dora_metrics(config, store, now - 90 * day, now, repositories)
        return sum(metrics.deployment_frequency.count for metrics, _ in results)

    return [
        Query("history builds --repo R --since 30d", lambda: len(store.builds(ONE, month))),
        Query("history builds --since 30d", lambda: len(store.builds(since=month))),
        Query(
            "history builds --repo R --branch main", lambda: len(store.builds(ONE, branch="main"))
        ),
        Query("history tests --repo R --since 30d", lambda: len(store.tests(ONE, month))),
        Query(
            "history tests --repo R --since 30d --branch main --stage unit",
            lambda: len(store.tests(ONE, month, branch="main", stage="unit")),
        ),
        Query("history deployments --repo R", lambda: len(store.deployments(ONE))),
        Query("history deployments --since 30d", lambda: len(store.deployments(since=month))),
        Query("history scans --repo R --since 30d", lambda: len(store.findings(ONE, since=month))),
        Query("history scans --commit PREFIX", lambda: len(store.findings(commit=prefix))),
        Query("flaky: test_outcomes + flaky_ranking, R, 30 d", lambda: flaky(ONE)),
        Query("flaky: every repository, 30 d", lambda: sum(map(flaky, names))),
        Query("performance_report R, 30 d", lambda: performance(ONE)),
        Query("performance_report all, 30 d", lambda: performance(None)),
        Query("dora: all_dora_metrics R, 90 d", lambda: dora([ONE])),
        Query("dora: all_dora_metrics all, 90 d", lambda: dora(names)),
    ]


@contextmanager
def captured_sql() -> Iterator[list[tuple[str, Any]]]:
    """The SELECTs every engine sends meanwhile, with their parameters."""
    statements: list[tuple[str, Any]] = []

    def before(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    sa.event.listen(sa.Engine, "before_cursor_execute", before)
    try:
        yield statements
    finally:
        sa.event.remove(sa.Engine, "before_cursor_execute", before)


def explain(url: str, statements: Sequence[tuple[str, Any]]) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    plans = []
    try:
        with engine.connect() as connection:
            for statement, parameters in statements:
                if connection.dialect.name == "postgresql":
                    sql = "EXPLAIN (ANALYZE, BUFFERS) " + statement
                    plan = [row[0] for row in connection.exec_driver_sql(sql, parameters)]
                else:
                    sql = "EXPLAIN QUERY PLAN " + statement
                    rows = connection.exec_driver_sql(sql, parameters).all()
                    plan = [row[-1] for row in rows]
                plans.append({"sql": statement, "plan": plan, "full_scans": full_scans(plan)})
    finally:
        engine.dispose()
    return plans


_BIG_TABLES = (
    "builds",
    "stages",
    "test_cases",
    "gate_results",
    "benchmarks",
    "findings",
    "commits",
)


def full_scans(plan: Sequence[str]) -> list[str]:
    """The big tables a plan reads in full: SQLite's SCAN (also in index order: SEARCH is
    what looks rows up), PostgreSQL's Seq Scan."""
    found = {
        match[1] for line in plan if (match := re.search(r"(?:Seq Scan on|\bSCAN) (\w+)", line))
    }
    return sorted(found & set(_BIG_TABLES))


def measure(
    store: HistoryStore, url: str, query_list: list[Query], runs: int
) -> list[dict[str, Any]]:
    results = []
    for query in query_list:
        with captured_sql() as statements:
            rows = query.run()
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            query.run()
            seconds.append(time.perf_counter() - started)
        plans = explain(url, statements)
        scans = sorted({table for plan in plans for table in plan["full_scans"]})
        results.append(
            {
                "query": query.name,
                "rows": rows,
                "median_ms": round(median(seconds) * 1000, 1),
                "runs_ms": [round(s * 1000, 1) for s in seconds],
                "full_scans": scans,
                "plans": plans,
            }
        )
        print(
            f"  {query.name}: {rows} rows, {median(seconds) * 1000:.0f} ms, scans {scans or '-'}",
            flush=True,
        )
    return results


# --- backends ---------------------------------------------------------------------------------


@contextmanager
def database(backend: str, scratch: Path, keep: bool) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{scratch / 'history.db'}"
        return
    server = os.environ.get("CICD_TEST_POSTGRES_URL")
    if not server:
        raise SystemExit("--backend postgresql needs CICD_TEST_POSTGRES_URL")
    name = f"bench_history_scale_{os.getpid()}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        try:
            yield sa.make_url(server).set(database=name).render_as_string(hide_password=False)
        finally:
            if keep:
                print(f"kept database {name}", file=sys.stderr)
            else:
                with admin.connect() as connection:
                    connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        admin.dispose()


def run_backend(backend: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    sizes = Sizes.at(args.scale)
    now = datetime.now(UTC).replace(microsecond=0)
    config_path = scratch / "cicd.yaml"
    # A repository that is none of the seeded ones: DORA reads no git mirror for them.
    config_path.write_text(
        "home: .cicd\nrepositories:\n  - name: elsewhere\n    url: /nonexistent\n"
        "environments:\n" + "".join(f"  - name: {env}\n" for env in ENVIRONMENTS)
    )
    with database(backend, scratch, args.keep) as url:
        print(f"== {backend}: seeding {sizes.builds} builds", flush=True)
        HistoryStore(url).dispose()  # migrated to head
        seeding = seed(url, sizes, now)
        print(f"   {seeding}", flush=True)
        prefix = hashlib.sha1(f"7:{sizes.builds // REPOSITORIES // 2}".encode()).hexdigest()[:8]
        writer = Writer(url)
        phases: dict[str, Any] = {}
        store = HistoryStore(url)
        try:
            if args.baseline_revision:
                writer.migrate(args.baseline_revision, down=True)
                print(f"-- at revision {args.baseline_revision}", flush=True)
                phases["baseline"] = measure(
                    store, url, queries(store, config_path, now, prefix), args.runs
                )
                seeding["index_build_s"] = round(writer.migrate("head", down=False), 1)
            print("-- at head", flush=True)
            phases["head"] = measure(
                store, url, queries(store, config_path, now, prefix), args.runs
            )
            seeding["size_mib"] = round(store.size_bytes() / 2**20)
        finally:
            store.dispose()
            writer.engine.dispose()
    return {"sizes": vars(sizes), "seeding": seeding, **phases}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="fraction of the full size (1 = 100 000 builds)"
    )
    parser.add_argument("--runs", type=int, default=3, help="timed runs per query (median)")
    parser.add_argument(
        "--backend",
        action="append",
        choices=["sqlite", "postgresql"],
        help="repeatable; default both",
    )
    parser.add_argument(
        "--baseline-revision", default="0006", help="measure here first, then at head"
    )
    parser.add_argument("--no-baseline", dest="baseline_revision", action="store_const", const=None)
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch folder and the PostgreSQL database"
    )
    args = parser.parse_args()
    backends = args.backend or ["sqlite", "postgresql"]
    results: dict[str, Any] = {
        "benchmark": "history_scale",
        **metadata(),
        "scale": args.scale,
        "runs": args.runs,
        "baseline_revision": args.baseline_revision,
        "loadavg_before": loadavg(),
        "backends": {},
    }
    with scratch_dir("bench-history-scale-", keep=args.keep) as scratch:
        for backend in backends:
            results["backends"][backend] = run_backend(backend, args, scratch)
    results["loadavg_after"] = loadavg()
    table = []
    for index, query in enumerate(results["backends"][backends[0]]["head"]):
        row: list[object] = [query["query"], query["rows"]]
        for backend in backends:
            measured = results["backends"][backend]
            before = measured.get("baseline", [{}] * (index + 1))[index].get("median_ms", "")
            row += [before, measured["head"][index]["median_ms"]]
        table.append(row)
    headers = ["query", "rows"]
    for backend in backends:
        headers += [f"{backend} ms @{args.baseline_revision or '-'}", f"{backend} ms @head"]
    print()
    print_table(headers, table)
    suffix = "" if args.scale == 1 else f"_scale{args.scale:g}"
    write_results(f"history_scale{suffix}", results)


if __name__ == "__main__":
    main()
