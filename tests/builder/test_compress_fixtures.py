"""Shared fixtures of the compression tests (imported by the other ``test_compress_*`` modules).

The demo documents (~5 KB, ~1,300 tokens) are too few to calibrate SparseGPT (it needs more tokens than the
widest layer input, 512 here) *and* hold out unseen text, and a model trained on them memorises them. So the
compression tests train their tiny Llama on a larger real domain corpus that is installed on the build host:
PostgreSQL 15's manual chapters on backup, WAL, vacuuming and replication (``postgresql-doc-15``, ~250 KB of
text once the HTML is stripped). Chunks are split into calibration and held-out sets by seed, as the pipeline
does. Everything is cached under the test cache, keyed by a hash of the inputs and a version string.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import random
import re
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PG_HTML = Path("/usr/share/doc/postgresql-doc-15/html")
PG_PAGES = ("backup", "wal", "routine", "continuous-archiving", "warm-standby", "hot-standby", "high-availability",
            "maintenance")
FIXTURE_VERSION = "compress-fixtures-v1"
PG_STEPS = 1200
CHUNK_CHARS = 800


def cache_root() -> Path:
    """``<repo>/.fieldpack-cache/tests`` (or ``$FIELDPACK_TEST_CACHE``): the ``cache_dir`` fixture's folder, for
    use outside pytest (the benchmark)."""
    root = Path(os.environ.get("FIELDPACK_TEST_CACHE", REPO / ".fieldpack-cache" / "tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([FIXTURE_VERSION, *map(str, parts)]).encode()).hexdigest()[:16]


def html_to_text(raw: str) -> str:
    """Strip tags and scripts from a manual page; keep paragraph breaks."""
    t = re.sub(r"(?is)<(script|style|head).*?</\1>", " ", raw)
    t = re.sub(r"(?i)</?(p|div|h\d|li|pre|tr|dt|dd|table|br)[^>]*>", "\n\n", t)
    t = html.unescape(re.sub(r"<[^>]+>", " ", t))
    t = re.sub(r"[ \t\r]+", " ", t)
    return re.sub(r"\n\s*\n+", "\n\n", t).strip()


def pg_docs_dir() -> Path:
    """A docs folder of plain-text PostgreSQL manual pages (cached). Skips when the manual is not installed."""
    if not PG_HTML.is_dir():
        pytest.skip("postgresql-doc-15 is not installed (apt-get install postgresql-doc-15)")
    pages = sorted(p for p in PG_HTML.glob("*.html") if p.stem.split("-")[0] in PG_PAGES or p.stem in PG_PAGES)
    out = cache_root() / f"pg-docs-{_key([p.name for p in pages])}"
    if not out.is_dir():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for p in pages:
            (tmp / f"{p.stem}.txt").write_text(html_to_text(p.read_text(encoding="utf-8", errors="replace")),
                                               encoding="utf-8")
        tmp.rename(out)
    return out


def chunk_texts(docs_dir: Path, chunk_chars: int = CHUNK_CHARS) -> list[str]:
    """Paragraphs of every document, packed greedily into chunks of about ``chunk_chars`` characters."""
    chunks: list[str] = []
    for path in sorted(docs_dir.glob("*.txt")):
        cur = ""
        for para in path.read_text(encoding="utf-8").split("\n\n"):
            if cur and len(cur) + len(para) > chunk_chars:
                chunks.append(cur)
                cur = ""
            cur = f"{cur}\n\n{para}" if cur else para
        if cur.strip():
            chunks.append(cur)
    return chunks


def split_chunks(chunks: list[str], n_eval: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(calibration, held-out) split fixed by seed, as ``builder.stages.quant.split_eval`` does."""
    order = list(range(len(chunks)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [c for i, c in enumerate(chunks) if i not in held], [c for i, c in enumerate(chunks) if i in held]


def trained_model(name: str, arch: str, corpus: list[str], steps: int, root: Path | None = None) -> Path:
    """A :func:`builder.tinymodel.make_tiny_model` checkpoint, cached by a hash of its inputs."""
    from fieldpack.builder.tinymodel import make_tiny_model

    out = (root or cache_root()) / f"{name}-{_key(arch, steps, hashlib.sha256(''.join(corpus).encode()).hexdigest())}"
    if not (out / "model.safetensors").is_file():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_tiny_model(tmp, arch=arch, corpus=corpus, steps=steps, seed=0)
        tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def pg_corpus() -> tuple[list[str], list[str]]:
    """(calibration chunks, held-out chunks) of the PostgreSQL corpus; 40 chunks held out."""
    return split_chunks(chunk_texts(pg_docs_dir()), n_eval=40)


@pytest.fixture(scope="session")
def pg_llama(cache_dir: Path, pg_corpus: tuple[list[str], list[str]]) -> Path:
    """Tiny Llama (2 blocks, hidden 256, MLP 512, 4 heads / 2 KV heads) trained 400 steps on the PG calibration
    chunks only, so the held-out chunks are unseen text. (The Qwen2 variant used for load/generate checks is
    ``tiny_qwen2_dir`` from ``tests/builder/conftest.py``.)"""
    return trained_model("pg-llama", "llama", pg_corpus[0], PG_STEPS, root=cache_dir)
