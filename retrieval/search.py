"""Hybrid retrieval over a bundle index: vector kNN (sqlite-vec) + BM25 (FTS5), fused by reciprocal rank fusion.

RRF: each document's fused score is ``sum over rankings of 1 / (k + rank)`` with ``k = 60`` and 1-based ranks
(Cormack, Clarke & Buettcher, "Reciprocal Rank Fusion outperforms Condorcet and individual Rank Learning
Methods", SIGIR 2009). BM25 is SQLite FTS5's ``bm25()`` (Robertson & Zaragoza's Okapi BM25, k1 = 1.2,
b = 0.75; lower is better as SQLite returns it). The user's text never reaches FTS5 as syntax: it is cut into
quoted terms joined by ``OR`` (:func:`fts5_query`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fieldpack.retrieval import index as idx
from fieldpack.retrieval.binary import BinaryCodes
from fieldpack.shared import index_format
from fieldpack.retrieval.embedder import OnnxEmbedder
from fieldpack.retrieval.types import Hit
from fieldpack.shared.errors import EmptyQuestionError, RuntimeLoadError, UsageError
from fieldpack.shared.text import clean_question

if TYPE_CHECKING:
    import apsw

log = logging.getLogger(__name__)

Mode = Literal["hybrid", "vector", "bm25"]
MODES: tuple[str, ...] = ("hybrid", "vector", "bm25")
#: RRF constant k (Cormack et al. 2009).
RRF_K = 60
#: FTS5 column weights for ``bm25()``: text, section (heading path), source (file path).
BM25_WEIGHTS = (1.0, 1.0, 1.0)
#: At most this many distinct terms of a query go to FTS5.
MAX_QUERY_TERMS = 48
#: Default abstention threshold of :func:`is_relevant` (cosine, all-MiniLM-L6-v2, 200-token chunks with their
#: section path embedded). On the Debian Administrator's Handbook QA set (40 answerable, 6 unanswerable, hybrid
#: k=5): best similarity of answerable questions 0.379 (one), then >= 0.436; of unanswerable ones <= 0.402
#: (fp32) / 0.394 (int8). 0.42 passes 39/40 answerable and 0/6 unanswerable with both precisions. Another
#: embedder needs its own calibration.
DEFAULT_MIN_SIMILARITY = 0.42

_STOPWORDS = frozenset(
    """a about above after again all also am an and any are as at be because been before being below between
    both but by can could did do does doing down during each few for from further had has have having he her
    here hers him his how i if in into is it its itself just me more most my no nor not now of off on once only
    or other our ours out over own same she should so some such than that the their theirs them then there
    these they this those through to too under until up very was we were what when where which while who whom
    why will with would you your yours""".split()
)
_TERM = re.compile(r"\w", re.UNICODE)


def fts5_query(text: str) -> str | None:
    """Turn free text into a safe FTS5 MATCH expression: quoted terms joined by ``OR``.

    Each whitespace-separated token is stripped of surrounding punctuation and written as an FTS5 string
    (``"..."``, inner ``"`` doubled), so operators (``AND``/``OR``/``NOT``/``NEAR``), column filters (``:``),
    prefix stars, parentheses, ``-`` and ``^`` in the user's text are literal. A token with inner punctuation
    (``V-31``, ``max_connections``, ``/etc/apt``) becomes a phrase of its parts. English stop words are
    dropped unless nothing else remains. Duplicates (case-insensitive) are dropped; at most
    :data:`MAX_QUERY_TERMS` terms are kept.

    Returns:
        The expression, or ``None`` when the text has no word characters at all.
    """
    terms = _query_terms(text)
    content = _without_stopwords(terms) or terms
    if not content:
        return None
    return " OR ".join(_fts5_string(t) for t in content[:MAX_QUERY_TERMS])


def _fts5_string(term: str) -> str:
    return '"' + term.replace('"', '""') + '"'


def _query_terms(text: str) -> list[str]:
    terms: list[str] = []
    seen: set[str] = set()
    for raw in text.split():
        tok = raw.strip("\"'`()[]{}<>.,;:!?*^+-=|&~#@$%\\/")
        if not _TERM.search(tok):
            continue
        key = tok.lower()
        if key in seen:
            continue
        seen.add(key)
        terms.append(tok)
    return terms


def content_terms(text: str) -> list[str]:
    """The terms :func:`fts5_query` searches for, stop words excluded even when nothing else remains
    (``"What should I do about it?"`` has none), in order, without duplicates."""
    return _without_stopwords(_query_terms(text))


def _without_stopwords(terms: list[str]) -> list[str]:
    return [t for t in terms if t.lower() not in _STOPWORDS]


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], *, k: int = RRF_K,
                           weights: Sequence[float] | None = None) -> list[tuple[int, float]]:
    """Fuse ranked id lists: ``score(d) = sum_i w_i / (k + rank_i(d))``, ranks 1-based (Cormack et al. 2009;
    the per-list weights ``w_i`` make it weighted RRF, all 1 in the paper).

    Args:
        rankings: each a list of ids, best first (an id appearing twice in one list counts at its best rank).
        k: the RRF constant (60 in the paper).
        weights: one weight per ranking (>= 0); ``None``: all 1.

    Returns:
        ``(id, score)`` pairs, highest score first; ties broken by the best single rank, then by id.

    Raises:
        UsageError: ``weights`` has another length than ``rankings`` or a negative weight.
    """
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings) or any(w < 0 for w in weights):
        raise UsageError(f"RRF weights {list(weights)} do not fit {len(rankings)} rankings",
                         hint="give one non-negative weight per ranking")
    scores: dict[int, float] = {}
    best: dict[int, int] = {}
    for ranking, w in zip(rankings, weights):
        seen: set[int] = set()
        for rank, doc in enumerate(ranking, start=1):
            if doc in seen:
                continue
            seen.add(doc)
            scores[doc] = scores.get(doc, 0.0) + w / (k + rank)
            best[doc] = min(best.get(doc, rank), rank)
    return sorted(scores.items(), key=lambda item: (-item[1], best[item[0]], item[0]))


@dataclass(frozen=True)
class SearchConfig:
    """How :meth:`Retriever.search` ranks: fusion weights, BM25 column weights, page grouping.

    Attributes:
        rrf_k: RRF constant (Cormack et al. 2009).
        vector_weight, bm25_weight: weighted-RRF weight of the vector and the BM25 list.
        bm25_columns: FTS5 ``bm25()`` weights of the columns ``text``, ``section`` (heading path) and ``source``
            (file path); a term found in a heading counts ``bm25_columns[1]`` times one in the body.
        candidates: length of each retriever's list before fusion (raised to ``k`` if smaller).
        candidate_share: at most this share of the index's chunks in each list (rounded up; never below ``k``).
            A candidate list should be a selection: where it holds most of a small corpus (the demo's 16 chunks,
            50 candidates), every chunk of every page enters the page score, so with RRF's flat scores (k = 60) a
            page's score measures its length and three middling chunks of a long page outrank the one chunk of a
            short page that both retrievers rank first (a new-user trial: "What does alarm A-202 mean?" abstained
            at top_k_chunks 1). From 4 / share chunks on (200 at the defaults) the cap does not bind.
        page_decay: ``None``: return the fused chunk ranking. A float in [0, 1]: rank pages first: a page's
            score is ``sum_j page_decay**j * s_j`` over its fused chunk scores ``s_0 >= s_1 >= ...`` (0 =
            its best chunk only, CombMAX; 1 = CombSUM, Fox & Shaw 1994), and the hits are the best chunks of
            the best pages. Only where the candidate lists are a selection, i.e. :attr:`candidate_share` does not
            cut them (an index of at least ``candidates / candidate_share`` chunks: 200 at the defaults). On a
            smaller index the fused chunk ranking is returned: even a quarter of the demo's 16 chunks let a page
            with two middling chunks outrank the one chunk both retrievers ranked first (a new-user trial:
            "shift handover checklist" put the chlorine page first and abstained at top_k_chunks 1).
        per_page: with page ranking, at most this many chunks of one page in a row before the next page
            (the best ``per_page`` chunks of page 1, then of page 2, ...).
        page_chunks: only a page's best ``page_chunks`` chunks count in its score (bounds the bias towards
            long pages that a plain sum has).
        concurrent_bm25: hybrid mode runs BM25 in a worker thread on its own connection while the query is
            embedded and the vectors searched (the same hits; less latency where a second core is free: 100k
            chunks, idle 2-core host, p50 63.1 -> 52.2 ms: `benchmarks.retrieval_latency`). False: one after the other, one thread (a
            single-core device).
    """

    rrf_k: int = RRF_K
    vector_weight: float = 1.0
    bm25_weight: float = 1.0
    bm25_columns: tuple[float, float, float] = BM25_WEIGHTS
    candidates: int = 20
    candidate_share: float = 0.25
    page_decay: float | None = None
    per_page: int = 1
    page_chunks: int = 3
    concurrent_bm25: bool = True

    def __post_init__(self) -> None:
        if self.rrf_k < 0 or self.candidates < 1 or self.per_page < 1 or self.page_chunks < 1:
            raise UsageError(f"bad search settings {self}", hint="rrf_k >= 0, candidates >= 1, per_page >= 1")
        if not 0.0 < self.candidate_share <= 1.0:
            raise UsageError(f"candidate_share {self.candidate_share} is outside (0, 1]", hint="use e.g. 0.25")
        if self.vector_weight < 0 or self.bm25_weight < 0 or any(w < 0 for w in self.bm25_columns):
            raise UsageError(f"negative weight in {self}", hint="weights are >= 0")
        if self.page_decay is not None and not 0.0 <= self.page_decay <= 1.0:
            raise UsageError(f"page_decay {self.page_decay} is outside [0, 1]", hint="use 0..1, or None")


#: The ranking :class:`Retriever` uses unless given another. Chosen on the dev part of benchmarks/qa/postgresql-15
#: (MiniLM int8, hybrid, 36 answerable questions) and checked on the Debian handbook set (40): equal RRF over 20
#: candidates with chunk ranking (the former default) gives page R@5 0.81, page MRR@10 0.59 (handbook 0.975 /
#: 0.878); vector weight 2, 50 candidates, pages ranked by their best 3 chunks with decay 0.5: 0.86 / 0.73
#: (handbook 1.000 / 0.870). A plain sum over all of a page's chunks (decay 1) scored the same on PostgreSQL but
#: 0.81 on the handbook and put long pages first on small sets; heading (section column) weight 3 changed nothing.
DEFAULT_SEARCH = SearchConfig(vector_weight=2.0, candidates=50, page_decay=0.5, page_chunks=3)


def group_by_page(fused: Sequence[tuple[int, float]], page_of: dict[int, str], *, decay: float,
                  per_page: int, page_chunks: int = 3) -> list[tuple[int, float]]:
    """Reorder a fused chunk ranking page by page (see :attr:`SearchConfig.page_decay`).

    Args:
        fused: ``(chunk id, fused score)``, best first.
        page_of: chunk id -> its page (``source``); every id of ``fused`` must be a key.
        decay: weight of a page's ``j``-th best chunk is ``decay**j`` in the page score.
        per_page: chunks of one page taken in a row before moving to the next page.
        page_chunks: a page's best chunks that count in its score.

    Returns:
        The same pairs in page order: pages by descending page score (ties: the page of the better chunk
        first), within a page by chunk score; first at most ``per_page`` chunks of every page, then the rest of
        each page's chunks, again page by page.
    """
    pages: dict[str, list[tuple[int, float]]] = {}
    for cid, score in fused:  # fused is best first, so each page's list is too
        pages.setdefault(page_of[cid], []).append((cid, score))
    order = sorted(pages, key=lambda p: -sum(sc * decay**j for j, (_, sc) in enumerate(pages[p][:page_chunks])))
    head = [pair for p in order for pair in pages[p][:per_page]]
    tail = [pair for p in order for pair in pages[p][per_page:]]
    return head + tail


def identifiers(text: str) -> list[str]:
    """Exact-match tokens of ``text``: codes, paths and config keys (``A-202``, ``V-31``, ``pg_dump``,
    ``/etc/apt/sources.list``, ``0x80070005``): a letter plus a digit, ``_`` or ``/``, 3+ characters,
    surrounding punctuation stripped; lower-cased, in order, without duplicates."""
    out: list[str] = []
    for raw in text.split():
        tok = raw.strip("\"'`()[]{}<>.,;:!?*").lower()
        if (
            len(tok) >= 3
            and any(c.isalpha() for c in tok)
            and (any(c.isdigit() for c in tok) or "_" in tok or "/" in tok)
            and tok not in out
        ):
            out.append(tok)
    return out


def is_relevant(
    hits: Sequence[Hit], *, min_similarity: float = DEFAULT_MIN_SIMILARITY, query: str | None = None
) -> bool:
    """Whether retrieval found something relevant enough to answer from; ``False`` -> abstain.

    Relevant when either
      * the best ``vector_similarity`` (cosine of question and chunk embeddings) among ``hits`` reaches
        ``min_similarity`` (default :data:`DEFAULT_MIN_SIMILARITY`, calibration figures there), or
      * ``query`` is given and one of its :func:`identifiers` (an alarm code, a path, a config key) occurs
        verbatim (case-insensitive) in a hit's text: exact lexical evidence a small embedder scores poorly
        ("alarm A-202" has similarity 0.29 to the CSV row that defines it).

    Hits from ``mode="bm25"`` carry no similarity; :meth:`Retriever.search` in hybrid mode fills the
    similarity of every returned hit, BM25-only ones too. No hits -> ``False``.
    """
    sims = [h.vector_similarity for h in hits if h.vector_similarity is not None]
    if sims and max(sims) >= min_similarity:
        return True
    if query:
        texts = [h.text.lower() for h in hits]
        return any(ident in t for ident in identifiers(query) for t in texts)
    return False


class Retriever:
    """Search one bundle index (``index.sqlite``) with the bundle's embedder.

    Args:
        db_path: index file written by :func:`builder.index_build.build_index`; opened read-only.
        embedder: the bundle's :class:`OnnxEmbedder` (same model as the index; the width is checked).
        config: ranking settings; ``None``: :data:`DEFAULT_SEARCH`.

    Raises:
        RuntimeLoadError: the file is missing, not an index, of an unknown ``index_format``, or its
            dimension differs from the embedder's.

    The retriever does not own the embedder: :meth:`close` closes only the database.
    """

    def __init__(self, db_path: Path, embedder: OnnxEmbedder, config: SearchConfig | None = None) -> None:
        self.db_path = Path(db_path)
        self.embedder = embedder
        self.config = config or DEFAULT_SEARCH
        self._conn: apsw.Connection | None = idx.connect(self.db_path, readonly=True)
        conn = self._conn
        try:
            rows = conn.execute("SELECT key, value FROM meta").fetchall()
        except idx.SQLiteError as exc:
            conn.close()
            raise RuntimeLoadError(
                f"{self.db_path} is not a fieldpack index (no meta table): {exc}",
                hint="rebuild the bundle with `fieldpack build`",
            ) from exc
        self.meta: dict[str, str] = {str(k): str(v) for k, v in rows}
        fmt = self.meta.get(index_format.META_INDEX_FORMAT)
        readable = [str(f) for f in index_format.READABLE_FORMATS]
        self.vector_layout = self.meta.get(index_format.META_VECTOR_LAYOUT, "float32")
        layout_of = {str(index_format.INDEX_FORMAT): "float32", str(index_format.BINARY_INDEX_FORMAT): "binary"}
        if layout_of.get(fmt or "") != self.vector_layout:
            conn.close()
            raise RuntimeLoadError(
                f"index {self.db_path} has format {fmt!r} (vector layout {self.vector_layout!r}); this fieldpack "
                f"reads formats {', '.join(readable)} ({', '.join(index_format.VECTOR_LAYOUTS)})",
                hint="rebuild the bundle with this fieldpack version, or upgrade fieldpack on the device",
            )
        binary = self.vector_layout == "binary"
        self._emb_table = "chunks_emb" if binary else "chunks_vec"
        self._emb_dtype = index_format.BINARY_RESCORE_DTYPE if binary else "<f4"
        self._codes: BinaryCodes | None = None  # binary layout: loaded on the first vector search
        # hybrid search runs BM25 on its own read-only connection in one worker thread while this thread embeds
        # the query and searches the vectors (SQLite serializes statements per connection; apsw releases the
        # GIL inside SQLite, onnxruntime and numpy's kernels release it too): opened on the first hybrid search
        self._fts_conn: apsw.Connection | None = None
        self._pool: Any = None  # concurrent.futures.ThreadPoolExecutor(1)
        self._pool_lock = threading.Lock()  # first hybrid searches from several threads open one worker
        self._page_of: tuple[np.ndarray, np.ndarray, list[str]] | None = None  # ids, source index, sources
        self.oversample = int(self.meta.get(index_format.META_BINARY_OVERSAMPLE, index_format.BINARY_OVERSAMPLE))
        self.dimension = int(self.meta.get(index_format.META_DIMENSION, "0"))
        self.metric = self.meta.get(index_format.META_METRIC, "cosine")
        if self.dimension != embedder.dimension:
            conn.close()
            raise RuntimeLoadError(
                f"index {self.db_path} holds {self.dimension}-d vectors but the embedder makes "
                f"{embedder.dimension}-d ones",
                hint="the bundle's index and embedder do not belong together; rebuild the bundle",
            )

    # --- search --------------------------------------------------------------------------------------------
    def search(self, query: str, *, k: int = 5, mode: Mode = "hybrid", candidates: int | None = None) -> list[Hit]:
        """The ``k`` best chunks for ``query``.

        Args:
            query: the user's question, free text (any punctuation is safe).
            k: hits returned (at most; fewer when the index is small or BM25 matches little).
            mode: ``"hybrid"`` (vector + BM25, RRF-fused), ``"vector"`` or ``"bm25"``.
            candidates: list length taken from each retriever before fusion (capped at
                :attr:`SearchConfig.candidate_share` of the chunks, then raised to ``k`` if smaller); ``None``: the
                config's.

        Returns:
            Hits best first: the fused chunk ranking, or in hybrid mode with :attr:`SearchConfig.page_decay`
            set (and an index large enough, see there) the best chunks of the best pages (:func:`group_by_page`; single-list modes keep their chunk
            ranking: their rank-based RRF scores are nearly flat, so a page sum would only count chunks). ``score`` is the chunk's (weighted) RRF score in
            every mode; ``vector_rank``/``bm25_rank`` are
            ranks in each candidate list. In hybrid mode every hit also gets ``vector_similarity`` and, when
            the chunk matches any query term, ``bm25``, even if it came from only one list.

        Raises:
            EmptyQuestionError: ``query`` is blank.
            UsageError: ``k`` < 1 or unknown ``mode``.
            RuntimeLoadError: the index or embedder is closed or fails.
        """
        query = clean_question(query or "")  # same folding as the documents got at ingest; no NUL reaches SQLite
        if not query:
            raise EmptyQuestionError("the question is empty", hint="ask a question in words")
        if k < 1:
            raise UsageError(f"k={k} must be at least 1", hint="ask for 1 or more hits")
        if mode not in MODES:
            raise UsageError(f"unknown retrieval mode {mode!r}", hint=f"use one of {', '.join(MODES)}")
        cfg = self.config
        n = max(min(cfg.candidates if candidates is None else candidates,
                    math.ceil(cfg.candidate_share * self.chunk_count())), k)
        qvec: np.ndarray | None = None
        vec_list: list[tuple[int, float]] = []  # (chunk id, similarity), best first
        bm_list: list[tuple[int, float]] = []  # (chunk id, bm25), best (lowest) first
        pending = self._bm25_async(query, n) if mode == "hybrid" and cfg.concurrent_bm25 else None
        if mode in ("hybrid", "vector"):
            qvec = self.embedder.embed([query])[0]  # (dim,) float32, unit norm
            vec_list = self.vector_search(qvec, n)
        if pending is not None:
            bm_list = pending.result()
        elif mode in ("hybrid", "bm25"):
            bm_list = self._bm25(query, n)
        fused = reciprocal_rank_fusion([[i for i, _ in vec_list], [i for i, _ in bm_list]], k=cfg.rrf_k,
                                       weights=(cfg.vector_weight, cfg.bm25_weight))
        wanted = cfg.candidates if candidates is None else candidates
        if cfg.page_decay is not None and fused and mode == "hybrid" and n >= wanted:  # lists are a selection
            fused = group_by_page(fused, self._sources([i for i, _ in fused]), decay=cfg.page_decay,
                                  per_page=cfg.per_page, page_chunks=cfg.page_chunks)
        fused = fused[:k]
        ids = [i for i, _ in fused]
        vec_rank = {i: r for r, (i, _) in enumerate(vec_list, start=1)}
        bm_rank = {i: r for r, (i, _) in enumerate(bm_list, start=1)}
        sims = dict(vec_list)
        bm25 = dict(bm_list)
        if mode == "hybrid" and qvec is not None:
            sims.update(self._similarities(qvec, [i for i in ids if i not in sims]))
            bm25.update(self._bm25_of(query, [i for i in ids if i not in bm25]))
        rows = self._rows(ids)
        hits = []
        for chunk_id, score in fused:
            row = rows.get(chunk_id)
            if row is None:  # pragma: no cover - vec0/FTS5 ids always come from chunks
                continue
            source, section, page, line_start, line_end, text = row
            hits.append(
                Hit(
                    chunk_id=chunk_id,
                    source=source,
                    section=section,
                    page=page,
                    line_start=line_start,
                    line_end=line_end,
                    text=text,
                    score=score,
                    vector_rank=vec_rank.get(chunk_id),
                    bm25_rank=bm_rank.get(chunk_id),
                    vector_similarity=sims.get(chunk_id),
                    bm25=bm25.get(chunk_id),
                )
            )
        return hits

    def _page_map(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``(chunk ids sorted (n,) int64, source index per chunk (n,) int32, sources)``, read once: ~5 bytes a
        chunk (a per-query ``IN`` lookup of ~100 ids cost ~12 ms at 100k chunks, it reads each row's page)."""
        if self._page_of is None:
            rows = self._query("SELECT id, source FROM chunks ORDER BY id", ())
            names: dict[str, int] = {}
            src = np.fromiter((names.setdefault(str(r[1]), len(names)) for r in rows), dtype=np.int32,
                              count=len(rows))
            self._page_of = (np.fromiter((int(r[0]) for r in rows), dtype=np.int64, count=len(rows)), src,
                             list(names))
        return self._page_of

    def _sources(self, ids: list[int]) -> dict[int, str]:
        """Chunk id -> document path, from :meth:`_page_map`."""
        all_ids, src, names_list = self._page_map()
        want = np.asarray(ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(all_ids, want), max(len(all_ids) - 1, 0))
        return {int(i): names_list[int(src[p])] for i, p in zip(want, pos)
                if len(all_ids) and all_ids[p] == i}

    def chunk_count(self) -> int:
        """Chunks in the index (from the in-memory page map, read on first use)."""
        return int(self._page_map()[0].shape[0])

    def _bm25_async(self, query: str, n: int) -> Any:
        """Start :meth:`_bm25` on the BM25 connection in the worker thread; returns its future."""
        if self._conn is None:
            raise RuntimeLoadError(f"retriever for {self.db_path} is closed", hint="open a new Retriever")
        with self._pool_lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._fts_conn = idx.connect(self.db_path, readonly=True)
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fieldpack-bm25")
            return self._pool.submit(self._bm25, query, n, self._fts_conn)

    def chunk_texts(self, ids: list[int]) -> dict[int, str]:
        """The stored text of each chunk id (ids the index does not hold are left out)."""
        return {i: str(row[-1]) for i, row in self._rows(list(ids)).items()}

    def sources(self) -> list[str]:
        """The document paths (``chunks.source``) the index holds, sorted."""
        return sorted(str(r[0]) for r in self._query("SELECT DISTINCT source FROM chunks", ()))

    def _query(self, sql: str, params: Sequence[Any], conn: apsw.Connection | None = None) -> list[tuple[Any, ...]]:
        if self._conn is None:
            raise RuntimeLoadError(f"retriever for {self.db_path} is closed", hint="open a new Retriever")
        try:
            return (conn or self._conn).execute(sql, params).fetchall()
        except idx.SQLiteError as exc:
            raise idx.query_error(exc, self.db_path, "index query") from exc

    def _similarity(self, distance: float) -> float:
        if self.metric == "l2":  # unit vectors: ||a - b||^2 = 2 - 2 cos
            return 1.0 - distance * distance / 2.0
        return 1.0 - distance

    def vector_search(self, qvec: np.ndarray, n: int) -> list[tuple[int, float]]:
        """The ``n`` chunks nearest to the query embedding ``qvec`` (``(dim,) float32``, unit norm):
        ``(chunk id, cosine similarity)``, best first.

        ``float32`` layout: exact KNN by sqlite-vec. ``binary`` layout: the ``n * oversample`` nearest codes by
        Hamming distance (:class:`retrieval.binary.BinaryCodes`), rescored with their float16 vectors (cosine
        within 1e-4 of float32), so only the candidate set is approximate."""
        if self.vector_layout == "binary":
            ids = self.binary_codes().candidates(qvec, n * self.oversample)
            sims = self._similarities(qvec, ids)
            return sorted(sims.items(), key=lambda item: (-item[1], item[0]))[:n]
        rows = self._query(
            "SELECT chunk_id, distance FROM chunks_vec WHERE embedding MATCH ? AND k = ? ORDER BY distance",
            (np.ascontiguousarray(qvec, dtype="<f4").tobytes(), n),
        )
        return [(int(i), self._similarity(float(d))) for i, d in rows]

    def binary_codes(self) -> BinaryCodes:
        """The binary layout's codes and projection, read once (``chunks_codes``, ``vec_projection``)."""
        if self._codes is None:
            ((rows, cols, matrix),) = self._query("SELECT rows, cols, matrix FROM vec_projection WHERE id = 1", ())
            proj = np.frombuffer(matrix, dtype="<f4").reshape(int(rows), int(cols))
            blocks = self._query("SELECT ids, codes FROM chunks_codes ORDER BY block", ())
            width = int(cols) // 8
            ids = np.concatenate([np.frombuffer(i, dtype="<i8") for i, _ in blocks] or [np.zeros(0, "<i8")])
            codes = np.concatenate([np.frombuffer(c, dtype=np.uint8).reshape(-1, width) for _, c in blocks]
                                   or [np.zeros((0, width), np.uint8)])
            try:
                self._codes = BinaryCodes(ids, codes, proj)
            except ValueError as exc:
                raise RuntimeLoadError(f"the index {self.db_path} is damaged (binary codes: {exc})",
                                       hint="run `fieldpack verify --installed`, then reinstall the bundle") from exc
            log.debug("loaded %d binary codes of %d bits (%d bytes)", ids.shape[0], int(cols), self._codes.nbytes)
        return self._codes

    def unknown_terms(self, text: str) -> list[str]:
        """The :func:`content_terms` of ``text`` that no chunk contains, matched as BM25 matches them (FTS5's
        Porter stemming: "restarting" is known where "restart" occurs). One indexed lookup per term.

        Raises:
            RuntimeLoadError: the index is closed or fails.
        """
        return [t for t in content_terms(text)
                if not self._query("SELECT 1 FROM chunks_fts WHERE chunks_fts MATCH ? LIMIT 1", (_fts5_string(t),))]

    def bm25_search(self, query: str, n: int) -> list[tuple[int, float]]:
        """The ``n`` best FTS5 BM25 matches of ``query``: ``(chunk id, bm25)``, best (lowest) first."""
        return self._bm25(query, n)

    def _bm25(self, query: str, n: int, conn: apsw.Connection | None = None) -> list[tuple[int, float]]:
        expr = fts5_query(query)
        if expr is None:
            return []
        w = self.config.bm25_columns
        rows = self._query(
            f"SELECT rowid, bm25(chunks_fts, {w[0]}, {w[1]}, {w[2]}) AS s FROM chunks_fts"
            " WHERE chunks_fts MATCH ? ORDER BY s LIMIT ?",
            (expr, n), conn,
        )
        return [(int(i), float(s)) for i, s in rows]

    def _bm25_of(self, query: str, ids: list[int]) -> dict[int, float]:
        expr = fts5_query(query)
        if expr is None or not ids:
            return {}
        w = self.config.bm25_columns
        marks = ",".join("?" * len(ids))
        rows = self._query(
            f"SELECT rowid, bm25(chunks_fts, {w[0]}, {w[1]}, {w[2]}) FROM chunks_fts"
            f" WHERE chunks_fts MATCH ? AND rowid IN ({marks})",
            (expr, *ids),
        )
        return {int(i): float(s) for i, s in rows}

    def _similarities(self, qvec: np.ndarray, ids: list[int]) -> dict[int, float]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._query(f"SELECT chunk_id, embedding FROM {self._emb_table} WHERE chunk_id IN ({marks})", ids)
        if not rows:
            return {}
        mat = np.frombuffer(b"".join(blob for _, blob in rows), dtype=self._emb_dtype).reshape(len(rows), -1)
        mat = mat.astype(np.float32)
        # einsum, not BLAS gemv: a gemv's thread pool costs ~10 ms per call on a busy CPU (measured here)
        dots = np.einsum("ij,j->i", mat, np.asarray(qvec, dtype=np.float32))
        sims = dots / np.maximum(np.sqrt(np.einsum("ij,ij->i", mat, mat)), 1e-12)
        return {int(i): float(s) for (i, _), s in zip(rows, sims)}

    def _rows(self, ids: list[int]) -> dict[int, tuple[Any, ...]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._query(
            f"SELECT id, source, section, page, line_start, line_end, text FROM chunks WHERE id IN ({marks})", ids
        )
        return {int(r[0]): tuple(r[1:]) for r in rows}

    def chunk(self, chunk_id: int) -> Hit | None:
        """The chunk with row id ``chunk_id`` as a :class:`Hit` (``score`` 0.0), or ``None`` when absent."""
        row = self._rows([int(chunk_id)]).get(int(chunk_id))
        if row is None:
            return None
        source, section, page, line_start, line_end, text = row
        return Hit(chunk_id=int(chunk_id), source=source, section=section, page=page, line_start=line_start,
                   line_end=line_end, text=text, score=0.0)

    # --- housekeeping --------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """JSON-ready facts about the index: ``path``, ``size_bytes``, ``chunks``, ``documents``,
        ``dimension``, ``metric``, ``embedder``, ``index_format``, ``vector_layout``."""
        (chunks,), = self._query("SELECT count(*) FROM chunks", ())
        (documents,), = self._query("SELECT count(DISTINCT source) FROM chunks", ())
        return {
            "path": str(self.db_path),
            "size_bytes": self.db_path.stat().st_size,
            "chunks": int(chunks),
            "documents": int(documents),
            "dimension": self.dimension,
            "metric": self.metric,
            "embedder": self.meta.get(index_format.META_EMBEDDER, ""),
            "index_format": int(self.meta.get(index_format.META_INDEX_FORMAT, "0")),
            "vector_layout": self.vector_layout,
        }

    def close(self) -> None:
        """Close the database connections and the BM25 worker thread (idempotent). The embedder stays open."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
        if self._fts_conn is not None:
            self._fts_conn.close()
            self._fts_conn = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
