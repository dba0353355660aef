"""The bundle index format, defined once: written by :mod:`fieldpack.builder.index_build`, read by
:mod:`fieldpack.retrieval.search` on the device (and at build time for the smoke question).

The index is one SQLite file (members ``index/index.sqlite`` in the bundle) with a sqlite-vec ``vec0`` table and an
FTS5 table; this module holds its version, ``meta`` keys and DDL as data. Opening it is
:func:`fieldpack.retrieval.index.connect`.
"""

from __future__ import annotations

from fieldpack.shared.errors import UsageError

#: Version of the index layout below; stored in ``meta`` under ``index_format``.
INDEX_FORMAT = 1
#: Distance metrics the index may use (sqlite-vec ``distance_metric``).
METRICS = ("cosine", "l2")
#: FTS5 tokenizer: Porter stemming over Unicode 6.1 word splitting with diacritics folded.
FTS_TOKENIZE = "porter unicode61 remove_diacritics 2"
#: ``meta`` keys.
META_INDEX_FORMAT = "index_format"
META_DIMENSION = "dimension"
META_METRIC = "metric"
META_EMBEDDER = "embedder"
META_CHUNKS = "chunks"
META_DOCUMENTS = "documents"


def index_schema(dimension: int, metric: str) -> list[str]:
    """DDL of a bundle index, in order.

    ``chunks`` holds the text and citation fields (``id`` = rowid = chunk id); ``chunks_vec`` is a sqlite-vec
    ``vec0`` table of ``float[dimension]`` embeddings keyed by chunk id; ``chunks_fts`` is an external-content
    FTS5 table over ``chunks(text, section, source)`` for BM25; ``meta`` is key/value text.
    """
    if metric not in METRICS:
        raise UsageError(f"unknown index metric {metric!r}", hint=f"use one of {', '.join(METRICS)}")
    return [
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE chunks ("
        " id INTEGER PRIMARY KEY, source TEXT NOT NULL, section TEXT NOT NULL, page INTEGER,"
        " line_start INTEGER, line_end INTEGER, text TEXT NOT NULL, n_tokens INTEGER NOT NULL,"
        " doc_sha256 TEXT NOT NULL)",
        "CREATE INDEX chunks_source ON chunks(source)",
        f"CREATE VIRTUAL TABLE chunks_vec USING vec0("
        f"chunk_id INTEGER PRIMARY KEY, embedding float[{int(dimension)}] distance_metric={metric})",
        f"CREATE VIRTUAL TABLE chunks_fts USING fts5("
        f"text, section, source, content='chunks', content_rowid='id', tokenize='{FTS_TOKENIZE}')",
    ]
