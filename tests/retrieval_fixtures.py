"""Fixtures and helpers for the retrieval tests (tests/builder/test_{ingest,embedder,index}.py,
tests/device/test_retrieval.py).

The MiniLM ONNX exports (fp32 and int8) are expensive (~10 s each on 2 cores), so they are cached under
``cache_dir`` (``<repo>/.fieldpack-cache/tests``), keyed by a hash of the checkpoint files, the source of
:mod:`builder.embedder_export` and :mod:`retrieval.embedder`, and :data:`RETRIEVAL_CACHE_VERSION`. Import the
fixtures into a test module with ``from tests.retrieval_fixtures import minilm_fp32, ...``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DOCS = REPO / "demo" / "docs"
DEBIAN_HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")
QA_FILE = REPO.parent / "shared" / "qa" / "debian-handbook.jsonl"  # ../shared beside the checkout
#: Bump to rebuild cached exports/indexes although no hashed input changed.
RETRIEVAL_CACHE_VERSION = "retrieval-1"


@dataclass(frozen=True)
class ExportedEmbedder:
    """A cached export: the folder with ``embedder.onnx`` + ``tokenizer.json`` and the export record."""

    onnx_path: Path
    tokenizer_path: Path
    record: dict[str, Any]

    @property
    def max_tokens(self) -> int:
        return int(self.record["max_tokens"])


def _hash_files(h: Any, paths: list[Path]) -> None:
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
        h.update(b"\0")


def cache_key(*parts: str | bytes, files: Sequence[Path] = ()) -> str:
    """16 hex digits of sha256 over ``RETRIEVAL_CACHE_VERSION``, ``parts`` and the bytes of ``files``."""
    h = hashlib.sha256(RETRIEVAL_CACHE_VERSION.encode())
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    _hash_files(h, list(files))
    return h.hexdigest()[:16]


def build_cached(root: Path, name: str, build: Any) -> Path:
    """``root/name``, made by ``build(tmp_dir)`` under an exclusive file lock if it is not complete yet."""
    final = root / name
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / ".complete").is_file():
            return final
        shutil.rmtree(final, ignore_errors=True)
        tmp = root / f".{name}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _export(cache_dir: Path, *, int8: bool) -> ExportedEmbedder:
    from fieldpack.builder import embedder_export
    from fieldpack.retrieval import embedder as device_embedder

    model_dir = embedder_export.default_model_dir()
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    files += [Path(embedder_export.__file__), Path(device_embedder.__file__)]
    key = cache_key("minilm", f"int8={int8}", files=files)

    def build(tmp: Path) -> None:
        rec = embedder_export.export_embedder(None, tmp, int8=int8)
        (tmp / "export.json").write_text(json.dumps(rec.to_dict(), indent=1))

    d = build_cached(cache_dir, f"minilm-{'int8' if int8 else 'fp32'}-{key}", build)
    record = json.loads((d / "export.json").read_text())
    return ExportedEmbedder(d / embedder_export.ONNX_NAME, d / embedder_export.TOKENIZER_NAME, record)


@pytest.fixture(scope="session")
def minilm_fp32(cache_dir: Path) -> ExportedEmbedder:
    """all-MiniLM-L6-v2 exported to ONNX fp32 (``int8=False``), cached."""
    return _export(cache_dir, int8=False)


@pytest.fixture(scope="session")
def minilm_int8(cache_dir: Path) -> ExportedEmbedder:
    """all-MiniLM-L6-v2 exported with the int8 gate (the default build path), cached."""
    return _export(cache_dir, int8=True)


@pytest.fixture(scope="session")
def embedder(minilm_int8: ExportedEmbedder) -> Iterator[Any]:
    """A :class:`retrieval.embedder.OnnxEmbedder` on the int8 export, as a device would open it."""
    from fieldpack.retrieval.embedder import OnnxEmbedder

    emb = OnnxEmbedder(minilm_int8.onnx_path, minilm_int8.tokenizer_path, max_tokens=minilm_int8.max_tokens)
    yield emb
    emb.close()


@pytest.fixture(scope="session")
def demo_index(tmp_path_factory: pytest.TempPathFactory, embedder: Any) -> Path:
    """Index of demo/docs (ingest -> embed -> build_index), made once per session (~1 s)."""
    from fieldpack.builder.index_build import build_index, embed_chunks
    from fieldpack.builder.ingest import ingest

    result = ingest(DEMO_DOCS, count_tokens=embedder.count_tokens)
    path = tmp_path_factory.mktemp("demo-index") / "index.sqlite"
    build_index(result.chunks, embed_chunks(result.chunks, embedder), path, embedder_name="all-MiniLM-L6-v2")
    return path


def make_pdf(pages: list[list[str]] | list[list[str | list[str | int]]]) -> bytes:
    """A minimal valid PDF 1.4: one page per item, each line drawn with Helvetica (WinAnsi), 14 pt leading.

    A line is a string (one ``Tj``) or a ``TJ`` array of strings and kerning numbers (thousandths of an em), the
    way justified text and letter-spaced headings are drawn: ``["con", -300, "figuration"]``.

    Objects: 1 catalog, 2 page tree, 3 font, then a page and its content stream per page; the xref offsets
    are computed, so pypdf reads it without repair.
    """

    def esc(s: str) -> str:
        return s.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    n = len(pages)
    bodies = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        ("<< /Type /Pages /Kids [" + " ".join(f"{4 + 2 * i} 0 R" for i in range(n)) + f"] /Count {n} >>").encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, lines in enumerate(pages):
        def show(line: str | list[str | int]) -> str:
            if isinstance(line, str):
                return f"({esc(line)}) Tj T*"
            return "[" + " ".join(str(x) if isinstance(x, int) else f"({esc(x)})" for x in line) + "] TJ T*"

        ops = "BT /F1 11 Tf 14 TL 72 740 Td " + " ".join(show(line) for line in lines) + " ET"
        stream = ops.encode("cp1252")
        bodies.append(
            (
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>"
            ).encode()
        )
        bodies.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(bodies, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(bodies) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(bodies) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def load_qa() -> list[dict[str, Any]]:
    """The Debian handbook QA items (46: 40 answerable, 6 with ``unanswerable: true``)."""
    return [json.loads(line) for line in QA_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
