"""Static analysis: run bandit on a checkout, and read any SARIF 2.1.0 log into findings.

The SARIF reader is not tied to bandit: ruff (`--output-format sarif`), semgrep (`--sarif`)
and any other tool that writes SARIF 2.1.0 give the same Finding rows. Locations are
reported relative to the checkout; a log that points outside it is refused, so a finding
can never name a file the scan had no business reading.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import pandas as pd

from cicd_dagster.reports import ReportError, open_report
from cicd_dagster.security.secrets import is_skipped_dir, redact

Severity = Literal["low", "medium", "high", "critical"]
SEVERITIES: tuple[Severity, ...] = ("low", "medium", "high", "critical")
FINDING_COLUMNS = ["tool", "rule", "severity", "confidence", "message", "file", "line"]
BANDIT_TIMEOUT_S = 600.0
STDERR_TAIL_CHARS = 2000

# SARIF's result levels (§3.27.10); "none" is informational and ranks lowest.
_LEVEL_SEVERITY: dict[str, Severity] = {
    "error": "high",
    "warning": "medium",
    "note": "low",
    "none": "low",
}
# Result kinds that are not problems (§3.27.9): a passed check is not a finding.
_NOT_PROBLEMS = frozenset({"pass", "notApplicable"})
# bandit's own properties, upper case; UNDEFINED falls back to the SARIF level.
_TOOL_SEVERITY: dict[str, Severity] = {"LOW": "low", "MEDIUM": "medium", "HIGH": "high"}
# bandit quotes the hard-coded password it found in the message; findings must not.
_BANDIT_PASSWORD_RULES = frozenset({"B105", "B106", "B107"})
_QUOTED_VALUE = re.compile(r"'(?P<value>[^']*)'$")
_FILE_SCHEME = "file"


class SastError(Exception):
    """The analyser could not run or crashed; its message carries the tool's stderr tail."""


@dataclass(frozen=True)
class Finding:
    """One SARIF result: a problem a tool reported at a place in the checkout."""

    tool: str
    rule: str
    severity: Severity
    confidence: str | None
    """low/medium/high where the tool says (bandit's issue_confidence), else None."""
    message: str
    file: str | None
    """POSIX path relative to the checkout; None for a result without a file location."""
    line: int | None


@dataclass(frozen=True)
class SarifReport:
    """The findings of a SARIF log and the problems its tools reported about themselves
    (files they could not parse, failed runs), which mean part of the code went unchecked."""

    path: Path
    findings: list[Finding]
    problems: list[str]


def severity_rank(severity: Severity) -> int:
    """0 for low up to 3 for critical, for `at or above fail_on` comparisons."""
    return SEVERITIES.index(severity)


def findings_frame(findings: Sequence[Finding]) -> pd.DataFrame:
    """One row per finding, with the columns FINDING_COLUMNS (line as nullable Int64)."""
    rows = [dataclasses.astuple(finding) for finding in findings]
    return pd.DataFrame(rows, columns=FINDING_COLUMNS).astype({"line": "Int64"})


def bandit_command(checkout: Path, sarif_path: Path) -> list[str]:
    """The bandit argv for the checkout (run with the checkout as working directory, so
    SARIF locations come out relative to it)."""
    excluded = ",".join(f"./{path}" for path in excluded_paths(checkout))
    # --ignore-nosec: a `# nosec` comment would silence a finding without the reason and
    # expiry a .cicd.yml suppression demands.
    command = [sys.executable, "-m", "bandit", "--quiet", "--ignore-nosec", "--format", "sarif"]
    command += ["--output", str(sarif_path.resolve()), "--recursive", "."]
    return command + (["--exclude", excluded] if excluded else [])


def excluded_paths(checkout: Path) -> list[str]:
    """Folders bandit must not read (VCS data, caches, virtualenvs) and symlinks (which
    may lead out of the checkout), relative to it."""
    excluded: list[str] = []
    for root, dirs, files in os.walk(checkout):
        here = Path(root)
        for name in sorted(dirs + files):
            path = here / name
            if path.is_symlink() or (name in dirs and is_skipped_dir(path)):
                excluded.append(path.relative_to(checkout).as_posix())
        dirs[:] = [name for name in dirs if not is_skipped_dir(here / name)]
    return excluded


def run_bandit(
    checkout: Path, sarif_path: Path, *, timeout_s: float = BANDIT_TIMEOUT_S
) -> SarifReport:
    """Run bandit on the checkout, writing SARIF 2.1.0 to `sarif_path`, and read it back.

    bandit exits 1 when it found something; any other non-zero exit, a timeout or a
    missing output file raise SastError with the end of bandit's stderr.
    """
    if not checkout.is_dir():
        raise SastError(f"{checkout}: not a folder, cannot run bandit on it")
    sarif_path.parent.mkdir(parents=True, exist_ok=True)
    sarif_path.unlink(missing_ok=True)  # a stale log must not pass for this run's
    command = bandit_command(checkout, sarif_path)
    try:
        done = subprocess.run(
            command, cwd=checkout, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as error:
        raise SastError(
            f"bandit did not finish within {timeout_s:g}s on {checkout}{_tail(error.stderr)}"
        ) from error
    if done.returncode not in (0, 1):
        raise SastError(f"bandit failed with exit code {done.returncode}{_tail(done.stderr)}")
    if not sarif_path.is_file():
        raise SastError(f"bandit wrote no SARIF log to {sarif_path}{_tail(done.stderr)}")
    return parse_sarif(sarif_path, checkout)


def parse_sarif(path: Path, checkout: Path) -> SarifReport:
    """Read a SARIF 2.1.0 log made by any tool that analysed `checkout`.

    Raises ReportError naming the file (and line and column for JSON syntax errors, the
    field for structural ones) if it is not valid JSON, not SARIF 2.1.0, or points outside
    the checkout.
    """
    with open_report(path) as stream:
        data = stream.read()
    try:
        log = json.loads(data)
    except json.JSONDecodeError as error:
        raise ReportError(
            path, error.lineno, f"not valid JSON (column {error.colno}): {error.msg}"
        ) from error
    except UnicodeDecodeError as error:
        raise ReportError(path, None, f"not valid JSON: not UTF-8 text ({error.reason})") from error
    return _SarifReader(path, checkout).read(log)


def _tail(stderr: str | bytes | None) -> str:
    if not stderr:
        return ""
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
    return f":\n{text.strip()[-STDERR_TAIL_CHARS:]}"


class _SarifReader:
    """Walks one SARIF log; every error names the file and the JSON path of the field."""

    def __init__(self, path: Path, checkout: Path) -> None:
        self.path = path
        self.checkout = Path(os.path.abspath(checkout))
        self.checkout_real = checkout.resolve()

    def error(self, where: str, message: str) -> ReportError:
        return ReportError(self.path, None, f"{where}: {message}" if where else message)

    def read(self, log: Any) -> SarifReport:
        if not isinstance(log, dict):
            raise self.error("", f"not a SARIF log: expected a JSON object, got {_kind(log)}")
        version = log.get("version")
        if version != "2.1.0":
            raise self.error("version", f"not SARIF 2.1.0: version is {json.dumps(version)}")
        findings: list[Finding] = []
        problems: list[str] = []
        for index, run in enumerate(self.array(log, "runs", "")):
            where = f"runs[{index}]"
            run = self.object(run, where)
            tool = self.tool_name(run, where)
            rules = self.rules(run, where)
            for result_index, result in enumerate(self.array(run, "results", where, default=[])):
                finding = self.finding(tool, rules, run, result, f"{where}.results[{result_index}]")
                if finding is not None:
                    findings.append(finding)
            problems += self.problems(tool, run, where)
        return SarifReport(self.path, findings, problems)

    def field(self, container: dict[str, Any], name: str, where: str) -> Any:
        if name not in container:
            raise self.error(f"{where}.{name}".lstrip("."), "missing")
        return container[name]

    def object(self, value: Any, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(where, f"expected an object, got {_kind(value)}")
        return value

    def array(
        self, container: dict[str, Any], name: str, where: str, default: list[Any] | None = None
    ) -> list[Any]:
        if name not in container and default is not None:
            return default
        value = self.field(container, name, where)
        if not isinstance(value, list):
            raise self.error(f"{where}.{name}".lstrip("."), f"expected a list, got {_kind(value)}")
        return value

    def tool_name(self, run: dict[str, Any], where: str) -> str:
        tool = self.object(self.field(run, "tool", where), f"{where}.tool")
        driver = self.object(self.field(tool, "driver", f"{where}.tool"), f"{where}.tool.driver")
        name = self.field(driver, "name", f"{where}.tool.driver")
        if not isinstance(name, str) or not name:
            raise self.error(f"{where}.tool.driver.name", f"expected a name, got {_kind(name)}")
        return name

    def rules(self, run: dict[str, Any], where: str) -> dict[int | None, list[dict[str, Any]]]:
        """The rules of the driver (key None) and of each extension (key: its index), which
        results point into with ruleIndex and rule.toolComponent (§3.52.7, §3.54)."""
        tool = run["tool"]
        holders: dict[int | None, tuple[Any, str]] = {None: (tool["driver"], "tool.driver")}
        extensions = self.array(tool, "extensions", f"{where}.tool", default=[])
        for index, extension in enumerate(extensions):
            holders[index] = (extension, f"tool.extensions[{index}]")
        rules: dict[int | None, list[dict[str, Any]]] = {}
        for key, (holder, path) in holders.items():
            component = self.object(holder, f"{where}.{path}")
            listed = self.array(component, "rules", f"{where}.{path}", default=[])
            rules[key] = [
                self.object(rule, f"{where}.{path}.rules[{i}]") for i, rule in enumerate(listed)
            ]
        return rules

    def finding(
        self,
        tool: str,
        rules: dict[int | None, list[dict[str, Any]]],
        run: dict[str, Any],
        result: Any,
        where: str,
    ) -> Finding | None:
        result = self.object(result, where)
        if result.get("kind", "fail") in _NOT_PROBLEMS:
            return None
        rule = self.rule_of(result, rules, where)
        rule_id = _string(result.get("ruleId")) or _string(rule.get("id")) or "unknown"
        properties = _mapping(result.get("properties"))
        message = self.message(result, rule, where)
        if tool.lower() == "bandit" and rule_id in _BANDIT_PASSWORD_RULES:
            message = _QUOTED_VALUE.sub(lambda m: f"'{redact(m.group('value'))}'", message)
        confidence = _string(properties.get("issue_confidence"))
        file, line = self.location(result, run, where)
        return Finding(
            tool=tool,
            rule=rule_id,
            severity=self.severity(result, rule, properties, where),
            confidence=confidence.lower() if confidence else None,
            message=message,
            file=file,
            line=line,
        )

    def rule_of(
        self, result: dict[str, Any], rules: dict[int | None, list[dict[str, Any]]], where: str
    ) -> dict[str, Any]:
        """The result's rule metadata (by ruleIndex, else by id), or {} if the tool lists none."""
        reference = _mapping(result.get("rule"))
        component = _mapping(reference.get("toolComponent")).get("index")
        if component not in rules:
            raise self.error(f"{where}.rule.toolComponent", f"no tool.extensions[{component}]")
        listed = rules[component]
        index = result.get("ruleIndex", reference.get("index"))
        if index is not None:
            if not isinstance(index, int) or not 0 <= index < len(listed):
                raise self.error(f"{where}.ruleIndex", f"no rule {index!r} in the tool's rules")
            return listed[index]
        rule_id = result.get("ruleId", reference.get("id"))
        return next((rule for rule in listed if rule.get("id") == rule_id), {})

    def message(self, result: dict[str, Any], rule: dict[str, Any], where: str) -> str:
        message = self.object(self.field(result, "message", where), f"{where}.message")
        text = message.get("text")
        if text is None and "id" in message:  # a message template kept in the rule (§3.11.10)
            template = _mapping(_mapping(rule.get("messageStrings")).get(message["id"]))
            text = template.get("text")
        if not isinstance(text, str):
            raise self.error(f"{where}.message", "expected a text or a known message id")
        arguments = message.get("arguments", [])
        for number, argument in enumerate(arguments if isinstance(arguments, list) else []):
            text = text.replace(f"{{{number}}}", str(argument))
        return text

    def severity(
        self,
        result: dict[str, Any],
        rule: dict[str, Any],
        properties: dict[str, Any],
        where: str,
    ) -> Severity:
        """The tool's own severity where it gives one (bandit's issue_severity, GitHub's
        numeric security-severity that semgrep and CodeQL set), else the SARIF level."""
        own = _TOOL_SEVERITY.get(str(properties.get("issue_severity", "")).upper())
        if own is not None:
            return own
        score = properties.get("security-severity")
        if score is None:
            score = _mapping(rule.get("properties")).get("security-severity")
        if score is not None:
            return _score_severity(score) or self._level_severity(result, rule, where)
        return self._level_severity(result, rule, where)

    def _level_severity(self, result: dict[str, Any], rule: dict[str, Any], where: str) -> Severity:
        # §3.27.10: the result's level, else the rule's default configuration, else warning.
        level = result.get("level")
        if level is None:
            level = _mapping(rule.get("defaultConfiguration")).get("level", "warning")
        if level not in _LEVEL_SEVERITY:
            raise self.error(f"{where}.level", f"unknown level {json.dumps(level)}")
        return _LEVEL_SEVERITY[level]

    def location(
        self, result: dict[str, Any], run: dict[str, Any], where: str
    ) -> tuple[str | None, int | None]:
        locations = self.array(result, "locations", where, default=[])
        if not locations:
            return None, None
        location = self.object(locations[0], f"{where}.locations[0]")
        physical = _mapping(location.get("physicalLocation"))
        if not physical:  # a logical location only (a module, a function): no file
            return None, None
        where = f"{where}.locations[0].physicalLocation"
        artifact = self.object(
            self.field(physical, "artifactLocation", where), f"{where}.artifactLocation"
        )
        file = self.relative_file(artifact, run, f"{where}.artifactLocation")
        region = _mapping(physical.get("region"))
        line = region.get("startLine")
        if line is not None and (not isinstance(line, int) or isinstance(line, bool) or line < 1):
            raise self.error(f"{where}.region.startLine", f"expected a line number, got {line!r}")
        return file, line

    def relative_file(self, artifact: dict[str, Any], run: dict[str, Any], where: str) -> str:
        """The artifact's path relative to the checkout, following uriBaseId and the run's
        originalUriBaseIds (§3.4.4, §3.14.14); relative URIs without a base are taken as
        relative to the checkout, where the tools run."""
        uri = artifact.get("uri")
        if uri is None and isinstance(artifact.get("index"), int):
            artifacts = run.get("artifacts", [])
            if isinstance(artifacts, list) and 0 <= artifact["index"] < len(artifacts):
                uri = _mapping(_mapping(artifacts[artifact["index"]]).get("location")).get("uri")
        if not isinstance(uri, str) or not uri:
            raise self.error(f"{where}.uri", "expected a URI")
        base = self.base_path(artifact.get("uriBaseId"), run, where)
        path = self.uri_path(uri, base, where)
        relative = os.path.relpath(path, self.checkout)
        if relative.startswith(".."):
            # The checkout may be reached through a symlink (/tmp -> /private/tmp).
            relative = os.path.relpath(path, self.checkout_real)
        if relative == "." or relative.startswith(".."):
            raise self.error(f"{where}.uri", f"{uri} is outside the checkout {self.checkout}")
        return PurePosixPath(Path(relative)).as_posix()

    def base_path(self, base_id: Any, run: dict[str, Any], where: str) -> str:
        seen: set[str] = set()
        parts: list[str] = []
        bases = _mapping(run.get("originalUriBaseIds"))
        # A base may itself be relative to another base; undefined ones mean the checkout.
        while isinstance(base_id, str) and base_id in bases and base_id not in seen:
            seen.add(base_id)
            base = _mapping(bases[base_id])
            base_uri = base.get("uri")
            if isinstance(base_uri, str):
                parts.append(base_uri)
            base_id = base.get("uriBaseId")
        path = str(self.checkout)
        for base_uri in reversed(parts):
            path = self.uri_path(base_uri, path, f"{where}.uriBaseId")
        return path

    def uri_path(self, uri: str, base: str, where: str) -> str:
        parts = urlsplit(uri)
        if parts.scheme and parts.scheme != _FILE_SCHEME:
            raise self.error(f"{where}.uri", f"{uri} is not a file in the checkout")
        if parts.scheme == _FILE_SCHEME and parts.netloc not in ("", "localhost"):
            raise self.error(f"{where}.uri", f"{uri} is on another host")
        return os.path.normpath(os.path.join(base, unquote(parts.path)))

    def problems(self, tool: str, run: dict[str, Any], where: str) -> list[str]:
        """The tool's reports about its own run: errors and warnings it raised, and runs
        it marks as failed (§3.20.14-§3.20.21)."""
        problems: list[str] = []
        for index, invocation in enumerate(self.array(run, "invocations", where, default=[])):
            invocation = _mapping(invocation)
            if invocation.get("executionSuccessful") is False:
                problems.append(f"{tool}: the run did not complete successfully")
            for key in ("toolExecutionNotifications", "toolConfigurationNotifications"):
                notifications = invocation.get(key, [])
                for notification in notifications if isinstance(notifications, list) else []:
                    notification = _mapping(notification)
                    if notification.get("level", "warning") not in ("error", "warning"):
                        continue
                    text = _string(_mapping(notification.get("message")).get("text")) or "?"
                    file = self.notification_file(
                        notification, run, f"{where}.invocations[{index}].{key}"
                    )
                    problems.append(f"{tool}: {file}: {text}" if file else f"{tool}: {text}")
        return problems

    def notification_file(
        self, notification: dict[str, Any], run: dict[str, Any], where: str
    ) -> str | None:
        locations = notification.get("locations")
        if not isinstance(locations, list) or not locations:
            return None
        artifact = _mapping(
            _mapping(_mapping(locations[0]).get("physicalLocation")).get("artifactLocation")
        )
        return self.relative_file(artifact, run, where) if artifact else None


def _score_severity(score: Any) -> Severity | None:
    """GitHub's security-severity scale (a CVSS-like 0.0-10.0 score, as a string)."""
    try:
        value = float(score)
    except (TypeError, ValueError):
        return None
    if value >= 9.0:
        return "critical"
    if value >= 7.0:
        return "high"
    if value >= 4.0:
        return "medium"
    return "low"


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(
        type(value), type(value).__name__
    )
