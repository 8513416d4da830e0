"""security_scan: static analysis, dependencies, licences and secrets of one commit.

The scan reads the commit's checkout and its build's environment; every finding becomes a
FindingRecord. The raw findings are cached per input (checkout, environment, advisory
database, policy); the .cicd.yml suppressions are applied afresh on every run, so a
suppression that expires overnight stops applying without a rescan.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from cicd_dagster.config import PipelineConfig, SuppressionConfig
from cicd_dagster.reports import ReportError
from cicd_dagster.security.dependencies import DependencyError, resolved_dependencies
from cicd_dagster.security.licenses import LicensePolicyError, check_licenses
from cicd_dagster.security.osv import (
    AdvisoryDatabase,
    AdvisoryDatabaseError,
    DependencyVersionError,
    load_advisories,
    match,
)
from cicd_dagster.security.sast import (
    BANDIT_TIMEOUT_S,
    SEVERITIES,
    Finding,
    SarifReport,
    SastError,
    parse_sarif,
    run_bandit,
)
from cicd_dagster.security.secrets import SecretScanError, scan_secrets
from cicd_dagster.stages.build import BuildOutcome
from cicd_dagster.stages.context import StageContext, StageError
from cicd_dagster.store import GateRecord
from cicd_dagster.store.history import FindingRecord
from cicd_dagster.workspace import fingerprint

STAGE = "security_scan"
# Each gate judges the findings of one kind.
GATE_KINDS = {
    "no_vulnerabilities": "dependency",
    "licenses_allowed": "license",
    "no_secrets": "secret",
    "no_sast_findings": "sast",
}
# Severities of the kinds whose scanners give none: a committed secret, a licence finding.
LEAK_SEVERITY = "high"
SEVERITY_OF_LICENSE = {"denied": "high", "not_allowed": "medium", "unknown": "medium"}
_DETAIL_ITEMS = 5  # findings named in a gate's detail; the check's table lists them all


@dataclass(frozen=True)
class SecurityScan:
    findings: list[FindingRecord]
    """Every finding; those a live suppression covers have `suppressed` set and still count."""
    expired: list[SuppressionConfig]
    """.cicd.yml suppressions past their expiry: they suppress nothing any more."""
    aliases: dict[str, list[str]]  # advisory id -> its CVE/GHSA aliases
    warnings: list[str]
    sarif: list[Path]
    tools: list[str]
    dependencies: int
    advisories: int | None  # None: no security.advisory_db, dependencies not matched
    licence_policy: bool  # an allow or deny list is configured
    scanned_at: datetime
    duration_s: float
    reused: bool = False

    def of_kind(self, kind: str) -> list[FindingRecord]:
        return [finding for finding in self.findings if finding.kind == kind]


@dataclass(frozen=True)
class _RawScan:
    """What the tools reported, before suppressions: the cached part of a scan."""

    findings: list[FindingRecord]
    aliases: dict[str, list[str]]  # advisory id -> its CVE/GHSA aliases
    warnings: list[str]
    sarif: list[str]
    tools: list[str]
    dependencies: int
    advisories: int | None
    scanned_at: datetime
    duration_s: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _RawScan:
        return cls(
            **{
                **data,
                "findings": [FindingRecord(**f) for f in data["findings"]],
                "scanned_at": datetime.fromisoformat(data["scanned_at"]),
            }
        )


def run_security_scan(
    ctx: StageContext, pipeline: PipelineConfig, build: BuildOutcome, *, today: date
) -> SecurityScan:
    """Scan the commit (or reuse the scan of identical inputs) and apply the suppressions
    as of `today`."""
    with ctx.workspace.stage_lock(STAGE):
        key = _scan_fingerprint(ctx, pipeline, build)
        cached = None if ctx.force else ctx.workspace.load_result(STAGE, key)
        raw = _RawScan.from_json(cached) if cached is not None else None
        reused = raw is not None and all(Path(p).is_file() for p in raw.sarif)
        if raw is None or not reused:
            raw = _scan(ctx, pipeline, build)
            ctx.workspace.save_result(STAGE, key, asdict(raw))
    suppressions = pipeline.security.suppressions
    findings = apply_suppressions(raw.findings, suppressions, raw.aliases, today)
    expired = [entry for entry in suppressions if entry.expires < today]
    warnings = [
        *raw.warnings,
        *(f"{_describe(entry)} expired; it no longer applies" for entry in expired),
    ]
    ctx.warnings.extend(warnings)
    licences = ctx.config.security.licenses
    return SecurityScan(
        findings=findings,
        expired=expired,
        aliases=raw.aliases,
        warnings=warnings,
        sarif=[Path(p) for p in raw.sarif],
        tools=raw.tools,
        dependencies=raw.dependencies,
        advisories=raw.advisories,
        licence_policy=bool(licences.allow or licences.deny),
        scanned_at=raw.scanned_at,
        duration_s=raw.duration_s,
        reused=reused,
    )


def evaluate_security_gates(scan: SecurityScan, fail_on: str) -> list[GateRecord]:
    """The four gates. A dependency or SAST finding of unknown severity reaches every
    threshold: an advisory that does not say how bad it is fails closed."""
    return [
        _gate(
            "no_vulnerabilities",
            scan,
            [f for f in scan.of_kind("dependency") if reaches(f.severity, fail_on)],
            f"at or above {fail_on}",
            None
            if scan.advisories is not None
            else "no security.advisory_db configured: dependencies were not checked",
        ),
        _gate(
            "licenses_allowed",
            scan,
            scan.of_kind("license"),
            "rejected by the licence policy",
            None if scan.licence_policy else "no licence allow or deny list configured",
        ),
        _gate("no_secrets", scan, scan.of_kind("secret"), "committed", None),
        _gate(
            "no_sast_findings",
            scan,
            [f for f in scan.of_kind("sast") if reaches(f.severity, fail_on)],
            f"at or above {fail_on}",
            None if scan.tools else "no static analyser ran",
        ),
    ]


def location(finding: FindingRecord) -> str:
    """file:line for code findings, package==version for dependency findings."""
    if finding.package is not None:
        return f"{finding.package}=={finding.version}"
    if finding.file is not None:
        return f"{finding.file}:{finding.line}" if finding.line else finding.file
    return ""


# --- the scan --------------------------------------------------------------------------------


def _scan_fingerprint(ctx: StageContext, pipeline: PipelineConfig, build: BuildOutcome) -> str:
    # The build's fingerprint covers the commit, its environment and the checkout.
    security = ctx.config.security
    return fingerprint(
        build.fingerprint,
        pipeline.security.sast,
        security.licenses.model_dump(mode="json"),
        str(security.advisory_db),
        _folder_state(security.advisory_db),
    )


def _folder_state(folder: Path | None) -> tuple[int, int]:
    """(file count, newest mtime in ns) of the advisory folder: changes when it is updated."""
    if folder is None or not folder.is_dir():
        return (0, 0)
    count, newest = 0, 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                newest = max(newest, os.stat(Path(root, name)).st_mtime_ns)
            except OSError:
                continue
            count += 1
    return (count, newest)


def _scan(ctx: StageContext, pipeline: PipelineConfig, build: BuildOutcome) -> _RawScan:
    started = time.monotonic()
    scanned_at = datetime.now(UTC)
    checkout = ctx.workspace.checkout
    reports = ctx.workspace.reports_dir(STAGE)
    shutil.rmtree(reports, ignore_errors=True)
    reports.mkdir(parents=True)
    warnings: list[str] = []
    findings: list[FindingRecord] = []
    sarif: list[str] = []
    tools: list[str] = []
    try:
        for tool in pipeline.security.sast:
            sarif_path = reports / f"{tool}.sarif"
            report = _run_sast(tool, checkout, sarif_path, warnings)
            if report is None:
                continue
            tools.append(tool)
            sarif.append(str(sarif_path))
            warnings += report.problems
            findings += [_sast_record(finding, ctx) for finding in report.findings]
        secrets = scan_secrets(checkout)
        findings += [
            FindingRecord(
                kind="secret",
                tool="secrets",
                rule=secret.rule,
                severity=LEAK_SEVERITY,
                message=secret.excerpt,  # redacted by the scanner
                file=secret.file,
                line=secret.line,
            )
            for secret in secrets.findings
        ]
        resolved = resolved_dependencies(build.env_dir)
        warnings += resolved.warnings
        installed = [(d.name, d.version) for d in resolved.dependencies]
        advisory_db = ctx.config.security.advisory_db
        aliases: dict[str, list[str]] = {}
        advisories = None
        if advisory_db is not None:
            db = load_advisories(advisory_db)
            advisories = len(db.advisories)
            warnings += advisory_warnings(db)
            vulnerable, aliases = dependency_findings(db, installed)
            findings += vulnerable
        licences = ctx.config.security.licenses
        findings += [
            FindingRecord(
                kind="license",
                tool="licenses",
                rule=finding.license or "no licence",
                severity=SEVERITY_OF_LICENSE[finding.kind],
                message=finding.reason,
                package=finding.dependency,
                version=finding.version,
            )
            for finding in check_licenses(resolved.dependencies, licences.allow, licences.deny)
        ]
    except (
        SastError,
        ReportError,
        SecretScanError,
        DependencyError,
        AdvisoryDatabaseError,
        LicensePolicyError,
    ) as error:
        raise StageError(f"security scan: {error}") from error
    return _RawScan(
        findings=findings,
        aliases=aliases,
        warnings=warnings,
        sarif=sarif,
        tools=tools,
        dependencies=len(installed),
        advisories=advisories,
        scanned_at=scanned_at,
        duration_s=time.monotonic() - started,
    )


def advisory_warnings(db: AdvisoryDatabase) -> list[str]:
    return [f"advisory skipped: {warning}" for warning in db.warnings]


def dependency_findings(
    db: AdvisoryDatabase, installed: Sequence[tuple[str, str]]
) -> tuple[list[FindingRecord], dict[str, list[str]]]:
    """The advisories affecting the installed (name, version) pairs, as findings, and the
    aliases of each advisory id (so that a suppression may name a CVE)."""
    findings: list[FindingRecord] = []
    aliases: dict[str, list[str]] = {}
    for name, version in installed:
        try:
            vulnerable = match(db, [(name, version)])
        except DependencyVersionError as error:
            # Advisories exist but cannot be judged: fail closed, as unknown severity.
            findings.append(
                FindingRecord(
                    kind="dependency",
                    tool="osv",
                    rule="unorderable-version",
                    severity="unknown",
                    message=str(error),
                    package=canonicalize_name(name),
                    version=version,
                )
            )
            continue
        for vulnerability in vulnerable:
            aliases[vulnerability.advisory_id] = list(vulnerability.aliases)
            fixed = ", ".join(vulnerability.fixed_versions) or "none known"
            findings.append(
                FindingRecord(
                    kind="dependency",
                    tool="osv",
                    rule=vulnerability.advisory_id,
                    severity=vulnerability.severity,
                    message=f"{vulnerability.summary} (fixed in: {fixed})",
                    package=vulnerability.package,
                    version=vulnerability.installed_version,
                )
            )
    return findings, aliases


def _sast_record(finding: Finding, ctx: StageContext) -> FindingRecord:
    return FindingRecord(
        kind="sast",
        tool=finding.tool.lower(),
        rule=finding.rule,
        severity=finding.severity,
        message=ctx.masker.mask(finding.message),
        file=finding.file,
        line=finding.line,
    )


def _run_sast(
    tool: str, checkout: Path, sarif_path: Path, warnings: list[str]
) -> SarifReport | None:
    """bandit always (it is a dependency of cicd-dagster); ruff and semgrep where they are
    installed. Returns the SarifReport, or None with a warning when the tool is skipped.
    """
    if tool == "bandit":
        return run_bandit(checkout, sarif_path)
    executable = shutil.which(
        tool, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if executable is None:
        warnings.append(
            f"{tool} is configured in .cicd.yml security.sast but not installed; skipped"
        )
        return None
    if tool == "ruff":
        # The security rules (flake8-bandit) only, whatever the repository's own ruff config.
        command = [executable, "check", "--isolated", "--select", "S", "--exit-zero"]
        command += ["--output-format", "sarif", "--output-file", str(sarif_path), "."]
    else:
        rules = next((p for p in (".semgrep.yml", ".semgrep") if (checkout / p).exists()), None)
        if rules is None:
            warnings.append(
                "semgrep is configured but the checkout has no .semgrep.yml rules; skipped"
            )
            return None
        command = [executable, "scan", "--config", rules, "--metrics", "off", "--quiet"]
        command += ["--sarif", "--output", str(sarif_path)]
    sarif_path.unlink(missing_ok=True)
    try:
        done = subprocess.run(
            command, cwd=checkout, capture_output=True, text=True, timeout=BANDIT_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as error:
        raise SastError(f"{tool} did not finish within {BANDIT_TIMEOUT_S:g}s") from error
    if done.returncode not in (0, 1) or not sarif_path.is_file():
        raise SastError(f"{tool} failed with exit code {done.returncode}: {done.stderr[-2000:]}")
    return parse_sarif(sarif_path, checkout)


# --- suppressions and gates ------------------------------------------------------------------


def _covers(
    entry: SuppressionConfig, finding: FindingRecord, aliases: dict[str, list[str]]
) -> bool:
    """Whether the entry names this finding, whatever its expiry: its rule (or, for an
    advisory, one of its aliases), and its path and package where it gives them."""
    names = [finding.rule, *aliases.get(finding.rule, [])]
    if not any(fnmatchcase(name, entry.rule) for name in names):
        return False
    if entry.path is not None and (
        finding.file is None or not fnmatchcase(finding.file, entry.path)
    ):
        return False
    return entry.package is None or (
        finding.package is not None
        and canonicalize_name(finding.package) == canonicalize_name(entry.package)
    )


def apply_suppressions(
    findings: Sequence[FindingRecord],
    suppressions: Sequence[SuppressionConfig],
    aliases: dict[str, list[str]],
    today: date,
) -> list[FindingRecord]:
    """The findings, those a suppression live on `today` covers marked suppressed."""
    return [_suppress(f, suppressions, aliases, today) for f in findings]


def _suppress(
    finding: FindingRecord,
    suppressions: Sequence[SuppressionConfig],
    aliases: dict[str, list[str]],
    today: date,
) -> FindingRecord:
    live = next(
        (s for s in suppressions if today <= s.expires and _covers(s, finding, aliases)), None
    )
    if live is None:
        return finding
    reason = f"{live.reason} (until {live.expires.isoformat()})"
    return dataclasses.replace(finding, suppressed=True, suppression_reason=reason)


def _describe(entry: SuppressionConfig) -> str:
    scope = "".join(
        f" {name} {value}"
        for name, value in (("path", entry.path), ("package", entry.package))
        if value is not None
    )
    return f"suppression of {entry.rule}{scope} (expires {entry.expires.isoformat()})"


def reaches(severity: str, fail_on: str) -> bool:
    """Whether a finding of `severity` is at or above `fail_on`; unknown reaches all."""
    if severity not in SEVERITIES:  # unknown
        return True
    return SEVERITIES.index(severity) >= SEVERITIES.index(fail_on)


def _gate(
    name: str,
    scan: SecurityScan,
    candidates: list[FindingRecord],
    what: str,
    not_checked: str | None,
) -> GateRecord:
    if not_checked is not None:
        return GateRecord(name, True, 0.0, None, not_checked)
    blocking = [f for f in candidates if not f.suppressed]
    suppressed = len(candidates) - len(blocking)
    if blocking:
        named = "; ".join(
            f"{f.rule} {f.severity} {location(f)}: {f.message}" for f in blocking[:_DETAIL_ITEMS]
        )
        more = (
            f"; and {len(blocking) - _DETAIL_ITEMS} more" if len(blocking) > _DETAIL_ITEMS else ""
        )
        detail = f"{len(blocking)} {GATE_KINDS[name]} finding(s) {what}: {named}{more}"
    else:
        detail = f"no unsuppressed {GATE_KINDS[name]} finding {what}"
    if suppressed:
        detail += f" ({suppressed} suppressed)"
    expired = [e for e in scan.expired if any(_covers(e, f, scan.aliases) for f in blocking)]
    if expired:
        detail += "; expired: " + ", ".join(_describe(e) for e in expired)
    return GateRecord(name, not blocking, float(len(blocking)), None, detail)
