"""Compression of the model before quantization: pruning that pays off, a domain imatrix, an honest report.

The pipeline calls, when ``cfg.compression`` is non-empty::

    ┌ validate_compression(options)                 (CLI, before any heavy work)
    │
    ├ apply_compression(cfg, model_dir, f16, calib, held_out, work)
    │     calibration windows (calibration.py) ─▶ prune the HF checkpoint
    │         magnitude | wanda | sparsegpt  (masks.py: unstructured or N:M, stored densely)
    │         depth | width                  (structured.py: fewer blocks / narrower MLP, really smaller)
    │     ─▶ smaller/sparser HF checkpoint ─▶ GGUF (our converter) ─▶ parity gate ─▶ quality rows (report.py)
    │     returns (GGUF to quantize, quality rows)
    │
    └ compute_imatrix(gguf, calib, out)             (imatrix.py, through llama.cpp; read by quantize_gguf)

Options are described in :mod:`builder.compress.options`. Every error a user can cause is a
:class:`~shared.errors.CompressionConfigError` raised before the expensive part of its stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fieldpack.builder.compress.options import (
    CompressionOptions,
    check_against_model,
    parse_options,
    read_model_shape,
    resolve_drop_layers,
    resolve_ffn_width,
)
from fieldpack.shared.errors import CompressionConfigError

log = logging.getLogger(__name__)

__all__ = ["CompressionOptions", "apply_compression", "compute_imatrix", "validate_compression"]

#: Activation statistics (Wanda norms, block influence, channel scores) need at least this many tokens.
MIN_ACTIVATION_TOKENS = 128


def validate_compression(options: dict[str, Any], *, model_dir: Path | str | None = None,
                         qtype: str | None = None) -> CompressionOptions:
    """Check compression options before any heavy work.

    Args:
        options: ``BuildConfig.compression`` (keys in :mod:`builder.compress.options`).
        model_dir: the local checkpoint folder (or GGUF file), when known: adds the checks that need its
            ``config.json`` (architecture, layer count, widths). A hub id or a missing folder skips them.
        qtype: the ``--quant`` type, when known: checked against ``quantizer``.

    Returns:
        the parsed :class:`CompressionOptions`.

    Raises:
        CompressionConfigError: sparsity outside (0, 1); a pattern that is not N:M with N < M; dropping >= the
            number of blocks; a width that would leave a layer empty; an architecture we cannot prune (named);
            an unknown key or a key that does not apply to the method.
    """
    opts = parse_options(options)
    if opts.prune is not None and model_dir is not None and Path(model_dir).is_dir():
        check_against_model(opts, read_model_shape(Path(model_dir)))
    if opts.quantizer is not None:
        from fieldpack.builder.compress.quantizers import check_quantizer

        check_quantizer(opts.quantizer, qtype or "Q4_K_M", prune=opts.prune,
                        model=Path(model_dir) if model_dir is not None and Path(model_dir).exists() else None)
    return opts


def _required_tokens(opts: CompressionOptions, shape: Any) -> tuple[int, str]:
    if opts.prune == "sparsegpt":
        widest = max(shape.hidden, shape.intermediate, shape.n_head * shape.head_dim)
        return widest, (f"SparseGPT's Hessian of the widest layer input ({widest} columns, e.g. mlp.down_proj) "
                        "to be full rank")
    return MIN_ACTIVATION_TOKENS, f"{opts.prune}'s activation statistics"


def prune_checkpoint(model_dir: Path, opts: CompressionOptions, calib_texts: list[str], work_dir: Path, *,
                     seed: int = 0, outtype: str = "f16",
                     held_out_texts: list[str] | None = None) -> tuple[Path, Any, dict[str, Any], dict[str, Any]]:
    """Prune ``model_dir`` as ``opts`` says (and heal it with ``opts.heal``: KD from the unpruned model on
    ``calib_texts``, measured on ``held_out_texts``), write the smaller/sparser checkpoint, convert it and gate parity.

    Returns:
        ``(pruned_dir, conversion, detail, resolved)``: the checkpoint folder, its ConversionResult, flat
        figures for the report (``removed``: what was pruned in words, achieved sparsity, dropped blocks,
        widths, calibration tokens, device, parity top-1; ``heal``: the heal run's adaptation row) and the options with defaults resolved (for the
        recipe).

    Raises:
        CompressionConfigError: an architecture we cannot prune, bad widths, a calibration set too small.
        ParityError: the pruned checkpoint and its GGUF disagree.
    """
    import torch

    from fieldpack.builder.compress.calibration import build_calibration, load_float_model, require_tokens
    from fieldpack.builder.compress.masks import pick_device, prune_with_masks
    from fieldpack.builder.compress.structured import prune_depth, prune_width, report_dict, save_checkpoint
    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.parity import check_parity

    shape = read_model_shape(model_dir)
    check_against_model(opts, shape)
    seq_len = min(opts.calib_seq_len, shape.max_positions)
    calib = None
    if opts.prune != "magnitude":
        calib = build_calibration(model_dir, calib_texts, n_chunks=opts.calib_chunks, seq_len=seq_len, seed=seed)
        needed, why = _required_tokens(opts, shape)
        require_tokens(calib, needed, why)
    model = load_float_model(model_dir, "pruning")
    stored = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
    store_dtype = getattr(torch, str(stored).replace("torch.", ""), torch.float32) if stored else torch.float32
    device = pick_device()
    resolved = opts.to_dict()
    if opts.prune in ("magnitude", "wanda", "sparsegpt"):
        rep: Any = prune_with_masks(model, opts.prune, sparsity=opts.sparsity, pattern=opts.pattern,
                                    input_ids=calib.input_ids if calib is not None else None, device=device)
        what = f"{opts.pattern[0]}:{opts.pattern[1]}" if opts.pattern else f"{opts.sparsity:.0%}"
        detail: dict[str, Any] = {"achieved_sparsity": round(rep.achieved_sparsity, 6), "matrices": rep.matrices}
    elif opts.prune == "depth":
        n_drop = resolve_drop_layers(opts, shape)
        rep = prune_depth(model, n_drop, calib.input_ids, device=device)
        resolved["drop_layers"] = n_drop
        what = f"-{n_drop} of {shape.n_layer} blocks"
        detail = {"dropped_blocks": ",".join(map(str, rep.dropped_blocks)),
                  "block_influence": ",".join(f"{b:.4f}" for b in rep.block_influence)}
    else:
        width = resolve_ffn_width(opts.ffn_keep, shape.intermediate)
        rep = prune_width(model, width, calib.input_ids, kv_heads_keep=opts.kv_heads_keep, device=device)
        what = f"ffn {rep.ffn_before}->{rep.ffn_after}" + (
            f", kv heads {rep.kv_heads_before}->{rep.kv_heads_after}" if rep.kv_heads_after != rep.kv_heads_before else "")
        detail = {"ffn": f"{rep.ffn_before}->{rep.ffn_after}",
                  "kv_heads": f"{rep.kv_heads_before}->{rep.kv_heads_after}"}
    calib_tokens = calib.n_tokens if calib is not None else 0
    if opts.heal == "kd":
        from fieldpack.builder.adapt import heal_pruned

        model, heal = heal_pruned(model, model_dir, calib_texts, held_out_texts or calib_texts, steps=opts.heal_steps,
                                  seq_len=seq_len, seed=seed)
        detail["heal"] = heal.row()
        store_dtype = torch.float32  # the LoRA deltas are merged into float32 weights; keep them
    pruned_dir = save_checkpoint(model, model_dir, Path(work_dir) / f"pruned-{opts.prune}",
                                 provenance={"options": resolved, "report": report_dict(rep),
                                             "calib_tokens": calib_tokens}, dtype=store_dtype)
    del model
    conv = convert_hf_to_gguf(pruned_dir, Path(work_dir) / f"model-{opts.prune}-{outtype}.gguf", outtype=outtype)
    parity = check_parity(pruned_dir, conv.path)
    detail.update(removed=what, calib_tokens=calib_tokens, device=device, parity_top1=parity.top1_agreement)
    return pruned_dir, conv, detail, resolved


def apply_compression(cfg: Any, model_dir: Path, f16: Any, calib_texts: list[str], held_out_texts: list[str],
                      work_dir: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Prune the checkpoint as ``cfg.compression`` asks and return the dense GGUF to quantize.

    Args:
        cfg: the :class:`builder.config.BuildConfig`; its ``compression`` dict is updated in place with the
            resolved options (defaults filled in, e.g. ``drop_layers``), so ``recipe.toml`` replays exactly.
        model_dir: the local Hugging Face checkpoint.
        f16: the ConversionResult of the unpruned checkpoint (the reference for ΔPPL/KLD).
        calib_texts / held_out_texts: the pipeline's calibration and held-out chunk texts.
        work_dir: scratch folder (the pruned checkpoint and its GGUF are written here).

    Returns:
        ``(gguf_path, stage_rows)``: the F16/F32 GGUF to quantize (``f16.path`` when nothing is pruned), and
        quality rows (dense, pruned) as flat dicts for the manifest's ``quality.stages``.

    Raises:
        CompressionConfigError: bad options, an architecture we cannot prune, a calibration set too small.
        ParityError: the pruned checkpoint and its GGUF disagree (a bug in the written config).
        BuildError subclasses from conversion.
    """
    from fieldpack.builder.compress.report import quality_rows

    model_dir, work_dir = Path(model_dir), Path(work_dir)
    opts = validate_compression(cfg.compression, model_dir=model_dir)
    if opts.prune is None:
        cfg.compression.update(opts.to_dict())
        return Path(f16.path), []
    _, conv, detail, resolved = prune_checkpoint(model_dir, opts, calib_texts, work_dir,
                                                 seed=int(getattr(cfg, "seed", 0)),
                                                 outtype=getattr(cfg, "parity_outtype", "f16"),
                                                 held_out_texts=held_out_texts)
    rows = quality_rows(Path(f16.path), [("pruned", opts.prune, detail.pop("removed"), conv.path)],
                        held_out_texts, n_ctx=min(256, int(getattr(f16, "n_ctx_train", 256) or 256)))
    out = [r.to_dict() for r in rows]
    out[-1].update(detail)
    cfg.compression.update(resolved)
    log.info("compression %s: %d -> %d bytes of GGUF", opts.label, Path(f16.path).stat().st_size, conv.size_bytes)
    return Path(conv.path), out


def compute_imatrix(dense_gguf_or_model: Path, calib_texts: list[str], out_path: Path, *,
                    n_ctx: int | None = None, max_chunks: int | None = None) -> Path:
    """Importance matrix of the model that will be quantized, on the domain calibration chunks.

    Args:
        dense_gguf_or_model: the F16/F32 GGUF to be quantized, or a Hugging Face checkpoint folder (converted
            to an F16 GGUF beside ``out_path`` first).
        calib_texts: calibration chunk texts.
        out_path: where to write the imatrix (llama-imatrix GGUF format; any suffix).
        n_ctx: window length in tokens (default 512, clipped to the model's and the text's length).
        max_chunks: decode at most this many windows.

    Returns:
        ``out_path``, ready for ``quantize_gguf(..., imatrix=out_path)``.

    Raises:
        InputNotFoundError / ModelLoadError / QuantizationError / UsageError: see
        :func:`builder.compress.imatrix.compute_imatrix_gguf`.
    """
    from fieldpack.builder.compress.imatrix import DEFAULT_IMATRIX_CTX, compute_imatrix_gguf

    src = Path(dense_gguf_or_model)
    if src.is_dir():
        from fieldpack.builder.convert import convert_hf_to_gguf

        src = convert_hf_to_gguf(src, Path(out_path).with_name(Path(out_path).stem + "-src-f16.gguf")).path
    return compute_imatrix_gguf(src, calib_texts, Path(out_path), n_ctx=n_ctx or DEFAULT_IMATRIX_CTX,
                                max_chunks=max_chunks).path
