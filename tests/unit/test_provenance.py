"""Signed provenance: the ed25519 key file, the in-toto/SLSA statement, DSSE sign and verify.

Artifacts are real files, the commit a real git commit, and signatures are cross-checked with
the openssl command line so the PAE and the key export are not only checked against
themselves.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cicd_dagster.artifact_store import file_sha256
from cicd_dagster.security.provenance import (
    BUILD_TYPE,
    PAYLOAD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    ProvenanceError,
    ResolvedDependency,
    SigningKey,
    SigningKeyError,
    Subject,
    key_id,
    load_public_key,
    pae,
    read_envelope,
    sign,
    statement,
    verify,
)
from tests.support import commit

STARTED = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
FINISHED = STARTED + timedelta(minutes=3, seconds=2)
RUN_ID = "0b5e9f1c-7c7e-4d0e-9a4a-2f2b9d7f3e11"
BUILDER = "urn:cicd-dagster:builder:local:v1"


# --- the key file ---------------------------------------------------------------------------


@pytest.fixture
def key(tmp_path: Path) -> SigningKey:
    return SigningKey.load(tmp_path / "keys" / "signing.pem", create=True)


def write_key_file(path: Path, pem: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(pem)
    path.chmod(mode)
    return path


def test_missing_key_is_created_private_and_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys" / "signing.pem"
    created = SigningKey.load(path, create=True)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in path.parent.iterdir()] == ["signing.pem"]  # no temporary left
    again = SigningKey.load(path, create=True)
    assert again.keyid == created.keyid
    assert len(created.keyid) == 64


def test_missing_key_without_create_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    with pytest.raises(SigningKeyError, match="key file does not exist") as raised:
        SigningKey.load(path)
    assert str(raised.value).startswith(f"{path}: ")
    assert not path.exists()


def test_key_readable_by_others_is_refused(key: SigningKey) -> None:
    key.path.chmod(0o644)
    with pytest.raises(SigningKeyError, match=r"has mode 0644: group or others") as raised:
        SigningKey.load(key.path)
    assert str(key.path) in str(raised.value)
    assert "chmod 600" in str(raised.value)


def test_key_in_a_folder_others_can_write_is_refused(key: SigningKey) -> None:
    key.path.parent.chmod(0o777)
    with pytest.raises(SigningKeyError, match=r"has mode 0777: others could replace the key"):
        SigningKey.load(key.path)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_key_owned_by_another_user_is_refused(key: SigningKey) -> None:
    os.chown(key.path, 65534, 65534)
    with pytest.raises(SigningKeyError, match="is owned by uid 65534"):
        SigningKey.load(key.path)


def test_garbage_key_file_is_not_a_pem_key(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "signing.pem", b"not a key\n")
    with pytest.raises(SigningKeyError, match="is not a PEM private key"):
        SigningKey.load(path, create=True)  # a broken key is never silently replaced
    assert path.read_bytes() == b"not a key\n"


def test_empty_key_file_is_not_a_pem_key(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "signing.pem", b"")
    with pytest.raises(SigningKeyError, match="is not a PEM private key"):
        SigningKey.load(path)


def test_key_of_another_type_is_refused(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = write_key_file(tmp_path / "signing.pem", pem)
    with pytest.raises(SigningKeyError, match="holds a key of type EC, not ed25519"):
        SigningKey.load(path)


def test_passphrase_protected_key_is_refused(tmp_path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    path = write_key_file(tmp_path / "signing.pem", pem)
    with pytest.raises(SigningKeyError, match="encrypted with a passphrase"):
        SigningKey.load(path)


def test_key_path_that_is_a_folder_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    path.mkdir()
    with pytest.raises(SigningKeyError, match="cannot be read: Is a directory"):
        SigningKey.load(path, create=True)


def test_key_made_by_openssl_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(path)],
        check=True,
        capture_output=True,
    )
    path.chmod(0o600)
    assert len(SigningKey.load(path).keyid) == 64


def test_public_key_export_loads_for_verifiers(key: SigningKey, tmp_path: Path) -> None:
    public = tmp_path / "signing.pub"
    public.write_text(key.public_key_pem())
    assert key_id(load_public_key(public)) == key.keyid


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"garbage", "is not a PEM public key"),
        (
            ec.generate_private_key(ec.SECP256R1())
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
            "holds a key of type EC, not ed25519",
        ),
    ],
    ids=["garbage", "ec-key"],
)
def test_bad_public_key_file_is_an_error_naming_it(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "signing.pub"
    path.write_bytes(content)
    with pytest.raises(SigningKeyError, match=message) as raised:
        load_public_key(path)
    assert str(raised.value).startswith(f"{path}: ")


@pytest.fixture
def world_readable_folder() -> Iterator[Path]:
    """A folder any user can enter, unlike pytest's tmp_path under a 0700 root."""
    folder = Path(tempfile.mkdtemp(prefix="cicd-key-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run a step as another uid",
)
def test_created_key_is_unreadable_by_a_step_running_as_another_uid(
    world_readable_folder: Path,
) -> None:
    key = SigningKey.load(world_readable_folder / "keys" / "signing.pem", create=True)
    public = world_readable_folder / "signing.pub"
    public.write_text(key.public_key_pem())
    public.chmod(0o644)

    def read_as_nobody(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(path)],
            capture_output=True,
            text=True,
        )

    assert read_as_nobody(public).returncode == 0  # the step can read what is meant for it
    denied = read_as_nobody(key.path)
    assert denied.returncode != 0
    assert "Permission denied" in denied.stderr


# --- the statement --------------------------------------------------------------------------


@pytest.fixture
def repository(tmp_path: Path) -> tuple[Path, str]:
    repo = tmp_path / "shop-api"
    sha = commit(repo, {"requirements.txt": "requests==2.31.0\n", "app.py": "print(1)\n"})
    return repo, sha


@pytest.fixture
def artifacts(tmp_path: Path) -> dict[str, Path]:
    dist = tmp_path / "store" / "dist"
    dist.mkdir(parents=True)
    wheel = dist / "shop_api-1.0-py3-none-any.whl"
    wheel.write_bytes(bytes(range(256)) * 64)
    sdist = dist / "shop_api-1.0.tar.gz"
    sdist.write_bytes(b"sdist contents\n")
    return {f"dist/{wheel.name}": wheel, f"dist/{sdist.name}": sdist}


def build_statement(
    repository: tuple[Path, str], artifacts: dict[str, Path], **overrides: Any
) -> dict[str, Any]:
    repo, sha = repository
    arguments: dict[str, Any] = {
        "repository_url": str(repo),
        "commit_sha": sha,
        "ref": "refs/heads/main",
        "builder_id": BUILDER,
        "invocation_id": RUN_ID,
        "started_on": STARTED,
        "finished_on": FINISHED,
        "dependencies": [ResolvedDependency.lock_file(repo / "requirements.txt")],
    } | overrides
    subjects = [(name, file_sha256(path)) for name, path in artifacts.items()]
    return statement(subjects, **arguments)


def test_statement_is_an_in_toto_statement_with_a_slsa_provenance_predicate(
    repository: tuple[Path, str], artifacts: dict[str, Path]
) -> None:
    repo, sha = repository
    document = build_statement(repository, artifacts, internal_parameters={"python": "3.11"})
    lock_sha256 = file_sha256(repo / "requirements.txt")
    assert document == {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [
            {"name": name, "digest": {"sha256": file_sha256(path)}}
            for name, path in artifacts.items()
        ],
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"repository": str(repo), "ref": "refs/heads/main"},
                "internalParameters": {"python": "3.11"},
                "resolvedDependencies": [
                    {
                        "uri": f"git+file://{repo}@refs/heads/main",
                        "digest": {"gitCommit": sha},
                    },
                    {"digest": {"sha256": lock_sha256}, "name": "requirements.txt"},
                ],
            },
            "runDetails": {
                "builder": {"id": BUILDER},
                "metadata": {
                    "invocationId": RUN_ID,
                    "startedOn": "2024-05-01T12:00:00Z",
                    "finishedOn": "2024-05-01T12:03:02Z",
                },
            },
        },
    }
    json.dumps(document)  # plain JSON types only


def test_statement_times_are_written_in_utc(
    repository: tuple[Path, str], artifacts: dict[str, Path]
) -> None:
    paris = timezone(timedelta(hours=2))
    document = build_statement(
        repository,
        artifacts,
        started_on=datetime(2024, 5, 1, 14, 0, 0, 250000, tzinfo=paris),
        finished_on=datetime(2024, 5, 1, 14, 1, 0, tzinfo=paris),
    )
    metadata = document["predicate"]["runDetails"]["metadata"]
    assert metadata["startedOn"] == "2024-05-01T12:00:00.250000Z"
    assert metadata["finishedOn"] == "2024-05-01T12:01:00Z"


@pytest.mark.parametrize(
    ("url", "recorded", "uri"),
    [
        (
            "https://ci-bot:ghp_s3cr3t@github.com/octo/shop-api.git",
            "https://github.com/octo/shop-api.git",
            "git+https://github.com/octo/shop-api.git@main",
        ),
        (
            "https://ghp_s3cr3t@github.com/octo/shop-api.git",
            "https://github.com/octo/shop-api.git",
            "git+https://github.com/octo/shop-api.git@main",
        ),
        (
            "git@github.com:octo/shop-api.git",
            "git@github.com:octo/shop-api.git",
            "git+ssh://git@github.com/octo/shop-api.git@main",
        ),
        (
            "ssh://git@GitHub.com/octo/shop-api.git",
            "ssh://git@GitHub.com/octo/shop-api.git",
            "git+ssh://git@GitHub.com/octo/shop-api.git@main",
        ),
    ],
    ids=["user-and-token", "token-only", "scp-like", "ssh"],
)
def test_repository_url_is_recorded_without_credentials(
    repository: tuple[Path, str], artifacts: dict[str, Path], url: str, recorded: str, uri: str
) -> None:
    document = build_statement(repository, artifacts, repository_url=url, ref="main")
    definition = document["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["repository"] == recorded
    assert definition["resolvedDependencies"][0]["uri"] == uri
    assert "s3cr3t" not in json.dumps(document)


def test_resolved_packages_are_purls(
    repository: tuple[Path, str], artifacts: dict[str, Path]
) -> None:
    document = build_statement(
        repository,
        artifacts,
        dependencies=[
            ResolvedDependency.pypi("Typing_Extensions", "4.12.2", sha256="ab" * 32),
            ResolvedDependency.pypi("requests", "2.31.0"),
        ],
    )
    assert document["predicate"]["buildDefinition"]["resolvedDependencies"][1:] == [
        {"uri": "pkg:pypi/typing-extensions@4.12.2", "digest": {"sha256": "ab" * 32}},
        {"uri": "pkg:pypi/requests@2.31.0"},
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"commit_sha": "abc123"}, "is not a full lowercase hex git object id"),
        ({"started_on": datetime(2024, 5, 1, 12, 0)}, "has no timezone"),
        ({"finished_on": STARTED - timedelta(seconds=1)}, "finished .* before it started"),
        (
            {"dependencies": [ResolvedDependency(digest={"sha256": "NOT-HEX"})]},
            "is not lowercase hex",
        ),
        ({"dependencies": [ResolvedDependency(name="lock")]}, "needs a uri or a digest"),
    ],
    ids=["short-sha", "naive-time", "time-reversed", "bad-digest", "empty-dependency"],
)
def test_bad_statement_input_is_refused(
    repository: tuple[Path, str],
    artifacts: dict[str, Path],
    overrides: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(ProvenanceError, match=message) as raised:
        build_statement(repository, artifacts, **overrides)
    assert raised.value.reason == "statement"


@pytest.mark.parametrize(
    ("subjects", "message"),
    [
        ([], "at least one subject"),
        ([("../../etc/passwd", "ab" * 32)], "not a relative path inside the store"),
        ([("/etc/passwd", "ab" * 32)], "not a relative path inside the store"),
        ([("a.whl", "ab" * 32), ("a.whl", "cd" * 32)], "listed twice"),
        ([("a.whl", "AB" * 32)], "is not a lowercase sha256"),
        ([("a.whl", "ab" * 20)], "is not a lowercase sha256"),
    ],
    ids=["none", "dot-dot", "absolute", "duplicate", "uppercase", "sha1"],
)
def test_bad_subjects_are_refused(
    repository: tuple[Path, str], subjects: list[tuple[str, str]], message: str
) -> None:
    repo, sha = repository
    with pytest.raises(ProvenanceError, match=message):
        statement(
            subjects,
            repository_url=str(repo),
            commit_sha=sha,
            builder_id=BUILDER,
            invocation_id=RUN_ID,
            started_on=STARTED,
            finished_on=FINISHED,
        )


# --- DSSE -----------------------------------------------------------------------------------


def test_pae_matches_the_dsse_spec_test_vector() -> None:
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t/é", "ü".encode()) == "DSSEv1 4 t/é 2 ü".encode()


@pytest.fixture
def signed(
    key: SigningKey, repository: tuple[Path, str], artifacts: dict[str, Path]
) -> dict[str, Any]:
    return sign(build_statement(repository, artifacts), key)


def test_envelope_signature_verifies_with_openssl(
    signed: dict[str, Any], key: SigningKey, tmp_path: Path
) -> None:
    assert signed["payloadType"] == "application/vnd.in-toto+json"
    assert signed["signatures"][0]["keyid"] == key.keyid
    body = base64.b64decode(signed["payload"])
    assert json.loads(body)["_type"] == STATEMENT_TYPE
    (tmp_path / "pae").write_bytes(
        b"DSSEv1 28 application/vnd.in-toto+json %d %b" % (len(body), body)
    )
    (tmp_path / "sig").write_bytes(base64.b64decode(signed["signatures"][0]["sig"]))
    (tmp_path / "public.pem").write_text(key.public_key_pem())
    done = subprocess.run(
        [
            "openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(tmp_path / "public.pem"),
            "-rawin", "-in", str(tmp_path / "pae"), "-sigfile", str(tmp_path / "sig"),
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Signature Verified Successfully" in done.stdout


def test_verify_returns_what_the_provenance_vouches_for(
    signed: dict[str, Any],
    key: SigningKey,
    artifacts: dict[str, Path],
    repository: tuple[Path, str],
) -> None:
    _, sha = repository
    verified = verify(signed, key.public_key(), artifacts, builder_id=BUILDER, commit_sha=sha)
    assert verified.keyid == key.keyid
    assert verified.subjects == tuple(
        Subject(name, file_sha256(path)) for name, path in artifacts.items()
    )
    assert verified.commit_sha == sha
    assert verified.builder_id == BUILDER
    assert verified.build_type == BUILD_TYPE
    assert verified.invocation_id == RUN_ID
    assert (verified.started_on, verified.finished_on) == (
        "2024-05-01T12:00:00Z",
        "2024-05-01T12:03:02Z",
    )
    assert verified.statement["predicateType"] == PREDICATE_TYPE


def test_envelope_survives_a_json_file_round_trip(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "provenance.intoto.json"
    path.write_text(json.dumps(signed, indent=2))
    assert verify(read_envelope(path), key.public_key(), artifacts).keyid == key.keyid


def test_url_safe_unpadded_base64_is_accepted(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path]
) -> None:
    def url_safe(text: str) -> str:
        return base64.urlsafe_b64encode(base64.b64decode(text)).decode().rstrip("=")

    envelope = signed | {
        "payload": url_safe(signed["payload"]),
        "signatures": [{"sig": url_safe(signed["signatures"][0]["sig"])}],
    }
    verify(envelope, key.public_key(), artifacts)


def test_one_changed_byte_in_an_artifact_fails_naming_it(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path]
) -> None:
    name, path = next(iter(artifacts.items()))
    expected = file_sha256(path)
    content = bytearray(path.read_bytes())
    content[1000] ^= 0x01
    path.write_bytes(content)
    with pytest.raises(ProvenanceError) as raised:
        verify(signed, key.public_key(), artifacts)
    assert raised.value.reason == "artifact"
    assert str(raised.value) == (
        f"artifact {name} ({path}) has sha256 {file_sha256(path)}, "
        f"the signed statement says {expected}"
    )


def test_one_changed_byte_in_the_statement_fails_the_signature(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path]
) -> None:
    # The attack: swap an artifact and rewrite its digest in the statement to match.
    path = next(iter(artifacts.values()))
    path.write_bytes(b"malicious wheel")
    body = base64.b64decode(signed["payload"])
    document = json.loads(body)
    document["subject"][0]["digest"]["sha256"] = file_sha256(path)
    forged = signed | {"payload": base64.b64encode(json.dumps(document).encode()).decode()}
    with pytest.raises(ProvenanceError, match="the signature does not verify") as raised:
        verify(forged, key.public_key(), artifacts)
    assert raised.value.reason == "signature"


def test_one_changed_byte_in_the_payload_fails_the_signature(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path]
) -> None:
    body = bytearray(base64.b64decode(signed["payload"]))
    body[body.index(b"2024-05-01")] = ord("3")  # 2024 -> 3024
    tampered = signed | {"payload": base64.b64encode(bytes(body)).decode()}
    with pytest.raises(ProvenanceError, match="the statement or the signature was changed"):
        verify(tampered, key.public_key(), artifacts)


def test_one_changed_byte_in_the_signature_fails(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path]
) -> None:
    sig = bytearray(base64.b64decode(signed["signatures"][0]["sig"]))
    sig[10] ^= 0x80
    tampered = signed | {
        "signatures": [{"keyid": key.keyid, "sig": base64.b64encode(bytes(sig)).decode()}]
    }
    with pytest.raises(ProvenanceError, match="the signature does not verify") as raised:
        verify(tampered, key.public_key(), artifacts)
    assert raised.value.reason == "signature"


def test_changed_payload_type_fails_the_signature(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path]
) -> None:
    with pytest.raises(ProvenanceError) as raised:
        verify(signed | {"payloadType": "application/json"}, key.public_key(), artifacts)
    assert raised.value.reason == "signature"


def test_signature_by_another_key_names_both_keys(
    signed: dict[str, Any], artifacts: dict[str, Path], tmp_path: Path
) -> None:
    other = SigningKey.load(tmp_path / "other" / "signing.pem", create=True)
    with pytest.raises(ProvenanceError, match=f"the given key is {other.keyid}") as raised:
        verify(signed, other.public_key(), artifacts)
    assert signed["signatures"][0]["keyid"] in str(raised.value)


def test_any_one_good_signature_is_enough(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    other = SigningKey.load(tmp_path / "other" / "signing.pem", create=True)
    by_other = sign(json.loads(base64.b64decode(signed["payload"])), other)
    envelope = signed | {"signatures": by_other["signatures"] + signed["signatures"]}
    assert verify(envelope, key.public_key(), artifacts).keyid == key.keyid


def signed_raw(key: SigningKey, payload_type: str, body: bytes) -> dict[str, Any]:
    """An envelope validly signed over any payload: to reach the checks after the signature."""
    sig = key.private_key.sign(pae(payload_type, body))
    return {
        "payloadType": payload_type,
        "payload": base64.b64encode(body).decode(),
        "signatures": [{"keyid": key.keyid, "sig": base64.b64encode(sig).decode()}],
    }


def test_signed_envelope_of_another_payload_type_is_refused(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path]
) -> None:
    envelope = signed_raw(key, "application/json", base64.b64decode(signed["payload"]))
    with pytest.raises(ProvenanceError, match="payloadType 'application/json' is not") as raised:
        verify(envelope, key.public_key(), artifacts)
    assert raised.value.reason == "payload_type"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "the payload is not JSON"),
        (b"[1, 2]", "the payload is not a JSON object"),
        (
            json.dumps({"_type": "https://in-toto.io/Statement/v0.1"}).encode(),
            "has _type 'https://in-toto.io/Statement/v0.1'",
        ),
    ],
    ids=["not-json", "array", "old-statement"],
)
def test_signed_payload_that_is_not_a_statement_is_refused(
    key: SigningKey, artifacts: dict[str, Path], body: bytes, message: str
) -> None:
    with pytest.raises(ProvenanceError, match=message) as raised:
        verify(signed_raw(key, PAYLOAD_TYPE, body), key.public_key(), artifacts)
    assert raised.value.reason == "statement"


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        ({"name": "../../etc/passwd", "digest": {"sha256": "ab" * 32}}, "not a relative path"),
        ({"name": "a.whl", "digest": {"sha512": "ab" * 64}}, "has no sha256 digest"),
        ({"digest": {"sha256": "ab" * 32}}, "subject 0 has no name and digest"),
    ],
    ids=["escapes-store", "no-sha256", "no-name"],
)
def test_signed_statement_with_a_bad_subject_is_refused(
    signed: dict[str, Any],
    key: SigningKey,
    artifacts: dict[str, Path],
    subject: dict[str, Any],
    message: str,
) -> None:
    document = json.loads(base64.b64decode(signed["payload"]))
    document["subject"] = [subject]
    envelope = signed_raw(key, PAYLOAD_TYPE, json.dumps(document).encode())
    with pytest.raises(ProvenanceError, match=message) as raised:
        verify(envelope, key.public_key(), artifacts)
    assert raised.value.reason == "statement"


def test_artifact_that_is_not_a_subject_fails(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path], tmp_path: Path
) -> None:
    extra = tmp_path / "extra.bin"
    extra.write_bytes(b"x")
    with pytest.raises(ProvenanceError, match=r"artifact extra\.bin is not a subject"):
        verify(signed, key.public_key(), artifacts | {"extra.bin": extra})


def test_subject_without_its_artifact_fails(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path]
) -> None:
    name, _ = artifacts.popitem()
    with pytest.raises(ProvenanceError, match=f"subject {name} has no artifact file"):
        verify(signed, key.public_key(), artifacts)


def test_missing_artifact_file_fails_naming_it(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path]
) -> None:
    name, path = next(iter(artifacts.items()))
    path.unlink()
    with pytest.raises(ProvenanceError, match=f"artifact {name} \\({path}\\) cannot be read"):
        verify(signed, key.public_key(), artifacts)


def test_provenance_of_another_commit_or_builder_fails(
    signed: dict[str, Any], key: SigningKey, artifacts: dict[str, Path], repository: Any
) -> None:
    _, sha = repository
    with pytest.raises(ProvenanceError, match=f"is for commit {sha}, not {'0' * 40}") as raised:
        verify(signed, key.public_key(), artifacts, commit_sha="0" * 40)
    assert raised.value.reason == "commit"
    with pytest.raises(ProvenanceError, match="not by the expected 'urn:other'") as raised:
        verify(signed, key.public_key(), artifacts, builder_id="urn:other")
    assert raised.value.reason == "builder"


def test_sign_refuses_what_verify_would_refuse(key: SigningKey) -> None:
    with pytest.raises(ProvenanceError, match="has predicateType None"):
        sign({"_type": STATEMENT_TYPE, "subject": []}, key)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"payloadType": None}, "has no payloadType string"),
        ({"payload": 12}, "has no payload string"),
        ({"signatures": []}, "has no signatures"),
        ({"signatures": [{"keyid": "k"}]}, "signature 1 has no sig string"),
        ({"signatures": [{"sig": "AAAA", "keyid": 5}]}, "keyid that is not a string"),
        ({"payload": "not base64!"}, "payload is not valid base64"),
        ({"signatures": [{"sig": "%%%%"}]}, "signature 1 is not valid base64"),
    ],
    ids=[
        "no-type",
        "payload-int",
        "no-signatures",
        "no-sig",
        "keyid-int",
        "b64-payload",
        "b64-sig",
    ],
)
def test_malformed_envelope_fails_clearly(
    signed: dict[str, Any],
    key: SigningKey,
    artifacts: dict[str, Path],
    change: dict[str, Any],
    message: str,
) -> None:
    with pytest.raises(ProvenanceError, match=message) as raised:
        verify(signed | change, key.public_key(), artifacts)
    assert raised.value.reason == "envelope"


def test_envelope_file_that_is_not_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "provenance.intoto.json"
    path.write_text('{\n  "payloadType": "application/vnd.in-toto+json",\n  "payload": \n}\n')
    with pytest.raises(ProvenanceError, match=rf"^{path}:4: not valid JSON") as raised:
        read_envelope(path)
    assert raised.value.reason == "envelope"


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "envelope file does not exist"), ("[]", "a DSSE envelope is a JSON object")],
    ids=["missing", "array"],
)
def test_envelope_file_that_is_not_an_envelope_is_named(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "provenance.intoto.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ProvenanceError, match=message) as raised:
        read_envelope(path)
    assert str(raised.value).startswith(f"{path}: ")
