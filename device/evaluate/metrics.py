"""Retrieval and answer-quality metrics: pure functions over plain Python values (no numpy, no I/O).

Conventions used throughout:

* A ranking is judged by a ``relevance`` list: ``relevance[i]`` is True when the item at rank ``i + 1`` is
  relevant (binary relevance). Ranks are 1-based in every docstring and return value.
* ``n_relevant`` is how many relevant items exist for the query (the recall denominator and the size of the
  ideal ranking of nDCG). fieldpack's eval asks for one target per question (a document, or a document
  section), so it collapses repeated hits of that target with :func:`first_relevant_only` and passes
  ``n_relevant=1``: recall@k is then the hit rate ("the target is in the top k").
* Averages over queries are arithmetic means; an empty population gives ``None`` (never a fake 0).

References:
    Järvelin, K. and Kekäläinen, J. (2002). Cumulated gain-based evaluation of IR techniques. ACM TOIS 20(4),
    422-446 (nDCG; here with binary gains and the log2(rank + 1) discount used by TREC tools).
    Voorhees, E. M. (1999). The TREC-8 question answering track report (mean reciprocal rank).
    Hyndman, R. J. and Fan, Y. (1996). Sample quantiles in statistical packages. The American Statistician
    50(4), 361-365 (percentiles: their definition 7, numpy's default "linear").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from fieldpack.shared.errors import UsageError


def _check_k(k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise UsageError(f"cutoff k={k!r} is not a positive integer", hint="use k >= 1 (e.g. --k 10)")


def first_relevant_only(relevance: Sequence[bool]) -> list[bool]:
    """Keep only the first relevant position (later relevant hits of the same single target count as misses).

    Example: ``[False, True, True] -> [False, True, False]``.
    """
    seen = False
    out: list[bool] = []
    for r in relevance:
        out.append(bool(r) and not seen)
        seen = seen or bool(r)
    return out


def first_relevant_rank(relevance: Sequence[bool]) -> int | None:
    """1-based rank of the first relevant item, or ``None`` when nothing in the list is relevant."""
    for i, r in enumerate(relevance):
        if r:
            return i + 1
    return None


def recall_at_k(relevance: Sequence[bool], k: int, n_relevant: int = 1) -> float:
    """Share of the ``n_relevant`` relevant items found in the top ``k``: ``|relevant in top k| / n_relevant``.

    Args:
        relevance: binary relevance by rank (see module doc).
        k: cutoff (>= 1); a list shorter than ``k`` is judged as it is.
        n_relevant: relevant items that exist for the query (>= 1).

    Returns:
        A value in [0, 1]; with ``n_relevant=1`` it is 1.0 if a relevant item is in the top ``k``, else 0.0.

    Raises:
        UsageError: ``k`` < 1, ``n_relevant`` < 1, or more relevant items in the list than ``n_relevant``.
    """
    _check_k(k)
    if n_relevant < 1:
        raise UsageError(f"n_relevant={n_relevant} must be >= 1", hint="skip queries that have no relevant item")
    found = sum(1 for r in relevance[:k] if r)
    if sum(1 for r in relevance if r) > n_relevant:
        raise UsageError(f"the ranking holds more relevant items than n_relevant={n_relevant}",
                         hint="pass the true count, or collapse repeats with first_relevant_only()")
    return found / n_relevant


def reciprocal_rank(relevance: Sequence[bool]) -> float:
    """``1 / rank`` of the first relevant item, 0.0 when none is relevant (the per-query term of MRR)."""
    rank = first_relevant_rank(relevance)
    return 0.0 if rank is None else 1.0 / rank


def dcg_at_k(relevance: Sequence[bool], k: int) -> float:
    """Discounted cumulated gain with binary gains: ``sum_{i=1..k} rel_i / log2(i + 1)`` (Järvelin & Kekäläinen
    2002). Raises UsageError when ``k`` < 1."""
    _check_k(k)
    return sum(1.0 / math.log2(i + 2) for i, r in enumerate(relevance[:k]) if r)


def ndcg_at_k(relevance: Sequence[bool], k: int, n_relevant: int | None = None) -> float:
    """Normalised DCG at ``k``: DCG@k over the DCG@k of the ideal ranking (all relevant items first).

    Args:
        relevance: binary relevance by rank.
        k: cutoff (>= 1).
        n_relevant: relevant items that exist; the ideal ranking puts ``min(k, n_relevant)`` of them first.
            ``None``: the number of relevant items in ``relevance`` (judges the order of what was retrieved).

    Returns:
        A value in [0, 1]; 0.0 when there is no relevant item at all. One relevant item at rank 2 with
        ``n_relevant=1`` gives ``1 / log2(3)`` ≈ 0.631.

    Raises:
        UsageError: ``k`` < 1 or ``n_relevant`` < 0.
    """
    _check_k(k)
    n = sum(1 for r in relevance if r) if n_relevant is None else n_relevant
    if n < 0:
        raise UsageError(f"n_relevant={n_relevant} must be >= 0", hint="pass the number of relevant items")
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, n)))
    return 0.0 if ideal == 0.0 else dcg_at_k(relevance, k) / ideal


def recall_curve(ranks: Sequence[int | None], max_k: int) -> list[float]:
    """Recall@k for k = 1..max_k over queries with one target, from each query's first relevant rank.

    Args:
        ranks: per query, the 1-based rank of its target, or ``None`` when not retrieved.
        max_k: last cutoff (>= 1).

    Returns:
        ``max_k`` floats in [0, 1], non-decreasing; ``[]`` when ``ranks`` is empty.
    """
    _check_k(max_k)
    if not ranks:
        return []
    return [sum(1 for r in ranks if r is not None and r <= k) / len(ranks) for k in range(1, max_k + 1)]


def page_ranking(sources: Sequence[str]) -> list[str]:
    """Distinct pages in order of first appearance: the page ranking a chunk ranking implies.

    A page is ranked where its best chunk is (the chunk ranking is best first). Example:
    ``["a", "b", "a", "c"] -> ["a", "b", "c"]``.
    """
    out: list[str] = []
    seen: set[str] = set()
    for s in sources:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean, or ``None`` for an empty population."""
    vals = list(values)
    return sum(vals) / len(vals) if vals else None


def rate(flags: Iterable[bool]) -> float | None:
    """Share of True values in [0, 1], or ``None`` when there are none to judge."""
    vals = [bool(f) for f in flags]
    return sum(vals) / len(vals) if vals else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (Hyndman & Fan
    definition 7, numpy's default). ``None`` for an empty sample.

    Raises:
        UsageError: ``q`` outside [0, 100] or a NaN in ``values``.
    """
    if not 0.0 <= q <= 100.0:
        raise UsageError(f"percentile q={q} is outside [0, 100]", hint="use e.g. 50 or 95")
    if not values:
        return None
    xs = sorted(float(v) for v in values)
    if any(math.isnan(x) for x in xs):
        raise UsageError("a latency sample is NaN", hint="drop failed measurements before computing percentiles")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(values_ms: Sequence[float]) -> dict[str, float | int | None]:
    """``{"n", "p50", "p95", "mean", "max"}`` of a latency sample in milliseconds (``None`` figures if empty)."""
    return {"n": len(values_ms), "p50": percentile(values_ms, 50), "p95": percentile(values_ms, 95),
            "mean": mean(values_ms), "max": max(values_ms) if values_ms else None}


def normalize_text(text: str) -> str:
    """Casefold and collapse every run of whitespace to one space (how ``answer_contains`` is compared)."""
    return " ".join(text.casefold().split())


def contains_all(answer: str, needles: Sequence[str]) -> bool:
    """True when every needle occurs in ``answer`` after :func:`normalize_text` on both (vacuously True)."""
    hay = normalize_text(answer)
    return all(normalize_text(n) in hay for n in needles)


def contains_share(answer: str, needles: Sequence[str]) -> float | None:
    """Share of needles found in ``answer`` (normalised as :func:`contains_all`), ``None`` if there are none."""
    if not needles:
        return None
    hay = normalize_text(answer)
    return sum(1 for n in needles if normalize_text(n) in hay) / len(needles)
