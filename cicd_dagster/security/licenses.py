"""Licences of Python distributions: what a package declares, and allow/deny checks.

Expressions are parsed with the SPDX-aware `license-expression` library, so ids match
case-insensitively and their deprecated aliases too (`GPL-2.0` is `GPL-2.0-only`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any, Literal

from license_expression import (
    AND,
    OR,
    ExpressionError,
    LicenseSymbol,
    LicenseWithExceptionSymbol,
    Licensing,
    get_spdx_licensing,
)

if TYPE_CHECKING:
    from cicd_dagster.security.dependencies import Dependency

# Trove classifier names (the last `::` segment, lower case) and free-text names seen in
# the License field, mapped to SPDX ids. Names that do not say which licence they mean
# ("BSD License", "GNU General Public License (GPL)") are left unmapped on purpose: an
# allow list can still name them literally. "Apache Software License" is mapped because
# no distribution on PyPI uses Apache 1.x any more.
LICENSE_NAMES: dict[str, str] = {
    "mit license": "MIT",
    "mit no attribution license (mit-0)": "MIT-0",
    "apache software license": "Apache-2.0",
    "apache 2.0": "Apache-2.0",
    "apache-2": "Apache-2.0",
    "apache license 2.0": "Apache-2.0",
    "apache license, version 2.0": "Apache-2.0",
    "apache license version 2.0": "Apache-2.0",
    "apache software license 2.0": "Apache-2.0",
    "bsd 3-clause": "BSD-3-Clause",
    "3-clause bsd license": "BSD-3-Clause",
    "new bsd license": "BSD-3-Clause",
    "bsd 2-clause": "BSD-2-Clause",
    "simplified bsd license": "BSD-2-Clause",
    "isc license (iscl)": "ISC",
    "isc license": "ISC",
    "python software foundation license": "PSF-2.0",
    "mozilla public license 2.0 (mpl 2.0)": "MPL-2.0",
    "mpl 2.0": "MPL-2.0",
    "mozilla public license 1.1 (mpl 1.1)": "MPL-1.1",
    "the unlicense (unlicense)": "Unlicense",
    "cc0 1.0 universal (cc0 1.0) public domain dedication": "CC0-1.0",
    "boost software license 1.0 (bsl-1.0)": "BSL-1.0",
    "zlib/libpng license": "Zlib",
    "historical permission notice and disclaimer (hpnd)": "HPND",
    "universal permissive license (upl)": "UPL-1.0",
    "eclipse public license 1.0 (epl-1.0)": "EPL-1.0",
    "eclipse public license 2.0 (epl-2.0)": "EPL-2.0",
    "european union public licence 1.2 (eupl 1.2)": "EUPL-1.2",
    "gnu general public license v2 (gplv2)": "GPL-2.0-only",
    "gnu general public license v2 or later (gplv2+)": "GPL-2.0-or-later",
    "gnu general public license v3 (gplv3)": "GPL-3.0-only",
    "gnu general public license v3 or later (gplv3+)": "GPL-3.0-or-later",
    "gnu lesser general public license v2 (lgplv2)": "LGPL-2.0-only",
    "gnu lesser general public license v2 or later (lgplv2+)": "LGPL-2.0-or-later",
    "gnu lesser general public license v3 (lgplv3)": "LGPL-3.0-only",
    "gnu lesser general public license v3 or later (lgplv3+)": "LGPL-3.0-or-later",
    "gnu affero general public license v3": "AGPL-3.0-only",
    "gnu affero general public license v3 or later (agplv3+)": "AGPL-3.0-or-later",
}

# A License field longer than this, or spanning lines, is the licence's full text.
MAX_LICENSE_NAME = 100

FindingKind = Literal["denied", "not_allowed", "unknown"]
# Most serious first: a finding's kind is that of its most serious blocking licence.
_SEVERITY: tuple[FindingKind, ...] = ("denied", "unknown", "not_allowed")
_REASONS: dict[FindingKind, str] = {
    "denied": "denied",
    "unknown": "not SPDX licence ids and not in the allow list",
    "not_allowed": "not in the allow list",
}


class LicensePolicyError(ValueError):
    """An allow or deny list entry that is not a licence name or SPDX expression."""


@dataclass(frozen=True)
class LicenseFinding:
    dependency: str
    version: str
    license: str | None
    kind: FindingKind
    reason: str


@cache
def _licensing() -> Licensing:
    # Building the SPDX symbol table takes a noticeable moment: do it once, on first use.
    return get_spdx_licensing()


def _parse(text: str) -> Any:
    """The expression tree of `text`; ExpressionError when it is not one."""
    parsed = _licensing().parse(text, validate=False)
    if parsed is None:
        raise ExpressionError("empty licence expression")
    return parsed


def _is_spdx(parsed: Any) -> bool:
    return not _licensing().unknown_license_keys(parsed)


def spdx_from_name(name: str) -> str | None:
    """The SPDX expression a licence name stands for: a classifier name, a common free-text
    name ("Apache 2.0") or an SPDX id/expression in any case; None when it is none of them."""
    text = name.strip()
    if mapped := LICENSE_NAMES.get(text.lower()):
        return mapped
    try:
        parsed = _parse(text)
    except ExpressionError:
        return None
    return str(parsed.render()) if _is_spdx(parsed) else None


def declared_license(
    expression: str | None, license_field: str | None, classifiers: Iterable[str]
) -> tuple[str | None, str | None]:
    """The licence a distribution declares and the metadata field it came from.

    Core metadata 2.4's License-Expression wins; then a License field that names an SPDX
    licence; then the licence classifiers (several are alternatives, joined with OR); then
    a short License field as written. The full licence text some packages put in the
    License field is not a name and is ignored.
    """
    if expression and expression.strip():
        return (spdx_from_name(expression) or expression.strip()), "License-Expression"
    field = (license_field or "").strip()
    is_name = bool(field) and "\n" not in field and len(field) <= MAX_LICENSE_NAME
    if is_name and (spdx := spdx_from_name(field)):
        return spdx, "License"
    names = [
        c.split("::")[-1].strip()
        for c in classifiers
        if c.startswith("License ::") and c.count("::") >= 2
    ]
    names = [spdx_from_name(n) or n for n in names if n != "OSI Approved"]
    if names:
        unique = list(dict.fromkeys(names))
        joined = " OR ".join(f"({n})" if " OR " in n or " AND " in n else n for n in unique)
        return joined, "classifiers"
    if is_name:
        return field, "License"
    return None, None


def _keys(entries: Sequence[str], list_name: str) -> set[str]:
    """Lower-case comparison keys of a policy list: SPDX ids canonicalised (aliases
    resolved), other names as written."""
    keys = set()
    for entry in entries:
        if not isinstance(entry, str) or not entry.strip():
            raise LicensePolicyError(f"licenses.{list_name}: {entry!r} is not a licence name")
        keys.add(entry.strip().lower())
        if spdx := spdx_from_name(entry):
            keys.add(spdx.lower())
    return keys


@dataclass(frozen=True)
class _Leaf:
    text: str
    status: Literal["ok", "denied", "not_allowed", "unknown"]


def _leaf(symbol: Any, allow: set[str], deny: set[str]) -> _Leaf:
    if isinstance(symbol, LicenseWithExceptionSymbol):
        full, base = str(symbol.render()), str(symbol.license_symbol.key)
    else:
        full = base = str(symbol.key)
    full_key, base_key = full.lower(), base.lower()
    # An exception only adds permissions: the base licence decides, unless the whole
    # "X WITH Y" is listed.
    if full_key in deny or (base_key in deny and full_key not in allow):
        return _Leaf(full, "denied")
    if not allow or full_key in allow or base_key in allow:
        return _Leaf(full, "ok")
    return _Leaf(full, "not_allowed" if _is_spdx(symbol) else "unknown")


def _blockers(node: Any, allow: set[str], deny: set[str]) -> list[_Leaf]:
    """The leaves that keep `node` from being acceptable; empty when it is acceptable."""
    if isinstance(node, OR):
        options = [_blockers(arg, allow, deny) for arg in node.args]
        return [] if any(not o for o in options) else [b for o in options for b in o]
    if isinstance(node, AND):
        return [b for arg in node.args for b in _blockers(arg, allow, deny)]
    if isinstance(node, LicenseSymbol | LicenseWithExceptionSymbol):
        leaf = _leaf(node, allow, deny)
        return [] if leaf.status == "ok" else [leaf]
    raise ExpressionError(f"unsupported licence expression part {node!r}")


def _finding(dependency: Dependency, kind: FindingKind, reason: str) -> LicenseFinding:
    return LicenseFinding(dependency.name, dependency.version, dependency.license, kind, reason)


def check_licenses(
    dependencies: Iterable[Dependency], allow: Sequence[str] = (), deny: Sequence[str] = ()
) -> list[LicenseFinding]:
    """Dependencies whose licence the policy rejects.

    An expression passes when some way of satisfying it uses no denied licence and, with
    an allow list, only allowed ones: "MIT OR GPL-3.0-only" passes when MIT is allowed,
    "MIT AND GPL-3.0-only" needs both. With an allow list, a dependency that declares no
    licence or a licence that is not an SPDX id is a finding of kind "unknown".
    """
    allow_keys, deny_keys = _keys(allow, "allow"), _keys(deny, "deny")
    findings = []
    for dependency in dependencies:
        if dependency.license is None:
            if allow_keys:
                findings.append(_finding(dependency, "unknown", "declares no licence"))
            continue
        try:
            blockers = _blockers(_parse(dependency.license), allow_keys, deny_keys)
        except ExpressionError:
            # Not an expression: judge the whole string as one licence name.
            key = dependency.license.strip().lower()
            if key in deny_keys:
                findings.append(_finding(dependency, "denied", f"denied: {dependency.license}"))
            elif allow_keys and key not in allow_keys:
                reason = "not an SPDX licence expression and not in the allow list"
                findings.append(_finding(dependency, "unknown", reason))
            continue
        if not blockers:
            continue
        by_status = {s: [b.text for b in blockers if b.status == s] for s in _SEVERITY}
        kind = next(s for s in _SEVERITY if by_status[s])
        reason = "; ".join(
            f"{_REASONS[s]}: {', '.join(dict.fromkeys(by_status[s]))}"
            for s in _SEVERITY
            if by_status[s]
        )
        findings.append(_finding(dependency, kind, reason))
    return findings
