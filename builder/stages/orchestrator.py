"""The build's stage graph: which stage feeds which, in the order progress is shown.

::

    embedder ─┬─▶ ingest ─▶ index ─▶ smoke question
              │      │
    convert ──┼──▶ parity         eval split (chunks + model tokenizer)
              │                      │
              └──▶ [compress] ─▶ quantize ─▶ quality (PPL/KLD on held-out chunks)

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
from fieldpack.builder.stages.embedder import ADAPT, EMBEDDER, AdaptInputs, AdaptRecord, EmbedderInputs, EmbedderRecord
from fieldpack.builder.stages.gguf import GGUF_INPUT, GgufInputInputs, GgufInputRecord
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
    ``compress`` is None when nothing was pruned; ``quantize`` is None when a GGUF input ships as is.
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
    adapt: AdaptRecord | None = None

    def all(self) -> dict[str, Any]:
        """Stage name -> record, in build order (skipped stages left out)."""
        return {k: v for k, v in vars(self).items() if v is not None}

    @property
    def gguf_input(self) -> GgufInputRecord | None:
        """The GGUF input's record when the build started from a GGUF file, else None."""
        return self.convert if isinstance(self.convert, GgufInputRecord) else None

    def shipped_model(self) -> Input:
        """The GGUF that goes into the bundle: the quantized model, or a GGUF input kept as is."""
        return self.quantize.model() if self.quantize is not None else self.convert.gguf()


def run_stages(cfg: Any, model_dir: Path, run: Runner) -> BuildRecords:
    """Run (or reuse) every stage for ``cfg`` (a :class:`~fieldpack.builder.config.BuildConfig`) on the local
    checkpoint folder or GGUF file ``model_dir``. Updates ``cfg.compression`` in place with the resolved
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
                                   chunk_tokens=cfg.chunk_tokens, overlap_tokens=cfg.overlap_tokens))
    chunks = ing.artefact(CHUNKS_NAME).as_input()
    adapt: AdaptRecord | None = None
    if getattr(cfg, "adapt_embedder", False):
        base = EmbedderInputs.from_config(cfg.embedder, cfg.embedder_int8)
        adapt = run(ADAPT, AdaptInputs(checkpoint=base.checkpoint, chunks=chunks, steps=cfg.adapt_steps, seed=cfg.seed))
        if adapt.result.kept and adapt.result.model_dir is not None:  # same tokenizer: the chunks stay valid
            emb = run(EMBEDDER, EmbedderInputs(checkpoint=Input.tree(adapt.result.model_dir),
                                               name=f"{e.name}+adapted", int8=cfg.embedder_int8))
            e = emb.export
            emb_files = EmbedderFiles(onnx=emb.input_for(e.onnx_path), tokenizer=emb.input_for(e.tokenizer_path),
                                      max_tokens=e.max_tokens, name=e.name)
    idx = run(INDEX, IndexInputs(chunks=chunks, embedder=emb_files))
    smoke = run(SMOKE, SmokeInputs(chunks=chunks, index=idx.input_for(idx.stats.path), embedder=emb_files))

    model_stages = _gguf_model_stages if is_gguf_path(model_dir) else _hf_model_stages
    return BuildRecords(embedder=emb, ingest=ing, index=idx, smoke=smoke, adapt=adapt,
                        **model_stages(cfg, Path(model_dir), chunks, run))


def _hf_model_stages(cfg: Any, model_dir: Path, chunks: Input, run: Runner) -> dict[str, Any]:
    """convert -> parity -> eval split -> [compress] -> quantize -> quality, for a Hugging Face checkpoint.
    Returns the :class:`BuildRecords` fields of the model stages."""
    checkpoint = Input.tree(model_dir)  # hashed once; every model stage reads the checkpoint through it
    conv = run(CONVERT, ConvertInputs(checkpoint=checkpoint, outtype=cfg.parity_outtype))
    parity = run(PARITY, ParityInputs(checkpoint=checkpoint, gguf=conv.gguf()))
    tok = model_dir / "tokenizer.json"
    split = run(SPLIT, SplitInputs(chunks=chunks, tokenizer=Input.file(tok) if tok.is_file() else None,
                                   fraction=cfg.eval_fraction, max_chunks=cfg.eval_max_chunks, seed=cfg.seed,
                                   n_ctx_train=conv.conversion.n_ctx_train))

    comp: CompressRecord | None = None
    if cfg.compression:
        from fieldpack.builder.compress import validate_compression

        opts = validate_compression(cfg.compression, model_dir=model_dir)
        if opts.prune is None:
            cfg.compression.update(opts.to_dict())
        else:
            comp = run(COMPRESS, CompressInputs(
                checkpoint=checkpoint, reference=conv.gguf(), architecture=conv.conversion.architecture,
                n_ctx_train=conv.conversion.n_ctx_train, options=dict(cfg.compression), seed=cfg.seed,
                outtype=cfg.parity_outtype, split=split.split()))
            cfg.compression.update(comp.resolved)
    quant = run(QUANTIZE, QuantizeInputs(source=comp.dense() if comp else conv.gguf(), qtype=cfg.quant.upper(),
                                         imatrix_from=split.split() if cfg.compression.get("imatrix") else None))
    quality = run(QUALITY, QualityInputs(reference=conv.gguf(), model=quant.model(), split=split.split(),
                                         n_ctx=split.n_ctx_eval))
    return dict(convert=conv, parity=parity, split=split, compress=comp, quantize=quant, quality=quality)


def _gguf_model_stages(cfg: Any, gguf_path: Path, chunks: Input, run: Runner) -> dict[str, Any]:
    """gguf input -> eval split (~4 characters per token) -> [quantize, when ``--quant`` names another type than
    the file's] -> quality (PPL/KLD vs the input when re-quantized, else the input's PPL), for a GGUF input;
    no parity stage. Sets ``cfg.quant`` to the type that ships. Returns the :class:`BuildRecords` fields."""
    from fieldpack.builder.pipeline import requested_quant

    src = run(GGUF_INPUT, GgufInputInputs(gguf=Input.file(gguf_path)))
    split = run(SPLIT, SplitInputs(chunks=chunks, tokenizer=None, fraction=cfg.eval_fraction,
                                   max_chunks=cfg.eval_max_chunks, seed=cfg.seed,
                                   n_ctx_train=src.conversion.n_ctx_train))
    requested = requested_quant(cfg)
    quant: QuantizeRecord | None = None
    if requested is not None and requested.upper() != src.file_type.upper():  # gguf_input.requantize_requested
        quant = run(QUANTIZE, QuantizeInputs(source=src.gguf(), qtype=requested.upper(),
                                             allow_requantize=src.quantized))
    cfg.quant = quant.quant.qtype if quant is not None else src.file_type
    quality = run(QUALITY, QualityInputs(reference=src.gguf() if quant is not None else None,
                                         model=quant.model() if quant is not None else src.gguf(),
                                         split=split.split(), n_ctx=split.n_ctx_eval))
    return dict(convert=src, parity=None, split=split, compress=None, quantize=quant, quality=quality)
