"""``--quantizer rtn|gptq|awq``: how the shipped GGUF's integers are chosen, beside ``--quant TYPE`` and
``--imatrix``.

* ``rtn`` (default): llama.cpp's own round-to-nearest (with the importance matrix when ``--imatrix domain``).
* ``gptq`` (:mod:`.gptq`): llama.cpp writes the RTN file of the type (Q4_0 or Q8_0), then every decoder-block
  linear's blocks are replaced by GPTQ's, chosen on the documents' calibration windows; everything else
  (header, embeddings, output, norms) stays byte for byte llama.cpp's. The file has the same size and layout.
* ``awq`` (:mod:`.awq`): AWQ scales are searched on the calibration windows and folded into the float model,
  which our converter turns into an F16 GGUF and llama.cpp quantizes to any type (with the imatrix too when
  asked, computed on the scaled model).

Both calibrate on the same windows as pruning and the imatrix (:mod:`.calibration`, the ``eval split``'s
calibration side, ``calib_chunks`` x ``calib_seq_len``), on cuda when torch sees a GPU, else on the CPU.
Everything a user can get wrong (type, architecture, row lengths, too few calibration tokens) is refused before
the model is loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fieldpack.shared.errors import CompressionConfigError, CompressionOptionError

log = logging.getLogger(__name__)

from fieldpack.builder.compress.options import QUANTIZERS
#: AWQ's per-channel means need at least this many calibration tokens.
AWQ_MIN_TOKENS = 128


def check_quantizer(quantizer: str, qtype: str, *, prune: str | None = None, model: Path | None = None) -> None:
    """Checks before any work: the options, and with ``model`` what its ``config.json`` tells.

    Raises:
        CompressionConfigError: an unknown quantizer; gptq with a type other than Q4_0/Q8_0; awq with F16/F32;
            either combined with pruning or given a GGUF input; a layer width that does not split into
            32-weight blocks (gptq; named).
    """
    from fieldpack.builder.compress.awq import grid_of
    from fieldpack.builder.compress.gptq import check_grid

    if quantizer not in QUANTIZERS:
        raise CompressionOptionError(f"--quantizer {quantizer!r} is not a quantizer",
                                     hint=f"use one of {', '.join(QUANTIZERS)}")
    if quantizer == "gptq":
        check_grid(qtype)
    elif quantizer == "awq":
        grid_of(qtype)
    if quantizer != "rtn" and prune is not None:
        raise CompressionOptionError(f"--quantizer {quantizer} is not combined with --prune yet",
                                     hint="build without --prune, or with --quantizer rtn")
    if quantizer != "rtn" and model is not None and Path(model).is_file():
        raise CompressionOptionError(f"--quantizer {quantizer} calibrates the float model; {model} is a GGUF file",
                                     hint="pass the Hugging Face checkpoint folder, or drop --quantizer")
    if quantizer == "gptq" and model is not None and (Path(model) / "config.json").is_file():
        from fieldpack.builder.compress.gptq import check_row_length

        for what, cols in widest_input(Path(model))[1]:
            check_row_length(what, cols)


def widest_input(model_dir: Path) -> tuple[int, list[tuple[str, int]]]:
    """Widest linear input (columns) of a checkpoint's decoder blocks, and each kind's input width, from
    ``config.json`` (no weights loaded): ``q/k/v`` and ``gate/up`` read ``hidden_size``, ``o`` reads
    ``n_head * head_dim``, ``down`` reads ``intermediate_size``.

    Raises:
        CompressionConfigError: no readable config.json or a missing field.
    """
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg = cfg.get("text_config", cfg)
        hidden, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        widths = [("attn_q/attn_k/attn_v, ffn_gate/ffn_up", hidden),
                  ("attn_output", n_head * int(cfg.get("head_dim") or hidden // n_head)),
                  ("ffn_down", int(cfg["intermediate_size"]))]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CompressionConfigError(f"cannot read the layer widths from {path}: {exc}",
                                     hint="pass an unmodified Hugging Face checkpoint folder") from exc
    return max(w for _, w in widths), widths


@dataclass
class CalibratedQuant:
    """What :func:`calibrated_quantize` made: ``quant`` (the shipped GGUF's QuantResult), ``rtn`` (llama.cpp's
    RTN file of the same type that GPTQ patched, else None) and flat ``detail`` figures for the manifest."""

    quant: Any
    rtn: Any = None
    detail: dict[str, Any] = field(default_factory=dict)


def calibrated_quantize(quantizer: str, model_dir: Path, f16_gguf: Path, calib_texts: list[str], qtype: str,
                        out_dir: Path, *, imatrix_texts: list[str] | None = None, calib_chunks: int = 128,
                        calib_seq_len: int = 256, seed: int = 0, device: str | None = None) -> CalibratedQuant:
    """Quantize ``model_dir`` to ``qtype`` with GPTQ or AWQ; the output is ``out_dir/model.gguf``.

    Args:
        quantizer: ``"gptq"`` or ``"awq"``.
        model_dir: the Hugging Face checkpoint. f16_gguf: its F16/F32 conversion.
        calib_texts: the calibration chunks (never the held-out ones).
        imatrix_texts: also use a domain imatrix computed on these texts (None: no imatrix).
        calib_chunks / calib_seq_len / seed: the calibration windows (:func:`.calibration.build_calibration`).
        device: torch device (default: cuda when present, else cpu).

    Raises:
        CompressionConfigError: see :func:`check_quantizer`; a row length that does not fit the grid (named);
            too few calibration tokens (with the ``--calib-chunks`` that would do).
        BuildError subclasses from conversion and quantization.
    """
    from fieldpack.builder.compress.calibration import build_calibration, load_float_model, require_tokens
    from fieldpack.builder.compress.masks import pick_device

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_quantizer(quantizer, qtype, model=model_dir)
    widest, _ = widest_input(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seq_len = calib_seq_len
    calib = build_calibration(model_dir, calib_texts, n_chunks=calib_chunks, seq_len=seq_len, seed=seed)
    if quantizer == "gptq":
        require_tokens(calib, widest, f"GPTQ's Hessian of the widest layer input ({widest} columns) to be full rank")
    else:
        require_tokens(calib, AWQ_MIN_TOKENS, "AWQ's per-channel activation means")
    device = device or pick_device()
    model = load_float_model(model_dir, quantizer)
    detail: dict[str, Any] = dict(quantizer=quantizer, calib_tokens=calib.n_tokens, device=device)
    if quantizer == "gptq":
        return _gptq(model, model_dir, f16_gguf, calib, qtype, out_dir, imatrix_texts, detail, device)
    return _awq(model, model_dir, calib, qtype, out_dir, imatrix_texts, detail, device)


def _imatrix(gguf_path: Path, texts: list[str] | None, out: Path) -> Path | None:
    if texts is None:
        return None
    from fieldpack.builder.compress import compute_imatrix

    return compute_imatrix(gguf_path, texts, out)


def _gptq(model: Any, model_dir: Path, f16_gguf: Path, calib: Any, qtype: str, out_dir: Path,
          imatrix_texts: list[str] | None, detail: dict[str, Any], device: str) -> CalibratedQuant:
    import dataclasses

    from fieldpack.builder.compress.gptq import gguf_blocks, gptq_model
    from fieldpack.builder.convert.patch import replace_tensor_data
    from fieldpack.builder.quantize import quantize_gguf

    imx = _imatrix(Path(f16_gguf), imatrix_texts, out_dir / "imatrix.dat")
    rtn = quantize_gguf(Path(f16_gguf), out_dir / "rtn.gguf", qtype, imatrix=imx)
    rep = gptq_model(model, calib.input_ids, qtype, device=device)
    del model
    blocks = gguf_blocks(rep, model_dir)
    kept = {n: b for n, b in blocks.items() if rtn.tensor_type_by_name.get(n) == qtype.upper()}
    if len(kept) < len(blocks):
        log.warning("gptq: %d tensors kept llama.cpp's own type (not %s): %s", len(blocks) - len(kept), qtype,
                    ", ".join(sorted(set(blocks) - set(kept))))
    out = out_dir / "model.gguf"
    sha = replace_tensor_data(rtn.path, out, kept, expect_type=qtype.upper())
    quant = dataclasses.replace(rtn, path=out, sha256=sha)
    detail.update(matrices=len(kept), calib_seconds=round(rep.seconds, 1),
                  layer_error_ratio_vs_rtn=round(rep.error_ratio, 4))
    return CalibratedQuant(quant=quant, rtn=rtn, detail=detail)


def _awq(model: Any, model_dir: Path, calib: Any, qtype: str, out_dir: Path, imatrix_texts: list[str] | None,
         detail: dict[str, Any], device: str) -> CalibratedQuant:
    import torch

    from fieldpack.builder.compress.awq import awq_model
    from fieldpack.builder.compress.structured import save_checkpoint
    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.quantize import quantize_gguf

    rep = awq_model(model, calib.input_ids, qtype, device=device)
    ckpt = save_checkpoint(model, model_dir, out_dir / "awq-checkpoint", dtype=torch.float32,
                           provenance={"quantizer": "awq", "grid": rep.grid, "alphas": rep.alphas})
    del model
    f16 = convert_hf_to_gguf(ckpt, out_dir / "awq-f16.gguf", outtype="f16")
    imx = _imatrix(f16.path, imatrix_texts, out_dir / "imatrix.dat")
    quant = quantize_gguf(f16.path, out_dir / "model.gguf", qtype, imatrix=imx)
    detail.update(grid=rep.grid, calib_seconds=round(rep.seconds, 1), proxy_error_ratio_vs_rtn=round(rep.mean_gain, 4),
                  mean_alpha=round(sum(rep.alphas.values()) / max(1, len(rep.alphas)), 3))
    return CalibratedQuant(quant=quant, detail=detail)
