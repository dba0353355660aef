"""The bundle index format, defined once: written by :mod:`fieldpack.builder.index_build`, read by
:mod:`fieldpack.retrieval.search` on the device (and at build time for the smoke question).

The index is one SQLite file (members ``index/index.sqlite`` in the bundle) with a sqlite-vec ``vec0`` table and an
FTS5 table; this module holds its version, ``meta`` keys and DDL as data. Opening it is
:func:`fieldpack.retrieval.index.connect`.
"""

from __future__ import annotations

from fieldpack.shared.errors import UsageError

#: Version of the index layout below; stored in ``meta`` under ``index_format``. Format 1: float32 vectors in
#: a ``vec0`` table (every index up to issue 13, and still every index below :data:`BINARY_MIN_CHUNKS`).
#: Format 2: the ``binary`` vector layout (:func:`binary_schema`); a reader that knows only format 1 refuses it
#: with a clear message instead of failing on a missing table.
INDEX_FORMAT = 1
BINARY_INDEX_FORMAT = 2
#: Formats this fieldpack reads.
READABLE_FORMATS = (INDEX_FORMAT, BINARY_INDEX_FORMAT)
#: Vector layouts (``meta`` key ``vector_layout``; absent = ``float32``):
#: ``float32``: exact KNN by sqlite-vec over ``chunks_vec``;
#: ``binary``: sign-random-projection codes (Charikar 2002) searched by Hamming distance, the best
#: ``oversample`` x candidates rescored with the float16 vectors of ``chunks_emb``.
#: dtype of the ``chunks_emb`` vectors of the binary layout.
BINARY_RESCORE_DTYPE = "<f2"
VECTOR_LAYOUTS = ("float32", "binary")
#: ``build_index(vector_layout="auto")`` writes ``binary`` from this many chunks on (README "Retrieval at
#: scale": below it float32 exact KNN is already within the latency budget and binary costs recall).
BINARY_MIN_CHUNKS = 10_000
#: Code bits per embedding dimension in the binary layout (384-d MiniLM: 1536 bits = 192 bytes per chunk).
BINARY_BITS_PER_DIM = 4
#: Candidates rescored with float vectors, as a multiple of the list length asked for.
BINARY_OVERSAMPLE = 8
#: Chunks per row of ``chunks_codes`` (one BLOB of ids and one of codes per block).
BINARY_BLOCK = 4096
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
META_VECTOR_LAYOUT = "vector_layout"
META_BINARY_BITS = "binary_bits"
META_BINARY_OVERSAMPLE = "binary_oversample"


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


def binary_schema(dimension: int, metric: str) -> list[str]:
    """DDL of a ``binary``-layout index (format 2), in order: :func:`index_schema` without ``chunks_vec``, plus

    * ``chunks_emb (chunk_id, embedding)``: the vector of each chunk as ``dimension`` little-endian IEEE
      half floats (float16: cosine within 1e-4 of float32, half the bytes; 5 rows fit a 4 KiB page where
      float32 rows fit 2), read by id to rescore candidates and to report similarities;
    * ``chunks_codes (block, ids, codes)``: binary codes in blocks of :data:`BINARY_BLOCK` chunks; ``ids`` is
      ``m`` little-endian int64 chunk ids, ``codes`` ``m x bits/8`` bytes, bit ``j`` of a code (LSB first,
      sqlite-vec's ``vec_quantize_binary`` order) = ``(projection.T @ v)[j] > 0``;
    * ``vec_projection (id = 1, rows, cols, matrix)``: the ``dimension x bits`` float32 projection (row-major,
      little-endian) that both the codes and the device's query codes are made with.
    """
    if metric not in METRICS:
        raise UsageError(f"unknown index metric {metric!r}", hint=f"use one of {', '.join(METRICS)}")
    base = [ddl for ddl in index_schema(dimension, metric) if "chunks_vec" not in ddl]
    return base + [
        "CREATE TABLE chunks_emb (chunk_id INTEGER PRIMARY KEY, embedding BLOB NOT NULL)",
        "CREATE TABLE chunks_codes (block INTEGER PRIMARY KEY, ids BLOB NOT NULL, codes BLOB NOT NULL)",
        "CREATE TABLE vec_projection (id INTEGER PRIMARY KEY CHECK (id = 1), rows INTEGER NOT NULL,"
        " cols INTEGER NOT NULL, matrix BLOB NOT NULL)",
    ]
