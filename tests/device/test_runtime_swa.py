"""The device's sliding-window KV cache (``device.runtime.load_llama``: ``swa_full=False``) and the guard on
llama-cpp-python's prompt-prefix reuse (``forget_unsafe_prefix``), on a tiny Gemma 3 whose sliding layers see 8
positions: a prompt sharing a short prefix with a long earlier one is scored exactly as by a fresh context; a
prompt that extends the cached one still reuses it; without the guard the first case is scored on a broken
cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fieldpack.builder.convert import convert_hf_to_gguf
from fieldpack.device.runtime import forget_unsafe_prefix, load_llama
from tests.conftest import DEMO_DOCS

N_CTX = 2048


@pytest.fixture(scope="module")
def gemma_gguf_tiny(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_hf_to_gguf(tiny_gemma_dir, tmp_path_factory.mktemp("swa") / "tiny-gemma.gguf").path


@pytest.fixture(scope="module")
def tiny_llama_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_hf_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("noswa") / "tiny-llama.gguf").path


@pytest.fixture(scope="module")
def long_tokens(gemma_gguf_tiny: Path) -> list[int]:
    llm = load_llama(gemma_gguf_tiny, n_ctx=N_CTX, threads=2)
    text = "\n".join(p.read_text() for p in sorted(DEMO_DOCS.glob("*.*")))
    toks: list[int] = []
    while len(toks) < 1400:
        toks += llm.tokenize(text.encode(), add_bos=False)
    llm.close()
    return toks[:1400]


def _scores(llm: object, tokens: list[int], *, guard: bool) -> tuple[np.ndarray, bool]:
    """The last prompt position's logits after ``create_completion(tokens, max_tokens=1)``, and whether the guard
    dropped the cached prefix."""
    import llama_cpp

    dropped = forget_unsafe_prefix(llm, tokens) if guard else False
    llm.create_completion(tokens, max_tokens=1, temperature=0.0, top_k=1)  # type: ignore[attr-defined]
    n_vocab = llm.n_vocab()  # type: ignore[attr-defined]
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)).copy(), dropped  # type: ignore[attr-defined]


def _fresh(gguf: Path, tokens: list[int]) -> np.ndarray:
    llm = load_llama(gguf, n_ctx=N_CTX, threads=2)
    try:
        return _scores(llm, tokens, guard=True)[0]
    finally:
        llm.close()


def test_the_sliding_layers_cache_holds_the_window_not_n_ctx(gemma_gguf_tiny: Path, long_tokens: list[int]) -> None:
    import llama_cpp

    llm = load_llama(gemma_gguf_tiny, n_ctx=N_CTX, threads=2)
    try:
        assert llama_cpp.llama_model_n_swa(llm.model) == 8
        _scores(llm, long_tokens[:1200], guard=True)
        # the oldest position the sliding layers still hold: far from 0 once the prompt outgrew window + batch
        assert llama_cpp.llama_memory_seq_pos_min(llama_cpp.llama_get_memory(llm.ctx), 0) > 100
    finally:
        llm.close()


def test_a_short_shared_prefix_is_re_evaluated_and_a_long_one_reused(gemma_gguf_tiny: Path,
                                                                      long_tokens: list[int]) -> None:
    first = long_tokens[:1200]
    branch = long_tokens[:100] + long_tokens[1300:1400]   # shares 100 tokens with `first`, the rest is new
    extend = long_tokens[:1250]                           # `first` plus 50 tokens
    llm = load_llama(gemma_gguf_tiny, n_ctx=N_CTX, threads=2)
    try:
        _scores(llm, first, guard=True)
        got, dropped = _scores(llm, branch, guard=True)
        assert dropped
        np.testing.assert_allclose(got, _fresh(gemma_gguf_tiny, branch), atol=1e-4)

        _scores(llm, first, guard=True)
        got, dropped = _scores(llm, extend, guard=True)
        assert not dropped  # every cell the 50 new tokens attend to is still cached: the prefix is reused
        np.testing.assert_allclose(got, _fresh(gemma_gguf_tiny, extend), atol=1e-4)
    finally:
        llm.close()


def test_load_llama_guards_every_completion_by_itself(gemma_gguf_tiny: Path, long_tokens: list[int]) -> None:
    first, branch = long_tokens[:1200], long_tokens[:100] + long_tokens[1300:1400]
    llm = load_llama(gemma_gguf_tiny, n_ctx=N_CTX, threads=2)
    try:
        _scores(llm, first, guard=False)
        got = _scores(llm, branch, guard=False)[0]  # no explicit call: create_completion's generate runs it
    finally:
        llm.close()
    np.testing.assert_allclose(got, _fresh(gemma_gguf_tiny, branch), atol=1e-4)


def test_without_the_guard_the_reused_prefix_is_broken(gemma_gguf_tiny: Path, long_tokens: list[int]) -> None:
    """The reason for the guard: llama-cpp-python 0.3.36 reuses the prefix though the sliding layers lost it."""
    import llama_cpp

    from fieldpack.shared.llama_backend import llama_cpp_module

    first, branch = long_tokens[:1200], long_tokens[:100] + long_tokens[1300:1400]
    # a plain Llama as load_llama configures it, without the guard load_llama adds
    llm = llama_cpp_module(llama_cpp).Llama(str(gemma_gguf_tiny), n_ctx=N_CTX, n_threads=2, n_threads_batch=2,
                                            n_batch=512, verbose=False, seed=0, swa_full=False)
    try:
        _scores(llm, first, guard=False)
        try:
            got = _scores(llm, branch, guard=False)[0]
        except RuntimeError:  # a llama.cpp that refuses the inconsistent cache outright is broken loudly
            return
    finally:
        llm.close()
    assert np.abs(got - _fresh(gemma_gguf_tiny, branch)).max() > 1e-3


def test_a_model_without_a_sliding_window_keeps_its_prefix(tiny_llama_gguf: Path) -> None:
    llm = load_llama(tiny_llama_gguf, n_ctx=512, threads=2)
    try:
        toks = llm.tokenize(b"The pump is running and the filter needs a backwash soon.", add_bos=True)
        _scores(llm, toks, guard=True)
        assert not forget_unsafe_prefix(llm, toks[:3] + toks[::-1])
    finally:
        llm.close()
