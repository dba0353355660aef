"""The compression quality report: one row per model variant, all measured through llama.cpp on this machine.

Each row: stage, method, sparsity or pattern, parameters, GGUF bytes, perplexity on the held-out domain chunks,
ΔPPL and mean KLD against the dense F16 (llama-perplexity's method, :func:`builder.llama_eval.perplexity_kld`),
top-1 agreement with the dense F16, and prompt (prefill) and decode tokens/s of llama.cpp on this machine's CPU.

What the numbers mean for sparsity: :data:`SPARSITY_NOTE`.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The plain statement every report carries.
SPARSITY_NOTE = (
    "Unstructured and N:M (2:4, 4:8) sparsity are stored densely in GGUF: the zeros take as many bytes as any "
    "other weight, and llama.cpp has no sparse kernels, so a sparse model is neither smaller nor faster in "
    "llama.cpp today; only depth and width pruning (fewer blocks, narrower matrices) and quantization change "
    "size and speed."
)

#: Text used to time prompt processing and decoding (content does not change llama.cpp's speed).
_SPEED_TEXT = ("Check the suction pressure before restarting the pump, then record the flow rate, the valve "
               "positions and the alarm history in the shift log. ")


@dataclass(frozen=True)
class SpeedFigures:
    """llama.cpp throughput on this machine.

    Attributes:
        prompt_tps: prompt (prefill) tokens per second for ``n_prompt`` tokens in one batch.
        decode_tps: generated tokens per second, one token per ``llama_decode``, greedy.
        n_prompt / n_decode: tokens timed. threads: llama.cpp threads. repeats: best of this many runs.
    """

    prompt_tps: float
    decode_tps: float
    n_prompt: int
    n_decode: int
    threads: int
    repeats: int
    decode_tps_runs: tuple[float, ...] = ()

    @property
    def decode_tps_min(self) -> float:
        """Slowest run (tokens/s); equals ``decode_tps`` when only one run was timed."""
        return min(self.decode_tps_runs, default=self.decode_tps)

    @property
    def decode_tps_max(self) -> float:
        """Fastest run (tokens/s)."""
        return max(self.decode_tps_runs, default=self.decode_tps)


@dataclass
class QualityRow:
    """One line of the quality table (see the module docstring); ``None`` where a figure was not measured."""

    stage: str
    method: str
    sparsity: str
    params: int
    gguf_bytes: int
    ppl: float | None
    delta_ppl: float | None
    kld_mean: float | None
    top1_agreement: float | None
    decode_tps: float | None
    prompt_tps: float | None
    size_ratio: float | None = None
    decode_ratio: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes None)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def gguf_params(path: Path) -> int:
    """Number of weights (elements of every tensor) in a GGUF file."""
    import gguf

    return int(sum(int(t.n_elements) for t in gguf.GGUFReader(Path(path)).tensors))


def fit_eval_ctx(ref_gguf: Path, texts: list[str], cap: int = 256) -> int:
    """Evaluation window (tokens, even) for ``texts``: ``cap``, or less when the held-out text is shorter, so
    at least one window is scored.

    Raises:
        UsageError: the held-out text has fewer than 16 tokens.
    """
    from fieldpack.builder.llama_eval import vocab_only
    from fieldpack.shared.errors import UsageError

    llm = vocab_only(ref_gguf)
    try:
        n = len(llm.tokenize("\n\n".join(t for t in texts if t.strip()).encode("utf-8"), add_bos=False, special=False))
    finally:
        llm.close()
    ctx = min(cap, n) // 2 * 2
    if ctx < 16:
        raise UsageError(f"the held-out text has {n} tokens, too few to measure perplexity",
                         hint="add documents (about 10% of the chunks are held out for evaluation)")
    return ctx


def measure_speed(gguf_path: Path, *, n_prompt: int = 128, n_decode: int = 32, threads: int | None = None,
                  repeats: int = 2, statistic: str = "best") -> SpeedFigures:
    """Time prompt processing and greedy decoding of ``gguf_path`` with llama.cpp on the CPU.

    ``statistic="best"``: best of ``repeats`` runs (the least disturbed run; the compression report compares
    variants this way). ``"median"``: the median run, with every run's decode rate kept in
    ``decode_tps_runs`` so a caller can report the spread (``fieldpack plan`` does: on a shared machine one run
    can be orders of magnitude off). Not a benchmark of the target device: it ranks variants on this machine.

    Raises:
        InputNotFoundError / ModelLoadError: the GGUF cannot be loaded.
    """
    import llama_cpp
    import numpy as np

    from fieldpack.builder.llama_eval import default_threads
    from fieldpack.shared.errors import InputNotFoundError, ModelLoadError
    from fieldpack.shared.llama_backend import llama_cpp_module

    Llama = llama_cpp_module(llama_cpp).Llama

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise InputNotFoundError(f"GGUF file {gguf_path} does not exist", hint="convert or quantize first")
    threads = int(threads or default_threads())
    from fieldpack.builder.llama_eval import capture_llama_log

    try:
        with capture_llama_log():  # load-time notes (a full-size SWA cache) go to DEBUG, not the plan's output
            llm = Llama(model_path=str(gguf_path), n_ctx=n_prompt + n_decode + 16, n_batch=n_prompt,
                        n_ubatch=n_prompt, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0, verbose=False,
                        seed=0)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"llama.cpp cannot load {gguf_path}: {exc}", hint="re-convert the model") from exc
    try:
        n_vocab = llm.n_vocab()
        text = _SPEED_TEXT * (1 + n_prompt // 8)
        prompt = list(llm.tokenize(text.encode(), add_bos=True, special=False))[:n_prompt]
        best_p, best_d = math.inf, math.inf
        prompt_s: list[float] = []
        decode_s: list[float] = []
        llm.reset()
        llm.eval(prompt[:8])  # warm-up: page the weights in
        for _ in range(max(1, repeats)):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            prompt_s.append(time.perf_counter() - t0)
            best_p = min(best_p, prompt_s[-1])
            t0 = time.perf_counter()
            for _ in range(n_decode):
                last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # (n_vocab,) float32, last position
                nxt = int(np.argmax(np.ctypeslib.as_array(last, shape=(n_vocab,))))
                llm.eval([nxt])
            decode_s.append(time.perf_counter() - t0)
            best_d = min(best_d, decode_s[-1])
    finally:
        llm.close()
    if statistic == "median":
        best_p, best_d = statistics.median(prompt_s), statistics.median(decode_s)
    elif statistic != "best":
        raise ValueError(f"statistic {statistic!r}: use 'best' or 'median'")
    return SpeedFigures(prompt_tps=len(prompt) / best_p, decode_tps=n_decode / best_d, n_prompt=len(prompt),
                        n_decode=n_decode, threads=threads, repeats=repeats,
                        decode_tps_runs=tuple(n_decode / s for s in decode_s))


def quality_rows(ref_gguf: Path, variants: list[tuple[str, str, str, Path]], held_out: list[str], *,
                 n_ctx: int = 256, threads: int | None = None, measure: bool = True) -> list[QualityRow]:
    """Measure the dense reference and each variant against it.

    Args:
        ref_gguf: the dense F16 (or F32) GGUF: the first row, and the reference of ΔPPL/KLD/top-1.
        variants: ``(stage, method, sparsity_or_pattern, gguf_path)`` each.
        held_out: held-out domain chunk texts.
        n_ctx: evaluation window (tokens); shortened when the held-out text is shorter.
        measure: time llama.cpp (prompt and decode tokens/s); ``False`` leaves them ``None``.

    Returns:
        ``[dense row] + [one row per variant]`` with size and decode speed also as ratios to the dense row.
    """
    from fieldpack.builder.llama_eval import perplexity, perplexity_kld

    ref_gguf = Path(ref_gguf)
    n_ctx = fit_eval_ctx(ref_gguf, held_out, n_ctx)
    ref_speed = measure_speed(ref_gguf, threads=threads, repeats=3) if measure else None
    ref_bytes = ref_gguf.stat().st_size
    rows: list[QualityRow] = []
    ref_ppl: float | None = None
    for stage, method, sparsity, path in variants:
        figs = perplexity_kld(ref_gguf, path, held_out, n_ctx=n_ctx)
        ref_ppl = figs.ppl_ref
        sp = measure_speed(path, threads=threads, repeats=3) if measure else None
        size = Path(path).stat().st_size
        rows.append(QualityRow(
            stage=stage, method=method, sparsity=sparsity, params=gguf_params(path), gguf_bytes=size,
            ppl=figs.ppl_test, delta_ppl=figs.delta_ppl, kld_mean=figs.kld_mean, top1_agreement=figs.top1_agreement,
            decode_tps=sp.decode_tps if sp else None, prompt_tps=sp.prompt_tps if sp else None,
            size_ratio=size / ref_bytes, decode_ratio=(sp.decode_tps / ref_speed.decode_tps) if sp and ref_speed else None,
            note="sparse weights stored densely" if sparsity not in ("", "-", "dense") and method in
            ("magnitude", "wanda", "sparsegpt") else ""))
    if ref_ppl is None:
        ref_ppl = perplexity(ref_gguf, held_out, n_ctx)
    dense = QualityRow(stage="dense", method="none", sparsity="-", params=gguf_params(ref_gguf), gguf_bytes=ref_bytes,
                       ppl=ref_ppl, delta_ppl=0.0, kld_mean=0.0, top1_agreement=1.0,
                       decode_tps=ref_speed.decode_tps if ref_speed else None,
                       prompt_tps=ref_speed.prompt_tps if ref_speed else None, size_ratio=1.0,
                       decode_ratio=1.0 if ref_speed else None)
    return [dense] + rows


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(rows: list[QualityRow], *, title: str = "") -> str:
    """The rows as a Markdown table, followed by :data:`SPARSITY_NOTE`."""
    head = ("| stage | method | sparsity | params | GGUF bytes | size ×f16 | PPL | ΔPPL | KLD | top-1 | "
            "decode tok/s | ×f16 | prompt tok/s |")
    lines = ([f"### {title}", ""] if title else []) + [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r.stage} | {r.method} | {r.sparsity} | {r.params:,} | {r.gguf_bytes:,} | {_fmt(r.size_ratio, '.3f')} | "
            f"{_fmt(r.ppl, '.3f')} | {_fmt(r.delta_ppl, '+.3f')} | {_fmt(r.kld_mean, '.4f')} | "
            f"{_fmt(r.top1_agreement, '.3f')} | {_fmt(r.decode_tps, '.1f')} | {_fmt(r.decode_ratio, '.2f')} | "
            f"{_fmt(r.prompt_tps, '.0f')} |")
    lines += ["", f"Note: {SPARSITY_NOTE}"]
    return "\n".join(lines)
