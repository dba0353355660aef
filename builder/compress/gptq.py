"""GPTQ onto llama.cpp's Q4_0 / Q8_0 grids: integers chosen with second-order error feedback, written as GGUF.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", Algorithm 1) quantizes a linear layer ``W`` (``rows x cols``, ``y = W x``) column by
column so that the layer's output on calibration inputs ``X`` changes least: with ``H = 2 X X^T / n`` (the
Hessian of ``||W X - Q X||^2``), dampened by ``percdamp * mean(diag H)``, and ``U`` the upper Cholesky factor of
``H^-1``, column ``i`` is rounded to the grid and its error ``(w_i - q_i) / U_ii`` is spread over the columns not
yet quantized (``W[:, i:] -= err * U[i, i:]``); updates outside the current block of ``blocksize`` columns are
applied lazily once per block. Columns are taken in order (no act-order), so each group of 32 input columns
gets its scale when its first column is reached, from the weights as updated so far (the reference code's
``groupsize`` behaviour).

The grids are llama.cpp's own, so the chosen integers are stored as they are, with no re-rounding:

* **Q4_0** (``block_q4_0``: fp16 ``d`` + 16 bytes): 32 weights per block, ``x = d * (q - 8)``, ``q`` in 0..15;
  low nibbles hold elements 0..15, high nibbles 16..31. ``d = m / -8`` with ``m`` the block's value of largest
  magnitude (sign kept), as ``quantize_row_q4_0_ref`` chooses it.
* **Q8_0** (``block_q8_0``: fp16 ``d`` + 32 int8): ``x = d * q``, ``d = max|x| / 127``.

GPTQ rounds each weight to the nearest point of its block's grid with the fp16-rounded ``d`` (the value
llama.cpp multiplies by), so dequantizing the GGUF gives exactly the values GPTQ chose and measured its error
with. Symmetric 4-bit groups of 32 are exactly Q4_0; 8-bit are Q8_0.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fieldpack.shared.errors import CompressionConfigError, CompressionOptionError

log = logging.getLogger(__name__)

#: Weights per block of Q4_0 and Q8_0 (``QK4_0``, ``QK8_0``).
BLOCK = 32
#: GGUF types GPTQ can write exactly.
GPTQ_TYPES = ("Q4_0", "Q8_0")
#: Relative dampening of the Hessian diagonal (the paper's 1%).
DEFAULT_PERCDAMP = 0.01
#: Columns per lazy batch update (the paper's B = 128); a multiple of :data:`BLOCK`.
DEFAULT_BLOCKSIZE = 128


def check_grid(qtype: str) -> str:
    """The upper-case grid name; raises CompressionOptionError for a type GPTQ cannot write exactly."""
    key = qtype.upper()
    if key not in GPTQ_TYPES:
        raise CompressionOptionError(
            f"--quantizer gptq writes {' or '.join(GPTQ_TYPES)} (symmetric groups of 32), not {qtype}",
            hint="use --quant Q4_0 or --quant Q8_0 with gptq, or --quantizer awq for K-quants such as Q4_K_M")
    return key


def check_row_length(name: str, cols: int) -> None:
    """Raise CompressionConfigError naming ``name`` when its rows (``cols`` inputs) do not split into blocks."""
    if cols % BLOCK:
        raise CompressionConfigError(
            f"{name} has rows of {cols} weights, not a multiple of the {BLOCK}-weight Q4_0/Q8_0 block, so GPTQ "
            "cannot place its integers on the GGUF grid",
            hint="build with --quantizer rtn (llama.cpp falls back to another type for that tensor)")


def block_scales(group: Any, qtype: str) -> Any:
    """llama.cpp's per-block scale ``d`` for ``group`` ``(rows, 32)`` float32, rounded to fp16 (returned as
    float32 ``(rows,)``): Q4_0 ``m / -8`` (``m`` the largest-magnitude value, signed), Q8_0 ``max|x| / 127``."""
    import torch

    if qtype == "Q4_0":
        idx = group.abs().argmax(dim=1, keepdim=True)
        d = torch.gather(group, 1, idx).squeeze(1) / -8.0
    else:
        d = group.abs().amax(dim=1) / 127.0
    return d.to(torch.float16).to(torch.float32)


def round_to_grid(w: Any, d: Any, qtype: str) -> tuple[Any, Any]:
    """Nearest grid point of ``w`` ``(rows,)`` on scales ``d`` ``(rows,)``: ``(q int, value float32)``.

    Q4_0: ``q`` in 0..15 stored, value ``d * (q - 8)``; Q8_0: ``q`` in -128..127, value ``d * q``. ``d == 0``
    gives value 0 (``q = 8`` / ``0``), as llama.cpp writes an all-zero block.
    """
    import torch

    safe = torch.where(d == 0, torch.ones_like(d), d)
    if qtype == "Q4_0":
        q = torch.clamp(torch.round(w / safe) + 8, 0, 15)
        q = torch.where(d == 0, torch.full_like(q, 8), q)
        return q.to(torch.int16), d * (q - 8)
    q = torch.clamp(torch.round(w / safe), -128, 127)
    q = torch.where(d == 0, torch.zeros_like(q), q)
    return q.to(torch.int16), d * q


def rtn_values(w: Any, qtype: str) -> Any:
    """Round-to-nearest of ``w`` ``(rows, cols)`` on the Q4_0/Q8_0 grid (llama.cpp's scale choice), dequantized
    float32: the baseline GPTQ is measured against."""
    rows, cols = w.shape
    blocks = w.float().reshape(-1, BLOCK)
    d = block_scales(blocks, qtype).unsqueeze(1).expand(-1, BLOCK).reshape(-1)
    return round_to_grid(blocks.reshape(-1), d, qtype)[1].reshape(rows, cols)


@dataclass
class GptqResult:
    """One quantized matrix.

    Attributes:
        qtype: ``"Q4_0"`` or ``"Q8_0"``.
        q: ``(rows, cols)`` int16 stored integers (Q4_0 0..15; Q8_0 -128..127).
        d: ``(rows, cols // 32)`` float32 block scales, each exactly an fp16 value.
        values: ``(rows, cols)`` float32 dequantized weights (``d * (q - 8)`` or ``d * q``).
    """

    qtype: str
    q: Any
    d: Any
    values: Any


def gptq_quantize(weight: Any, hessian: Any, qtype: str, *, blocksize: int = DEFAULT_BLOCKSIZE,
                  percdamp: float = DEFAULT_PERCDAMP) -> GptqResult:
    """GPTQ (Algorithm 1 of the paper) of one matrix onto the Q4_0 or Q8_0 grid.

    Args:
        weight: ``(rows, cols)`` weight, any float dtype (computed in float32 on its device).
        hessian: ``(cols, cols)`` ``2 X X^T / n`` of the layer's calibration inputs (not modified).
        qtype: ``"Q4_0"`` or ``"Q8_0"``.
        blocksize: columns per lazy batch update (rounded down to a multiple of 32, at least 32).
        percdamp: dampening, as a share of the mean Hessian diagonal.

    Returns:
        a :class:`GptqResult`.

    Raises:
        CompressionConfigError: an unsupported type, ``cols`` not a multiple of 32, or a Hessian that is not
            positive definite after dampening.
    """
    import torch

    from fieldpack.builder.compress.masks import inverse_hessian_factor

    qtype = check_grid(qtype)
    W = weight.detach().clone().float()
    rows, cols = W.shape
    check_row_length("the weight", cols)
    blocksize = max(BLOCK, blocksize // BLOCK * BLOCK)
    hinv, dead = inverse_hessian_factor(hessian.detach().clone().float().to(W.device), percdamp)
    W[:, dead] = 0.0
    Q = torch.zeros_like(W)
    q_int = torch.zeros((rows, cols), dtype=torch.int16, device=W.device)
    scales = torch.zeros((rows, cols // BLOCK), dtype=torch.float32, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        d = scales[:, 0]
        for i in range(i2 - i1):
            col = i1 + i
            if col % BLOCK == 0:  # the group's scale, from its weights as updated so far
                d = block_scales(W1[:, i:i + BLOCK], qtype)
                scales[:, col // BLOCK] = d
            w = W1[:, i]
            qi, qv = round_to_grid(w, d, qtype)
            q_int[:, col] = qi
            Q[:, col] = qv
            err = (w - qv) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i2:] -= Err1.matmul(hinv[i1:i2, i2:])  # lazy batch update of the later columns
    return GptqResult(qtype=qtype, q=q_int, d=scales, values=Q)


def pack_blocks(q: np.ndarray, d: np.ndarray, qtype: str) -> np.ndarray:
    """GGUF block bytes of a matrix: ``(rows, cols // 32 * type_size)`` uint8.

    Args:
        q: ``(rows, cols)`` stored integers (Q4_0 0..15, Q8_0 -128..127).
        d: ``(rows, cols // 32)`` block scales (fp16 values).
        qtype: ``"Q4_0"`` (``block_q4_0``: fp16 d, 16 bytes, low nibbles elements 0..15, high nibbles 16..31) or
            ``"Q8_0"`` (``block_q8_0``: fp16 d, 32 int8).
    """
    rows, cols = q.shape
    nb = cols // BLOCK
    blocks = np.asarray(q).reshape(rows, nb, BLOCK)
    dd = np.asarray(d, dtype=np.float32).astype(np.float16).reshape(rows, nb, 1).view(np.uint8)  # (rows, nb, 2)
    if qtype == "Q4_0":
        b = blocks.astype(np.uint8)
        qs = b[..., :BLOCK // 2] | (b[..., BLOCK // 2:] << np.uint8(4))
    else:
        qs = blocks.astype(np.int8).view(np.uint8)
    return np.concatenate([dd, qs], axis=-1).reshape(rows, -1)


# --------------------------------------------------------------------------------------------------------
# the model driver


@dataclass
class GptqReport:
    """What :func:`gptq_model` did.

    Attributes:
        qtype: the grid. matrices: linears quantized. calib_tokens: calibration tokens. seconds: wall time.
        device: torch device. results: HF module name (``"model.layers.0.self_attn.q_proj"``) -> result.
        rel_error: module name -> ``||W X - Q X||_F^2 / ||W X||_F^2`` on the calibration inputs of that layer
            (the error GPTQ minimised, from ``H``: ``tr(E H E^T) / tr(W H W^T)``).
        rtn_rel_error: the same for round-to-nearest on the same grid and the same inputs.
    """

    qtype: str
    matrices: int = 0
    calib_tokens: int = 0
    seconds: float = 0.0
    device: str = "cpu"
    results: dict[str, GptqResult] = field(default_factory=dict, repr=False)
    rel_error: dict[str, float] = field(default_factory=dict)
    rtn_rel_error: dict[str, float] = field(default_factory=dict)

    @property
    def error_ratio(self) -> float:
        """Median over matrices of GPTQ's layer-wise output error / RTN's (below 1: GPTQ is better)."""
        r = sorted(self.rel_error[k] / self.rtn_rel_error[k] for k in self.rel_error if self.rtn_rel_error.get(k))
        return r[len(r) // 2] if r else float("nan")


def output_error(weight: Any, values: Any, hessian: Any) -> float:
    """``||W X - Q X||_F^2 / ||W X||_F^2`` computed from ``H = 2 X X^T / n``: ``tr(E H E^T) / tr(W H W^T)``."""
    W = weight.float()
    E = W - values.float()
    num = float((E.matmul(hessian) * E).sum())
    den = float((W.matmul(hessian) * W).sum())
    return num / den if den > 0 else 0.0


def gptq_model(model: Any, input_ids: Any, qtype: str, *, device: str | None = None,
               blocksize: int = DEFAULT_BLOCKSIZE, percdamp: float = DEFAULT_PERCDAMP) -> GptqReport:
    """GPTQ every decoder-block linear of ``model``, block by block, in place (weights become the grid values).

    As in the paper's code, blocks are processed in order: the calibration windows pass through block ``l``
    once to accumulate each linear's ``H`` (q/k/v share one input, gate/up another), its linears are
    quantized, and the block's *quantized* outputs become block ``l+1``'s inputs. Embeddings and the LM head
    are left to llama.cpp's round-to-nearest.

    Args:
        model: a Hugging Face causal LM (Llama, Qwen2, Gemma 3 layout) on CPU, float32, eval mode.
        input_ids: ``(n_windows, seq_len)`` int64 calibration windows.
        qtype: ``"Q4_0"`` or ``"Q8_0"``.
        device: torch device for the per-block work (default: cuda when present, else cpu).

    Returns:
        a :class:`GptqReport` with every matrix's integers and scales.

    Raises:
        CompressionConfigError: an unsupported type, a linear whose rows do not split into 32-weight blocks
            (named; checked before any calibration pass), a Hessian not positive definite.
    """

    from fieldpack.builder.compress.masks import (
        block_linears,
        collect_input_stats,
        decoder_layers,
        for_each_block,
        pick_device,
    )

    qtype = check_grid(qtype)
    layers = decoder_layers(model)
    for idx, block in enumerate(layers):
        for name, lin in block_linears(block):
            check_row_length(f"layers.{idx}.{name}", lin.in_features)
    device = device or pick_device()
    prefix = _layers_prefix(model)
    report = GptqReport(qtype=qtype, calib_tokens=int(input_ids.numel()), device=device)
    t0 = time.perf_counter()

    def quantize_block(idx: int, block: Any, feed: Any) -> None:
        stats = collect_input_stats(block, feed, need_hessian=True, device=device)
        for name, lin in block_linears(block):
            H = stats.pop(name).hessian  # the others' Hessians are freed as they are used
            res = gptq_quantize(lin.weight.data, H, qtype, blocksize=blocksize, percdamp=percdamp)
            full = f"{prefix}.{idx}.{name}"
            report.rel_error[full] = output_error(lin.weight.data, res.values, H)
            report.rtn_rel_error[full] = output_error(lin.weight.data, rtn_values(lin.weight.data, qtype), H)
            lin.weight.data = res.values.to(dtype=lin.weight.dtype)
            report.results[full] = GptqResult(qtype, res.q.cpu(), res.d.cpu(), res.values.cpu())
            report.matrices += 1

    for_each_block(model, input_ids, device, quantize_block, f"gptq {qtype}")  # quantized outputs feed on
    report.seconds = time.perf_counter() - t0
    log.info("gptq %s: %d matrices, %d calibration tokens, %.1f s on %s, median output error vs RTN %.3f", qtype,
             report.matrices, report.calib_tokens, report.seconds, device, report.error_ratio)
    return report


def _layers_prefix(model: Any) -> str:
    """The module path of the decoder blocks (``"model.layers"``)."""
    from fieldpack.builder.compress.masks import decoder_layers

    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    return "model.layers"


def gguf_blocks(report: GptqReport, model_dir: Any) -> dict[str, np.ndarray]:
    """The GGUF tensor name and block bytes of every matrix in ``report``, in the row order our converter
    writes (Llama's Q/K rows permuted for llama.cpp's RoPE, :func:`builder.convert.arch.permute_qk`; a row
    permutation moves whole rows, so the integers and scales follow their rows unchanged).

    Args:
        report: from :func:`gptq_model` on the checkpoint in ``model_dir``.
        model_dir: the Hugging Face checkpoint folder the GGUF was converted from.

    Returns:
        GGUF tensor name (``"blk.0.attn_q.weight"``) -> ``(rows, row_bytes)`` uint8.

    Raises:
        CompressionConfigError: a quantized module has no tensor in the converted model.
    """
    from pathlib import Path

    from fieldpack.builder.convert.arch import permute_qk, plan_tensors, read_hparams
    from fieldpack.builder.convert.checkpoint import Checkpoint

    ckpt = Checkpoint(Path(model_dir))
    hp = read_hparams(ckpt.config, ckpt.architecture, source=str(ckpt.model_dir))
    by_source = {p.source: p.gguf_name for p in plan_tensors(ckpt, hp)}
    out: dict[str, np.ndarray] = {}
    for module, res in report.results.items():
        gname = by_source.get(module + ".weight")
        if gname is None:
            raise CompressionConfigError(f"{module} has no tensor in the GGUF converted from {model_dir}",
                                         hint="report this as a bug")
        q, d = res.q.numpy(), res.d.numpy()
        heads = None
        if hp.permute_qk and ".self_attn.q_proj" in module:
            heads = hp.n_head
        elif hp.permute_qk and ".self_attn.k_proj" in module:
            heads = hp.n_head_kv
        if heads is not None:
            q, d = permute_qk(q, heads), permute_qk(d, heads)
        out[gname] = pack_blocks(q, d, res.qtype)
    return out
