"""Perplexity and KL divergence of GGUF models, computed with llama.cpp's own forward pass.

Method (llama.cpp ``tools/perplexity/perplexity.cpp``, ``perplexity()`` and ``kl_divergence()``): the texts
are joined and tokenized once; the token stream is cut into non-overlapping windows of ``n_ctx`` tokens; each
window is evaluated from an empty KV cache (its first token replaced by BOS when the model adds one), and only
the second half of each window is scored, so every scored token has at least ``n_ctx/2`` tokens of context.
Perplexity is ``exp(mean NLL)`` over the scored tokens. For KLD the same windows go through a reference and a
test model; per scored position ``KL(p_ref || p_test) = sum_v p_ref(v) * (log p_ref(v) - log p_test(v))``,
computed in float64 from log-softmaxed logits, and top-1 agreement is the share of positions where both
models' argmax token is the same.

Both models must share a vocabulary (a quantized file and the F16/F32 it came from always do).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from fieldpack.builder.progress import report
from fieldpack.shared.errors import InputNotFoundError, ModelLoadError, UsageError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalFigures:
    """Quality of a test GGUF against a reference GGUF on the same scored tokens.

    Attributes:
        ppl_ref / ppl_test: perplexity (exp of mean NLL in nats) of each model.
        delta_ppl: ``ppl_test - ppl_ref``.
        kld_mean: mean KL(ref || test) per scored token, nats.
        kld_p99: 99th percentile of the per-token KLD, nats.
        top1_agreement: share (0..1) of scored positions where both argmax tokens are equal.
        tokens_scored: number of scored positions (second half of each window).
        chunks: windows evaluated. n_ctx: window length in tokens.
    """

    ppl_ref: float
    ppl_test: float
    delta_ppl: float
    kld_mean: float
    kld_p99: float
    top1_agreement: float
    tokens_scored: int
    chunks: int
    n_ctx: int


_log_lock = threading.RLock()  # guards the capture stack below; other threads wait for the outermost
_log_sinks: list[list[str]] = []  # the lists of the active captures, outermost first (guarded by _log_lock)
_log_callback: Any = None  # the ctypes callback, kept alive while llama.cpp holds it


@contextlib.contextmanager
def capture_llama_log() -> Iterator[list[str]]:
    """Route llama.cpp's log to a list of lines (and to DEBUG logging) for the duration; restore the binding's
    callback. Used around every builder-side llama.cpp load, quantization and evaluation, so that llama.cpp's notes
    stay off the user's terminal and a failure can quote llama.cpp's own cause.

    Reentrant: a capture inside another one (an evaluation load inside the quality stage's capture) shares the
    installed callback, every active capture's list gets the lines, and only the outermost restores the binding's
    callback. Other threads wait for the outermost capture to end."""
    global _log_callback
    import llama_cpp
    import llama_cpp._logger as binding_logger

    lines: list[str] = []
    with _log_lock:
        outermost = not _log_sinks
        _log_sinks.append(lines)
        if outermost:
            @llama_cpp.llama_log_callback
            def _cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
                s = text.decode("utf-8", errors="replace")
                for sink in _log_sinks:
                    sink.append(s)
                logger.debug("llama.cpp: %s", s.rstrip())

            _log_callback = _cb
            llama_cpp.llama_log_set(_cb, ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            _log_sinks.pop()
            if outermost:
                llama_cpp.llama_log_set(binding_logger.llama_log_callback, ctypes.c_void_p(0))
                _log_callback = None



def llama_cause(lines: list[str]) -> str:
    """`` (llama.cpp: LINE)`` for the first line of a :func:`capture_llama_log` capture that mentions a failure
    or an error (llama.cpp's own cause of a failed load), else ``""``; meant to be appended to an error message."""
    said = next((ln.strip() for ln in lines if "fail" in ln or "error" in ln), "")
    return f" (llama.cpp: {said})" if said else ""


def default_threads() -> int:
    """Threads for llama.cpp: the CPUs this process may use (at least 1)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def vocab_only(path: Path) -> Any:
    """llama.cpp's tokenizer of a GGUF: a ``llama_cpp.Llama`` loaded with ``vocab_only`` (no weights, no
    hyperparameters). llama.cpp still makes a context for it and warns ``n_ctx_seq (512) > n_ctx_train (0)``,
    since a vocab-only load reads no context length; that log goes to DEBUG instead of the user's terminal (a
    trial of ``fieldpack plan`` saw it after the conversion). Close it with ``.close()``.

    Raises:
        ValueError, RuntimeError, OSError: as ``llama_cpp.Llama`` (callers translate them).
    """
    from llama_cpp import Llama


    with capture_llama_log():
        return Llama(model_path=str(path), vocab_only=True, verbose=False)


@contextlib.contextmanager
def open_gguf(path: Path, *, n_ctx: int, logits_all: bool = True, f32_kv: bool = False,
              lora_path: Path | None = None) -> Iterator[Any]:
    """Load a GGUF with llama-cpp-python for evaluation and close it afterwards.

    Args:
        path: GGUF file.
        n_ctx: context length (tokens) of the llama.cpp context.
        logits_all: keep the logits of every position (needed for scoring), ``(n_tokens, n_vocab)`` float32.
        f32_kv: store the KV cache in F32 instead of F16 (isolates conversion error from cache rounding).
        lora_path: a llama.cpp LoRA adapter GGUF applied at scale 1.0 on top of ``path`` (mmap is then off).

    Yields:
        a ``llama_cpp.Llama``.

    Raises:
        InputNotFoundError: ``path`` does not exist.
        ModelLoadError: llama.cpp cannot load the file (corrupt, unknown architecture or tokenizer).
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"GGUF file {path} does not exist", hint="convert or quantize the model first")
    if lora_path is not None and not Path(lora_path).is_file():
        raise InputNotFoundError(f"LoRA adapter {lora_path} does not exist", hint="rebuild with --ship-adapter")
    import llama_cpp

    from fieldpack.shared.llama_backend import llama_cpp_module

    Llama = llama_cpp_module(llama_cpp).Llama
    GGML_TYPE_F32 = llama_cpp.GGML_TYPE_F32
    kv: dict[str, Any] = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_kv else {}
    if lora_path is not None:
        kv["lora_path"] = str(lora_path)

    log_lines: list[str] = []
    try:
        with capture_llama_log() as log_lines:  # llama.cpp's notes at load (e.g. a full-size SWA cache) go to DEBUG
            llm = Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                n_threads=default_threads(), n_gpu_layers=0, seed=0, verbose=False, **kv,
            )
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(
            f"llama.cpp cannot load {path}{f' with adapter {lora_path}' if lora_path else ''}: {exc}"
            + llama_cause(log_lines),
            hint="the file is not a GGUF this llama.cpp build supports; re-convert it with fieldpack",
        ) from exc
    try:
        yield llm
    finally:
        llm.close()


def adds_bos(llm: Any) -> bool:
    """Whether llama.cpp adds BOS when tokenizing plain text with this model (``tokenizer.ggml.add_bos_token``)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))


def logits_for(llm: Any, tokens: list[int]) -> np.ndarray:
    """Run ``tokens`` through a fresh KV cache; return ``(len(tokens), n_vocab)`` float32 logits."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32, copy=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Natural-log softmax over the last axis, in float64 (max-shifted, so large logits do not overflow).

    Args:
        logits: ``(..., n_vocab)`` logits of any float dtype.

    Returns:
        ``(..., n_vocab)`` float64 log-probabilities (nats); each row's ``exp`` sums to 1.
    """
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def continuation_logprobs(llm: Any, prompt: list[int], continuation: list[int]) -> np.ndarray:
    """Teacher-forced log-probability of each token of ``continuation`` after ``prompt``.

    ``prompt + continuation`` runs through a fresh KV cache in one pass (``llm`` must have been opened with
    ``logits_all=True``, as :func:`open_gguf` does by default); the logits at position ``i`` predict token
    ``i + 1``.

    Args:
        llm: a ``llama_cpp.Llama`` (from :func:`open_gguf`) whose context holds both token lists.
        prompt: token ids already in the context before the continuation (BOS included if the model wants one);
            at least one token.
        continuation: token ids to score, at least one.

    Returns:
        ``(len(continuation),)`` float64 log-probabilities (nats); their sum is ``log P(continuation | prompt)``.

    Raises:
        UsageError: ``prompt`` or ``continuation`` is empty.
    """
    if not prompt or not continuation:
        raise UsageError("continuation scoring needs a non-empty prompt and continuation",
                         hint="pass at least one token in each (a BOS token for an empty prompt)")
    n = len(prompt)
    logp = log_softmax(logits_for(llm, list(prompt) + list(continuation))[n - 1 : n - 1 + len(continuation)])
    return logp[np.arange(len(continuation)), np.asarray(continuation)]


class TooLittleEvalTextError(UsageError):
    """The held-out text is shorter than one perplexity window (a very small document set)."""


def _windows(llm: Any, texts: list[str], n_ctx: int, max_chunks: int | None) -> tuple[list[list[int]], bool]:
    if n_ctx < 8 or n_ctx % 2:
        raise UsageError(f"n_ctx={n_ctx} is too small or odd", hint="use an even n_ctx of at least 8 tokens")
    text = "\n\n".join(t for t in texts if t.strip())
    if not text:
        raise UsageError("No text to evaluate perplexity on", hint="pass at least one non-empty text")
    add_bos = adds_bos(llm)
    stream = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    n_chunks = len(stream) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)
    if n_chunks < 1:
        raise TooLittleEvalTextError(
            f"The evaluation text has {len(stream)} tokens, fewer than one window of n_ctx={n_ctx}",
            hint="pass more text or a smaller n_ctx",
        )
    windows = []
    for c in range(n_chunks):
        w = list(stream[c * n_ctx : (c + 1) * n_ctx])
        if add_bos:
            w[0] = llm.token_bos()  # as llama-perplexity does
        windows.append(w)
    return windows, add_bos


def _scored_logprobs(llm: Any, w: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One window's scored half: ``(n/2 - 1, n_vocab)`` float64 log-probabilities and the targets they predict
    (tokens ``n/2 + 1 .. n - 1``)."""
    n = len(w)
    first = n // 2
    return log_softmax(logits_for(llm, w)[first : n - 1]), np.asarray(w[first + 1 : n])


def _window_nll(llm: Any, windows: list[list[int]]) -> np.ndarray:
    nll: list[np.ndarray] = []
    for w in windows:
        logp, targets = _scored_logprobs(llm, w)
        nll.append(-logp[np.arange(len(targets)), targets])
    return np.concatenate(nll)


def perplexity(gguf: Path, texts: list[str], n_ctx: int = 256, *, max_chunks: int | None = None) -> float:
    """Perplexity of ``gguf`` on ``texts`` by llama-perplexity's method (second half of each window scored).

    Raises:
        UsageError: n_ctx too small/odd, or the text is shorter than one window.
        InputNotFoundError / ModelLoadError: the GGUF cannot be loaded.
    """
    with open_gguf(Path(gguf), n_ctx=n_ctx) as llm:
        windows, _ = _windows(llm, texts, n_ctx, max_chunks)
        nll = _window_nll(llm, windows)
    return float(math.exp(nll.mean()))


def perplexity_kld(
    ref_gguf: Path,
    test_gguf: Path,
    texts: list[str],
    *,
    n_ctx: int = 256,
    max_chunks: int | None = None,
    test_lora: Path | None = None,
) -> EvalFigures:
    """Perplexity of both models and KL divergence of ``test_gguf`` from ``ref_gguf`` on the same windows.

    The windows are built with the reference model's tokenizer and fed as token ids to both models. Both models
    are loaded at once and the windows go through them one by one, so memory holds one window's log-probabilities
    (``(n_ctx/2 - 1, n_vocab)`` float64 per model: 266 MB at n_ctx 256 on Gemma 3's 262,144-token vocabulary),
    not the whole held-out set's (which at 64 held-out chunks was tens of GB and took a build out of memory).

    Args:
        ref_gguf: reference model (usually the F16 conversion).
        test_gguf: model under test (a quantization of the reference).
        texts: held-out text; joined with blank lines.
        n_ctx: window length in tokens (even, >= 8).
        max_chunks: evaluate at most this many windows.
        test_lora: a llama.cpp LoRA adapter GGUF applied to ``test_gguf`` (a bundle built with
            ``--ship-adapter``: base model + adapter against the merged adapted model).

    Raises:
        UsageError: bad n_ctx, too little text, or the two models have different vocabulary sizes.
        InputNotFoundError / ModelLoadError: a GGUF cannot be loaded.
    """
    with open_gguf(Path(ref_gguf), n_ctx=n_ctx) as ref, \
            open_gguf(Path(test_gguf), n_ctx=n_ctx, lora_path=test_lora) as test:
        if test.n_vocab() != ref.n_vocab():
            raise UsageError(
                f"{test_gguf} has {test.n_vocab()} tokens but {ref_gguf} has {ref.n_vocab()}",
                hint="compare a quantized model only with the model it was quantized from",
            )
        windows, _ = _windows(ref, texts, n_ctx, max_chunks)
        parts: dict[str, list[np.ndarray]] = {"nll_ref": [], "nll_test": [], "kld": [], "top1": []}
        report(0, len(windows), "held-out windows")
        for i, w in enumerate(windows, 1):  # one window at a time: nothing of size (tokens, n_vocab) outlives it
            lr, targets = _scored_logprobs(ref, w)
            lt, _ = _scored_logprobs(test, w)
            rows = np.arange(len(targets))
            parts["nll_ref"].append(-lr[rows, targets])
            parts["nll_test"].append(-lt[rows, targets])
            parts["kld"].append((np.exp(lr) * (lr - lt)).sum(axis=-1))  # (n/2 - 1,) float64, nats
            parts["top1"].append(lr.argmax(-1) == lt.argmax(-1))
            report(i, len(windows), "held-out windows")  # the build's progress bar (a minute or more on a CPU)
    nll_ref, nll_test, kld, agree = (np.concatenate(parts[k]) for k in ("nll_ref", "nll_test", "kld", "top1"))
    top1 = float(agree.mean())
    ppl_ref, ppl_test = float(math.exp(nll_ref.mean())), float(math.exp(nll_test.mean()))
    figures = EvalFigures(
        ppl_ref=ppl_ref,
        ppl_test=ppl_test,
        delta_ppl=ppl_test - ppl_ref,
        kld_mean=float(kld.mean()),
        kld_p99=float(np.percentile(kld, 99)),
        top1_agreement=top1,
        tokens_scored=int(kld.size),
        chunks=len(windows),
        n_ctx=n_ctx,
    )
    logger.info(
        "%s vs %s: PPL %.4f -> %.4f (Δ %+.4f), KLD mean %.5f p99 %.5f, top-1 %.4f over %d tokens",
        Path(test_gguf).name, Path(ref_gguf).name, ppl_ref, ppl_test, figures.delta_ppl, figures.kld_mean,
        figures.kld_p99, top1, figures.tokens_scored,
    )
    return figures
