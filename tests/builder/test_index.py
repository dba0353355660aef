"""builder.index_build + retrieval.index: the index file's layout, contents, atomic write, and refusals."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from fieldpack.builder.index_build import build_index, embed_chunks
from fieldpack.builder.ingest import Chunk, ingest
from fieldpack.retrieval import index as idx
from fieldpack.shared.errors import IngestError, OutputNotWritableError, RuntimeLoadError, UsageError
from tests.retrieval_fixtures import DEMO_DOCS, embedder, minilm_int8  # noqa: F401


def chunk(i: int, source: str = "a.md", text: str | None = None) -> Chunk:
    return Chunk(source, f"S{i}", None, i, i, text or f"chunk number {i} about pumps", 5, "0" * 64)


def unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_demo_index_layout_and_contents(tmp_path: Path, embedder) -> None:  # noqa: ANN001,F811
    result = ingest(DEMO_DOCS, count_tokens=embedder.count_tokens)
    vectors = embed_chunks(result.chunks, embedder)
    out = tmp_path / "index.sqlite"
    stats = build_index(result.chunks, vectors, out, embedder_name="all-MiniLM-L6-v2")
    assert (stats.documents, stats.chunks, stats.dimension, stats.metric) == (7, len(result.chunks), 384, "cosine")
    assert stats.size_bytes == out.stat().st_size
    assert stats.sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sorted(os.listdir(tmp_path)) == ["index.sqlite"]  # no temp file or journal left behind

    conn = idx.connect(out, readonly=True)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        assert meta == {
            "index_format": "1", "dimension": "384", "metric": "cosine", "embedder": "all-MiniLM-L6-v2",
            "chunks": str(len(result.chunks)), "documents": "7",
        }
        rows = conn.execute(
            "SELECT id, source, section, page, line_start, line_end, text, n_tokens, doc_sha256 FROM chunks ORDER BY id"
        ).fetchall()
        assert [tuple(r[1:]) for r in rows] == [
            (c.source, c.section, c.page, c.line_start, c.line_end, c.text, c.n_tokens, c.doc_sha256)
            for c in result.chunks
        ]
        assert [r[0] for r in rows] == list(range(1, len(result.chunks) + 1))
        (blob,) = conn.execute("SELECT embedding FROM chunks_vec WHERE chunk_id = 3").fetchone()
        np.testing.assert_array_equal(np.frombuffer(blob, dtype="<f4"), vectors[2])
        assert conn.execute("SELECT count(*) FROM chunks_vec").fetchone()[0] == len(result.chunks)
        # FTS5 over text, section and source with Porter stemming: "exhausting" finds "exhausted".
        hits = conn.execute("SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH 'exhausting'").fetchall()
        assert {result.chunks[r[0] - 1].source for r in hits} == {"database.md", "alarms.csv"}
        by_source = conn.execute("SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH 'source:chlorine'").fetchall()
        assert {result.chunks[r[0] - 1].source for r in by_source} == {"procedures/chlorine.md"}
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        with pytest.raises(idx.SQLiteError):
            conn.execute("DELETE FROM chunks")  # read-only connection
    finally:
        conn.close()


def test_rebuild_replaces_the_file_and_l2_metric(tmp_path: Path) -> None:
    out = tmp_path / "i.sqlite"
    build_index([chunk(1), chunk(2)], unit_rows(2, 8), out)
    first = out.read_bytes()
    stats = build_index([chunk(1), chunk(2), chunk(3, "b.md")], unit_rows(3, 8, seed=1), out, metric="l2")
    assert out.read_bytes() != first
    assert (stats.chunks, stats.documents, stats.dimension, stats.metric) == (3, 2, 8, "l2")
    conn = idx.connect(out, readonly=True)
    try:
        assert dict(conn.execute("SELECT key, value FROM meta").fetchall())["metric"] == "l2"
        # vec0 kNN works on the stored rows: the nearest neighbour of row 2 is row 2 itself.
        q = unit_rows(3, 8, seed=1)[1]
        (cid, dist), *_ = conn.execute(
            "SELECT chunk_id, distance FROM chunks_vec WHERE embedding MATCH ? AND k = 3 ORDER BY distance",
            (q.tobytes(),),
        ).fetchall()
        assert cid == 2 and dist == pytest.approx(0.0, abs=1e-6)
    finally:
        conn.close()


def test_bad_inputs_are_refused_before_writing(tmp_path: Path) -> None:
    out = tmp_path / "i.sqlite"
    with pytest.raises(IngestError, match="no chunks"):
        build_index([], np.zeros((0, 8), np.float32), out)
    with pytest.raises(UsageError, match="do not match 2 chunks"):
        build_index([chunk(1), chunk(2)], unit_rows(3, 8), out)
    with pytest.raises(UsageError, match="do not match"):
        build_index([chunk(1)], np.ones(8, np.float32), out)
    bad = unit_rows(2, 8)
    bad[1, 3] = np.nan
    with pytest.raises(UsageError, match="NaN"):
        build_index([chunk(1), chunk(2)], bad, out)
    with pytest.raises(UsageError, match="metric"):
        build_index([chunk(1)], unit_rows(1, 8), out, metric="dot")
    with pytest.raises(OutputNotWritableError, match="does not exist"):
        build_index([chunk(1)], unit_rows(1, 8), tmp_path / "missing" / "i.sqlite")
    assert not out.exists() and os.listdir(tmp_path) == []


def test_connect_errors_are_translated(tmp_path: Path) -> None:
    with pytest.raises(RuntimeLoadError, match="does not exist"):
        idx.connect(tmp_path / "none.sqlite", readonly=True)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database, just text " * 200)
    with pytest.raises(RuntimeLoadError, match="cannot open index database") as err:
        idx.connect(junk, readonly=True)
    assert "Fix:" in str(err.value)
    with pytest.raises(OutputNotWritableError):
        idx.connect(tmp_path / "no-such-dir" / "x.sqlite", readonly=False)
    conn = idx.connect(tmp_path / "new.sqlite", readonly=False)
    try:
        assert conn.execute("SELECT vec_length(vec_f32('[1, 2, 3]'))").fetchone()[0] == 3
    finally:
        conn.close()
