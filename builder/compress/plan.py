"""``fieldpack plan``: which compression fits the device, from figures measured on this machine.

For a checkpoint and the user's documents, every candidate combination of structured pruning
({none, depth -25% blocks, width MLP x0.75}) and quantization ({F16, Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0}, plus
Q4_K_M with a domain imatrix, Q4_K_M with ``token_embd``/``output`` in Q4_K instead of the mix's Q6_K/Q8_0,
which matters most for small models whose vocabulary holds most of their bytes, and on the unpruned model the
calibrated quantizers GPTQ Q4_0 and AWQ + Q4_K_M, :mod:`.quantizers`) is actually built and measured:

* size: the GGUF's bytes;
* memory on the device: weights + the f16 KV cache at ``n_ctx`` (``2 * n_layer * n_ctx * n_head_kv * head_dim *
  2`` bytes) + the embedder, the index and the runtime overhead (the estimates the build writes in the manifest);
* quality: perplexity, ΔPPL, mean KLD and top-1 agreement against the dense F16 on held-out chunks of the
  documents (same split and method as ``fieldpack build``);
* speed: llama.cpp prompt and decode tokens/s on this machine with ``--threads`` threads.

A candidate *fits* when its memory is within ``--device-ram`` and its decode speed reaches ``--min-tokens-per-s``.
The proposal is the fitting candidate with the lowest KLD (ties: smaller file). The PNG plots KLD against size,
marks the Pareto front (no other candidate is both smaller and better) and the proposal.

Unstructured and N:M sparsity are not candidates: stored densely in GGUF they cost the same bytes and time as
the dense model and only lose quality, so they can never be on the front (see ``report.SPARSITY_NOTE``).
Speed is this machine's: pass ``--threads`` as the device's core count; a slower device scales it down.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

from fieldpack.shared.errors import InputNotFoundError, UsageError
from fieldpack.shared.interrupts import raise_if_interrupted
from fieldpack.shared.atomic import atomic_path
from fieldpack.shared.kv_cache import kv_cache_bytes

log = logging.getLogger(__name__)

#: Quant types `fieldpack plan` tries by default (a subset of :data:`builder.quantize.QUANT_NAMES`).
DEFAULT_QUANTS = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
DEFAULT_PRUNES = ("none", "depth", "width")
#: Every prune candidate ``--prunes`` accepts: ``+heal`` distils the pruned model from the unpruned one
#: (``--heal kd``, Minitron) before it is quantized and measured like the others.
PRUNE_CANDIDATES = ("none", "depth", "width", "depth+heal", "width+heal")
IMATRIX_QUANTS = ("Q4_K_M",)
#: (quant mix, GGML type for token_embd and output) candidates: ``--quant Q4_K_M --embd-type Q4_K --output-type Q4_K``.
EMBD_QUANTS: tuple[tuple[str, str], ...] = (("Q4_K_M", "Q4_K"),)
#: ``TYPE+quantizer`` candidates tried on the unpruned model (gptq/awq are not combined with pruning).
QUANTIZER_CANDIDATES = ("Q4_0+gptq", "Q4_K_M+awq")
#: int8 all-MiniLM-L6-v2 ONNX (~23 MB) as the build counts it (file + runtime arena): an estimate.
EMBEDDER_BYTES_ESTIMATE = 2 * 23 * 1024 * 1024
#: Index bytes per chunk: a 384-d float32 vector, FTS5 postings and the text, roughly.
INDEX_BYTES_PER_CHUNK = 384 * 4 + 4096

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a memory size: ``4GiB``, ``512MiB``, ``4G`` (binary), ``4GB`` (decimal), ``1073741824``.

    Raises:
        UsageError: not a size, or not positive.
    """
    m = _SIZE_RE.match(str(text))
    if not m or (m.group(3) and not m.group(2)):
        raise UsageError(f"--device-ram {text!r} is not a size", hint="write it like 4GiB, 512MiB or 8GB")
    value, unit, binary, b = float(m.group(1)), m.group(2).lower(), bool(m.group(3)), bool(m.group(4))
    power = " kmgt".index(unit) if unit else 0
    base = 1000 if (b and not binary and unit) else 1024
    size = int(value * base ** power)
    if size <= 0:
        raise UsageError(f"--device-ram {text!r} is not positive", hint="give the device's RAM, e.g. 4GiB")
    return size


@dataclass
class Candidate:
    """One measured combination (all sizes in bytes, speeds in tokens/s, KLD in nats per token)."""

    prune: str
    quant: str
    imatrix: bool
    gguf_bytes: int
    params: int
    n_layer: int
    kv_cache_bytes: int
    memory_bytes: int
    ppl: float
    delta_ppl: float
    kld_mean: float
    top1_agreement: float
    decode_tps: float
    prompt_tps: float
    decode_tps_min: float | None = None
    decode_tps_max: float | None = None
    fits_ram: bool = False
    fast_enough: bool = False
    pareto: bool = False
    embd_type: str | None = None  # GGML type of token_embd/output when chosen (None: the mix's)
    quantizer: str = "rtn"

    @property
    def label(self) -> str:
        return (f"{self.prune}/{self.quant}{'+imatrix' if self.imatrix else ''}"
                f"{f'+embd {self.embd_type}' if self.embd_type else ''}"
                f"{'+' + self.quantizer if self.quantizer != 'rtn' else ''}")

    @property
    def fits(self) -> bool:
        return self.fits_ram and self.fast_enough

    def speed_uncertain(self, threshold: float) -> bool:
        """The runs' spread straddles ``threshold`` (tokens/s): the speed verdict could flip on a rerun."""
        if self.decode_tps_min is None or self.decode_tps_max is None:
            return False
        return self.decode_tps_min < threshold <= self.decode_tps_max


@dataclass
class Plan:
    """The measured candidates, the proposal (index into ``candidates`` or ``None``) and the PNG written."""

    candidates: list[Candidate]
    chosen: int | None
    device_ram_bytes: int
    min_tokens_per_s: float
    n_ctx: int
    threads: int
    png: Path | None
    prune_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: int = 0  # plan steps run or reused (documents, bases, imatrices, measurements)
    steps_cached: int = 0  # of them reused from the build cache

    def build_flags(self) -> str | None:
        """The ``fieldpack build`` options of the proposal, or ``None`` when nothing fits."""
        if self.chosen is None:
            return None
        c = self.candidates[self.chosen]
        flags = [f"--quant {c.quant}"]
        for k, v in self.prune_options.get(c.prune, {}).items():
            flags.append(f"--{k.replace('_', '-')} {v}")
        if c.imatrix:
            flags.append("--imatrix domain")
        if c.embd_type:
            flags.append(f"--embd-type {c.embd_type} --output-type {c.embd_type}")
        if c.quantizer != "rtn":
            flags.append(f"--quantizer {c.quantizer}")
        return " ".join(flags)

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": [dict(asdict(c), label=c.label) for c in self.candidates], "chosen": self.chosen,
                "device_ram_bytes": self.device_ram_bytes, "min_tokens_per_s": self.min_tokens_per_s,
                "n_ctx": self.n_ctx, "threads": self.threads, "png": str(self.png) if self.png else None,
                "build_flags": self.build_flags(), "steps": self.steps, "steps_cached": self.steps_cached}


#: Timed runs per candidate; the plan reports their median and spread.
SPEED_REPEATS = 5


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For ``(size, loss)`` points, whether each is Pareto-optimal (no other point <= in both, < in one)."""
    out = []
    for i, (s, q) in enumerate(points):
        dominated = any((s2 <= s and q2 <= q) and (s2 < s or q2 < q) for j, (s2, q2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def choose(candidates: list[Candidate]) -> int | None:
    """Index of the fitting candidate with the lowest KLD (then the smaller file), or ``None``."""
    fitting = [i for i, c in enumerate(candidates) if c.fits]
    if not fitting:
        return None
    return min(fitting, key=lambda i: (candidates[i].kld_mean, candidates[i].gguf_bytes))


def _chunks(model_dir: Path, docs_dir: Path, seed: int, exclude: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    from fieldpack.builder.compress.calibration import load_tokenizer
    from fieldpack.builder.ingest import ingest
    from fieldpack.builder.ingest.exclude import Excludes
    from fieldpack.builder.stages.quant import split_eval

    tok = load_tokenizer(model_dir)
    res = ingest(docs_dir, count_tokens=lambda t: len(tok(t, add_special_tokens=False, verbose=False)["input_ids"]),
                 chunk_tokens=200, overlap_tokens=0, exclude=Excludes.parse(exclude))
    return split_eval([c.text for c in res.chunks], 0.1, 64, seed)


def make_plan(model_dir: Path, docs_dir: Path, *, device_ram_bytes: int, min_tokens_per_s: float,
              threads: int | None = None, n_ctx: int = 2048, out_png: Path | None = None,
              quants: tuple[str, ...] = DEFAULT_QUANTS, prunes: tuple[str, ...] = DEFAULT_PRUNES,
              imatrix_quants: tuple[str, ...] = IMATRIX_QUANTS, work_dir: Path | None = None,
              seed: int = 0, embd_quants: tuple[tuple[str, str], ...] = EMBD_QUANTS,
              quantizers: tuple[str, ...] = QUANTIZER_CANDIDATES, heal_steps: int | None = None,
              on_step: Callable[[str], None] | None = None, exclude: tuple[str, ...] = (),
              cache_dir: Path | None = None, on_cached: Callable[[str], None] | None = None,
              on_done: Callable[[str], None] | None = None) -> Plan:
    """Build and measure every candidate; propose the best quality that fits the device.

    Every step (documents, each dense base, imatrix, each candidate's measurement) is a build-cache stage
    (:mod:`.plan_stages`): with ``cache_dir`` a rerun, or a plan stopped half-way, reuses the steps already done.

    Args:
        model_dir: local Hugging Face checkpoint.
        docs_dir: the documents the bundle will answer from (calibration and held-out text).
        device_ram_bytes: the device's RAM for fieldpack (bytes).
        min_tokens_per_s: the slowest acceptable decode speed (tokens/s, measured here).
        threads: llama.cpp threads for timing (default: this machine's).
        n_ctx: context length on the device (tokens) for the KV cache estimate.
        out_png: where to draw quality vs size (``None``: no plot).
        quants / prunes / imatrix_quants: the grid; ``embd_quants``: (mix, token_embd/output type) pairs.
        quantizers: ``TYPE+gptq`` / ``TYPE+awq`` candidates, built on the unpruned model.
        heal_steps: optimizer steps of the ``+heal`` prune candidates (default: the build's ``--heal-steps``
            default); healing trains on the calibration chunks and is measured on the held-out ones.
        work_dir: scratch folder for the steps when ``cache_dir`` is None (default: a temp folder, removed
            afterwards, also when the plan is interrupted).
        on_step: called with a one-line description before each step that does work (conversion, pruning,
            quantization, measurement), e.g. to show progress; each step first calls
            :func:`shared.interrupts.raise_if_interrupted`, so a Ctrl-C that llama.cpp's callbacks swallowed
            stops the plan at the next step.
        on_cached: called with the description of each step reused from ``cache_dir`` instead.
        on_done: called with a step's description once it finished (and, with a cache, its entry is kept).
        exclude: ``--exclude`` glob patterns of files under ``docs_dir`` not to use (:mod:`builder.ingest.exclude`).
        cache_dir: the build cache root (:class:`~fieldpack.builder.stages.cache.StageCache`); ``None``: keep
            nothing between runs.

    Raises:
        InputNotFoundError: model or docs folder missing.
        UsageError: bad limits, an unknown quant type / prune name, or a bad ``--exclude`` pattern.
        OutputNotWritableError: ``cache_dir`` cannot be created or written.
        CompressionConfigError / BuildError subclasses from pruning, conversion and quantization.
    """
    from fieldpack.builder.compress import validate_compression
    from fieldpack.builder.compress.plan_stages import (PLAN_BASE, PLAN_DOCS, PLAN_IMATRIX, PLAN_MEASURE,
                                                         PlanBaseInputs, PlanDocsInputs, PlanImatrixInputs,
                                                         PlanMeasureInputs)
    from fieldpack.builder.compress.report import fit_eval_ctx
    from fieldpack.builder.llama_eval import default_threads
    from fieldpack.builder.manifest_build import RUNTIME_OVERHEAD_BYTES
    from fieldpack.builder.quantize import QUANT_TYPES
    from fieldpack.builder.stages.base import Input
    from fieldpack.builder.stages.cache import Runner, StageCache
    from fieldpack.builder.stages.quant import load_split

    model_dir, docs_dir = Path(model_dir), Path(docs_dir)
    if not (model_dir / "config.json").is_file():
        raise InputNotFoundError(f"model folder {model_dir} has no config.json", hint="pass a local checkpoint folder")
    if not docs_dir.is_dir():
        raise InputNotFoundError(f"docs folder {docs_dir} does not exist", hint="pass the folder of your documents")
    from fieldpack.builder.ingest.exclude import Excludes

    Excludes.parse(exclude)  # a bad pattern stops the plan before any step
    if min_tokens_per_s < 0 or n_ctx < 16:
        raise UsageError("--min-tokens-per-s must be >= 0 and --n-ctx >= 16", hint="e.g. --min-tokens-per-s 10 --n-ctx 2048")
    from fieldpack.builder.quantize import TENSOR_TYPES

    bad = [q for q in [*quants, *imatrix_quants, *(m for m, _ in embd_quants)] if q.upper() not in QUANT_TYPES]
    bad += [e for _, e in embd_quants if e.upper() not in TENSOR_TYPES]
    if bad:
        raise UsageError(f"unknown quant type(s) {', '.join(bad)}", hint=f"use {', '.join(QUANT_TYPES)}")
    calibrated = [tuple(q.split("+", 1)) for q in quantizers]
    if any(len(c) != 2 for c in calibrated):
        raise UsageError(f"--quantizers {','.join(quantizers)}: write each as TYPE+QUANTIZER",
                         hint="e.g. --quantizers Q4_0+gptq,Q4_K_M+awq")
    from fieldpack.builder.compress.quantizers import check_quantizer

    for qt, qz in calibrated:
        check_quantizer(qz.lower(), qt.upper(), model=model_dir)
    heal = {"heal": "kd", **({"heal_steps": heal_steps} if heal_steps is not None else {})}
    prune_opts: dict[str, dict[str, Any]] = {"none": {}, "depth": {"prune": "depth"},
                                             "width": {"prune": "width", "ffn_keep": 0.75},
                                             "depth+heal": {"prune": "depth", **heal},
                                             "width+heal": {"prune": "width", "ffn_keep": 0.75, **heal}}
    unknown = [p for p in prunes if p not in prune_opts]
    if unknown:
        raise UsageError(f"unknown plan prune(s) {', '.join(unknown)}", hint=f"use {', '.join(PRUNE_CANDIDATES)}")
    for p in prunes:
        if p != "none":
            validate_compression(dict(prune_opts[p]), model_dir=model_dir)  # refused before the first step
    threads = int(threads or default_threads())
    own_work = cache_dir is None and work_dir is None
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="fieldpack-plan-")) if own_work else None

    def hook(title: str, event: str) -> None:
        if event == "start":
            raise_if_interrupted()
            log.info("plan: %s", title)
            if on_step is not None:
                on_step(title)
        elif event == "cached":
            log.info("plan: %s (cached)", title)
            if on_cached is not None:
                on_cached(title)
        elif event == "done" and on_done is not None:
            on_done(title)

    try:
        root = Path(cache_dir) if cache_dir is not None else Path(work) / "steps"  # type: ignore[arg-type]
        run = Runner(StageCache(root), on_stage=hook)
        model = Input.tree(model_dir)
        docs = run(PLAN_DOCS, PlanDocsInputs(what="reading the documents", model=model, docs=Input.tree(docs_dir),
                                             exclude=tuple(exclude), seed=seed))
        split = docs.split()
        calib, held = load_split(split.path)
        other_bytes = RUNTIME_OVERHEAD_BYTES + EMBEDDER_BYTES_ESTIMATE + INDEX_BYTES_PER_CHUNK * (len(calib) + len(held))

        def base_of(p: str) -> Any:
            what = "converting the checkpoint to F16 GGUF" if p == "none" else f"pruning: {p}"
            return run(PLAN_BASE, PlanBaseInputs(what=what, model=model, split=split, prune=p,
                                                 options=prune_opts[p], seed=seed))

        ref = base_of("none")
        eval_ctx = fit_eval_ctx(ref.gguf, held, min(256, ref.n_ctx_train))
        bases = {"none": ref}
        for p in prunes:
            if p != "none":
                bases[p] = base_of(p)
                prune_opts[p] = dict(bases[p].resolved)
        cands: list[Candidate] = []

        def measure(p: str, qt: str, imx: Any, quantizer: str = "rtn", embd_type: str | None = None) -> None:
            base = bases[p]
            what = (f"measuring {p}/{qt}{'+imatrix' if imx is not None else ''}"
                    f"{f' embd {embd_type}' if embd_type else ''}{f' ({quantizer})' if quantizer != 'rtn' else ''}: "
                    f"{'' if qt == 'F16' and imx is None and embd_type is None and quantizer == 'rtn' else 'quantizing, '}"
                    "PPL/KLD on held-out text, decode speed")
            m = run(PLAN_MEASURE, PlanMeasureInputs(
                what=what, ref=ref.base(), base=base.base(), split=split, quant=qt,
                imatrix=imx.as_input() if imx is not None else None, embd_type=embd_type, quantizer=quantizer,
                model=model if quantizer != "rtn" else None, seed=seed, eval_ctx=eval_ctx, threads=threads,
                repeats=SPEED_REPEATS))
            kv = kv_cache_bytes(n_ctx, n_layer=base.n_layer, n_head_kv=base.n_head_kv, head_dim=base.head_dim)
            f = m.figures
            cands.append(Candidate(prune=p, quant=qt, imatrix=imx is not None, n_layer=base.n_layer, kv_cache_bytes=kv,
                                   memory_bytes=int(f["gguf_bytes"]) + kv + other_bytes, quantizer=quantizer,
                                   embd_type=embd_type, **f))  # type: ignore[arg-type]
            log.info("plan %s: %d bytes, KLD %.5f, %.1f tok/s", cands[-1].label, f["gguf_bytes"], f["kld_mean"],
                     f["decode_tps"])

        for p in prunes:
            imx = None
            grid = [(q.upper(), False, None) for q in quants] + [(q.upper(), True, None) for q in imatrix_quants]
            grid += [(q.upper(), False, e.upper()) for q, e in embd_quants]
            for qt, use_imx, embd in grid:
                if use_imx and imx is None:
                    imx = run(PLAN_IMATRIX, PlanImatrixInputs(what=f"computing a domain imatrix for {p}",
                                                              base=bases[p].base(), split=split))
                measure(p, qt, imx if use_imx else None, embd_type=embd)
        for qt, qz in calibrated:
            measure("none", qt.upper(), None, quantizer=qz.lower())
        for c, front in zip(cands, pareto_front([(c.gguf_bytes, c.kld_mean) for c in cands])):
            c.pareto = front
            c.fits_ram = c.memory_bytes <= device_ram_bytes
            c.fast_enough = c.decode_tps >= min_tokens_per_s
        plan = Plan(candidates=cands, chosen=choose(cands), device_ram_bytes=device_ram_bytes,
                    min_tokens_per_s=min_tokens_per_s, n_ctx=n_ctx, threads=threads, png=None,
                    prune_options={k: {kk: vv for kk, vv in v.items()} for k, v in prune_opts.items()},
                    steps_cached=sum(t.cached for t in run.timings), steps=len(run.timings))
        if out_png is not None:
            plan.png = draw_plan(plan, Path(out_png))
        return plan
    finally:
        if own_work and work is not None:
            shutil.rmtree(work, ignore_errors=True)


def draw_plan(plan: Plan, out_png: Path) -> Path:
    """Scatter KLD (log scale) against GGUF size, Pareto front as a line, the proposal starred; PNG written
    atomically to ``out_png``."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = 1e-6
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, c in enumerate(plan.candidates):
        x, y = c.gguf_bytes / 2 ** 20, max(c.kld_mean, floor)
        ax.scatter([x], [y], marker="o" if c.fits else "x", color="tab:green" if c.fits else "tab:red", zorder=3)
        ax.annotate(c.label, (x, y), textcoords="offset points", xytext=(4, 4 if i % 2 else -10), fontsize=7)
    front = sorted((c.gguf_bytes / 2 ** 20, max(c.kld_mean, floor)) for c in plan.candidates if c.pareto)
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "-", color="tab:blue", label="Pareto front", zorder=2)
    if plan.chosen is not None:
        c = plan.candidates[plan.chosen]
        ax.scatter([c.gguf_bytes / 2 ** 20], [max(c.kld_mean, floor)], marker="*", s=260, color="gold",
                   edgecolors="black", zorder=4, label=f"proposal: {c.label}")
    ax.set_yscale("log")
    ax.set_xlabel("GGUF size (MiB)")
    ax.set_ylabel(f"mean KLD vs dense F16 (nats/token, floor {floor:g})")
    ax.set_title(f"quality vs size — fits: RAM <= {plan.device_ram_bytes / 2 ** 30:.2f} GiB at n_ctx {plan.n_ctx}, "
                 f">= {plan.min_tokens_per_s:g} tok/s ({plan.threads} threads here)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    out_png = Path(out_png)
    with atomic_path(out_png, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out_png


def format_plan(plan: Plan) -> str:
    """A plain-text table of the candidates with the proposal marked, and the build flags."""
    lines = [f"{'candidate':<24} {'GGUF MiB':>9} {'memory MiB':>10} {'PPL':>8} {'ΔPPL':>8} {'KLD':>8} {'top-1':>6} "
             f"{'decode t/s median (min-max)':>27} {'fits':>5} {'front':>5}"]
    for i, c in enumerate(plan.candidates):
        mark = "*" if i == plan.chosen else " "
        spread = (f"{c.decode_tps:.1f} ({c.decode_tps_min:.1f}-{c.decode_tps_max:.1f})"
                  if c.decode_tps_min is not None and c.decode_tps_max is not None else f"{c.decode_tps:.1f}")
        fits = ("yes" if c.fits else "no") + ("?" if c.fits_ram and c.speed_uncertain(plan.min_tokens_per_s) else "")
        lines.append(f"{mark}{c.label:<23} {c.gguf_bytes / 2**20:>9.2f} {c.memory_bytes / 2**20:>10.1f} {c.ppl:>8.3f} "
                     f"{c.delta_ppl:>+8.3f} {c.kld_mean:>8.4f} {c.top1_agreement:>6.3f} {spread:>27} "
                     f"{fits:>5} {'yes' if c.pareto else '':>5}")
    flags = plan.build_flags()
    if flags:
        c = plan.candidates[plan.chosen]  # type: ignore[index]
        lines.append(f"proposal: {c.label} (memory {c.memory_bytes / 2**20:.1f} MiB of "
                     f"{plan.device_ram_bytes / 2**20:.0f} MiB, {c.decode_tps:.1f} tok/s here): fieldpack build {flags}")
    else:
        lines.append("no candidate fits: lower --n-ctx, raise --device-ram, lower --min-tokens-per-s, or pick a smaller model")
    if any(c.fits_ram and c.speed_uncertain(plan.min_tokens_per_s) for c in plan.candidates):
        lines.append(f"fits '?': the {SPEED_REPEATS} timed runs fall on both sides of --min-tokens-per-s "
                     f"{plan.min_tokens_per_s:g} (a busy machine); rerun when it is quiet before relying on it")
    lines.append(f"speeds: median of {SPEED_REPEATS} runs on this machine with the given --threads; unstructured/N:M sparsity is never proposed "
                 "(stored densely in GGUF, no smaller or faster in llama.cpp)")
    return "\n".join(lines)
