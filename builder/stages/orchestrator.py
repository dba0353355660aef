"""The build's stage graph: which stage feeds which, in the order progress is shown.

::

    embedder ─┬─▶ ingest ─▶ index ─▶ smoke question
              │      │
    convert ──┼──▶ parity         eval split (chunks + model tokenizer)
              │                      │
              └──▶ [compress] ─▶ [trim vocab] ─▶ quantize ─▶ quality (PPL/KLD on held-out chunks)

``trim vocab`` (``--trim-vocab``, :mod:`.trim`) cuts the dense GGUF's vocabulary to the documents' and gates it
against the untrimmed one; quantize then reads the trimmed file, and quality measures against it.

With ``--adapt`` / ``--distill-from`` (:mod:`.adapt`), the adapted checkpoint takes the source's place::

    convert (source) ─▶ eval split ─▶ adapt ─▶ convert (adapted) ─▶ parity ─▶ [compress] ─▶ quantize ─▶ quality

With ``--ship-adapter`` the source ships and the LoRA travels beside it as a llama.cpp adapter GGUF::

    convert (source) ─▶ parity (source) ─▶ quantize (source) ─────────────────────┐
         └▶ eval split ─▶ adapt (+ adapter.gguf) ─▶ convert (adapted) ─▶ adapter check ─▶ quality
                                                                         (F16 base + adapter vs merged;
                                                                          quality: quantized base + adapter vs merged)

A GGUF input (``--model x.gguf``, :mod:`.gguf`) takes the place of ``convert`` and has no parity stage::

    gguf input ─┬─▶ (ships as is) ───────────────▶ quality (PPL of the input on held-out chunks)
                └─▶ quantize (re-quantize, on request) ─▶ quality (PPL/KLD vs the input)

Every arrow is an :class:`~fieldpack.builder.stages.base.Input` (path + sha256) taken from the upstream record,
so a stage's cache key changes exactly when something it reads changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldpack.builder.gguf_input import is_gguf_path
from fieldpack.builder.stages.adapt import (
    ADAPT,
    ADAPTER_CHECK,
    AdaptInputs,
    AdapterCheckInputs,
    AdapterCheckRecord,
    AdaptRecord,
)
from fieldpack.builder.stages.base import Input
from fieldpack.builder.stages.cache import Runner
from fieldpack.builder.stages.docs import (
    CHUNKS_NAME,
    INDEX,
    INGEST,
    SMOKE,
    EmbedderFiles,
    IndexInputs,
    IndexRecord,
    IngestInputs,
    IngestRecord,
    SmokeInputs,
    SmokeRecord,
)
from fieldpack.builder.stages.embedder import (
    EMBEDDER,
    EMBEDDER_ADAPT,
    EmbedderAdaptInputs,
    EmbedderAdaptRecord,
    EmbedderInputs,
    EmbedderRecord,
)
from fieldpack.builder.stages.gguf import GGUF_INPUT, GgufInputInputs, GgufInputRecord
from fieldpack.builder.stages.trim import TRIM, TRIM_LIKE, TrimInputs, TrimLikeInputs, TrimRecord
from fieldpack.builder.stages.model import CONVERT, PARITY, ConvertInputs, ConvertRecord, ParityInputs, ParityRecord
from fieldpack.builder.stages.quant import (
    COMPRESS,
    QUALITY,
    QUANTIZE,
    SPLIT,
    CompressInputs,
    CompressRecord,
    QualityInputs,
    QualityRecord,
    QuantizeInputs,
    QuantizeRecord,
    SplitInputs,
    SplitRecord,
)


@dataclass
class BuildRecords:
    """Every stage's record of one build.

    ``convert`` is a :class:`~.gguf.GgufInputRecord` for a GGUF input, which has no ``parity`` (None);
    ``compress`` is None when nothing was pruned; ``quantize`` is None when a GGUF input ships as is; ``trim`` is
    None without ``--trim-vocab``; ``adapt`` is None without ``--adapt`` / ``--distill-from`` (then ``convert`` is
    the adapted checkpoint's).
    """

    embedder: EmbedderRecord
    ingest: IngestRecord
    index: IndexRecord
    smoke: SmokeRecord
    convert: ConvertRecord
    parity: ParityRecord | None
    split: SplitRecord
    compress: CompressRecord | None
    quantize: QuantizeRecord | None
    quality: QualityRecord
    trim: TrimRecord | None = None
    adapt: AdaptRecord | None = None
    embedder_adapt: EmbedderAdaptRecord | None = None  # --adapt-embedder
    adapter_check: AdapterCheckRecord | None = None  # --ship-adapter

    def shipped_adapter(self) -> Input | None:
        """The LoRA adapter GGUF that ships beside the model (``--ship-adapter``), else None."""
        return self.adapt.adapter_input() if self.adapter_check is not None and self.adapt is not None else None

    def all(self) -> dict[str, Any]:
        """Stage name -> record, in build order (skipped stages left out)."""
        return {k: v for k, v in vars(self).items() if v is not None}

    @property
    def gguf_input(self) -> GgufInputRecord | None:
        """The GGUF input's record when the build started from a GGUF file, else None."""
        return self.convert if isinstance(self.convert, GgufInputRecord) else None

    def shipped_model(self) -> Input:
        """The GGUF that goes into the bundle: the quantized model, or a GGUF input kept as is (trimmed when
        ``--trim-vocab``)."""
        if self.quantize is not None:
            return self.quantize.model()
        return self.trim.trimmed() if self.trim is not None else self.convert.gguf()


def run_stages(cfg: Any, model_dir: Path, run: Runner, prompt: Any = None) -> BuildRecords:
    """Run (or reuse) every stage for ``cfg`` (a :class:`~fieldpack.builder.config.BuildConfig`) on the local
    checkpoint folder or GGUF file ``model_dir``; ``prompt`` is the :class:`~fieldpack.builder.prompt_plan.PromptPlan`
    (RAFT trains on the bundle's own prompt). Updates ``cfg.compression`` in place with the resolved
    options (defaults filled in), and for a GGUF input ``cfg.quant`` with the type that ships (the file's own
    when kept as is), so the recipe replays exactly.

    Raises:
        Any BuildError subclass a stage raises (ParityError, QuantizationError, NoDocumentsError, ...).
    """
    emb = run(EMBEDDER, EmbedderInputs.from_config(cfg.embedder, cfg.embedder_int8))
    e = emb.export
    emb_files = EmbedderFiles(onnx=emb.input_for(e.onnx_path), tokenizer=emb.input_for(e.tokenizer_path),
                              max_tokens=e.max_tokens, name=e.name)
    ing = run(INGEST, IngestInputs(docs=Input.tree(Path(cfg.docs)), tokenizer=emb_files.tokenizer,
                                   chunk_tokens=cfg.chunk_tokens, overlap_tokens=cfg.overlap_tokens,
                                   exclude=tuple(cfg.exclude)))
    chunks = ing.artefact(CHUNKS_NAME).as_input()
    emb_adapt: EmbedderAdaptRecord | None = None
    if getattr(cfg, "adapt_embedder", False):
        base = EmbedderInputs.from_config(cfg.embedder, cfg.embedder_int8)
        emb_adapt = run(EMBEDDER_ADAPT, EmbedderAdaptInputs(checkpoint=base.checkpoint, chunks=chunks,
                                                             steps=cfg.embedder_adapt_steps, seed=cfg.seed))
        if emb_adapt.result.kept and emb_adapt.result.model_dir is not None:  # same tokenizer: the chunks stay valid
            emb = run(EMBEDDER, EmbedderInputs(checkpoint=Input.tree(emb_adapt.result.model_dir),
                                               name=f"{e.name}+adapted", int8=cfg.embedder_int8))
            e = emb.export
            emb_files = EmbedderFiles(onnx=emb.input_for(e.onnx_path), tokenizer=emb.input_for(e.tokenizer_path),
                                      max_tokens=e.max_tokens, name=e.name)
    idx = run(INDEX, IndexInputs(chunks=chunks, embedder=emb_files))
    smoke = run(SMOKE, SmokeInputs(chunks=chunks, index=idx.input_for(idx.stats.path), embedder=emb_files))
    model_stages = (_gguf_model_stages(cfg, Path(model_dir), chunks, run) if is_gguf_path(model_dir)
                    else _hf_model_stages(cfg, Path(model_dir), chunks, run, prompt))
    return BuildRecords(embedder=emb, ingest=ing, index=idx, smoke=smoke, embedder_adapt=emb_adapt, **model_stages)


def _adapt_stage(cfg: Any, checkpoint: Input, conv: ConvertRecord, split: SplitRecord, chunks: Input,
                 prompt: Any, run: Runner) -> AdaptRecord:
    """Run (or reuse) ``adapt`` for ``cfg.adapt`` on the source checkpoint."""
    import dataclasses

    raft = cfg.adapt.get("method") == "raft"
    c = conv.conversion
    stop = (c.eot_id if c.eot_id is not None and prompt is not None and prompt.prompt_format != "completion"
            else c.eos_id)
    return run(ADAPT, AdaptInputs.from_config(
        cfg.adapt, checkpoint=checkpoint, split=split.split(), seed=cfg.seed, chunks=chunks if raft else None,
        prompt=dataclasses.asdict(prompt) if raft and prompt is not None else None, raft_k=cfg.top_k_chunks,
        stop_id=stop if raft else None, export_adapter=bool(getattr(cfg, "ship_adapter", False))))


def _hf_model_stages(cfg: Any, model_dir: Path, chunks: Input, run: Runner, prompt: Any = None) -> dict[str, Any]:
    """convert -> parity -> eval split -> [compress] -> quantize -> quality, for a Hugging Face checkpoint
    (with adaptation: convert -> eval split -> adapt -> convert -> parity -> ...). Returns the
    :class:`BuildRecords` fields of the model stages."""
    checkpoint = Input.tree(model_dir)  # hashed once; every model stage reads the checkpoint through it
    conv = run(CONVERT, ConvertInputs(checkpoint=checkpoint, outtype=cfg.parity_outtype))
    tok = model_dir / "tokenizer.json"
    split = run(SPLIT, SplitInputs(chunks=chunks, tokenizer=Input.file(tok) if tok.is_file() else None,
                                   fraction=cfg.eval_fraction, max_chunks=cfg.eval_max_chunks, seed=cfg.seed,
                                   n_ctx_train=conv.conversion.n_ctx_train))
    adapted: AdaptRecord | None = None
    if getattr(cfg, "adapt", None):
        adapted = _adapt_stage(cfg, checkpoint, conv, split, chunks, prompt, run)
        if getattr(cfg, "ship_adapter", False):
            return _adapter_stages(cfg, checkpoint, conv, split, adapted, chunks, run)
        checkpoint, model_dir = adapted.checkpoint_input(), adapted.checkpoint
        conv = run(CONVERT, ConvertInputs(checkpoint=checkpoint, outtype=cfg.parity_outtype))
    parity = run(PARITY, ParityInputs(checkpoint=checkpoint, gguf=conv.gguf()))

    comp: CompressRecord | None = None
    if cfg.compression:
        opts = _resolve_compression(cfg, model_dir)
        if opts.prune is not None:
            comp = run(COMPRESS, CompressInputs(
                checkpoint=checkpoint, reference=conv.gguf(), architecture=conv.conversion.architecture,
                n_ctx_train=conv.conversion.n_ctx_train, options=dict(cfg.compression), seed=cfg.seed,
                outtype=cfg.parity_outtype, split=split.split()))
            cfg.compression.update(comp.resolved)
    dense = comp.dense() if comp else conv.gguf()
    trim = _trim(cfg, dense, chunks, split, run)
    if trim is not None:
        dense = trim.trimmed()
    quantizer = cfg.compression.get("quantizer")  # gptq|awq; never with a trim (BuildConfig refuses the mix)
    quant = run(QUANTIZE, QuantizeInputs(
        source=dense, qtype=cfg.quant.upper(),
        imatrix_from=split.split() if cfg.compression.get("imatrix") else None, quantizer=quantizer,
        checkpoint=checkpoint if quantizer else None, calib_from=split.split() if quantizer else None,
        calib=dict(calib_chunks=cfg.compression["calib_chunks"], calib_seq_len=cfg.compression["calib_seq_len"],
                   seed=cfg.seed, n_ctx=split.n_ctx_eval) if quantizer else {},
        **tensor_type_options(cfg)))
    quality = run(QUALITY, QualityInputs(reference=trim.trimmed() if trim else conv.gguf(), model=quant.model(),
                                         split=split.split(), n_ctx=split.n_ctx_eval))
    return dict(convert=conv, parity=parity, split=split, compress=comp, quantize=quant, quality=quality, trim=trim,
                adapt=adapted)


def _resolve_compression(cfg: Any, model_dir: Path) -> Any:
    """Validate ``cfg.compression`` against the checkpoint; without pruning, fill in its defaults in place (what the
    recipe stores; with pruning the compress stage resolves them). Returns the CompressionOptions.
    Raises CompressionConfigError."""
    from fieldpack.builder.compress import validate_compression

    opts = validate_compression(cfg.compression, model_dir=model_dir, qtype=cfg.quant)
    if opts.prune is None:
        cfg.compression.update(opts.to_dict())
    return opts


def _adapter_stages(cfg: Any, checkpoint: Input, conv: ConvertRecord, split: SplitRecord, adapted: AdaptRecord,
                    chunks: Input, run: Runner) -> dict[str, Any]:
    """``--ship-adapter``: the source checkpoint is gated, [trimmed,] quantized and shipped; the adapted (merged)
    checkpoint is converted only as the reference that the adapter check and the quality stage measure against.

    With ``--trim-vocab`` the base model is trimmed (and gated) as in a plain build, and the merged reference is cut
    to the same token ids (:data:`TRIM_LIKE`), so base + adapter and the reference share the vocabulary the device
    runs. Our LoRA adapts only the blocks' linear layers, which trimming does not touch, so the adapter trained on
    the untrimmed model applies unchanged. (No pruning or calibrated quantizer: :meth:`BuildConfig` refuses those
    with ``--ship-adapter``.)"""
    if cfg.compression:  # --imatrix only (BuildConfig refuses pruning and calibrated quantizers here)
        _resolve_compression(cfg, checkpoint.path)
    merged = run(CONVERT, ConvertInputs(checkpoint=adapted.checkpoint_input(), outtype=cfg.parity_outtype))
    parity = run(PARITY, ParityInputs(checkpoint=checkpoint, gguf=conv.gguf()))
    trim = _trim(cfg, conv.gguf(), chunks, split, run)
    base, reference = conv.gguf(), merged.gguf()
    if trim is not None:
        base = trim.trimmed()
        reference = run(TRIM_LIKE, TrimLikeInputs(source=merged.gguf(), keep=tuple(trim.keep))).trimmed()
    adapter = adapted.adapter_input()
    check = run(ADAPTER_CHECK, AdapterCheckInputs(base=base, adapter=adapter, merged=reference, split=split.split(),
                                                  n_ctx=split.n_ctx_eval))
    quant = run(QUANTIZE, QuantizeInputs(source=base, qtype=cfg.quant.upper(),
                                         imatrix_from=split.split() if cfg.compression.get("imatrix") else None,
                                         **tensor_type_options(cfg)))
    quality = run(QUALITY, QualityInputs(reference=reference, model=quant.model(), split=split.split(),
                                         n_ctx=split.n_ctx_eval, adapter=adapter))
    return dict(convert=conv, parity=parity, split=split, compress=None, quantize=quant, quality=quality, trim=trim,
                adapt=adapted, adapter_check=check)


def _trim(cfg: Any, dense: Input, chunks: Input, split: SplitRecord, run: Runner) -> TrimRecord | None:
    """The trim stage when ``cfg.trim_vocab``; sets ``cfg.keep_general`` to the value used (for the recipe)."""
    if not cfg.trim_vocab:
        return None
    from fieldpack.builder.trim import DEFAULT_KEEP_GENERAL

    if cfg.keep_general is None:
        cfg.keep_general = DEFAULT_KEEP_GENERAL
    return run(TRIM, TrimInputs(source=dense, chunks=chunks, split=split.split(), keep_general=cfg.keep_general,
                                n_ctx=split.n_ctx_eval))


def tensor_type_options(cfg: Any) -> dict[str, str | None]:
    """The quantize stage's ``embd_type`` / ``output_type`` from the config (upper case; None: the mix's)."""
    return dict(embd_type=cfg.embd_type.upper() if cfg.embd_type else None,
                output_type=cfg.output_type.upper() if cfg.output_type else None)


def _gguf_model_stages(cfg: Any, gguf_path: Path, chunks: Input, run: Runner) -> dict[str, Any]:
    """gguf input -> eval split (~4 characters per token) -> [quantize, when ``--quant`` names another type than
    the file's] -> quality (PPL/KLD vs the input when re-quantized, else the input's PPL), for a GGUF input;
    no parity stage. Sets ``cfg.quant`` to the type that ships. Returns the :class:`BuildRecords` fields."""
    from fieldpack.builder.pipeline import requested_quant

    src = run(GGUF_INPUT, GgufInputInputs(gguf=Input.file(gguf_path)))
    split = run(SPLIT, SplitInputs(chunks=chunks, tokenizer=None, fraction=cfg.eval_fraction,
                                   max_chunks=cfg.eval_max_chunks, seed=cfg.seed,
                                   n_ctx_train=src.conversion.n_ctx_train))
    trim = _trim(cfg, src.gguf(), chunks, split, run)  # a quantized input is trimmed as stored (rows cut)
    base = trim.trimmed() if trim else src.gguf()
    requested = requested_quant(cfg)
    quant: QuantizeRecord | None = None
    if requested is not None and requested.upper() != src.file_type.upper():  # gguf_input.requantize_requested
        quant = run(QUANTIZE, QuantizeInputs(source=base, qtype=requested.upper(),
                                             allow_requantize=src.quantized, **tensor_type_options(cfg)))
    cfg.quant = quant.quant.qtype if quant is not None else src.file_type
    quality = run(QUALITY, QualityInputs(reference=base if quant is not None else None,
                                         model=quant.model() if quant is not None else base,
                                         split=split.split(), n_ctx=split.n_ctx_eval))
    return dict(convert=src, parity=None, split=split, compress=None, quantize=quant, quality=quality, trim=trim)
