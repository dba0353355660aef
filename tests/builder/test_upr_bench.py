"""The UPR scorer of the reranking benchmark (benchmarks/rerank.py, option (c)): its one-decode, logits-at-the-
question's-positions score equals the question's mean log-likelihood computed the plain way (every position's
logits), on the real Gemma 3 270M; and the KV cache is cleared between candidates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

QUESTION = "A query has been running for an hour. How do I stop just that query?"
ON_TOPIC = ("pg_cancel_backend(pid) cancels the current query of the session whose backend process has the given "
            "process ID; pg_stat_activity lists the process IDs of running queries.")
OFF_TOPIC = "The sand filter is backwashed after 72 hours of running, or earlier when the pressure drop exceeds 0.5 bar."


def _reference(gguf: Path, doc: str, q: str) -> float:
    """Mean log P(question token | prefix) from a ``logits_all`` context's scores for the whole sequence."""
    import llama_cpp

    from benchmarks.rerank import UPR_PROMPT
    from fieldpack.shared.llama_backend import llama_cpp_module

    llm = llama_cpp_module(llama_cpp).Llama(str(gguf), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2,
                                            logits_all=True, verbose=False)
    pre = llm.tokenize(UPR_PROMPT.format(doc=doc).encode(), add_bos=True)
    toks = pre + llm.tokenize(f" {q}".encode(), add_bos=False)
    llm.eval(toks)
    rows = np.asarray(llm.scores[:len(toks)], dtype=np.float64)
    lp = rows - rows.max(axis=1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(axis=1, keepdims=True))
    return float(np.mean([lp[i, toks[i + 1]] for i in range(len(pre) - 1, len(toks) - 1)]))


def test_upr_score_is_the_questions_mean_log_likelihood(gemma_gguf: Path) -> None:
    import llama_cpp

    from benchmarks.rerank import _upr_score
    from fieldpack.shared.llama_backend import llama_cpp_module

    llm = llama_cpp_module(llama_cpp).Llama(str(gemma_gguf), n_ctx=512, n_batch=512, n_ubatch=512, n_threads=2,
                                            verbose=False)
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    try:
        on = _upr_score(llm, llama_cpp, batch, ON_TOPIC, QUESTION)
        off = _upr_score(llm, llama_cpp, batch, OFF_TOPIC, QUESTION)
        again = _upr_score(llm, llama_cpp, batch, ON_TOPIC, QUESTION)
    finally:
        llama_cpp.llama_batch_free(batch)
    assert on == pytest.approx(_reference(gemma_gguf, ON_TOPIC, QUESTION), abs=2e-3)
    assert again == pytest.approx(on, abs=1e-6)  # nothing of the off-topic candidate is left in the KV cache
    assert on > off + 0.1  # the passage that answers the question makes it likelier
