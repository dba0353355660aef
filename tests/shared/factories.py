"""Test factories: valid manifests, payload files, signed bundles, and tampered or malformed variants.

Everything here writes real ``.fpk`` archives with :func:`shared.bundle.write_bundle` and real ed25519
signatures; nothing is mocked. The payload files are small synthetic stand-ins (a GGUF magic + random bytes,
a JSON tokenizer, ...) because the installer's mechanics do not look inside them.

Pointing the tests at a real built bundle: set ``FIELDPACK_TEST_BUNDLE=/path/to/x.fpk``. :func:`base_bundle`
then re-signs that bundle's exact members and manifest with the test key (so tampering helpers, which need
the private key, keep working) instead of synthesising one.

Tampering helpers take any bundle (synthetic or real) and write a new file next to it:

- :func:`rebuild_bundle` re-packs a bundle, optionally editing the manifest JSON, re-signing or not;
- :func:`write_raw_bundle` packs whatever bytes/paths/tar entry types you hand it, in that order;
- :func:`flip_byte`, :func:`truncated_copy` damage bytes at a member's data offset or the file's tail.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.bundle import BundleReader, describe_members, write_bundle
from fieldpack.shared.manifest import (
    EmbedderInfo,
    IndexInfo,
    Manifest,
    MemoryNeeds,
    ModelInfo,
    Quality,
    RuntimeDefaults,
    SmokeTest,
)
from fieldpack.shared.signing import generate_keypair, sign_manifest

REPO = Path(__file__).resolve().parents[2]
CACHE_ROOT = REPO / ".fieldpack-cache"
#: Bump when the factories change what they write, to invalidate cached bundles.
FACTORY_VERSION = "factories-1"
ENV_REAL_BUNDLE = "FIELDPACK_TEST_BUNDLE"

# Tiny model shape used in synthetic manifests (and so in the KV-cache arithmetic).
N_LAYER, N_HEAD, N_HEAD_KV, N_EMBD, N_CTX = 2, 4, 2, 64, 512


@dataclass(frozen=True)
class Keys:
    """A test key pair: ``private`` (PEM PKCS#8) and ``public`` (PEM SPKI) paths."""

    private: Path
    public: Path


def make_keys(folder: Path) -> Keys:
    """Generate a fresh ed25519 pair in ``folder`` (created)."""
    priv, pub = generate_keypair(Path(folder))
    return Keys(priv, pub)


def make_member_files(folder: Path, *, model_bytes: int = 4096, seed: int = 0) -> dict[str, Path]:
    """Write synthetic payload files for every required member.

    Args:
        folder: where to write them (created).
        model_bytes: size of ``model.gguf`` in bytes (random after a ``GGUF`` magic); make it large (e.g.
            64 MiB) for kill-during-unpack tests.
        seed: varies the contents so two bundles differ.

    Returns:
        member name -> file path, for :func:`shared.bundle.describe_members`.
    """
    folder = Path(folder)
    files: dict[str, Path] = {}
    rng = _Rng(seed)

    def put(name: str, data: bytes) -> None:
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        files[name] = p

    model = folder / fmt.MODEL_NAME
    model.parent.mkdir(parents=True, exist_ok=True)
    with open(model, "wb") as fh:
        fh.write(b"GGUF")
        left = max(0, model_bytes - 4)
        while left:
            block = rng.bytes(min(left, 1 << 20))
            fh.write(block)
            left -= len(block)
    files[fmt.MODEL_NAME] = model
    put(fmt.EMBEDDER_NAME, b"\x08\x07onnx-stand-in" + rng.bytes(512))
    put(fmt.EMBEDDER_TOKENIZER_NAME, json.dumps({"version": "1.0", "seed": seed}).encode())
    put(fmt.INDEX_NAME, b"SQLite format 3\x00" + rng.bytes(1024))
    put(fmt.RECIPE_NAME, f'[bundle]\nname = "demo"\nseed = {seed}\n'.encode())
    return files


class _Rng:
    """Deterministic byte stream (sha256 in counter mode): reproducible, fast enough, no numpy."""

    def __init__(self, seed: int) -> None:
        self._key, self._n = hashlib.sha256(f"fieldpack-test-{seed}".encode()).digest(), 0

    def bytes(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            # 32 sha256 blocks expanded by repetition keep this cheap for 64 MiB payloads
            block = hashlib.sha256(self._key + self._n.to_bytes(8, "little")).digest()
            self._n += 1
            out += (block * 128)[: n - len(out)]
        return bytes(out)


def kv_bytes(n_ctx: int = N_CTX) -> int:
    """f16 KV cache of the synthetic model shape at ``n_ctx`` tokens (bytes)."""
    return 2 * N_LAYER * N_HEAD_KV * (N_EMBD // N_HEAD) * 2 * n_ctx


def make_manifest(files: Mapping[str, Path], *, name: str = "demo", version: str = "1.0.0",
                  weights_bytes: int | None = None, format_version: int = fmt.FORMAT_VERSION,
                  **overrides: Any) -> Manifest:
    """A valid manifest describing ``files`` (sizes and sha256 computed), with a tiny model shape.

    Args:
        files: member name -> path (see :func:`make_member_files`).
        weights_bytes: RAM claimed for weights (bytes); default the model file size. Make it huge to test
            the RAM refusal.
        format_version: written as is (the manifest model does not police it; the reader does).
        overrides: top-level manifest fields to replace (``runtime=...``, ``smoke=...``).
    """
    members = describe_members(files)
    model_size = files[fmt.MODEL_NAME].stat().st_size
    weights = model_size if weights_bytes is None else weights_bytes
    mem = MemoryNeeds(weights_bytes=weights, kv_cache_bytes=kv_bytes(), embedder_bytes=1024,
                      index_bytes=1024, overhead_bytes=4096,
                      total_bytes=weights + kv_bytes() + 1024 + 1024 + 4096)
    fields: dict[str, Any] = dict(
        format_version=format_version,
        name=name,
        version=version,
        builder_version="0.1.0",
        created_at=datetime(2025, 1, 1, tzinfo=timezone.utc),
        members=members,
        model=ModelInfo(architecture="llama", parameter_count=123_456, file_type="Q4_K_M",
                        tensor_types={"Q4_K": 10, "F32": 5}, n_ctx_train=2048, n_embd=N_EMBD, n_layer=N_LAYER,
                        n_head=N_HEAD, n_head_kv=N_HEAD_KV, vocab_size=320, chat_template_present=True,
                        bos_id=1, eos_id=2, eot_id=3, tokenizer_model="llama", source="tiny-test"),
        embedder=EmbedderInfo(name="all-MiniLM-L6-v2", dimension=384, pooling="mean", normalized=True,
                              max_tokens=256, precision="fp32"),
        index=IndexInfo(documents=3, chunks=12, metric="cosine", chunk_tokens=128, overlap_tokens=16,
                        skipped_files=0),
        runtime=RuntimeDefaults(n_ctx=N_CTX, max_tokens=64, temperature=0.0, top_k_chunks=4, stop=["</s>"],
                                min_similarity=0.2, memory=mem),
        smoke=SmokeTest(question="How do I reset the pump?", expected_source="pump.md", k=5),
        recipe={"model": "tiny-test", "quant": "Q4_K_M"},
        quality=Quality(parity={"top1_agreement": 1.0}),
    )
    fields.update(overrides)
    return Manifest(**fields)


def make_bundle(out: Path, keys: Keys, *, model_bytes: int = 4096, seed: int = 0, work_dir: Path | None = None,
                **manifest_kw: Any) -> Path:
    """Write a valid signed bundle at ``out`` from synthetic members (see :func:`make_member_files`).

    ``work_dir`` holds the member files (default: a folder beside ``out``); ``manifest_kw`` go to
    :func:`make_manifest`.
    """
    out = Path(out)
    work = Path(work_dir) if work_dir else out.parent / f"{out.stem}.members"
    files = make_member_files(work, model_bytes=model_bytes, seed=seed)
    return write_bundle(out, make_manifest(files, **manifest_kw), files, keys.private)


def base_bundle(folder: Path, keys: Keys, **kw: Any) -> Path:
    """The bundle most tests start from: ``$FIELDPACK_TEST_BUNDLE`` re-signed with ``keys`` when set (a real
    built bundle), else :func:`make_bundle` with ``kw``."""
    real = os.environ.get(ENV_REAL_BUNDLE)
    if real:
        return rebuild_bundle(Path(real), Path(folder) / "base.fpk", keys)
    return make_bundle(Path(folder) / "base.fpk", keys, **kw)


# --- reading and re-packing ----------------------------------------------------------------------------------
def unpack_members(bundle: Path, dest: Path) -> tuple[bytes, bytes | None, dict[str, Path]]:
    """Copy a bundle's members to ``dest`` without checking anything (a tampering helper, not a reader).

    Returns:
        (manifest bytes, signature bytes or None, member name -> path in archive order).
    """
    files: dict[str, Path] = {}
    manifest = sig = None
    with tarfile.open(bundle, "r:") as tar:
        for ti in tar:
            data = tar.extractfile(ti)
            assert data is not None, ti.name
            if ti.name == fmt.MANIFEST_NAME:
                manifest = data.read()
            elif ti.name == fmt.SIGNATURE_NAME:
                sig = data.read()
            else:
                p = Path(dest) / ti.name
                p.parent.mkdir(parents=True, exist_ok=True)
                with open(p, "wb") as fh:
                    shutil.copyfileobj(data, fh, 1 << 20)
                files[ti.name] = p
    assert manifest is not None, f"{bundle} has no manifest"
    return manifest, sig, files


def rebuild_bundle(src: Path, out: Path, keys: Keys | None, *,
                   edit_manifest: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Path:
    """Re-pack ``src`` as ``out``: same members, manifest JSON optionally edited, re-signed with ``keys``
    (``None`` = unsigned). The manifest is re-serialised canonically but NOT re-validated, so an edit can make
    it wrong on purpose (e.g. an unsupported ``format_version``) while the signature stays valid."""
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        manifest, _sig, files = unpack_members(src, Path(tmp))
        doc = json.loads(manifest)
        if edit_manifest is not None:
            doc = edit_manifest(doc)
        manifest = (json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
        sig = sign_manifest(manifest, keys.private) if keys else None
        entries: list[Entry] = [Entry(fmt.MANIFEST_NAME, manifest)]
        if sig is not None:
            entries.append(Entry(fmt.SIGNATURE_NAME, sig))
        entries += [Entry(name, path) for name, path in files.items()]
        return write_raw_bundle(out, entries)


@dataclass(frozen=True)
class Entry:
    """One tar member for :func:`write_raw_bundle`: ``data`` is bytes or a file path; ``type`` a
    ``tarfile`` type (``REGTYPE``, ``SYMTYPE``, ``LNKTYPE``, ...) with ``linkname`` for links."""

    name: str
    data: bytes | Path = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""


def write_raw_bundle(out: Path, entries: list[Entry]) -> Path:
    """Write a pax tar with exactly ``entries`` in order, no checks at all (to craft hostile archives)."""
    out = Path(out)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.type = e.type
            ti.linkname = e.linkname
            ti.mode = 0o644
            if e.type == tarfile.REGTYPE:
                if isinstance(e.data, Path):
                    ti.size = e.data.stat().st_size
                    with open(e.data, "rb") as fh:
                        tar.addfile(ti, fh)
                else:
                    ti.size = len(e.data)
                    tar.addfile(ti, io.BytesIO(e.data))
            else:
                tar.addfile(ti)
    return out


def raw_entries(bundle: Path, dest: Path) -> list[Entry]:
    """A bundle's members as :class:`Entry` items (manifest, signature, payload in archive order), the
    payload copied under ``dest``: edit the list, then :func:`write_raw_bundle` it."""
    manifest, sig, files = unpack_members(bundle, dest)
    entries = [Entry(fmt.MANIFEST_NAME, manifest)]
    if sig is not None:
        entries.append(Entry(fmt.SIGNATURE_NAME, sig))
    return entries + [Entry(n, p) for n, p in files.items()]


# --- damage --------------------------------------------------------------------------------------------------
def member_data_offset(bundle: Path, name: str) -> int:
    """Byte offset in the archive file where member ``name``'s data starts."""
    with tarfile.open(bundle, "r:") as tar:
        return tar.getmember(name).offset_data


def flip_byte(src: Path, out: Path, member: str, at: int = 0) -> Path:
    """Copy ``src`` to ``out`` with one bit flipped at byte ``at`` of ``member``'s data (sizes unchanged)."""
    shutil.copyfile(src, out)
    pos = member_data_offset(out, member) + at
    with open(out, "r+b") as fh:
        fh.seek(pos)
        b = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([b[0] ^ 0x01]))
    return Path(out)


def truncated_copy(src: Path, out: Path, keep_bytes: int) -> Path:
    """Copy the first ``keep_bytes`` bytes of ``src`` to ``out`` (a transfer cut short)."""
    with open(src, "rb") as fi, open(out, "wb") as fo:
        fo.write(fi.read(keep_bytes))
    return Path(out)


# --- caching -------------------------------------------------------------------------------------------------
def cached(name: str, parts: Mapping[str, Any], build: Callable[[Path], None]) -> Path:
    """A folder under ``<repo>/.fieldpack-cache/<name>/<hash>`` filled once by ``build(folder)``.

    The hash covers :data:`FACTORY_VERSION` and ``parts``; the folder is built under a temp name and renamed,
    so a crashed build is never reused.
    """
    key = hashlib.sha256(json.dumps({"v": FACTORY_VERSION, **parts}, sort_keys=True).encode()).hexdigest()[:16]
    final = CACHE_ROOT / name / key
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=final.parent))
    try:
        build(tmp)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def large_bundles(model_bytes: int = 64 * 1024 * 1024) -> tuple[Keys, Path, Path]:
    """Two cached signed bundles (``big@1`` and ``big@2``) with a ``model_bytes`` model each, and their key.

    Returns:
        (keys, bundle v1, bundle v2).
    """
    def build(folder: Path) -> None:
        keys = make_keys(folder / "keys")
        for v in (1, 2):
            make_bundle(folder / f"big-{v}.fpk", keys, model_bytes=model_bytes, seed=v, name="big", version=str(v),
                        work_dir=folder / f"members-{v}")
            shutil.rmtree(folder / f"members-{v}")

    folder = cached("install-large", {"model_bytes": model_bytes}, build)
    return Keys(folder / "keys" / fmt.PRIVATE_KEY_FILE, folder / "keys" / fmt.PUBLIC_KEY_FILE), \
        folder / "big-1.fpk", folder / "big-2.fpk"


def open_ok(bundle: Path) -> Manifest:
    """Open ``bundle`` with the real reader and return its manifest (raises what the reader raises)."""
    with BundleReader(bundle) as r:
        return r.manifest
