"""Ed25519 signing of bundle manifests (RFC 8032), on the ``cryptography`` package.

Keys are PEM files: the private key as unencrypted PKCS#8 (mode 0600), the public key as SubjectPublicKeyInfo.
A key id is the first 16 hex characters of sha256 over the 32 raw public-key bytes; it lets a device say
*which* key signed a bundle it does not trust.

The signature file (``manifest.json.sig``) is JSON: ``{"alg": "ed25519", "key_id": "...", "signature":
"<base64 of 64 bytes>"}`` over the exact bytes of ``manifest.json``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.atomic import atomic_write_bytes
from fieldpack.shared.errors import OutputNotWritableError, SignatureError, SigningKeyError


@dataclass(frozen=True)
class PublicKey:
    """A trusted ed25519 public key: ``raw`` is 32 bytes; ``origin`` says where it was read from."""

    raw: bytes
    origin: str

    @property
    def key_id(self) -> str:
        return key_id(self.raw)


def key_id(raw_public: bytes) -> str:
    """First 16 hex chars of sha256(raw 32-byte public key)."""
    return hashlib.sha256(raw_public).hexdigest()[:16]


def generate_keypair(out_dir: Path) -> tuple[Path, Path]:
    """Write a new key pair as ``out_dir/builder.key`` (0600) and ``out_dir/builder.pub``.

    Returns:
        (private key path, public key path).

    Raises:
        OutputNotWritableError: the folder cannot be created or written, or a key file already exists there
            (never overwrite a key silently).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out_dir = Path(out_dir)
    priv_path, pub_path = out_dir / fmt.PRIVATE_KEY_FILE, out_dir / fmt.PUBLIC_KEY_FILE
    for p in (priv_path, pub_path):
        if p.exists():
            raise OutputNotWritableError(f"{p} already exists", hint="choose another --out folder or remove the old key pair")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot create {out_dir}: {exc.strerror}", hint="choose a writable --out folder") from exc
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pub_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(priv_path, priv_pem, mode=0o600)
    atomic_write_bytes(pub_path, pub_pem, mode=0o644)
    return priv_path, pub_path


def _read(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise SigningKeyError(f"{what} {path} does not exist", hint="run `fieldpack keygen --out DIR` or give the right path")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SigningKeyError(f"cannot read {what} {path}: {exc.strerror}", hint="check its permissions") from exc


def load_private_key(path: Path):  # -> Ed25519PrivateKey
    """Load an ed25519 private key (PEM PKCS#8).

    Raises:
        SigningKeyError: missing, unreadable, not PEM, encrypted, or not an ed25519 private key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(
            f"{path} is not an unencrypted PEM private key",
            hint="pass the builder.key written by `fieldpack keygen` (not the .pub)",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} is a {type(key).__name__}, not an ed25519 key",
                              hint="make an ed25519 pair with `fieldpack keygen`")
    return key


def load_public_key(path: Path) -> PublicKey:
    """Load an ed25519 public key (PEM SubjectPublicKeyInfo).

    Raises:
        SigningKeyError: missing, unreadable, not PEM, or not ed25519.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not a PEM public key",
                              hint="pass the builder.pub written by `fieldpack keygen`") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path} is a {type(key).__name__}, not an ed25519 key",
                              hint="use the builder.pub written by `fieldpack keygen`")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(raw=raw, origin=str(path))


def sign_manifest(manifest_bytes: bytes, private_key_path: Path) -> bytes:
    """Sign the exact manifest bytes; returns the signature file's bytes (JSON, see module doc).

    Raises:
        SigningKeyError: as :func:`load_private_key`.
    """
    from cryptography.hazmat.primitives import serialization

    key = load_private_key(private_key_path)
    raw_pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    sig = key.sign(manifest_bytes)
    doc = {"alg": fmt.SIGNATURE_ALG, "key_id": key_id(raw_pub), "signature": base64.b64encode(sig).decode()}
    return (json.dumps(doc, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class SignatureStatus:
    """What can be said about a bundle's signature given some trusted keys (for ``inspect``, never raises).

    Attributes:
        status: ``"valid"`` (a trusted key verifies it), ``"signer_not_trusted"`` (well-formed, signed by a key
            that is not among ``trusted``: its validity cannot be checked without that key), ``"invalid"`` (the
            signer's key is trusted but the signature does not verify: the manifest was altered),
            ``"unsigned"``, ``"malformed"``, or ``"not_checked"`` (no keys given).
        key_id: the signer's key id from the signature file, or ``None``.
        message: one line for people.
    """

    status: str
    key_id: str | None
    message: str

    @property
    def ok(self) -> bool:
        return self.status == "valid"

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "key_id": self.key_id, "message": self.message}


def signature_status(manifest_bytes: bytes, signature_bytes: bytes | None, trusted: list[PublicKey]) -> SignatureStatus:
    """Classify the signature (see :class:`SignatureStatus`); ``trusted`` empty means "not checked"."""
    kid: str | None = None
    if signature_bytes:
        try:
            kid = str(json.loads(signature_bytes.decode("utf-8"))["key_id"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            kid = None
    if not signature_bytes:
        return SignatureStatus("unsigned", None, "unsigned")
    if kid is None:
        return SignatureStatus("malformed", None, "signature file is malformed")
    if not trusted:
        return SignatureStatus("not_checked", kid, f"signed by key {kid} (not checked: pass --trust KEY.pub)")
    try:
        k = verify_manifest(manifest_bytes, signature_bytes, trusted)
    except SignatureError as exc:
        if kid not in {t.key_id for t in trusted}:
            return SignatureStatus("signer_not_trusted", kid,
                                   f"signed by key {kid}, signer not trusted (trusted: "
                                   f"{', '.join(t.key_id for t in trusted)})")
        if "malformed" in exc.message:
            return SignatureStatus("malformed", kid, exc.message)
        return SignatureStatus("invalid", kid, f"INVALID: {exc.message}")
    return SignatureStatus("valid", k.key_id, f"valid signature, key {k.key_id} ({k.origin})")


def verify_manifest(manifest_bytes: bytes, signature_bytes: bytes | None, trusted: list[PublicKey]) -> PublicKey:
    """Check the detached signature against the trusted keys.

    Returns:
        The trusted key that verified it.

    Raises:
        SignatureError: no signature (unsigned bundle), malformed signature file, signed by a key that is not
            trusted (names its key id), or a signature that does not verify (manifest altered).
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not signature_bytes:
        raise SignatureError("bundle is unsigned", hint="rebuild it with `fieldpack build --sign KEY`")
    try:
        doc = json.loads(signature_bytes.decode("utf-8"))
        if doc.get("alg") != fmt.SIGNATURE_ALG:
            raise ValueError(f"alg {doc.get('alg')!r}")
        sig = base64.b64decode(doc["signature"], validate=True)
        kid = str(doc["key_id"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, binascii.Error) as exc:
        raise SignatureError(f"signature file is malformed ({exc})", hint="rebuild and re-sign the bundle") from exc
    if not trusted:
        raise SignatureError("no trusted keys are configured", hint="pass --trust builder.pub")
    candidates = [k for k in trusted if k.key_id == kid]
    if not candidates:
        known = ", ".join(k.key_id for k in trusted)
        raise SignatureError(
            f"bundle is signed by key {kid}, which is not trusted (trusted: {known})",
            hint="add that builder's public key to the trusted keys, or rebuild with a trusted key",
        )
    for k in candidates:
        try:
            Ed25519PublicKey.from_public_bytes(k.raw).verify(sig, manifest_bytes)
            return k
        except InvalidSignature:
            continue
    raise SignatureError(f"signature by key {kid} does not match the manifest (the bundle was altered)",
                         hint="do not install it; get a fresh copy from the build host")
