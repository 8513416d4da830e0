"""Secret scanning of a checkout: known token formats and high-entropy assigned values.

A finding never holds the secret: only its rule, place and a redacted excerpt, so findings
can go to logs, metadata and the history DB as they are.

Two kinds of rules. Token formats (AWS, GitHub, Slack, Stripe, Google, PEM private keys,
JWTs) are matched anywhere. A value of unknown format counts only where it is assigned to
a secret-sounding name (`password = "..."`, `api_token: ...`) and looks random: long
enough, mixed character classes and a Shannon entropy above a threshold for its alphabet.
Lock files' hashes, digests and commit ids are never assigned to such names, and the
entropy rule skips lock files entirely; token formats still apply there (a private index
URL with a token in it is a leak).
"""

from __future__ import annotations

import bisect
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Generic, Protocol, TypeVar

MAX_FILE_BYTES = 1024 * 1024
# Folders that hold tooling, caches or installed third-party code, never the project's own
# committed files. Any folder holding a pyvenv.cfg (a virtualenv) or named *.egg is skipped
# as well. This covers bandit's default excludes, which an explicit --exclude replaces.
SKIPPED_DIR_NAMES = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".bzr",
        "CVS",
        "__pycache__",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
        ".tox",
        ".nox",
        ".eggs",
        ".venv",
        "venv",
        "node_modules",
    }
)
LOCK_FILE_NAMES = frozenset(
    {
        "poetry.lock",
        "Pipfile.lock",
        "pdm.lock",
        "uv.lock",
        "package-lock.json",
        "npm-shrinkwrap.json",
        "yarn.lock",
        "pnpm-lock.yaml",
        "Cargo.lock",
        "composer.lock",
        "Gemfile.lock",
        "go.sum",
    }
)

# Token formats, from the issuers' documented prefixes and lengths. A token must also start
# a word (checked in scan_text: a leading \b would make the search ten times slower).
TOKEN_RULES: dict[str, re.Pattern[str]] = {
    "aws-access-key-id": re.compile(r"(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b"),
    "github-token": re.compile(
        r"(?:gh[pousr]_[A-Za-z0-9]{36,251}|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})\b"
    ),
    "slack-token": re.compile(r"xox[baprs]-[0-9]{1,13}-[0-9A-Za-z-]{10,}"),
    "stripe-secret-key": re.compile(r"[sr]k_live_[0-9A-Za-z]{24,247}\b"),
    "google-api-key": re.compile(r"AIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"),
    # The whole block, also inside a JSON string with escaped newlines (service account
    # files); the body check below keeps code that merely names the header out.
    "private-key": re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
        r"(?P<body>[A-Za-z0-9+/=\s:,\\-]*?)"
        r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
    ),
    # Header and payload are base64url JSON objects, so both start with "eyJ" ('{"').
    "jwt": re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
}
HIGH_ENTROPY_RULE = "high-entropy-assignment"
_MIN_PRIVATE_KEY_BODY = 64

_SENSITIVE_NAMES = (
    r"password|passwd|passphrase|secret|token|credentials?"
    r"|(?:api|access|private|signing|encryption|auth|master)[_-]?key"
)
_VALUE = r"[A-Za-z0-9+/=_-]{16,}"
# `name = "value"`, `"name": 'value'`, `NAME=value`, `name := "value"`, `name => "value"`.
# The match starts at the sensitive word (a leading `[\w.-]*` would make the search
# quadratic); the part of the name before it is picked up by _NAME_START.
_ASSIGNMENT = re.compile(
    rf"""(?P<name>(?:{_SENSITIVE_NAMES})[A-Za-z0-9_.-]*)["']?[ \t]*
         (?::=|=>|=|:)[ \t]*
         (?:(?P<quote>["'`])(?P<quoted>{_VALUE})(?P=quote)|(?P<bare>{_VALUE})(?=[\s,;}})\]\#]|$))""",
    re.IGNORECASE | re.MULTILINE | re.VERBOSE,
)
_WORD = re.compile(r"\w\w")
_NAME_START = re.compile(r"[A-Za-z0-9_.-]{0,64}$")
# Unquoted values count only in config-like files; in source code they are identifiers.
_BARE_VALUE_SUFFIXES = frozenset(
    {".env", ".yml", ".yaml", ".ini", ".cfg", ".conf", ".properties", ".sh", ".bash", ".zsh"}
)
_HEX = frozenset("0123456789abcdefABCDEF-")
# Thresholds in bits per character: random hex reaches about 3.7 at 32 characters,
# random base64 about 4.3 at 24; prose, identifiers and placeholders stay well below.
_HEX_ENTROPY = 3.0
# Hex keys are 32 characters or more; shorter hex is ids and public key tokens.
_MIN_HEX_LENGTH = 24
_BASE64_ENTROPY = 3.5
_BINARY_SNIFF_BYTES = 8192


class SecretScanError(Exception):
    """The checkout cannot be scanned at all (missing, not a folder)."""


@dataclass(frozen=True)
class SecretFinding:
    """A committed secret: which rule, where, and a redacted excerpt; never the value."""

    rule: str
    file: str
    """POSIX path relative to the checkout."""
    line: int
    excerpt: str
    """E.g. `ghp_…(40 chars)` or `db_password: Zx9q…(24 chars)`."""


@dataclass(frozen=True)
class SkippedFile:
    """A file the scan did not read, and why (too large, binary, unreadable, symlink)."""

    file: str
    reason: str


class _Located(Protocol):
    @property
    def rule(self) -> str: ...

    @property
    def file(self) -> str | None: ...


F = TypeVar("F", bound=_Located)


@dataclass(frozen=True)
class Suppression:
    """An allowlist entry (a .cicd.yml suppression): silences `rule` findings in `path`.

    `rule` and `path` are fnmatch patterns (`*` also crosses folders) on the rule name and
    the POSIX path relative to the checkout. It applies up to and including `expires`.
    """

    rule: str
    path: str
    reason: str
    expires: date

    def covers(self, finding: _Located, today: date) -> bool:
        return (
            today <= self.expires
            and fnmatchcase(finding.rule, self.rule)
            and finding.file is not None
            and fnmatchcase(finding.file, self.path)
        )


@dataclass(frozen=True)
class Suppressed(Generic[F]):
    finding: F
    suppression: Suppression


@dataclass(frozen=True)
class Allowed(Generic[F]):
    """Findings split by an allowlist; nothing is dropped."""

    findings: list[F]
    """Not covered by any live suppression: these block."""
    suppressed: list[Suppressed[F]]
    expired: list[Suppression]
    """Entries past their expiry date; they no longer suppress anything."""


def apply_suppressions(
    findings: Sequence[F], suppressions: Sequence[Suppression], today: date
) -> Allowed[F]:
    """Split findings (secret, SAST, anything with `rule` and `file`) by the allowlist."""
    kept: list[F] = []
    suppressed: list[Suppressed[F]] = []
    for finding in findings:
        match = next((entry for entry in suppressions if entry.covers(finding, today)), None)
        if match is None:
            kept.append(finding)
        else:
            suppressed.append(Suppressed(finding, match))
    expired = [entry for entry in suppressions if entry.expires < today]
    return Allowed(kept, suppressed, expired)


@dataclass(frozen=True)
class SecretScan:
    """The outcome of scanning a checkout."""

    findings: list[SecretFinding]
    """Not allowlisted: these block."""
    suppressed: list[Suppressed[SecretFinding]]
    expired_suppressions: list[Suppression]
    skipped: list[SkippedFile]
    files_scanned: int


def scan_secrets(
    checkout: Path,
    suppressions: Sequence[Suppression] = (),
    *,
    today: date | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> SecretScan:
    """Scan every text file of the checkout (skipping tooling folders, binaries, large files
    and symlinks) for committed secrets, then apply the allowlist as of `today`."""
    if not checkout.is_dir():
        raise SecretScanError(f"{checkout}: not a folder, cannot scan it for secrets")
    findings: list[SecretFinding] = []
    skipped: list[SkippedFile] = []
    scanned = 0
    for path in checkout_files(checkout, skipped):
        relative = path.relative_to(checkout).as_posix()
        text = _read_text(path, relative, max_file_bytes, skipped)
        if text is not None:
            scanned += 1
            findings.extend(scan_text(text, relative))
    allowed = apply_suppressions(findings, suppressions, today or date.today())
    return SecretScan(allowed.findings, allowed.suppressed, allowed.expired, skipped, scanned)


def is_skipped_dir(directory: Path) -> bool:
    """True for folders of tooling, caches and virtualenvs, which no scanner should read."""
    name = directory.name
    return (
        name in SKIPPED_DIR_NAMES or name.endswith(".egg") or (directory / "pyvenv.cfg").is_file()
    )


def checkout_files(checkout: Path, skipped: list[SkippedFile]) -> Iterator[Path]:
    """The regular files under the checkout, sorted, outside skipped folders; symbolic links
    are never followed (they are recorded in `skipped`), so nothing outside is read."""
    for root, dirs, files in os.walk(checkout):
        here = Path(root)
        links = {name for name in dirs + files if (here / name).is_symlink()}
        skipped.extend(
            SkippedFile(
                (here / name).relative_to(checkout).as_posix(), "symbolic link, not followed"
            )
            for name in sorted(links)
        )
        dirs[:] = sorted(
            name for name in dirs if name not in links and not is_skipped_dir(here / name)
        )
        yield from (here / name for name in sorted(files) if name not in links)


def scan_text(text: str, file: str) -> list[SecretFinding]:
    """The secrets in one file's text, in order of position; `file` names it in findings."""
    hits: list[tuple[int, int, str, str]] = []  # start, end, rule, excerpt
    for rule, pattern in TOKEN_RULES.items():
        for match in pattern.finditer(text):
            value = match.group(0)
            if (
                _inside_word(text, match.start())
                or _is_example(value)
                or (rule == "private-key" and not _has_key_body(match))
            ):
                continue
            hits.append((match.start(), match.end(), rule, redact(value)))
    base = file.rsplit("/", 1)[-1]
    if base not in LOCK_FILE_NAMES:
        for match in _ASSIGNMENT.finditer(text):
            bare = match.group("bare")
            if bare is not None and not _allows_bare_values(base):
                continue
            group = "bare" if bare is not None else "quoted"
            value = match.group(group)
            start, end = match.span(group)
            overlaps = any(start < hit_end and hit_start < end for hit_start, hit_end, *_ in hits)
            if not overlaps and looks_random(value):
                before = _NAME_START.search(text, max(0, match.start() - 64), match.start())
                name = (before.group(0) if before else "") + match.group("name")
                hits.append((start, end, HIGH_ENTROPY_RULE, f"{name}: {redact(value)}"))
    newlines = [match.start() for match in re.finditer("\n", text)] if hits else []
    return [
        SecretFinding(rule, file, bisect.bisect_left(newlines, start) + 1, excerpt)
        for start, _, rule, excerpt in sorted(hits)
    ]


def redact(value: str) -> str:
    """The first few characters (at most 4, fewer for short values) and the length: enough
    to find and rotate a secret, not to use or guess it."""
    return f"{value[: min(4, len(value) // 5)]}…({len(value)} chars)"


def shannon_entropy(value: str) -> float:
    """Bits per character of the value's own character distribution."""
    counts = Counter(value).values()
    return -sum(count / len(value) * math.log2(count / len(value)) for count in counts)


def looks_random(value: str) -> bool:
    """A value that is not a word, identifier, number or placeholder: letters and digits mixed
    and an entropy above the threshold of its alphabet (hex or base64). Without the digit,
    camelCase names (`challengePassword`) pass the entropy test."""
    if _is_example(value) or not any(char.isdigit() for char in value):
        return False
    if not any(char.isalpha() for char in value):
        return False
    if set(value) <= _HEX:
        return len(value) >= _MIN_HEX_LENGTH and shannon_entropy(value) > _HEX_ENTROPY
    return shannon_entropy(value) > _BASE64_ENTROPY


def _allows_bare_values(base: str) -> bool:
    return base.startswith(".env") or os.path.splitext(base)[1] in _BARE_VALUE_SUFFIXES


def _inside_word(text: str, start: int) -> bool:
    return start > 0 and _WORD.match(text, start - 1) is not None


def _is_example(value: str) -> bool:
    # Vendors' documentation values, e.g. AWS's AKIAIOSFODNN7EXAMPLE.
    return "EXAMPLE" in value.upper()


def _has_key_body(match: re.Match[str]) -> bool:
    body = re.sub(r"\\n|\s", "", match.group("body"))
    return len(body) >= _MIN_PRIVATE_KEY_BODY


def _read_text(path: Path, relative: str, limit: int, skipped: list[SkippedFile]) -> str | None:
    """The file's text, or None (recorded in `skipped`) if it is not a readable text file."""
    try:
        # O_NOFOLLOW: a file swapped for a symlink after the walk is refused, not followed.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        skipped.append(SkippedFile(relative, f"cannot be read: {error.strerror}"))
        return None
    with os.fdopen(descriptor, "rb") as stream:
        status = os.fstat(stream.fileno())
        if not stat.S_ISREG(status.st_mode):
            skipped.append(SkippedFile(relative, "not a regular file"))
            return None
        if status.st_size > limit:
            skipped.append(SkippedFile(relative, f"larger than {limit} bytes"))
            return None
        try:
            data = stream.read()
        except OSError as error:
            skipped.append(SkippedFile(relative, f"cannot be read: {error.strerror}"))
            return None
    if b"\0" in data[:_BINARY_SNIFF_BYTES]:
        skipped.append(SkippedFile(relative, "binary"))
        return None
    # Secrets are ASCII; a stray non-UTF-8 byte elsewhere must not hide them.
    return data.decode("utf-8", errors="replace")
