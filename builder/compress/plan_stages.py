"""The steps of ``fieldpack plan`` as build-cache stages, so that a rerun, or a plan stopped half-way, reuses what
was already made and measured.

A plan on a CPU host takes an hour or more (a trial measured about 20 minutes per candidate with healing on a
loaded 2-core machine), and before these stages it kept nothing: an interrupted plan started again from zero.
Each step is now a :class:`~fieldpack.builder.stages.base.Stage` run through the build's
:class:`~fieldpack.builder.stages.cache.StageCache` (same root, same ``--cache-dir``/``--no-cache``, same
verification by sha256 and atomic entries):

========================  =====================================================================  =================
stage                     what it keeps (``out/``)                                               key (besides code
                                                                                                 and library
                                                                                                 versions)
========================  =====================================================================  =================
``plan-docs``             ``split.json``: calibration and held-out chunk texts                   checkpoint, docs,
                                                                                                 ``--exclude``,
                                                                                                 seed
``plan-base``             the dense F16 GGUF of the checkpoint, or of one pruned (and healed)   checkpoint, split,
                          variant; the pruned checkpoint itself is not kept                      prune options
``plan-imatrix``          a domain importance matrix of one base                                 base, split
``plan-measure``          figures only (bytes, PPL, KLD, top-1, speeds); the quantized GGUF is   reference, base,
                          removed once measured                                                  imatrix, type,
                                                                                                 quantizer,
                                                                                                 ``--threads``
========================  =====================================================================  =================

``--device-ram``, ``--min-tokens-per-s`` and ``--n-ctx`` are not in any key: they only decide which measured
candidate fits, so changing them re-plans from the cache in seconds. Speeds kept in the cache were measured on
this machine when the entry was made; ``--no-cache`` measures everything again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fieldpack.builder.stages.base import Input, Stage, StageInputs, StageRecord
from fieldpack.builder.stages.quant import SPLIT_NAME  # the build's split file: same name, same JSON

#: The modules whose source decides a plan step's result (their edits invalidate cached steps).
PLAN_CODE = ("fieldpack.builder.compress", "fieldpack.builder.convert", "fieldpack.builder.quantize",
             "fieldpack.builder.llama_eval", "fieldpack.builder.adapt", "fieldpack.builder.ingest")
PLAN_LIBRARIES = ("torch", "transformers", "peft", "gguf", "llama_cpp_python", "safetensors", "tokenizers")


class PlanInputs(StageInputs):
    """Base of the plan stages' inputs: ``what`` is the progress line (``pruning: depth``), not part of the key."""

    what: str

    def key_material(self) -> dict[str, Any]:
        """Every field but ``what`` (an :class:`Input` by its digest)."""
        doc = super().key_material()
        doc.pop("what", None)
        return doc


# --- plan-docs -------------------------------------------------------------------------------------------------
class PlanDocsInputs(PlanInputs):
    model: Input  # the checkpoint folder: its tokenizer counts the 200-token chunks
    docs: Input
    exclude: tuple[str, ...] = ()
    seed: int = 0


class PlanDocsRecord(StageRecord):
    """``split.json`` holds ``{"calib": [str], "held_out": [str]}``; the counts are chunks."""

    calib_chunks: int
    held_out_chunks: int

    def split(self) -> Input:
        return self.artefact(SPLIT_NAME).as_input()


def run_plan_docs(inputs: PlanDocsInputs, out_dir: Path) -> PlanDocsRecord:
    """Chunk the documents with the checkpoint's tokenizer and split calibration / held-out as ``build`` does."""
    from fieldpack.builder.compress.plan import _chunks

    calib, held = _chunks(inputs.model.path, inputs.docs.path, inputs.seed, inputs.exclude)
    (out_dir / SPLIT_NAME).write_text(json.dumps({"calib": calib, "held_out": held}, ensure_ascii=False),
                                      encoding="utf-8")
    return PlanDocsRecord(calib_chunks=len(calib), held_out_chunks=len(held))


PLAN_DOCS: Stage[PlanDocsInputs, PlanDocsRecord] = Stage(
    "plan-docs", "1", PlanDocsRecord, run_plan_docs, libraries=("tokenizers", "transformers"),
    code=("fieldpack.builder.ingest", "fieldpack.builder.compress.plan", "fieldpack.builder.stages.quant"),
    label=lambda i: i.what)


# --- plan-base -------------------------------------------------------------------------------------------------
class PlanBaseInputs(PlanInputs):
    model: Input
    split: Input  # plan-docs' split.json: pruning calibrates (and healing trains) on its calibration chunks
    prune: str  # "none", "depth", "width", "depth+heal", "width+heal"
    options: dict[str, Any]  # the compression options (--prune, --ffn-keep, --heal, --heal-steps ...)
    seed: int = 0


class PlanBaseRecord(StageRecord):
    """One dense GGUF the candidates are quantized from (shape in counts / tokens); ``resolved`` are the prune
    options with their defaults filled in (``drop_layers``), as ``fieldpack build`` flags replay them."""

    gguf: Path
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    resolved: dict[str, Any] = {}

    def base(self) -> Input:
        return self.input_for(self.gguf)


def run_plan_base(inputs: PlanBaseInputs, out_dir: Path) -> PlanBaseRecord:
    """Convert the checkpoint to F16 (``prune == "none"``), or prune (and heal) it and convert the result."""
    from fieldpack.builder.compress import prune_checkpoint, validate_compression
    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.stages.quant import load_split

    resolved: dict[str, Any] = {}
    if inputs.prune == "none":
        conv = convert_hf_to_gguf(inputs.model.path, out_dir / "dense-f16.gguf", outtype="f16")
        gguf = conv.path
    else:
        calib, held = load_split(inputs.split.path)
        opts = validate_compression(dict(inputs.options), model_dir=inputs.model.path)
        scratch = out_dir / "scratch"  # the pruned checkpoint: converted, then dropped (only the GGUF is kept)
        try:
            _, conv, _, full = prune_checkpoint(inputs.model.path, opts, calib, scratch, seed=inputs.seed,
                                                held_out_texts=held if opts.heal else None)
            gguf = out_dir / f"{inputs.prune.replace('+', '-')}-f16.gguf"
            Path(conv.path).rename(gguf)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        resolved = {k: v for k, v in full.items()
                    if k in ("prune", "drop_layers", "ffn_keep", "heal", "heal_steps") and v is not None}
    return PlanBaseRecord(gguf=gguf, n_layer=conv.n_layer, n_embd=conv.n_embd, n_head=conv.n_head,
                          n_head_kv=conv.n_head_kv, head_dim=conv.head_dim or conv.n_embd // conv.n_head,
                          n_ctx_train=conv.n_ctx_train, resolved=resolved)


PLAN_BASE: Stage[PlanBaseInputs, PlanBaseRecord] = Stage(
    "plan-base", "1", PlanBaseRecord, run_plan_base, libraries=PLAN_LIBRARIES, code=PLAN_CODE,
    label=lambda i: i.what)


# --- plan-imatrix ----------------------------------------------------------------------------------------------
class PlanImatrixInputs(PlanInputs):
    base: Input  # the dense GGUF to be quantized
    split: Input
    n_ctx: int = 512


class PlanImatrixRecord(StageRecord):
    imatrix: Path

    def as_input(self) -> Input:
        return self.input_for(self.imatrix)


def run_plan_imatrix(inputs: PlanImatrixInputs, out_dir: Path) -> PlanImatrixRecord:
    """llama.cpp's importance matrix of ``base`` on the calibration chunks (:mod:`.imatrix`)."""
    from fieldpack.builder.compress.imatrix import compute_imatrix_gguf
    from fieldpack.builder.stages.quant import load_split

    calib, _ = load_split(inputs.split.path)
    res = compute_imatrix_gguf(inputs.base.path, calib, out_dir / "imatrix.gguf", n_ctx=inputs.n_ctx)
    return PlanImatrixRecord(imatrix=res.path)


PLAN_IMATRIX: Stage[PlanImatrixInputs, PlanImatrixRecord] = Stage(
    "plan-imatrix", "1", PlanImatrixRecord, run_plan_imatrix, libraries=("llama_cpp_python", "gguf"),
    code=("fieldpack.builder.compress.imatrix", "fieldpack.builder.llama_eval", "fieldpack.builder.quantize"),
    label=lambda i: i.what)


# --- plan-measure ----------------------------------------------------------------------------------------------
class PlanMeasureInputs(PlanInputs):
    ref: Input  # the unpruned F16 GGUF: the reference of PPL/KLD
    base: Input  # the dense GGUF this candidate is quantized from (== ref for none/F16)
    split: Input
    quant: str  # llama.cpp quant type, "F16" for the base itself
    imatrix: Input | None = None
    embd_type: str | None = None  # GGML type of token_embd and output (None: the mix's)
    quantizer: str = "rtn"  # "rtn" (llama.cpp), "gptq" or "awq" (then ``model`` is the checkpoint calibrated)
    model: Input | None = None
    seed: int = 0
    eval_ctx: int  # PPL/KLD window (tokens)
    threads: int  # llama.cpp threads for the speed runs
    repeats: int  # timed speed runs (median and spread kept)


class PlanMeasureRecord(StageRecord):
    """One candidate's figures, the measured fields of :class:`~fieldpack.builder.compress.plan.Candidate` by name:
    ``gguf_bytes``, ``params``, ``ppl``, ``delta_ppl``, ``kld_mean`` (nats/token), ``top1_agreement`` (0..1),
    ``decode_tps`` and ``prompt_tps`` (median tokens/s), ``decode_tps_min`` / ``decode_tps_max`` (of the runs)."""

    figures: dict[str, float | int | None]


def run_plan_measure(inputs: PlanMeasureInputs, out_dir: Path) -> PlanMeasureRecord:
    """Quantize (unless F16 RTN), measure PPL/KLD against the reference on the held-out chunks and llama.cpp's
    speed, then drop the quantized file (the plan keeps figures, not candidates' GGUFs)."""
    from fieldpack.builder.compress.report import gguf_params, measure_speed
    from fieldpack.builder.llama_eval import perplexity_kld
    from fieldpack.builder.quantize import quantize_gguf
    from fieldpack.builder.stages.quant import load_split

    calib, held = load_split(inputs.split.path)
    scratch = out_dir / "scratch"
    scratch.mkdir()
    try:
        if inputs.quantizer != "rtn":
            from fieldpack.builder.compress.quantizers import calibrated_quantize

            if inputs.model is None:
                raise ValueError(f"plan-measure: quantizer {inputs.quantizer} needs the checkpoint")  # a bug
            path = calibrated_quantize(inputs.quantizer, inputs.model.path, inputs.ref.path, calib, inputs.quant,
                                       scratch, seed=inputs.seed).quant.path
        elif inputs.quant == "F16" and inputs.imatrix is None and inputs.embd_type is None:
            path = inputs.base.path
        else:
            path = quantize_gguf(inputs.base.path, scratch / "candidate.gguf", inputs.quant,
                                 imatrix=inputs.imatrix.path if inputs.imatrix else None,
                                 embd_type=inputs.embd_type, output_type=inputs.embd_type).path
        figs = perplexity_kld(inputs.ref.path, path, held, n_ctx=inputs.eval_ctx)
        sp = measure_speed(path, threads=inputs.threads, repeats=inputs.repeats, statistic="median")
        size, params = Path(path).stat().st_size, gguf_params(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return PlanMeasureRecord(figures=dict(
        gguf_bytes=size, params=params, ppl=figs.ppl_test, delta_ppl=figs.delta_ppl, kld_mean=figs.kld_mean,
        top1_agreement=figs.top1_agreement, decode_tps=sp.decode_tps, prompt_tps=sp.prompt_tps,
        decode_tps_min=sp.decode_tps_min, decode_tps_max=sp.decode_tps_max))


PLAN_MEASURE: Stage[PlanMeasureInputs, PlanMeasureRecord] = Stage(
    "plan-measure", "1", PlanMeasureRecord, run_plan_measure, libraries=PLAN_LIBRARIES, code=PLAN_CODE,
    label=lambda i: i.what)
