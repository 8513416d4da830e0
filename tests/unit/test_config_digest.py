"""The HMAC digest of a deployment's settings and secrets, and where its key lives."""

from pathlib import Path

from cicd_dagster.stages.deploy import config_digest, digest_key_path


def test_digest_key_is_made_once_private_in_the_keys_folder(tmp_path: Path) -> None:
    first = config_digest(tmp_path, {"A": "1"}, {"TOKEN": "s3cret"})
    key = digest_key_path(tmp_path)
    assert key == tmp_path / "keys" / "deploy-digest.key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    assert config_digest(tmp_path, {"A": "1"}, {"TOKEN": "s3cret"}) == first
    assert config_digest(tmp_path, {"A": "1"}, {"TOKEN": "rotated"}) != first
    assert "s3cret" not in first


def test_a_key_in_the_old_place_moves_and_keeps_the_digests(tmp_path: Path) -> None:
    legacy = tmp_path / "deploy-digest.key"
    legacy.write_bytes(b"k" * 32)
    digest = config_digest(tmp_path, {"A": "1"}, {})
    assert not legacy.exists()
    assert digest_key_path(tmp_path).read_bytes() == b"k" * 32
    other_home = tmp_path / "other"
    digest_key_path(other_home).parent.mkdir(parents=True)
    digest_key_path(other_home).write_bytes(b"k" * 32)
    assert config_digest(other_home, {"A": "1"}, {}) == digest
