"""The binary vector layout (sign-random-projection codes + float rescoring) on real sqlite files: recall
against exact brute force, the ``meta`` layout flag, older float-only indexes, sqlite-vec's bit order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fieldpack.builder.index_build import build_index, choose_layout, embed_chunks
from fieldpack.builder.ingest import Chunk, ingest
from fieldpack.retrieval import binary as B
from fieldpack.retrieval import index as idx
from fieldpack.retrieval.search import Retriever
from fieldpack.shared import index_format
from fieldpack.shared.errors import RuntimeLoadError, UsageError
from tests.retrieval_fixtures import DEMO_DOCS, demo_index, embedder, minilm_int8  # noqa: F401

DIM = 384


def clustered(n_clusters: int, per: int, seed: int = 0) -> np.ndarray:
    """``(n_clusters * per, DIM)`` unit rows in tight clusters (cosine to the centre about 0.9), the hard case
    for codes: many near-ties."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, DIM))
    v = np.repeat(centres, per, axis=0) / np.sqrt(DIM) + 0.5 * rng.normal(size=(n_clusters * per, DIM)) / np.sqrt(DIM)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def chunks_for(n: int) -> list[Chunk]:
    return [Chunk(f"doc{i // 20}.md", f"S{i}", None, i + 1, i + 1, f"chunk {i} pump valve", 4, "0" * 64)
            for i in range(n)]


def test_binary_layout_finds_the_exact_neighbours(tmp_path: Path, embedder: Any) -> None:  # noqa: F811
    vecs = clustered(30, 20)  # 600 chunks
    out = tmp_path / "bin.sqlite"
    stats = build_index(chunks_for(len(vecs)), vecs, out, vector_layout="binary")
    assert stats.vector_layout == "binary"
    queries = clustered(30, 20, seed=0)[::15] * 0.7 + np.random.default_rng(1).normal(size=(40, DIM)).astype(
        np.float32) * 0.7 / np.sqrt(DIM)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    recalls = []
    with Retriever(out, embedder) as r:
        assert r.vector_layout == "binary" and r.stats()["vector_layout"] == "binary"
        for q in queries:
            exact = np.argsort(-(vecs @ q), kind="stable")[:10] + 1  # chunk ids are row + 1
            got = r.vector_search(q, 10)
            ids = [i for i, _ in got]
            sims = np.array([s for _, s in got])
            # rescored: similarities are the cosines (float16 vectors: within 2e-4), best first
            np.testing.assert_allclose(sims, vecs[np.array(ids) - 1] @ q, atol=2e-4)
            assert np.all(np.diff(sims) <= 1e-7)
            recalls.append(len(set(ids) & set(exact.tolist())) / 10)
    # 80 codes rescored out of 600 in 20-chunk clusters: a wrong projection, bit order or a missing rescoring
    # lands far below this
    assert np.mean(recalls) >= 0.95, recalls


def test_binary_and_float_layouts_agree_on_real_chunks(tmp_path: Path, embedder: Any) -> None:  # noqa: F811
    result = ingest(DEMO_DOCS, count_tokens=embedder.count_tokens)
    vecs = embed_chunks(result.chunks, embedder)
    paths = {}
    for layout in index_format.VECTOR_LAYOUTS:
        paths[layout] = tmp_path / f"{layout}.sqlite"
        build_index(result.chunks, vecs, paths[layout], vector_layout=layout)
    conn = idx.connect(paths["binary"], readonly=True)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")}
    finally:
        conn.close()
    assert (meta["index_format"], meta["vector_layout"], meta["binary_bits"]) == ("2", "binary", "1536")
    assert "chunks_vec" not in tables and {"chunks_emb", "chunks_codes", "vec_projection"} <= tables
    questions = ["The connection pool is exhausted. What should I do?", "How do I backwash a sand filter?",
                 "What should I run when trend screens are slow?"]
    with Retriever(paths["float32"], embedder) as f, Retriever(paths["binary"], embedder) as b:
        assert (f.vector_layout, b.vector_layout) == ("float32", "binary")
        for q in questions:
            for mode in ("vector", "hybrid"):
                hf, hb = f.search(q, k=5, mode=mode), b.search(q, k=5, mode=mode)
                assert [h.chunk_id for h in hf] == [h.chunk_id for h in hb]
                assert [h.vector_similarity for h in hf] == pytest.approx([h.vector_similarity for h in hb],
                                                                          abs=2e-4)


def test_float_only_index_still_loads(demo_index: Path, embedder: Any) -> None:  # noqa: F811
    """Indexes written before the binary layout (format 1, no ``vector_layout`` key) search as before."""
    conn = idx.connect(demo_index, readonly=True)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()
    assert meta["index_format"] == "1" and "vector_layout" not in meta
    with Retriever(demo_index, embedder) as r:
        assert r.vector_layout == "float32"
        hits = r.search("The connection pool is exhausted. What should I do?", k=3)
        assert hits[0].source == "database.md" and hits[0].vector_similarity is not None


def test_unknown_layout_or_format_is_refused(tmp_path: Path, embedder: Any) -> None:  # noqa: F811
    vecs = clustered(2, 5)
    for key, value, match in (("vector_layout", "pq", "vector layout 'pq'"), ("index_format", "3", "format '3'"),
                              ("index_format", "1", "format '1' \\(vector layout 'binary'\\)")):
        out = tmp_path / f"{value}.sqlite"
        build_index(chunks_for(10), vecs, out, vector_layout="binary")
        conn = idx.connect(out, readonly=False)
        try:
            conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
        finally:
            conn.close()
        with pytest.raises(RuntimeLoadError, match=match):
            Retriever(out, embedder)


def test_choose_layout() -> None:
    n = index_format.BINARY_MIN_CHUNKS
    assert [choose_layout(n - 1, "cosine"), choose_layout(n, "cosine"), choose_layout(n, "l2")] == [
        "float32", "binary", "float32"]
    assert choose_layout(5, "cosine", "binary") == "binary"
    with pytest.raises(UsageError, match="cosine"):
        choose_layout(5, "l2", "binary")
    with pytest.raises(UsageError, match="unknown vector layout"):
        choose_layout(5, "cosine", "int4")


def test_codes_use_sqlite_vec_bit_order(tmp_path: Path) -> None:
    """With the identity as projection a code is sqlite-vec's ``vec_quantize_binary`` of the vector."""
    vecs = clustered(3, 4)
    conn = idx.connect(tmp_path / "x.sqlite", readonly=False)
    try:
        for v in vecs:
            (ref,) = conn.execute("SELECT vec_quantize_binary(?)", (v.tobytes(),)).fetchone()
            assert B.encode(v, np.eye(DIM, dtype=np.float32)).tobytes() == bytes(ref)
    finally:
        conn.close()


def test_hamming_paths_agree() -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, size=(50, 24), dtype=np.uint8)
    q = rng.integers(0, 256, size=24, dtype=np.uint8)
    expected = np.unpackbits(codes ^ q, axis=1).sum(axis=1)
    np.testing.assert_array_equal(B.hamming(codes, q), expected)  # uint64 words
    np.testing.assert_array_equal(B.hamming(codes[:, :20], q[:20]), np.unpackbits(codes[:, :20] ^ q[:20],
                                                                                  axis=1).sum(axis=1))  # table
    ids = np.arange(10, 60, dtype=np.int64)
    vecs, qv = rng.normal(size=(50, 16)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    proj192 = B.projection(16, 192)
    word_major = B.BinaryCodes(ids, B.encode(vecs, proj192), proj192)  # the device's path
    np.testing.assert_array_equal(word_major.distances(qv), np.unpackbits(
        B.encode(vecs, proj192) ^ B.encode(qv, proj192), axis=1).sum(axis=1))
    proj = B.projection(8, 64)
    bc = B.BinaryCodes(ids[:3], np.zeros((3, 8), np.uint8), proj)
    assert bc.candidates(np.ones(8, np.float32), 5) == [10, 11, 12]
    with pytest.raises(ValueError):
        B.BinaryCodes(ids, codes, proj)


def test_auto_layout_switches_at_the_threshold(tmp_path: Path, embedder: Any) -> None:  # noqa: F811
    """``build_index``'s default picks binary from ``BINARY_MIN_CHUNKS`` chunks on, float32 below, and the
    retriever reads each (a build of that many chunks takes a few seconds)."""
    n = index_format.BINARY_MIN_CHUNKS
    vecs = clustered(n // 20, 20, seed=4)
    for count, layout in ((n - 1, "float32"), (n, "binary")):
        out = tmp_path / f"{count}.sqlite"
        assert build_index(chunks_for(count), vecs[:count], out).vector_layout == layout
        with Retriever(out, embedder) as r:
            assert r.vector_layout == layout
            top = r.vector_search(vecs[7], 5)
            assert top[0][0] == 8 and top[0][1] == pytest.approx(1.0, abs=1e-3)
