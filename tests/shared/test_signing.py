"""Ed25519 key files and manifest signatures (RFC 8032) with the real ``cryptography`` package."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fieldpack.shared.errors import OutputNotWritableError, SignatureError, SigningKeyError
from fieldpack.shared.signing import generate_keypair, key_id, load_private_key, load_public_key, sign_manifest, verify_manifest

MSG = b'{"format": "fieldpack-bundle"}\n'


@pytest.fixture()
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "k")


def test_keygen_writes_private_0600_and_never_overwrites(pair: tuple[Path, Path]) -> None:
    priv, pub = pair
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    before = priv.read_bytes()
    with pytest.raises(OutputNotWritableError, match="already exists"):
        generate_keypair(priv.parent)
    assert priv.read_bytes() == before


def test_sign_then_verify_returns_the_key(pair: tuple[Path, Path]) -> None:
    priv, pub = pair
    sig = sign_manifest(MSG, priv)
    doc = json.loads(sig)
    key = load_public_key(pub)
    assert doc["alg"] == "ed25519" and len(base64.b64decode(doc["signature"])) == 64
    assert doc["key_id"] == key.key_id == hashlib.sha256(key.raw).hexdigest()[:16] == key_id(key.raw)
    assert verify_manifest(MSG, sig, [key]) == key
    assert sign_manifest(MSG, priv) == sig  # ed25519 is deterministic


def test_verify_picks_the_right_key_among_several(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    other_priv, other_pub = generate_keypair(tmp_path / "other")
    keys = [load_public_key(other_pub), load_public_key(pair[1])]
    assert verify_manifest(MSG, sign_manifest(MSG, pair[0]), keys).origin == str(pair[1])


def test_altered_manifest_fails(pair: tuple[Path, Path]) -> None:
    sig = sign_manifest(MSG, pair[0])
    with pytest.raises(SignatureError, match="altered"):
        verify_manifest(MSG.replace(b"fieldpack", b"fie1dpack"), sig, [load_public_key(pair[1])])


def test_untrusted_key_names_its_id(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    _, other_pub = generate_keypair(tmp_path / "other")
    sig = sign_manifest(MSG, pair[0])
    kid = load_public_key(pair[1]).key_id
    with pytest.raises(SignatureError, match=f"signed by key {kid}, which is not trusted") as ei:
        verify_manifest(MSG, sig, [load_public_key(other_pub)])
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("sig, match", [
    (None, "unsigned"),
    (b"", "unsigned"),
    (b"not json", "malformed"),
    (b'{"alg": "rsa", "key_id": "x", "signature": "AA=="}', "malformed"),
    (b'{"alg": "ed25519", "key_id": "x", "signature": "***"}', "malformed"),
    (b'{"alg": "ed25519", "signature": "AA=="}', "malformed"),
])
def test_bad_signature_files(pair: tuple[Path, Path], sig: bytes | None, match: str) -> None:
    with pytest.raises(SignatureError, match=match):
        verify_manifest(MSG, sig, [load_public_key(pair[1])])


def test_no_trusted_keys(pair: tuple[Path, Path]) -> None:
    with pytest.raises(SignatureError, match="no trusted keys"):
        verify_manifest(MSG, sign_manifest(MSG, pair[0]), [])


def test_forged_signature_with_matching_key_id(pair: tuple[Path, Path]) -> None:
    doc = json.loads(sign_manifest(MSG, pair[0]))
    doc["signature"] = base64.b64encode(bytes(64)).decode()
    with pytest.raises(SignatureError, match="does not match"):
        verify_manifest(MSG, json.dumps(doc).encode(), [load_public_key(pair[1])])


def test_key_loading_errors(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    priv, pub = pair
    with pytest.raises(SigningKeyError, match="does not exist"):
        load_private_key(tmp_path / "missing.key")
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        load_private_key(pub)  # the .pub by mistake
    with pytest.raises(SigningKeyError, match="not a PEM public key"):
        load_public_key(priv)
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"hello")
    with pytest.raises(SigningKeyError):
        load_public_key(garbage)
    # a valid key of the wrong algorithm
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_priv, ec_pub = tmp_path / "ec.key", tmp_path / "ec.pub"
    ec_priv.write_bytes(ec_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    ec_pub.write_bytes(ec_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(SigningKeyError, match="not an ed25519 key"):
        load_private_key(ec_priv)
    with pytest.raises(SigningKeyError, match="not an ed25519 key"):
        load_public_key(ec_pub)
    with pytest.raises(SigningKeyError):
        sign_manifest(MSG, ec_priv)
