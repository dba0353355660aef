"""Second-stage reranking of retrieval candidates with a cross-encoder on ONNX Runtime + HF ``tokenizers``.

A cross-encoder reads the question and one passage together (``[CLS] question [SEP] passage [SEP]``) and
outputs one relevance logit (Nogueira & Cho, "Passage Re-ranking with BERT", 2019). It is far more costly
than the first stage (one encoder pass per candidate), so it scores only the top ``n`` candidates of the
hybrid search, and its ranking is fused with the first-stage ranking by weighted reciprocal rank fusion
(:func:`fuse_ranks`), so one bad cross-encoder score cannot throw out a candidate both first-stage lists agree on.

The ONNX graph is the one :func:`builder.reranker_train.export_reranker` writes: inputs ``input_ids``,
``attention_mask``, ``token_type_ids`` ``(batch, seq) int64``; output ``logits`` ``(batch,) float32``.
No torch, no transformers: the device runs this.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fieldpack.retrieval.embedder import cpu_session, load_tokenizer
from fieldpack.retrieval.search import reciprocal_rank_fusion
from fieldpack.retrieval.types import Hit
from fieldpack.shared.errors import RuntimeLoadError, UsageError

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

#: Candidates the device reranks by default (the top of the hybrid page ranking).
DEFAULT_RERANK_CANDIDATES = 20


def passage_text(section: str, text: str) -> str:
    """What the cross-encoder reads of a chunk: its heading path as a title line, then its text (the same
    layout the embedder gets, ``Chunk.embedding_text``)."""
    return f"{section}\n{text}" if section else text


def fuse_ranks(n: int, scores: np.ndarray, *, weight: float, rrf_k: int = 60) -> list[int]:
    """Order ``n`` candidates (first-stage order ``0..n-1``) by weighted RRF of the first-stage rank (weight 1)
    and the cross-encoder rank (``weight``; ``inf``: the cross-encoder order alone).

    Args:
        n: number of candidates.
        scores: ``(n,)`` cross-encoder logits, higher is more relevant.
        weight: RRF weight of the cross-encoder list (>= 0).
        rrf_k: the RRF constant (Cormack et al. 2009).

    Returns:
        Candidate positions ``0..n-1``, best first.
    """
    if scores.shape != (n,):
        raise UsageError(f"{scores.shape} scores for {n} candidates", hint="give one score per candidate")
    ce_order = [int(i) for i in np.argsort(-scores, kind="stable")]
    if weight == float("inf"):
        return ce_order
    return [i for i, _ in reciprocal_rank_fusion([list(range(n)), ce_order], k=rrf_k, weights=(1.0, weight))]


class OnnxReranker:
    """Scores (question, passage) pairs with an ONNX cross-encoder.

    Args:
        onnx_path: the ``reranker.onnx`` file (fp32 or int8 dynamic-quantised).
        tokenizer_path: its HF ``tokenizer.json``.
        max_tokens: pair length in tokens (special tokens included); the longer side is cut first.
        threads: ONNX Runtime intra-op threads; ``None``: every core.

    Raises:
        RuntimeLoadError: a file is missing or cannot be loaded, or the graph lacks ``input_ids``.
        UsageError: ``max_tokens`` < 8 or ``threads`` < 1.
    """

    def __init__(self, onnx_path: Path, tokenizer_path: Path, *, max_tokens: int = 256,
                 threads: int | None = None) -> None:
        onnx_path, tokenizer_path = Path(onnx_path), Path(tokenizer_path)
        if max_tokens < 8:
            raise UsageError(f"max_tokens={max_tokens} is too small for the reranker", hint="use at least 8")
        if threads is not None and threads < 1:
            raise UsageError(f"threads={threads} is not a thread count", hint="give 1 or more, or None for all")
        for p, what in ((onnx_path, "ONNX reranker"), (tokenizer_path, "reranker tokenizer")):
            if not p.is_file():
                raise RuntimeLoadError(f"{what} file {p} does not exist",
                                       hint="reinstall the bundle or point at the right file")
        self.onnx_path = onnx_path
        self.max_tokens = max_tokens
        self._tokenizer = load_tokenizer(tokenizer_path, max_tokens=max_tokens)
        self._session: onnxruntime.InferenceSession | None = cpu_session(onnx_path, threads, what="reranker")
        self._inputs = [i.name for i in self._session.get_inputs()]
        if "input_ids" not in self._inputs:
            raise RuntimeLoadError(f"ONNX reranker {onnx_path} has no input_ids input (it has {self._inputs})",
                                   hint="export the reranker with fieldpack (builder.reranker_train)")

    def score(self, query: str, passages: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """Relevance logits of ``passages`` for ``query``.

        Returns:
            ``(len(passages),) float32``, higher is more relevant (uncalibrated logits).

        Raises:
            RuntimeLoadError: the reranker is closed or ONNX Runtime fails.
        """
        if self._session is None:
            raise RuntimeLoadError(f"reranker {self.onnx_path} is closed", hint="create a new OnnxReranker")
        out = np.empty(len(passages), dtype=np.float32)
        for start in range(0, len(passages), batch_size):
            encs = self._tokenizer.encode_batch([(query, p) for p in passages[start:start + batch_size]])
            arrays = {
                "input_ids": np.asarray([e.ids for e in encs], dtype=np.int64),
                "attention_mask": np.asarray([e.attention_mask for e in encs], dtype=np.int64),
                "token_type_ids": np.asarray([e.type_ids for e in encs], dtype=np.int64),
            }
            try:
                logits = self._session.run(None, {k: v for k, v in arrays.items() if k in self._inputs})[0]
            except Exception as exc:  # onnxruntime's RuntimeException family
                raise RuntimeLoadError(f"ONNX Runtime failed scoring with {self.onnx_path}: {exc}",
                                       hint="check that the reranker file matches its tokenizer") from exc
            out[start:start + len(encs)] = np.asarray(logits, dtype=np.float32).reshape(-1)
        return out

    def rerank(self, query: str, hits: Sequence[Hit], *, n: int = DEFAULT_RERANK_CANDIDATES,
               weight: float = 1.0) -> list[Hit]:
        """The first ``n`` of ``hits`` (first-stage order) reordered by :func:`fuse_ranks`, then the rest as they
        were. ``weight``: the cross-encoder list's RRF weight."""
        head, tail = list(hits[:n]), list(hits[n:])
        if len(head) < 2:
            return list(hits)
        scores = self.score(query, [passage_text(h.section, h.text) for h in head])
        return [head[i] for i in fuse_ranks(len(head), scores, weight=weight)] + tail

    def close(self) -> None:
        """Release the ONNX Runtime session (idempotent)."""
        self._session = None

    def __enter__(self) -> OnnxReranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
