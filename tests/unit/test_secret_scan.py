"""Secret scanning on real trees: every token format, high-entropy assignments, a realistic
project with lock files, digests and binaries (no false positives), what is skipped and why,
redaction, and the allowlist.

The fake secrets are made at run time: a literal token in this file would itself be a
committed secret for every scanner (and push protection) that reads the repository.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import string
import struct
import zlib
from datetime import date
from pathlib import Path

import bandit
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from cicd_dagster.security.sast import Finding
from cicd_dagster.security.secrets import (
    HIGH_ENTROPY_RULE,
    SecretFinding,
    SecretScanError,
    Suppression,
    apply_suppressions,
    redact,
    scan_secrets,
    shannon_entropy,
)

RANDOM = random.Random(20240601)
ALNUM = string.ascii_letters + string.digits
UPPER_DIGITS = string.ascii_uppercase + string.digits


def rand(alphabet: str, length: int) -> str:
    return "".join(RANDOM.choice(alphabet) for _ in range(length))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt() -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"sub": "1234567890", "name": "Ada", "iat": 1516239022}).encode())
    signature = hmac.new(b"key", f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def pem_private_key(kind: str) -> str:
    if kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        encoding = serialization.PrivateFormat.TraditionalOpenSSL  # BEGIN RSA PRIVATE KEY
    elif kind == "ec":
        key = ec.generate_private_key(ec.SECP256R1())  # type: ignore[assignment]
        encoding = serialization.PrivateFormat.PKCS8  # BEGIN PRIVATE KEY
    else:
        key = ed25519.Ed25519PrivateKey.generate()  # type: ignore[assignment]
        encoding = serialization.PrivateFormat.OpenSSH  # BEGIN OPENSSH PRIVATE KEY
    return key.private_bytes(
        serialization.Encoding.PEM, encoding, serialization.NoEncryption()
    ).decode()


# One fake secret of each known format, as they appear in the issuers' documentation.
TOKENS = {
    "aws-access-key-id": "AKIA" + rand(UPPER_DIGITS, 16),
    "github-token": "ghp_" + rand(ALNUM, 36),
    "github-oauth": "gho_" + rand(ALNUM, 36),
    "github-fine-grained": "github_pat_" + rand(ALNUM, 22) + "_" + rand(ALNUM, 59),
    "slack-token": "xoxb-"
    + rand(string.digits, 12)
    + "-"
    + rand(string.digits, 13)
    + "-"
    + rand(ALNUM, 24),
    "stripe-secret-key": "sk_live_" + rand(ALNUM, 24),
    "google-api-key": "AIza" + rand(ALNUM + "_-", 35),
    "jwt": jwt(),
}
RULE_OF = {"github-oauth": "github-token", "github-fine-grained": "github-token"}


def write(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return root


def places(findings: list[SecretFinding]) -> list[tuple[str, str, int]]:
    return [(finding.rule, finding.file, finding.line) for finding in findings]


def assert_never_in_clear(scan: object, secrets: list[str]) -> None:
    shown = repr(scan) + str(scan)
    shown += "".join(str(finding) + repr(finding) for finding in getattr(scan, "findings", []))
    for secret in secrets:
        assert secret not in shown
        assert secret[5:25] not in shown  # no long piece of it either


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_each_token_format_is_found_on_its_line(tmp_path: Path, name: str) -> None:
    token = TOKENS[name]
    checkout = write(tmp_path, {"src/settings.py": f'import os\n\n\nCLIENT = Client("{token}")\n'})
    scan = scan_secrets(checkout)

    assert places(scan.findings) == [(RULE_OF.get(name, name), "src/settings.py", 4)]
    assert scan.findings[0].excerpt == f"{token[:4]}…({len(token)} chars)"
    assert_never_in_clear(scan, [token])


def test_tokens_in_urls_and_yaml_and_shell(tmp_path: Path) -> None:
    github, slack = TOKENS["github-token"], TOKENS["slack-token"]
    checkout = write(
        tmp_path,
        {
            "deploy.sh": f'#!/bin/sh\ncurl -H "Authorization: token {github}" https://api.github.com\n',
            "ci.yml": f"notify:\n  url: https://hooks.slack.com/x?t={slack}\n",
            "docs/README.md": f"Clone with `git clone https://{github}@github.com/org/repo`\n",
        },
    )
    assert places(scan_secrets(checkout).findings) == [
        ("slack-token", "ci.yml", 2),
        ("github-token", "deploy.sh", 2),
        ("github-token", "docs/README.md", 1),
    ]


@pytest.mark.parametrize("kind", ["rsa", "ec", "openssh"])
def test_private_key_blocks_are_found_at_their_header(tmp_path: Path, kind: str) -> None:
    key = pem_private_key(kind)
    checkout = write(tmp_path, {"deploy/id_key": "# deploy key\n" + key})
    scan = scan_secrets(checkout)

    assert places(scan.findings) == [("private-key", "deploy/id_key", 2)]
    body = "".join(key.splitlines()[1:-1])
    assert_never_in_clear(scan, [body[:40], body[-40:]])


def test_private_key_inside_a_json_service_account_file(tmp_path: Path) -> None:
    account = {"type": "service_account", "project_id": "p", "private_key": pem_private_key("ec")}
    checkout = write(tmp_path, {"gcp.json": json.dumps(account, indent=2)})
    assert places(scan_secrets(checkout).findings) == [("private-key", "gcp.json", 4)]


def test_code_that_only_names_key_headers_and_public_material_is_not_a_finding(
    tmp_path: Path,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    checkout = write(
        tmp_path,
        {
            "keys.py": (
                "def is_private(text):\n"
                '    return text.startswith("-----BEGIN RSA PRIVATE KEY-----")\n'
                'END = "-----END RSA PRIVATE KEY-----"\n'
            ),
            "public.pem": public.decode(),
        },
    )
    assert scan_secrets(checkout).findings == []


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("app/config.py", 'DEBUG = False\nDB_PASSWORD = "{v}"\n', 2),
        ("app/client.js", "const config = {{\n  apiKey: '{v}',\n}};\n", 2),
        ("config/prod.yaml", "db:\n  host: db\n  password: {v}\n", 3),
        (".env", "PORT=8000\nAWS_SECRET_ACCESS_KEY={v}\n", 2),
        ("creds.json", '{{\n  "client_secret": "{v}"\n}}\n', 2),
        ("main.go", 'package main\n\nconst signingKey := "{v}"\n', 3),
        ("settings.ini", "[auth]\ntoken = {v}\n", 2),
    ],
)
def test_random_values_assigned_to_secret_names_are_found(
    tmp_path: Path, name: str, text: str, line: int
) -> None:
    value = rand(ALNUM + "+/", 30) + "9"
    scan = scan_secrets(write(tmp_path, {name: text.format(v=value)}))

    assert places(scan.findings) == [(HIGH_ENTROPY_RULE, name, line)]
    assert scan.findings[0].excerpt.endswith(f": {redact(value)}")
    assert_never_in_clear(scan, [value])


def test_hex_api_key_is_found(tmp_path: Path) -> None:
    value = rand("0123456789abcdef", 32)
    scan = scan_secrets(write(tmp_path, {"app.py": f'api_key = "{value}"\n'}))
    assert places(scan.findings) == [(HIGH_ENTROPY_RULE, "app.py", 1)]


@pytest.mark.parametrize(
    "line",
    [
        'password = os.environ["DB_PASSWORD"]',
        "password = settings.DATABASE_PASSWORD_FROM_VAULT",
        'password = "changeme"',
        'password = "correct-horse-battery-staple"',
        'token = "${GITHUB_TOKEN_FOR_RELEASES}"',
        "connect(password=password_from_vault_123)",  # an identifier, not a value
        'TOKEN_URL = "https://oauth2.example.com/token"',
        'secret_name = "my-app-prod-database-credentials"',
        'CHALLENGE_PASSWORD: "challengePassword"',  # camelCase words
        'max_tokens = "1234567890123456"',
        'aws_access_key_id = "AKIAIOSFODNN7EXAMPLE"',  # AWS's documentation value
        'token = "xxxxxxxxxxxxxxxxxxxxxxxx"',
        'session_token = "0123456789abcdef"',  # short hex: an id, not a key
    ],
)
def test_non_secrets_assigned_to_secret_names_are_not_findings(tmp_path: Path, line: str) -> None:
    assert scan_secrets(write(tmp_path, {"app.py": line + "\n"})).findings == []


def test_yaml_references_to_ci_secrets_are_not_findings(tmp_path: Path) -> None:
    workflow = (
        "jobs:\n  release:\n    env:\n"
        "      GITHUB_TOKEN: ${{ secrets.GITHUB_TOKEN }}\n"
        "      NPM_TOKEN: ${{ secrets.NPM_TOKEN }}\n"
        "      PYPI_API_TOKEN: !vault |\n"
    )
    assert scan_secrets(write(tmp_path, {".github/workflows/release.yml": workflow})).findings == []


def realistic_project() -> dict[str, str | bytes]:
    """A small service as it is committed: lock files full of hashes, digests, commit ids,
    UUIDs, an embedded image, settings read from the environment, a binary."""
    digests = [hashlib.sha256(RANDOM.randbytes(64)).hexdigest() for _ in range(40)]
    integrity = [base64.b64encode(hashlib.sha512(RANDOM.randbytes(64)).digest()).decode()]
    go_sums = [base64.b64encode(hashlib.sha256(RANDOM.randbytes(32)).digest()).decode()]
    png = (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + zlib.compress(RANDOM.randbytes(300))
    )
    repo = Path(__file__).resolve().parents[2]
    poetry_lock = "".join(
        f'[[package]]\nname = "pkg{i}"\nversion = "1.{i}.0"\nfiles = [\n'
        f'    {{file = "pkg{i}-1.{i}.0-py3-none-any.whl", hash = "sha256:{digests[i]}"}},\n]\n\n'
        for i in range(10)
    )
    return {
        "poetry.lock": poetry_lock + '[metadata]\ncontent-hash = "' + digests[10] + '"\n',
        "requirements.txt": "".join(
            f"pkg{i}==1.0 \\\n    --hash=sha256:{digests[20 + i]}\n" for i in range(5)
        ),
        "package-lock.json": json.dumps(
            {
                "lockfileVersion": 3,
                "packages": {
                    "node_modules/left-pad": {
                        "version": "1.3.0",
                        "resolved": "https://registry.npmjs.org/left-pad/-/left-pad-1.3.0.tgz",
                        "integrity": f"sha512-{integrity[0]}",
                    }
                },
            },
            indent=2,
        ),
        "go.sum": f"github.com/pkg/errors v0.9.1 h1:{go_sums[0]}\n",
        "Dockerfile": f"FROM python:3.11-slim@sha256:{digests[30]}\nCOPY . /app\n",
        "deploy/release.yaml": (
            f"commit: {digests[31][:40]}\nimage_digest: sha256:{digests[32]}\n"
            f"request_id: 3f2b8c1e-9a4d-4e6f-8b2a-1c3d5e7f9a0b\n"
            "token_ttl: 3600\npassword_min_length: 12\n"
        ),
        "app/settings.py": (
            "import os\n\nSECRET_KEY = os.environ['SECRET_KEY']\n"
            "DATABASE_PASSWORD = os.getenv('DATABASE_PASSWORD', '')\n"
            "PASSWORD_HASHERS = ['django.contrib.auth.hashers.Argon2PasswordHasher']\n"
            "AUTH_TOKEN_HEADER = 'X-Auth-Token'\n"
        ),
        "app/static/logo.css": (
            ".logo { background: url(data:image/png;base64,"
            + base64.b64encode(png).decode()
            + "); }\n"
        ),
        "app/static/logo.png": png + b"\0" * 16,
        ".github/workflows/ci.yml": "env:\n  TOKEN: ${{ secrets.CI_TOKEN }}\n",
        # Real source that talks about secrets all the time: this scanner and the SAST module.
        "vendor/secrets.py": (repo / "cicd_dagster/security/secrets.py").read_text(),
        "vendor/sast.py": (repo / "cicd_dagster/security/sast.py").read_text(),
        "vendor/config.py": (repo / "cicd_dagster/config.py").read_text(),
        "README.md": (repo / "README.md").read_text(),
    }


def test_realistic_project_has_no_false_positives(tmp_path: Path) -> None:
    scan = scan_secrets(write(tmp_path, realistic_project()))
    assert scan.findings == []
    assert [skipped.file for skipped in scan.skipped] == ["app/static/logo.png"]


def test_third_party_code_full_of_password_talk_has_no_false_positives() -> None:
    # bandit's own source: rules about hard-coded passwords, tokens and keys.
    scan = scan_secrets(Path(bandit.__file__).parent)
    assert scan.files_scanned > 50
    assert scan.findings == []


def test_lock_files_are_scanned_for_tokens_but_not_for_entropy(tmp_path: Path) -> None:
    token = TOKENS["github-token"]
    lock = (
        '[[package]]\nname = "private"\n[package.source]\n'
        f'url = "https://{token}@pypi.example.com/simple"\n'
        f'token = "{rand(ALNUM, 30)}1"\n'
    )
    scan = scan_secrets(write(tmp_path, {"poetry.lock": lock}))
    assert places(scan.findings) == [("github-token", "poetry.lock", 4)]


def test_tooling_folders_and_virtualenvs_are_not_scanned(tmp_path: Path) -> None:
    line = f'TOKEN = "{TOKENS["github-token"]}"\n'
    checkout = write(
        tmp_path,
        {
            ".git/config": line,
            ".venv/lib/site.py": line,
            "build-env/pyvenv.cfg": "home = /usr/bin\n",
            "build-env/lib/site.py": line,
            "node_modules/pkg/index.js": line,
            "src/__pycache__/x.py": line,
            "src/app.py": line,
        },
    )
    assert places(scan_secrets(checkout).findings) == [("github-token", "src/app.py", 1)]


def test_symlinks_are_not_followed_out_of_the_checkout(tmp_path: Path) -> None:
    outside = write(tmp_path / "outside", {"creds.py": f'token = "{TOKENS["github-token"]}"\n'})
    checkout = write(tmp_path / "checkout", {"app.py": "x = 1\n"})
    (checkout / "creds.py").symlink_to(outside / "creds.py")
    (checkout / "shared").symlink_to(outside, target_is_directory=True)

    scan = scan_secrets(checkout)
    assert scan.findings == []
    assert {(s.file, s.reason) for s in scan.skipped} == {
        ("creds.py", "symbolic link, not followed"),
        ("shared", "symbolic link, not followed"),
    }


def test_binaries_large_files_and_fifos_are_skipped_with_a_reason(tmp_path: Path) -> None:
    token = TOKENS["github-token"]
    checkout = write(
        tmp_path,
        {
            "blob.bin": b"\0\1\2" + token.encode(),
            "big.txt": "x" * 2000 + token,
            "latin1.txt": "caf\xe9 ".encode("latin-1") + f"token {token}\n".encode(),
        },
    )
    os.mkfifo(checkout / "pipe")
    scan = scan_secrets(checkout, max_file_bytes=1000)

    assert places(scan.findings) == [("github-token", "latin1.txt", 1)]
    assert {(s.file, s.reason) for s in scan.skipped} == {
        ("big.txt", "larger than 1000 bytes"),
        ("blob.bin", "binary"),
        ("pipe", "not a regular file"),
    }
    assert scan.files_scanned == 1


def test_line_numbers_with_crlf_and_several_secrets(tmp_path: Path) -> None:
    aws, google = TOKENS["aws-access-key-id"], TOKENS["google-api-key"]
    text = f"a = 1\r\nkeys = ['{aws}',\r\n  '{google}']\r\n"
    scan = scan_secrets(write(tmp_path, {"k.py": text.encode()}))
    assert places(scan.findings) == [
        ("aws-access-key-id", "k.py", 2),
        ("google-api-key", "k.py", 3),
    ]


def test_tokens_inside_longer_words_are_not_findings(tmp_path: Path) -> None:
    glued = "xyz" + TOKENS["aws-access-key-id"] + " " + "Q" + TOKENS["google-api-key"]
    assert scan_secrets(write(tmp_path, {"a.txt": glued})).findings == []


def test_no_finding_or_scan_ever_shows_a_secret(tmp_path: Path) -> None:
    files: dict[str, str | bytes] = {
        f"{name}.py": f'TOKEN = "{token}"\n' for name, token in TOKENS.items()
    }
    value = rand(ALNUM, 28) + "7"
    files["config.yaml"] = f"password: {value}\n"
    scan = scan_secrets(write(tmp_path, files))

    assert len(scan.findings) == len(TOKENS) + 1
    assert_never_in_clear(scan, [*TOKENS.values(), value])


def test_redaction_shows_less_of_short_values() -> None:
    assert redact("ghp_" + "a" * 36) == "ghp_…(40 chars)"
    assert redact("hunter2") == "h…(7 chars)"
    assert redact("abc") == "…(3 chars)"


def test_entropy_of_known_strings() -> None:
    assert shannon_entropy("aaaa") == 0
    assert shannon_entropy("abcd") == 2
    assert shannon_entropy("0123456789abcdef") == 4


def test_suppressions_silence_matching_findings_until_they_expire(tmp_path: Path) -> None:
    token = TOKENS["stripe-secret-key"]
    checkout = write(
        tmp_path,
        {"tests/fixtures/payments.py": f'KEY = "{token}"\n', "app/pay.py": f'KEY = "{token}"\n'},
    )
    live = Suppression("stripe-*", "tests/*", "fixture key, revoked", date(2030, 1, 1))
    old = Suppression("*", "app/*", "was a test key", date(2024, 1, 1))

    scan = scan_secrets(checkout, [live, old], today=date(2025, 6, 1))

    assert places(scan.findings) == [("stripe-secret-key", "app/pay.py", 1)]
    assert [(s.finding.file, s.suppression.reason) for s in scan.suppressed] == [
        ("tests/fixtures/payments.py", "fixture key, revoked")
    ]
    assert scan.expired_suppressions == [old]
    # On its expiry day a suppression still holds; the day after it does not.
    assert scan_secrets(checkout, [live], today=date(2030, 1, 1)).suppressed
    assert not scan_secrets(checkout, [live], today=date(2030, 1, 2)).suppressed


def test_suppressions_apply_to_sast_findings_too() -> None:
    findings = [
        Finding("Bandit", "B602", "high", "high", "shell", "scripts/build.py", 3),
        Finding("Bandit", "B602", "high", "high", "shell", "app/run.py", 9),
        Finding("Bandit", "B101", "low", "high", "assert", None, None),
    ]
    allowed = apply_suppressions(
        findings,
        [Suppression("B602", "scripts/*", "build helper", date(2030, 1, 1))],
        date(2025, 1, 1),
    )
    assert [f.file for f in allowed.findings] == ["app/run.py", None]
    assert [s.finding.file for s in allowed.suppressed] == ["scripts/build.py"]


def test_missing_checkout_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SecretScanError, match="nope: not a folder"):
        scan_secrets(tmp_path / "nope")
