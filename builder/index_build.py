"""Chunks + embeddings -> the bundle's retrieval index: one SQLite file with sqlite-vec and FTS5.

Layout: :func:`shared.index_format.index_schema` (``chunks``, ``chunks_vec`` vec0, ``chunks_fts`` FTS5,
``meta``), or from :data:`shared.index_format.BINARY_MIN_CHUNKS` chunks on the ``binary`` vector layout
(:func:`shared.index_format.binary_schema`: float16 vectors in a plain table + sign-random-projection codes,
:mod:`retrieval.binary`), recorded in ``meta`` as ``vector_layout``.
The file is built under a temporary name in the destination folder, VACUUMed, fsynced and renamed, so a crash
never leaves a half-written index at ``out_path``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fieldpack.builder.ingest.model import Chunk
from fieldpack.retrieval import index as idx
from fieldpack.shared import index_format
from fieldpack.shared.atomic import atomic_path
from fieldpack.shared.hashing import sha256_file
from fieldpack.shared.errors import IngestError, OutputNotWritableError, UsageError

if TYPE_CHECKING:
    from fieldpack.retrieval.embedder import OnnxEmbedder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexStats:
    """What :func:`build_index` wrote.

    Attributes:
        path: the index file.
        documents: distinct ``source`` values.
        chunks: rows in ``chunks``.
        dimension: embedding width.
        metric: ``"cosine"`` or ``"l2"``.
        size_bytes: file size after VACUUM.
        sha256: hex digest of the file.
        vector_layout: ``"float32"`` or ``"binary"`` (:data:`shared.index_format.VECTOR_LAYOUTS`).
    """

    path: Path
    documents: int
    chunks: int
    dimension: int
    metric: str
    size_bytes: int
    sha256: str
    vector_layout: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def embed_chunks(chunks: Sequence[Chunk], embedder: OnnxEmbedder, *, batch_size: int = 32) -> np.ndarray:
    """Embed each chunk's :meth:`Chunk.embedding_text` (section path + text) with the bundle's embedder.

    Progress (chunks done of all) goes to :func:`builder.progress.report` after each slice of
    ``8 * batch_size`` chunks; the result equals one :meth:`OnnxEmbedder.embed` call over all of them.

    Returns:
        ``(len(chunks), embedder.dimension) float32``, rows L2-normalised, in chunk order.
    """
    from fieldpack.builder.progress import report

    texts = [c.embedding_text() for c in chunks]
    if not texts:
        return embedder.embed(texts, batch_size=batch_size)
    step = 8 * batch_size
    parts = []
    report(0, len(texts), "chunks")
    for start in range(0, len(texts), step):
        parts.append(embedder.embed(texts[start : start + step], batch_size=batch_size))
        report(min(start + step, len(texts)), len(texts), "chunks")
    return np.concatenate(parts, axis=0)


def build_index(
    chunks: Sequence[Chunk],
    embeddings: np.ndarray,
    out_path: Path,
    *,
    metric: str = "cosine",
    embedder_name: str = "",
    vector_layout: str = "auto",
) -> IndexStats:
    """Write the retrieval index for ``chunks``.

    Args:
        chunks: from :func:`builder.ingest.ingest`; chunk ``i`` gets id ``i + 1``.
        embeddings: ``(len(chunks), dim)`` float, row ``i`` for chunk ``i`` (see :func:`embed_chunks`).
        out_path: destination file; replaced atomically if it exists. Its folder must exist.
        metric: ``"cosine"`` (default) or ``"l2"``.
        embedder_name: recorded in ``meta`` so the device can check it embeds queries with the same model.
        vector_layout: ``"float32"`` (exact sqlite-vec KNN, index format 1), ``"binary"`` (codes + float
            rescoring, format 2, cosine only) or ``"auto"``: binary from
            :data:`~shared.index_format.BINARY_MIN_CHUNKS` chunks on when the metric is cosine.

    Raises:
        IngestError: no chunks.
        UsageError: shape mismatch, non-finite embeddings, or an unknown metric.
        OutputNotWritableError: the folder is missing or not writable, or the disk is full.
    """
    out_path = Path(out_path)
    if not chunks:
        raise IngestError(f"no chunks to index into {out_path}", hint="ingest a docs folder with documents first")
    if metric not in index_format.METRICS:
        raise UsageError(f"unknown index metric {metric!r}", hint=f"use one of {', '.join(index_format.METRICS)}")
    layout = choose_layout(len(chunks), metric, vector_layout)
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] != len(chunks) or emb.shape[1] < 1:
        raise UsageError(
            f"embeddings of shape {emb.shape} do not match {len(chunks)} chunks",
            hint="pass one embedding row per chunk, in chunk order (embed_chunks does this)",
        )
    if not np.isfinite(emb).all():
        raise UsageError("embeddings contain NaN or infinity", hint="check the embedder export")
    emb = np.ascontiguousarray(emb, dtype="<f4")  # (n, dim) little-endian float32, sqlite-vec's blob format
    dim = int(emb.shape[1])
    if not out_path.parent.is_dir():
        raise OutputNotWritableError(
            f"cannot write {out_path}: folder {out_path.parent} does not exist", hint="create the folder first"
        )
    with atomic_path(out_path) as tmp:  # SQLite creates the file itself
        try:
            _write(tmp, chunks, emb, metric, embedder_name, layout)
        finally:
            tmp.with_name(tmp.name + "-journal").unlink(missing_ok=True)
    sha256 = sha256_file(out_path)
    stats = IndexStats(
        path=out_path,
        documents=len({c.source for c in chunks}),
        chunks=len(chunks),
        dimension=dim,
        metric=metric,
        size_bytes=out_path.stat().st_size,
        sha256=sha256,
        vector_layout=layout,
    )
    log.info("index %s: %d chunks of %d documents, dim %d, %s vectors, %d bytes", out_path, stats.chunks,
             stats.documents, dim, layout, stats.size_bytes)
    return stats


def choose_layout(n_chunks: int, metric: str, requested: str = "auto") -> str:
    """The vector layout :func:`build_index` writes for ``n_chunks`` chunks (see its ``vector_layout``).

    Raises:
        UsageError: an unknown layout, or ``"binary"`` with a metric other than cosine (the rescoring and the
            codes measure angles).
    """
    if requested == "auto":
        return "binary" if metric == "cosine" and n_chunks >= index_format.BINARY_MIN_CHUNKS else "float32"
    if requested not in index_format.VECTOR_LAYOUTS:
        raise UsageError(f"unknown vector layout {requested!r}",
                         hint=f"use auto or one of {', '.join(index_format.VECTOR_LAYOUTS)}")
    if requested == "binary" and metric != "cosine":
        raise UsageError(f"the binary vector layout needs the cosine metric, not {metric!r}",
                         hint="use metric cosine, or vector_layout float32")
    return requested


def _write(path: Path, chunks: Sequence[Chunk], emb: np.ndarray, metric: str, embedder_name: str,
           layout: str) -> None:
    binary = layout == "binary"
    conn = idx.connect(path, readonly=False)
    try:
        conn.execute("PRAGMA journal_mode=MEMORY")
        with conn:  # one transaction
            schema = index_format.binary_schema if binary else index_format.index_schema
            for ddl in schema(emb.shape[1], metric):
                conn.execute(ddl)
            conn.executemany(
                "INSERT INTO chunks (id, source, section, page, line_start, line_end, text, n_tokens, doc_sha256)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    (i, c.source, c.section, c.page, c.line_start, c.line_end, c.text, c.n_tokens, c.doc_sha256)
                    for i, c in enumerate(chunks, start=1)
                ),
            )
            stored = emb.astype(index_format.BINARY_RESCORE_DTYPE) if binary else emb
            conn.executemany(
                f"INSERT INTO {'chunks_emb' if binary else 'chunks_vec'} (chunk_id, embedding) VALUES (?, ?)",
                ((i, stored[i - 1].tobytes()) for i in range(1, len(chunks) + 1)),
            )
            conn.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('rebuild')")
            conn.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('optimize')")
            meta = {
                index_format.META_INDEX_FORMAT: str(index_format.BINARY_INDEX_FORMAT if binary
                                                    else index_format.INDEX_FORMAT),
                index_format.META_DIMENSION: str(emb.shape[1]),
                index_format.META_METRIC: metric,
                index_format.META_EMBEDDER: embedder_name,
                index_format.META_CHUNKS: str(len(chunks)),
                index_format.META_DOCUMENTS: str(len({c.source for c in chunks})),
            }
            if binary:
                meta.update(_write_codes(conn, emb))
            conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())
        conn.execute("VACUUM")
        conn.execute("PRAGMA journal_mode=DELETE")
    except idx.SQLiteError as exc:
        raise OutputNotWritableError(
            f"SQLite failed writing index {path}: {exc}", hint="check free disk space and retry"
        ) from exc
    finally:
        conn.close()


def _write_codes(conn: Any, emb: np.ndarray) -> dict[str, str]:
    """Write ``vec_projection`` and ``chunks_codes`` for chunk ids ``1..n``; the ``meta`` entries they need."""
    from fieldpack.retrieval import binary as B

    bits = index_format.BINARY_BITS_PER_DIM * emb.shape[1]
    bits += -bits % 64
    proj = B.projection(emb.shape[1], bits)
    conn.execute("INSERT INTO vec_projection (id, rows, cols, matrix) VALUES (1, ?, ?, ?)",
                 (proj.shape[0], proj.shape[1], proj.tobytes()))
    step = index_format.BINARY_BLOCK
    for block, start in enumerate(range(0, emb.shape[0], step)):
        part = emb[start:start + step]
        ids = np.arange(start + 1, start + 1 + part.shape[0], dtype="<i8")
        conn.execute("INSERT INTO chunks_codes (block, ids, codes) VALUES (?, ?, ?)",
                     (block, ids.tobytes(), B.encode(part, proj).tobytes()))
    return {index_format.META_VECTOR_LAYOUT: "binary", index_format.META_BINARY_BITS: str(bits),
            index_format.META_BINARY_OVERSAMPLE: str(index_format.BINARY_OVERSAMPLE)}
