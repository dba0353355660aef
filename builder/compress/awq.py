"""AWQ: activation-aware per-channel scales, folded into the float model so any GGUF type then quantizes it.

AWQ (Lin, Tang, Tang, Yang, Dang, Gan, Han 2023, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration") protects the weights that meet large activations: for a group of linears that
read the same input ``x`` (``in`` channels), it scales their input channels by ``s`` and the input by ``1/s``
(``W x = (W diag(s)) (x / s)``), which is exact in float, but moves rounding error away from salient channels
once ``W diag(s)`` is quantized. ``s = mean|x|^alpha`` (normalised so ``sqrt(max s * min s) = 1``) and
``alpha`` is searched over a grid of ``n_grid`` values in [0, 1) for the smallest output error after fake
quantization, ``||W x - (Q(W diag(s)) / s) x||^2`` on calibration tokens (``alpha = 0`` is plain
round-to-nearest, so the search never does worse than it on this measure). The paper measures the error at the
output of the block part the linears feed (attention, MLP); here it is measured at the linears' own outputs.

``1/s`` is folded into the operation that produces ``x``, so the transformed model has the same function and
the same shapes, and our converter and llama.cpp's quantizer take it as any checkpoint:

========================  ========================================  =========================================
linears (same input)      preceding operation                       folded as
========================  ========================================  =========================================
q, k, v                   ``input_layernorm``                       RMSNorm weight ``w / s``; Gemma's
                                                                    ``(1 + w)`` norms: ``w' = (1 + w) / s - 1``
gate, up                  ``post_attention_layernorm`` (Llama,      same
                          Qwen2); ``pre_feedforward_layernorm``
                          (Gemma 3)
down                      ``up`` (``act(gate) * up``)               ``up`` rows divided by ``s``
o                         ``v``, only when each ``v`` row feeds     ``v`` rows divided by ``s``
                          one ``o`` column (no grouped-query heads)
========================  ========================================  =========================================

The LM head and the embeddings are not scaled (the final norm feeds the head, which Gemma ties to the
embeddings: scaling it would change the embeddings too). The paper's weight-clipping search is not done.

Fake quantization uses the target type's grid: Q4_0 and Q8_0 exactly (llama.cpp's round-to-nearest);
the K-quants through a proxy of their dominant tensor type (Q4_K/Q5_K: asymmetric 4/5-bit groups of 32, Q6_K:
symmetric 6-bit groups of 16, Q3_K: asymmetric 3-bit groups of 16), without the K-quants' quantized
super-block scales.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fieldpack.shared.errors import CompressionConfigError, CompressionOptionError

log = logging.getLogger(__name__)

#: alpha grid size (the paper's code: 20 values 0, 0.05, ..., 0.95).
DEFAULT_N_GRID = 20
#: calibration tokens per group used in the search (a fixed-stride subsample; bounds the CPU cost).
DEFAULT_MAX_TOKENS = 2048

#: GGML tensor type -> (bits, symmetric, group) of the fake quantizer; Q4_0/Q8_0 use llama.cpp's exact grid.
_PROXY = {"Q4_K": (4, False, 32), "Q5_K": (5, False, 32), "Q6_K": (6, True, 16), "Q3_K": (3, False, 16),
          "Q5_0": (5, True, 32), "Q4_1": (4, False, 32), "Q5_1": (5, False, 32)}


def grid_of(qtype: str) -> str:
    """The GGML tensor type whose grid AWQ fakes for the GGUF file type ``qtype`` (``Q4_K_M`` -> ``Q4_K``).

    Raises:
        CompressionConfigError: ``qtype`` is F16/F32 (nothing to protect) or unknown.
    """
    from fieldpack.builder.quantize import NOMINAL_TENSOR_TYPE

    t = NOMINAL_TENSOR_TYPE.get(qtype.upper())
    if t is None or t.name not in set(_PROXY) | {"Q4_0", "Q8_0"}:
        raise CompressionOptionError(f"--quantizer awq needs a quantized --quant type, not {qtype}",
                                     hint="use --quant Q4_K_M (or Q4_0, Q5_K_M, Q8_0 ...) with awq, or drop --quantizer")
    return t.name


def fake_quantize(w: Any, grid: str) -> Any:
    """``w`` ``(rows, cols)`` float32 rounded to ``grid`` and dequantized, row-wise groups along ``cols``."""
    import torch

    from fieldpack.builder.compress.gptq import rtn_values

    rows, cols = w.shape
    if grid in ("Q4_0", "Q8_0"):
        return rtn_values(w, grid)
    bits, sym, group = _PROXY[grid]
    g = w.reshape(-1, group)
    if sym:
        qmax = 2 ** (bits - 1) - 1
        scale = (g.abs().amax(dim=1, keepdim=True) / qmax).clamp(min=1e-10)
        return (torch.clamp(torch.round(g / scale), -qmax - 1, qmax) * scale).reshape(rows, cols)
    qmax = 2 ** bits - 1
    lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp(min=1e-10)
    zero = torch.round(-lo / scale)
    return ((torch.clamp(torch.round(g / scale) + zero, 0, qmax) - zero) * scale).reshape(rows, cols)


@dataclass(frozen=True)
class ScaleChoice:
    """The search's result for one group: ``s`` ``(in,)`` float32, ``alpha``, and the output MSE with it and
    with ``alpha = 0`` (round-to-nearest)."""

    s: Any
    alpha: float
    error: float
    error_rtn: float


def search_scale(x: Any, weights: list[Any], grid: str, *, n_grid: int = DEFAULT_N_GRID) -> ScaleChoice:
    """Grid search of ``alpha`` for the linears ``weights`` (each ``(out_i, in)``) reading ``x`` ``(n, in)``."""
    import torch

    x = x.float()
    W = torch.cat([w.float() for w in weights], dim=0)
    ref = x.matmul(W.t())
    x_mean = x.abs().mean(dim=0)
    best: tuple[float, float, Any] | None = None
    rtn = 0.0
    for k in range(n_grid):
        alpha = k / n_grid
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        wq = fake_quantize(W * s.unsqueeze(0), grid) / s.unsqueeze(0)
        err = float(((x.matmul(wq.t()) - ref) ** 2).mean())
        if k == 0:
            rtn = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    return ScaleChoice(s=best[2], alpha=best[1], error=best[0], error_rtn=rtn)


def _fold_into_norm(norm: Any, s: Any) -> None:
    """Divide an RMSNorm's output by ``s``: ``w / s``, or for Gemma's ``(1 + w)`` norms ``(1 + w) / s - 1``."""
    w = norm.weight.data.float()
    if "gemma" in type(norm).__name__.lower():
        new = (1.0 + w) / s - 1.0
    else:
        new = w / s
    norm.weight.data = new.to(norm.weight.dtype)


def _fold_into_rows(lin: Any, s: Any) -> None:
    """Divide a linear's output rows (and bias) by ``s``."""
    lin.weight.data = (lin.weight.data.float() / s.unsqueeze(1)).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (lin.bias.data.float() / s).to(lin.bias.dtype)


def apply_scale(prev: Any, linears: list[Any], s: Any) -> None:
    """The equivalent transformation: ``linears``' input channels times ``s`` ``(in,)``, the output of ``prev``
    (an RMSNorm or a linear) divided by ``s``. The block computes the same function (up to float rounding)."""
    import torch

    if isinstance(prev, torch.nn.Linear):
        _fold_into_rows(prev, s)
    else:
        _fold_into_norm(prev, s)
    for lin in linears:
        lin.weight.data = (lin.weight.data.float() * s.unsqueeze(0)).to(lin.weight.dtype)


def block_groups(block: Any) -> list[tuple[str, Any, list[str]]]:
    """``(group name, preceding module, [linear names])`` of a Llama/Qwen2/Gemma 3 decoder block, in the
    table's order; ``o`` only when ``v`` and ``o`` are square to each other (no grouped-query heads).

    Raises:
        CompressionConfigError: the block lacks the modules (an architecture AWQ does not know; named).
    """
    try:
        attn, mlp = block.self_attn, block.mlp
        mlp_norm = getattr(block, "pre_feedforward_layernorm", None) or block.post_attention_layernorm
        groups = [("qkv", block.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                  ("gate_up", mlp_norm, ["mlp.gate_proj", "mlp.up_proj"]),
                  ("down", mlp.up_proj, ["mlp.down_proj"])]
        if attn.v_proj.out_features == attn.o_proj.in_features:
            groups.insert(1, ("o", attn.v_proj, ["self_attn.o_proj"]))
    except AttributeError as exc:
        raise CompressionConfigError(f"AWQ does not know the decoder block {type(block).__name__} ({exc})",
                                     hint="use --quantizer rtn (or gptq) for this architecture") from exc
    return groups


@dataclass
class AwqReport:
    """What :func:`awq_model` did: ``alphas`` and ``gain`` (error with the chosen scales / error of
    round-to-nearest, on the proxy grid) per ``"layers.<i>.<group>"``; calibration tokens, seconds, device."""

    grid: str
    alphas: dict[str, float] = field(default_factory=dict)
    gain: dict[str, float] = field(default_factory=dict)
    calib_tokens: int = 0
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def mean_gain(self) -> float:
        return sum(self.gain.values()) / max(1, len(self.gain))


def awq_model(model: Any, input_ids: Any, qtype: str, *, device: str | None = None, n_grid: int = DEFAULT_N_GRID,
              max_tokens: int = DEFAULT_MAX_TOKENS) -> AwqReport:
    """Search and fold AWQ scales into every decoder block of ``model``, in place (same function, float).

    Args:
        model: a Hugging Face causal LM (Llama, Qwen2, Gemma 3 layout), float32, eval mode, on CPU.
        input_ids: ``(n_windows, seq_len)`` int64 calibration windows.
        qtype: the GGUF file type that will quantize the model (its grid is faked in the search).
        device: torch device for the per-block work (default: cuda when present, else cpu).
        n_grid: alpha values tried. max_tokens: tokens per group used in the search.

    Raises:
        CompressionConfigError: F16/F32 or an unknown type; an unknown block layout.
    """
    import torch

    from fieldpack.builder.compress.masks import decoder_layers, for_each_block, pick_device

    grid = grid_of(qtype)
    for block in decoder_layers(model):
        block_groups(block)
    device = device or pick_device()
    report = AwqReport(grid=grid, calib_tokens=int(input_ids.numel()), device=device)
    t0 = time.perf_counter()

    def scale_block(idx: int, block: Any, feed: Any) -> None:
        groups = block_groups(block)
        mods = dict(block.named_modules())
        feats: dict[str, list[Any]] = {g: [] for g, _, _ in groups}
        hooks = [mods[names[0]].register_forward_hook(
            lambda m, a, o, g=g: feats[g].append(a[0].detach().reshape(-1, a[0].shape[-1])))
            for g, _, names in groups]
        try:
            feed()
        finally:
            for h in hooks:
                h.remove()
        for g, prev, names in groups:
            x = torch.cat(feats.pop(g), dim=0)
            if x.shape[0] > max_tokens:
                x = x[torch.linspace(0, x.shape[0] - 1, max_tokens, device=x.device).long()]
            choice = search_scale(x, [mods[n].weight.data for n in names], grid, n_grid=n_grid)
            apply_scale(prev, [mods[n] for n in names], choice.s.to(x.device))
            report.alphas[f"layers.{idx}.{g}"] = choice.alpha
            report.gain[f"layers.{idx}.{g}"] = choice.error / choice.error_rtn if choice.error_rtn > 0 else 1.0

    for_each_block(model, input_ids, device, scale_block, f"awq {grid}")
    report.seconds = time.perf_counter() - t0
    log.info("awq %s: %d groups, mean error ratio vs RTN %.3f, %.1f s on %s", grid, len(report.gain),
             report.mean_gain, report.seconds, device)
    return report
