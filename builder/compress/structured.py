"""Structured pruning that makes the GGUF smaller and faster: whole decoder blocks (depth) and MLP channels /
GQA head groups (width). The result is a smaller *dense* Hugging Face checkpoint with a consistent config, which
our converter and llama.cpp load like any other.

* **Depth** (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect"):
  the Block Influence of block ``i`` is ``BI_i = 1 - E_t[cos(x_i,t, x_{i+1},t)]``, the expected cosine similarity
  between a token's hidden state entering and leaving the block, over the calibration tokens. The blocks with
  the lowest BI change the residual stream least and are removed; the rest are renumbered.
* **Width**: MLP channel ``j`` of a block is scored ``||a_j||_2 * ||W_down[:, j]||_2``, where ``a = act(gate(x)) *
  up(x)`` is ``down_proj``'s input over the calibration tokens: the Wanda score (Sun et al. 2023) summed over the
  column's output weights, as in Wanda's structured variant and FLAP (An et al. 2024). Each block keeps its
  best channels, the same count in every block (a Hugging Face config has one ``intermediate_size``), rounded to
  a multiple of 256 so K-quants still apply to ``ffn_down`` (see :func:`options.resolve_ffn_width`).
  Optionally whole GQA groups are removed (one KV head with the query heads that share it, so
  ``n_head / n_head_kv`` is unchanged), scored the same way on ``o_proj``'s input columns.

Blocks are scored on dense activations, one block on the accelerator at a time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fieldpack.shared.errors import CompressionConfigError, OutputNotWritableError

from fieldpack.builder.compress.masks import (
    InputStats,
    capture_block_inputs,
    decoder_layers,
    pick_device,
    run_block,
)

log = logging.getLogger(__name__)

#: Files of a checkpoint folder that describe the weights and are rewritten, never copied.
_WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "train_log.json")
#: Provenance written next to a pruned checkpoint.
PROVENANCE_NAME = "fieldpack_compression.json"


@dataclass
class StructuredReport:
    """What :func:`prune_depth` or :func:`prune_width` did.

    Attributes:
        method: ``depth`` or ``width``.
        params_before / params_after: parameters of the whole model (embeddings included).
        block_influence: depth: ShortGPT BI of each original block (higher = more important).
        dropped_blocks: depth: original indices of the removed blocks.
        ffn_before / ffn_after: width: MLP channels per block.
        kv_heads_before / kv_heads_after: width: KV heads per block (query heads follow in proportion).
        calib_tokens / seconds / device: what scoring used.
    """

    method: str
    params_before: int
    params_after: int
    block_influence: list[float] = field(default_factory=list)
    dropped_blocks: list[int] = field(default_factory=list)
    ffn_before: int | None = None
    ffn_after: int | None = None
    kv_heads_before: int | None = None
    kv_heads_after: int | None = None
    calib_tokens: int = 0
    seconds: float = 0.0
    device: str = "cpu"


def _n_params(model: Any) -> int:
    # unique storage (tied embeddings counted once)
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    return sum(seen.values())


# --------------------------------------------------------------------------------------------------------
# depth


def block_influence(model: Any, input_ids: Any, device: str | None = None) -> list[float]:
    """ShortGPT Block Influence of each decoder block on the calibration windows.

    Args:
        model: Llama-layout causal LM on CPU.
        input_ids: ``(n_windows, seq_len)`` int64.

    Returns:
        ``BI_i = 1 - mean over tokens of cos(block input, block output)``, one float per block.
    """
    import torch

    device = device or pick_device()
    inps, kw = capture_block_inputs(model, input_ids, device)
    scores: list[float] = []
    with torch.no_grad():
        for block in decoder_layers(model):
            block.to(device)
            outs = [run_block(block, x, kw) for x in inps]
            cos = torch.cat([torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).flatten()
                             for x, y in zip(inps, outs)])
            scores.append(float(1.0 - cos.double().mean()))
            block.to("cpu")
            inps = outs
    return scores


def drop_blocks(model: Any, drop: list[int]) -> None:
    """Remove decoder blocks ``drop`` (original indices) in place; renumber the rest and fix the config."""
    import torch

    layers = decoder_layers(model)
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    new = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, block in enumerate(new):
        for mod in block.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    model.model.layers = new
    cfg = model.config
    cfg.num_hidden_layers = len(keep)
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        cfg.layer_types = [layer_types[i] for i in keep]
    if getattr(cfg, "max_window_layers", None) is not None:
        cfg.max_window_layers = min(int(cfg.max_window_layers), len(keep))


def prune_depth(model: Any, n_drop: int, input_ids: Any, device: str | None = None) -> StructuredReport:
    """Drop the ``n_drop`` blocks with the lowest ShortGPT Block Influence, in place.

    Raises:
        CompressionConfigError: ``n_drop`` would remove every block.
    """
    n_layer = len(decoder_layers(model))
    if not 0 < n_drop < n_layer:
        raise CompressionConfigError(f"cannot drop {n_drop} of {n_layer} decoder blocks",
                                     hint=f"drop between 1 and {n_layer - 1}")
    device = device or pick_device()
    t0 = time.perf_counter()
    before = _n_params(model)
    bi = block_influence(model, input_ids, device)
    drop = sorted(sorted(range(n_layer), key=lambda i: (bi[i], i))[:n_drop])
    drop_blocks(model, drop)
    rep = StructuredReport(method="depth", params_before=before, params_after=_n_params(model),
                           block_influence=bi, dropped_blocks=drop, calib_tokens=int(input_ids.numel()),
                           seconds=time.perf_counter() - t0, device=device)
    log.info("depth: block influence %s -> dropped blocks %s (%d -> %d params)",
             [round(b, 4) for b in bi], drop, before, rep.params_after)
    return rep


# --------------------------------------------------------------------------------------------------------
# width


def _slice_linear(lin: Any, *, rows: Any = None, cols: Any = None) -> None:
    """Keep output rows / input columns ``rows`` / ``cols`` (index tensors) of an ``nn.Linear`` in place."""
    w = lin.weight.data
    if rows is not None:
        w = w[rows]
        if lin.bias is not None:
            lin.bias.data = lin.bias.data[rows].clone()
        lin.out_features = int(w.shape[0])
    if cols is not None:
        w = w[:, cols]
        lin.in_features = int(w.shape[1])
    lin.weight.data = w.contiguous().clone()


def width_scores(model: Any, input_ids: Any, device: str | None = None) -> list[tuple[Any, Any]]:
    """Per block: ``(mlp_scores (intermediate,), o_proj_col_scores (n_head*head_dim,))`` float32 on CPU.

    Score of input column ``j`` of a linear = ``||X_j||_2 * ||W[:, j]||_2`` (activation-aware, Wanda-style).
    """
    import torch

    device = device or pick_device()
    inps, kw = capture_block_inputs(model, input_ids, device)
    out: list[tuple[Any, Any]] = []
    with torch.no_grad():
        for block in decoder_layers(model):
            block.to(device)
            down, o = block.mlp.down_proj, block.self_attn.o_proj
            stats = {"down": InputStats(down.in_features, need_hessian=False, device=device),
                     "o": InputStats(o.in_features, need_hessian=False, device=device)}
            hooks = [down.register_forward_hook(lambda m, a, r: stats["down"].add(a[0])),
                     o.register_forward_hook(lambda m, a, r: stats["o"].add(a[0]))]
            try:
                outs = [run_block(block, x, kw) for x in inps]
            finally:
                for h in hooks:
                    h.remove()
            mlp = stats["down"].norm * down.weight.data.float().norm(dim=0)
            att = stats["o"].norm * o.weight.data.float().norm(dim=0)
            out.append((mlp.cpu(), att.cpu()))
            block.to("cpu")
            inps = outs
    return out


def prune_width(model: Any, ffn_width: int, input_ids: Any, *, kv_heads_keep: int | None = None,
                device: str | None = None) -> StructuredReport:
    """Keep the ``ffn_width`` best MLP channels (and ``kv_heads_keep`` best GQA groups) of every block, in place.

    Args:
        model: Llama-layout causal LM on CPU.
        ffn_width: MLP channels kept per block (already rounded, see :func:`options.resolve_ffn_width`).
        input_ids: ``(n_windows, seq_len)`` calibration windows.
        kv_heads_keep: KV heads kept per block; ``None`` keeps attention as is. Only for architectures whose
            llama.cpp graph allows ``n_head * head_dim != hidden_size`` (Llama, Mistral; not Qwen2), which
            :func:`options.check_against_model` enforces. An ``o_proj`` narrower than 256 loses K-quants
            (llama.cpp falls back to another type for it).

    Raises:
        CompressionConfigError: a width that would empty the MLP or attention, or prune nothing.
    """
    import torch

    cfg = model.config
    inter = int(cfg.intermediate_size)
    n_head = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
    if not 0 < ffn_width < inter:
        raise CompressionConfigError(f"MLP width {ffn_width} is not between 1 and {inter - 1}",
                                     hint="choose --ffn-keep in (0, 1)")
    if kv_heads_keep is not None and not 0 < kv_heads_keep <= n_kv:
        raise CompressionConfigError(f"kv_heads_keep={kv_heads_keep} is not between 1 and {n_kv}",
                                     hint=f"keep between 1 and {n_kv} KV heads")
    device = device or pick_device()
    t0 = time.perf_counter()
    before = _n_params(model)
    scores = width_scores(model, input_ids, device)
    group = n_head // n_kv
    with torch.no_grad():
        for block, (mlp_s, att_s) in zip(decoder_layers(model), scores):
            keep = torch.sort(torch.topk(mlp_s, ffn_width).indices).values
            _slice_linear(block.mlp.gate_proj, rows=keep)
            _slice_linear(block.mlp.up_proj, rows=keep)
            _slice_linear(block.mlp.down_proj, cols=keep)
            if kv_heads_keep is not None and kv_heads_keep < n_kv:
                g_score = att_s.reshape(n_kv, group * head_dim).sum(dim=1)  # (n_kv,)
                kept_g = torch.sort(torch.topk(g_score, kv_heads_keep).indices).values
                q_heads = torch.cat([torch.arange(g * group, (g + 1) * group) for g in kept_g.tolist()])
                q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()
                kv_rows = (kept_g[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()
                att = block.self_attn
                _slice_linear(att.q_proj, rows=q_rows)
                _slice_linear(att.k_proj, rows=kv_rows)
                _slice_linear(att.v_proj, rows=kv_rows)
                _slice_linear(att.o_proj, cols=q_rows)
                for attr, val in (("num_heads", kv_heads_keep * group), ("num_key_value_heads", kv_heads_keep)):
                    if hasattr(att, attr):
                        setattr(att, attr, val)
    cfg.intermediate_size = ffn_width
    if kv_heads_keep is not None and kv_heads_keep < n_kv:
        cfg.num_attention_heads = kv_heads_keep * group
        cfg.num_key_value_heads = kv_heads_keep
        cfg.head_dim = head_dim  # no longer hidden_size / num_attention_heads
    rep = StructuredReport(method="width", params_before=before, params_after=_n_params(model), ffn_before=inter,
                           ffn_after=ffn_width, kv_heads_before=n_kv,
                           kv_heads_after=kv_heads_keep if kv_heads_keep is not None else n_kv,
                           calib_tokens=int(input_ids.numel()), seconds=time.perf_counter() - t0, device=device)
    log.info("width: MLP %d -> %d channels, KV heads %d -> %d (%d -> %d params)", inter, ffn_width, n_kv,
             rep.kv_heads_after, before, rep.params_after)
    return rep


# --------------------------------------------------------------------------------------------------------
# writing the smaller checkpoint


def save_checkpoint(model: Any, src_dir: Path, out_dir: Path, *, provenance: dict[str, Any] | None = None,
                    dtype: Any = None, provenance_name: str = PROVENANCE_NAME) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder with the source's tokenizer files.

    The folder is written under a temporary name and renamed into place. ``config.json`` comes from the
    (edited) ``model.config``; tokenizer, chat template and generation files are copied from ``src_dir``;
    ``provenance_name`` (``fieldpack_compression.json``) records ``provenance``.

    Args:
        dtype: torch dtype to store the weights in (default: the model's).

    Raises:
        OutputNotWritableError: ``out_dir`` cannot be written.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if dtype is not None:
            model.to(dtype)
        model.save_pretrained(tmp, safe_serialization=True)
        for f in sorted(Path(src_dir).iterdir()):
            if f.is_file() and f.name not in _WEIGHT_FILES and not f.name.endswith((".safetensors", ".bin")) \
                    and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        (tmp / provenance_name).write_text(json.dumps(provenance or {}, indent=2, default=str) + "\n",
                                           encoding="utf-8")
        for f in tmp.iterdir():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot write the checkpoint {out_dir}: {exc}",
                                     hint="check free disk space in the build folder") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def report_dict(rep: Any) -> dict[str, Any]:
    """A report dataclass as a JSON-ready dict (pattern tuples as ``"N:M"``)."""
    d = asdict(rep)
    if d.get("pattern"):
        d["pattern"] = f"{d['pattern'][0]}:{d['pattern'][1]}"
    return d
