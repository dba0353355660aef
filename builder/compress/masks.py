"""Unstructured and N:M (semi-structured) pruning masks: magnitude, Wanda, SparseGPT.

All three prune the linear layers of the decoder blocks (attention q/k/v/o, MLP gate/up/down); embeddings, norms
and the LM head stay dense, as in both papers. A mask is a bool tensor shaped like the weight, ``True`` where the
weight is set to zero.

* **Magnitude**: score ``|W_ij|``; unstructured masks compare scores across the whole matrix (layer-wise, the
  baseline of both papers).
* **Wanda** (Sun, Liu, Bair, Kolter 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
  score ``S_ij = |W_ij| * ||X_j||_2``, with ``||X_j||_2`` the L2 norm of input feature ``j`` over every
  calibration token; scores are compared *per output row* (each row loses the same number of weights). No
  weight update.
* **SparseGPT** (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot"): with ``H = 2 X X^T / n`` (the layer-input Hessian of the squared reconstruction error), dampened by
  ``percdamp * mean(diag H)``, columns are processed left to right; the mask of each block of ``blocksize``
  columns is chosen by the OBS saliency ``w^2 / [H^-1]_cc^2`` (adaptive mask selection), each pruned weight's
  error is spread over the not-yet-processed columns of its row with the OBS update, using the upper Cholesky
  factor of ``H^-1`` (the inverse Hessians of all trailing sub-problems at once), and updates outside the block
  are applied lazily once per block.

N:M pattern ``(n, m)``: in every group of ``m`` consecutive input weights of a row, the ``m - n`` lowest-scoring
are pruned (Wanda and magnitude by their score; SparseGPT by its saliency, chosen group by group as the columns
are reached), so the matrix can use sparse tensor cores. N:M and unstructured sparsity are stored densely in
GGUF: they shrink neither the file nor llama.cpp's compute today.

:func:`prune_with_masks` runs a model block by block ("sequential" pruning as in both papers' code): the
calibration windows are passed through block ``l`` once to gather input statistics of its linears, the block is
pruned, and its *pruned* outputs become block ``l+1``'s inputs. Only one block is on the accelerator at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fieldpack.shared.errors import CompressionConfigError

log = logging.getLogger(__name__)

#: Relative dampening added to the Hessian diagonal (SparseGPT's default, 1% of its mean).
DEFAULT_PERCDAMP = 0.01
#: Columns per lazy-update block (SparseGPT's default B = Bs = 128).
DEFAULT_BLOCKSIZE = 128


def pick_device() -> str:
    """``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------------
# masks from scores


def _check_pattern(cols: int, pattern: tuple[int, int], what: str = "weight") -> None:
    n, m = pattern
    if cols % m:
        raise CompressionConfigError(f"a {what} has rows of {cols} weights, not a multiple of M={m} of pattern {n}:{m}",
                                     hint="choose an M that divides the layer widths (2:4 or 4:8 fit every model we support)")


def nm_mask(scores: Any, pattern: tuple[int, int]) -> Any:
    """Prune the ``m - n`` lowest scores in every group of ``m`` consecutive columns of each row.

    Args:
        scores: ``(rows, cols)`` float tensor; ``cols`` must be a multiple of ``m``.
        pattern: ``(n, m)``, ``0 < n < m``.

    Returns:
        ``(rows, cols)`` bool mask, ``True`` = pruned; exactly ``m - n`` per group.
    """
    import torch

    n, m = pattern
    rows, cols = scores.shape
    _check_pattern(cols, pattern)
    groups = scores.reshape(rows, cols // m, m)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def row_mask(scores: Any, sparsity: float) -> Any:
    """Prune the ``int(cols * sparsity)`` lowest scores of every row (Wanda's per-output comparison group)."""
    import torch

    rows, cols = scores.shape
    k = int(cols * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def matrix_mask(scores: Any, sparsity: float) -> Any:
    """Prune the ``int(numel * sparsity)`` lowest scores of the whole matrix (layer-wise comparison group)."""
    import torch

    k = int(scores.numel() * sparsity)
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        mask[torch.topk(scores.flatten(), k, largest=False).indices] = True
    return mask.reshape(scores.shape)


def magnitude_mask(weight: Any, *, sparsity: float | None = None, pattern: tuple[int, int] | None = None) -> Any:
    """Magnitude pruning mask of a ``(out, in)`` weight: layer-wise for unstructured, per group for N:M."""
    scores = weight.abs().float()
    return nm_mask(scores, pattern) if pattern else matrix_mask(scores, float(sparsity))


def wanda_mask(weight: Any, act_norm: Any, *, sparsity: float | None = None,
               pattern: tuple[int, int] | None = None) -> Any:
    """Wanda mask (Sun et al. 2023, Eq. 1): score ``|W_ij| * ||X_j||_2``, compared per output row (or per N:M group).

    Args:
        weight: ``(out, in)`` weight.
        act_norm: ``(in,)`` L2 norm of each input feature over all calibration tokens.
    """
    scores = weight.abs().float() * act_norm.float().reshape(1, -1)
    return nm_mask(scores, pattern) if pattern else row_mask(scores, float(sparsity))


def inverse_hessian_factor(hessian: Any, percdamp: float) -> tuple[Any, Any]:
    """The upper Cholesky factor of the dampened inverse Hessian, shared by SparseGPT and GPTQ.

    Columns never driven by the calibration set (``H_jj == 0``) get ``H_jj = 1`` (their weights should be
    zeroed by the caller, as both papers' code does); ``percdamp * mean(diag H)`` is added to the diagonal.

    Args:
        hessian: ``(cols, cols)`` float32 ``2 X X^T / n``; modified in place.
        percdamp: dampening, as a share of the mean Hessian diagonal.

    Returns:
        ``(U, dead)``: ``U`` ``(cols, cols)`` float32 upper triangular with ``H^-1 = U^T U`` (row ``i`` of ``U``
        is the inverse-Hessian row of the sub-problem of columns ``i..``); ``dead`` ``(cols,)`` bool.

    Raises:
        CompressionConfigError: the dampened Hessian is not positive definite (too little calibration data).
    """
    import torch

    H = hessian
    cols = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    diag = torch.arange(cols, device=H.device)
    H[diag, diag] += percdamp * torch.mean(torch.diag(H))
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
        hinv = torch.linalg.cholesky(hinv, upper=True)  # (cols, cols) upper factor U, H^-1 = U^T U
    except RuntimeError as exc:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise CompressionConfigError(
            f"the layer-input Hessian ({cols}x{cols}) is not positive definite even after dampening",
            hint="raise --calib-chunks so the calibration set has well over the layer width in tokens") from exc
    return hinv, dead


def sparsegpt_prune(weight: Any, hessian: Any, *, sparsity: float | None = None,
                    pattern: tuple[int, int] | None = None, mask: Any = None,
                    blocksize: int = DEFAULT_BLOCKSIZE, percdamp: float = DEFAULT_PERCDAMP) -> tuple[Any, Any]:
    """SparseGPT (Frantar & Alistarh 2023, Algorithm 1): choose a mask and reconstruct the remaining weights.

    Args:
        weight: ``(rows, cols)`` weight (any float dtype; computed in float32).
        hessian: ``(cols, cols)`` ``2 X X^T / n`` of the layer's inputs.
        sparsity: unstructured share to prune, chosen per block of ``blocksize`` columns.
        pattern: ``(n, m)``: N:M instead of ``sparsity`` (``blocksize`` must be a multiple of ``m``).
        mask: a fixed ``(rows, cols)`` bool mask to apply instead of choosing one (OBS reconstruction only).
        blocksize: columns per lazy batch update and adaptive mask selection block.
        percdamp: dampening, as a share of the mean Hessian diagonal.

    Returns:
        ``(new_weight float32 (rows, cols), mask bool (rows, cols))``.

    Raises:
        CompressionConfigError: the dampened Hessian is not positive definite (too little calibration data).
    """
    import torch

    W = weight.detach().clone().float()
    H = hessian.detach().clone().float().to(W.device)
    rows, cols = W.shape
    if pattern:
        _check_pattern(cols, pattern)
        if blocksize % pattern[1]:
            blocksize = pattern[1] * max(1, blocksize // pattern[1])
    hinv, dead = inverse_hessian_factor(H, percdamp)
    W[:, dead] = 0.0

    full_mask = torch.zeros((rows, cols), dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        if mask is not None:
            mask1 = mask[:, i1:i2].to(W.device).clone()
        elif pattern is None:
            mask1 = matrix_mask(W1 ** 2 / d1.reshape(1, -1) ** 2, float(sparsity))
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if pattern is not None and mask is None and i % pattern[1] == 0:
                n, m = pattern
                sal = W1[:, i:i + m] ** 2 / d1[i:i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(sal, m - n, dim=1, largest=False).indices, True)
            q = w.clone()
            q[mask1[:, i]] = 0.0
            Q1[:, i] = q
            err = (w - q) / d  # (rows,)
            W1[:, i:] -= err.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        full_mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(hinv[i1:i2, i2:])  # lazy batch update of the later columns
    return W, full_mask


# --------------------------------------------------------------------------------------------------------
# input statistics and the block-by-block driver


class InputStats:
    """Running statistics of a linear layer's inputs over calibration tokens.

    Attributes:
        sq_sum: ``(in,)`` float64 sum of squared inputs per feature (``||X_j||_2^2``).
        hessian: ``(in, in)`` float32 ``2 X X^T / n`` (only when ``need_hessian``), as SparseGPT accumulates it.
        n: tokens seen.
    """

    def __init__(self, cols: int, *, need_hessian: bool, device: str) -> None:
        import torch

        self.sq_sum = torch.zeros(cols, dtype=torch.float64, device=device)
        self.hessian = torch.zeros((cols, cols), dtype=torch.float32, device=device) if need_hessian else None
        self.n = 0

    def add(self, x: Any) -> None:
        """Add a batch of inputs ``(..., in)``."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        self.sq_sum += (x.double() ** 2).sum(0)
        if self.hessian is not None:
            self.hessian *= self.n / (self.n + t)
            x = x * math.sqrt(2.0 / (self.n + t))
            self.hessian += x.t().matmul(x)
        self.n += t

    @property
    def norm(self) -> Any:
        """``(in,)`` float32 ``||X_j||_2`` over all tokens seen."""
        return self.sq_sum.sqrt().float()


def decoder_layers(model: Any) -> Any:
    """The ``nn.ModuleList`` of decoder blocks of a Llama-layout causal LM (``model.model.layers``)."""
    try:
        return model.model.layers
    except AttributeError as exc:
        raise CompressionConfigError(f"cannot find decoder blocks in {type(model).__name__}",
                                     hint="pruning supports Llama, Mistral and Qwen2 checkpoints") from exc


def block_linears(block: Any) -> list[tuple[str, Any]]:
    """``(name, nn.Linear)`` of a decoder block, in execution order (q, k, v, o, gate, up, down)."""
    import torch

    return [(n, m) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]


class _Stop(Exception):
    pass


def capture_block_inputs(model: Any, input_ids: Any, device: str) -> tuple[list[Any], dict[str, Any]]:
    """Block 0's input per calibration window and the keyword arguments block 0 receives (position embeddings,
    causal mask, ...); see :func:`capture_layer_inputs` for every block's own."""
    inps, kws = capture_layer_inputs(model, input_ids, device)
    return inps, kws[0]


def capture_layer_inputs(model: Any, input_ids: Any, device: str) -> tuple[list[Any], list[dict[str, Any]]]:
    """Block 0's input per calibration window, and the keyword arguments *each* block receives.

    Unlike :func:`capture_block_inputs`, every block's own keyword arguments are kept: Gemma 3 passes its
    sliding-window blocks another causal mask and other RoPE tables than its global ones. Each block's forward
    is replaced, for one pass per window, by one that records its arguments and returns its input unchanged
    (so nothing but the embeddings is computed); the last block stops the pass.

    Returns:
        ``(inputs, kwargs)``: one ``(1, seq_len, hidden)`` tensor per window on ``device``; for each block the
        keyword arguments of the last window (windows have one length, so they are the same for all).
    """
    import torch

    layers = decoder_layers(model)
    inner = model.model
    captured: list[Any] = []
    per_layer: list[dict[str, Any]] = [{} for _ in layers]

    def recorder(idx: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hs = args[0] if args else kwargs.pop("hidden_states")
            per_layer[idx] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            per_layer[idx]["use_cache"] = False
            if idx == 0:
                captured.append(hs.detach())
            if idx == len(layers) - 1:
                raise _Stop
            return hs
        return forward

    parts = [p for p in ("embed_tokens", "rotary_emb", "rotary_emb_local") if hasattr(inner, p)]
    for part in parts:
        getattr(inner, part).to(device)
    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        with torch.no_grad():
            for row in input_ids:
                try:
                    inner(input_ids=row.unsqueeze(0).to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for layer in layers:
            del layer.forward
        for part in parts:
            getattr(inner, part).to("cpu")
    return captured, per_layer


def run_block(block: Any, hidden: Any, kwargs: dict[str, Any]) -> Any:
    """One decoder block forward; returns the hidden states (transformers 4 returns a tuple, 5 a tensor)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def for_each_block(model: Any, input_ids: Any, device: str, work: Callable[[int, Any, Callable[[], None]], None],
                   what: str) -> None:
    """The block-sequential calibration driver of SparseGPT/Wanda/GPTQ/AWQ.

    The windows' inputs to block 0 are captured (:func:`capture_layer_inputs`); then for each block in turn it
    is moved to ``device``, ``work(idx, block, feed)`` runs (``feed()`` passes every window through the block,
    for hooks ``work`` registers to gather statistics; ``work`` then changes the block's weights), and the
    block's outputs *after* ``work`` become the next block's inputs. Only one block is on ``device`` at a time.
    """
    import torch

    layers = decoder_layers(model)
    with torch.no_grad():
        inps, kws = capture_layer_inputs(model, input_ids, device)
        for idx, block in enumerate(layers):
            block.to(device)

            def feed(block: Any = block, kw: dict[str, Any] = kws[idx]) -> None:
                for x in inps:
                    run_block(block, x, kw)

            work(idx, block, feed)
            inps = [run_block(block, x, kws[idx]) for x in inps]
            block.to("cpu")
            log.info("%s: block %d/%d", what, idx + 1, len(layers))


def collect_input_stats(block: Any, feed: Callable[[], None], *, need_hessian: bool,
                        device: str) -> dict[str, InputStats]:
    """:class:`InputStats` of every linear of ``block`` over one ``feed()`` (see :func:`for_each_block`)."""
    linears = block_linears(block)
    stats = {n: InputStats(lin.in_features, need_hessian=need_hessian, device=device) for n, lin in linears}
    hooks = [lin.register_forward_hook(lambda m, a, o, s=stats[n]: s.add(a[0])) for n, lin in linears]
    try:
        feed()
    finally:
        for h in hooks:
            h.remove()
    return stats


@dataclass
class MaskReport:
    """What :func:`prune_with_masks` did.

    Attributes:
        method / sparsity / pattern: as requested (``pattern`` ``(n, m)`` or ``None``).
        matrices: linear weights pruned. weights: their elements. zeros: elements that are zero afterwards.
        per_matrix: ``"layers.<i>.<linear>"`` -> achieved share of zeros.
        calib_tokens: calibration tokens used (0 for magnitude). seconds: wall time. device: torch device.
    """

    method: str
    sparsity: float | None
    pattern: tuple[int, int] | None
    matrices: int = 0
    weights: int = 0
    zeros: int = 0
    per_matrix: dict[str, float] = field(default_factory=dict)
    calib_tokens: int = 0
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def achieved_sparsity(self) -> float:
        return self.zeros / max(1, self.weights)


def prune_with_masks(model: Any, method: str, *, sparsity: float | None = None,
                     pattern: tuple[int, int] | None = None, input_ids: Any = None, device: str | None = None,
                     blocksize: int = DEFAULT_BLOCKSIZE, percdamp: float = DEFAULT_PERCDAMP) -> MaskReport:
    """Prune every decoder block's linears of ``model`` in place with ``method``.

    Args:
        model: a Hugging Face Llama-layout causal LM on CPU, eval mode.
        method: ``magnitude`` | ``wanda`` | ``sparsegpt``.
        sparsity / pattern: unstructured share, or N:M ``(n, m)``; exactly one.
        input_ids: ``(n_windows, seq_len)`` int64 calibration windows (required by wanda and sparsegpt).
        device: torch device for the per-block work (default :func:`pick_device`); one block at a time.

    Returns:
        a :class:`MaskReport` with the achieved sparsity per matrix.

    Raises:
        CompressionConfigError: unknown method, missing calibration, a width not divisible by M, or a
            Hessian that is not positive definite.
    """
    import torch

    if method not in ("magnitude", "wanda", "sparsegpt"):
        raise CompressionConfigError(f"unknown mask method {method!r}", hint="use magnitude, wanda or sparsegpt")
    if (sparsity is None) == (pattern is None):
        raise CompressionConfigError("give exactly one of sparsity or pattern", hint="e.g. sparsity=0.5 or pattern=(2, 4)")
    device = device or pick_device()
    report = MaskReport(method=method, sparsity=sparsity, pattern=pattern, device=device)
    t0 = time.perf_counter()
    layers = decoder_layers(model)

    def apply(idx: int, name: str, lin: Any, new_w: Any, mask: Any) -> None:
        new_w = new_w.clone()
        new_w[mask] = 0.0
        lin.weight.data = new_w.to(device=lin.weight.device, dtype=lin.weight.dtype)
        z = int((lin.weight.data == 0).sum())
        report.matrices += 1
        report.weights += lin.weight.numel()
        report.zeros += z
        report.per_matrix[f"layers.{idx}.{name}"] = z / lin.weight.numel()

    with torch.no_grad():
        if method == "magnitude":
            for idx, block in enumerate(layers):
                for name, lin in block_linears(block):
                    w = lin.weight.data.to(device).float()
                    apply(idx, name, lin, w, magnitude_mask(w, sparsity=sparsity, pattern=pattern))
        else:
            if input_ids is None:
                raise CompressionConfigError(f"{method} needs calibration data", hint="pass calibration windows")
            report.calib_tokens = int(input_ids.numel())

            def prune_block(idx: int, block: Any, feed: Callable[[], None]) -> None:
                stats = collect_input_stats(block, feed, need_hessian=(method == "sparsegpt"), device=device)
                for name, lin in block_linears(block):
                    w = lin.weight.data.float()
                    if method == "wanda":
                        apply(idx, name, lin, w, wanda_mask(w, stats[name].norm, sparsity=sparsity, pattern=pattern))
                    else:
                        new_w, mask = sparsegpt_prune(w, stats[name].hessian, sparsity=sparsity, pattern=pattern,
                                                      blocksize=blocksize, percdamp=percdamp)
                        apply(idx, name, lin, new_w, mask)
                    del stats[name]  # free the Hessian before the next one

            for_each_block(model, input_ids, device, prune_block, f"{method} pruned")  # pruned outputs feed on
    report.seconds = time.perf_counter() - t0
    log.info("%s %s: %d matrices, %.4f zeros, %.1f s on %s", method,
             f"{pattern[0]}:{pattern[1]}" if pattern else f"{sparsity:.0%}", report.matrices,
             report.achieved_sparsity, report.seconds, device)
    return report
