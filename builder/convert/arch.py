"""Architecture knowledge: which HF model classes convert, their hyperparameters, and their tensor plan.

Supported: ``LlamaForCausalLM`` and ``MistralForCausalLM`` (GGUF arch ``llama``; TinyLlama and SmolLM are
Llama), ``Qwen2ForCausalLM`` (GGUF arch ``qwen2``) and ``Gemma3ForCausalLM`` / the text part of
``Gemma3ForConditionalGeneration`` (GGUF arch ``gemma3``; its specifics are in :mod:`.gemma3`). The differences
that matter for llama.cpp:

* **Q/K permutation** (llama only). HF Llama checkpoints store ``q_proj``/``k_proj`` rows in the
  "rotate_half" layout (first half of each head's dims, then second half); llama.cpp's ``llama`` arch applies
  RoPE to adjacent pairs (GGML_ROPE_TYPE_NORM), so rows are permuted per head: (n_head, 2, head_dim/2, ...)
  -> (n_head, head_dim/2, 2, ...). With GQA, K uses ``n_head_kv`` heads. ``qwen2`` uses NEOX RoPE, which is
  the HF layout, so nothing is permuted. See llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute``.
* **Tied embeddings**: no ``output.weight`` is written; llama.cpp then uses ``token_embd.weight`` as output.
* **Qwen2 biases** on q/k/v are written as ``blk.N.attn_{q,k,v}.bias`` (F32).
* **RoPE scaling**: ``linear`` and ``yarn`` are written as GGUF keys; ``llama3`` (Llama 3.1+) is written as a
  ``rope_freqs.weight`` tensor of per-dimension factors (Meta's Llama 3.1 reference ``apply_scaling``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from fieldpack.builder.convert import gemma3
from fieldpack.shared.errors import ModelLoadError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)

#: HF ``architectures[0]`` -> GGUF architecture name.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
}

#: Tensors HF checkpoints sometimes carry that have no place in a GGUF (recomputed by llama.cpp).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class HParams:
    """Hyperparameters read from config.json (units: tokens for lengths, counts for the rest)."""

    gguf_arch: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_embeddings: bool
    permute_qk: bool
    #: Added to every ``*norm.weight`` when written (Gemma: 1.0, see :mod:`.gemma3`).
    norm_shift: float = 0.0
    #: Sliding-window attention: window (tokens), RoPE base of sliding layers, per-layer "slides" flags.
    sliding_window: int | None = None
    rope_theta_swa: float | None = None
    swa_layers: list[bool] | None = None


@dataclass
class TensorPlan:
    """One GGUF tensor to write: its name, where its data comes from, and its shape (numpy order)."""

    gguf_name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray] = field(repr=False)
    source: str = ""


def permute_qk(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q or K projection rows from HF "rotate_half" RoPE layout to llama.cpp's interleaved layout.

    Args:
        weights: ``(n_head * head_dim, n_embd)`` float32 weight, or ``(n_head * head_dim,)`` bias.
        n_head: heads in this projection (``n_head`` for Q, ``n_head_kv`` for K).

    Returns:
        Same shape and dtype; per head, rows ``[0..d/2) + [d/2..d)`` become interleaved pairs.
    """
    head_dim = weights.shape[0] // n_head
    return (
        weights.reshape(n_head, 2, head_dim // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (theta, scaling dict or None) from a transformers 4.x or 5.x config."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:  # transformers >= 5
        theta = float(params["rope_theta"])
        kind = params.get("rope_type", params.get("type", "default"))
        return theta, (None if kind in (None, "default") else {**params, "rope_type": kind})
    theta = float(config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return theta, (None if kind in (None, "default") else {**scaling, "rope_type": kind})
    return theta, None


def read_hparams(config: dict[str, Any], architecture: str, *, source: str) -> HParams:
    """Validate ``architecture`` and read the hyperparameters llama.cpp needs from ``config``.

    Raises:
        UnsupportedArchitectureError: the HF architecture (or a RoPE scaling type) is not supported; names it.
        ModelLoadError: a required config key is missing.
    """
    gguf_arch = SUPPORTED_ARCHITECTURES.get(architecture)
    if gguf_arch is None:
        raise UnsupportedArchitectureError(
            f"Unsupported model architecture {architecture or '(none)'!r} in {source}",
            hint=f"fieldpack converts {', '.join(sorted(SUPPORTED_ARCHITECTURES))}; pick a model of one of these",
        )
    if gguf_arch == "gemma3":
        config = gemma3.text_config(config, architecture)
    try:
        n_embd = int(config["hidden_size"])
        n_head = int(config["num_attention_heads"])
        hp = HParams(
            gguf_arch=gguf_arch,
            n_vocab=int(config["vocab_size"]),
            n_ctx_train=int(config.get("max_position_embeddings", 2048)),
            n_embd=n_embd,
            n_ff=int(config["intermediate_size"]),
            n_layer=int(config["num_hidden_layers"]),
            n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            head_dim=int(config.get("head_dim") or n_embd // n_head),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=0.0,
            rope_scaling=None,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            permute_qk=(gguf_arch == "llama"),
        )
    except KeyError as exc:
        raise ModelLoadError(
            f"config.json in {source} lacks {exc.args[0]!r}", hint="the config is incomplete; re-download it"
        ) from exc
    if gguf_arch == "gemma3":
        _read_gemma3(config, hp, source)
    else:
        hp.rope_theta, hp.rope_scaling = _rope(config)
    if hp.rope_scaling is not None and hp.rope_scaling["rope_type"] not in ("linear", "yarn", "llama3"):
        raise UnsupportedArchitectureError(
            f"RoPE scaling {hp.rope_scaling['rope_type']!r} in {source} is not supported by llama.cpp conversion",
            hint="use a model with default, linear, yarn or llama3 RoPE scaling",
        )
    if gguf_arch == "gemma3" and hp.rope_scaling is not None and hp.rope_scaling["rope_type"] != "linear":
        raise UnsupportedArchitectureError(
            f"RoPE scaling {hp.rope_scaling['rope_type']!r} in Gemma 3 checkpoint {source} is not supported",
            hint="llama.cpp's gemma3 applies only linear RoPE scaling; use a standard Gemma 3 checkpoint",
        )
    slides = config.get("use_sliding_window") or (gguf_arch == "llama" and config.get("sliding_window"))
    if gguf_arch != "gemma3" and slides:
        logger.warning(
            "%s: sliding-window attention (window %s) is not represented in GGUF; llama.cpp attends to the "
            "full context, so outputs differ beyond the window", source, config.get("sliding_window"),
        )
    return hp


def _read_gemma3(config: dict[str, Any], hp: HParams, source: str) -> None:
    """Fill the Gemma 3 specifics of ``hp`` (norm shift, RoPE bases, sliding window) after validating them."""
    gemma3.check_supported(config, n_embd=hp.n_embd, n_head=hp.n_head, n_layer=hp.n_layer, head_dim=hp.head_dim,
                           source=source)
    hp.rope_theta, hp.rope_theta_swa, hp.rope_scaling = gemma3.rope_bases(config)
    hp.norm_shift = gemma3.NORM_SHIFT
    hp.tie_embeddings = bool(config.get("tie_word_embeddings", True))
    window = config.get("sliding_window")
    if window:
        hp.sliding_window = int(window)
        hp.swa_layers = gemma3.sliding_layers(config, hp.n_layer)


def write_hparams(writer: Any, hp: HParams) -> None:
    """Write the ``{arch}.*`` keys of ``hp`` with a ``gguf.GGUFWriter``."""
    import gguf

    writer.add_context_length(hp.n_ctx_train)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_vocab_size(hp.n_vocab)
    if hp.head_dim * hp.n_head != hp.n_embd or hp.gguf_arch == "gemma3":
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.sliding_window is not None and hp.swa_layers is not None:
        writer.add_sliding_window(hp.sliding_window)
        if hp.rope_theta_swa is not None:
            writer.add_rope_freq_base_swa(hp.rope_theta_swa)
        if hp.swa_layers != gemma3.default_pattern(hp.n_layer):
            writer.add_sliding_window_pattern(hp.swa_layers)
    rs = hp.rope_scaling
    if rs is not None and rs["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rs["factor"]))
    elif rs is not None and rs["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rs["factor"]))
        orig = rs.get("original_max_position_embeddings")
        if orig:
            writer.add_rope_scaling_orig_ctx_len(int(orig))


def llama3_rope_factors(hp: HParams) -> np.ndarray:
    """Per-frequency RoPE factors of Llama 3.1 scaling, ``(head_dim/2,)`` float32 (``rope_freqs.weight``).

    From Meta's Llama 3.1 reference (``apply_scaling``): wavelengths shorter than
    ``original_max_position_embeddings / high_freq_factor`` keep factor 1, longer than ``... / low_freq_factor``
    get ``factor``, and the band between is interpolated smoothly.
    """
    rs = hp.rope_scaling or {}
    factor = float(rs.get("factor", 8.0))
    low = float(rs.get("low_freq_factor", 1.0))
    high = float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _loader(checkpoint: Any, name: str, permute_heads: int | None, shift: float = 0.0) -> Callable[[], np.ndarray]:
    """A deferred load of one checkpoint tensor, Q/K-permuted over ``permute_heads`` heads when given, plus
    ``shift`` added to every element (Gemma's RMSNorm convention)."""

    def load() -> np.ndarray:
        data = checkpoint.tensor(name)
        if shift:
            data = data + np.float32(shift)
        # looked up at call time, so tests can swap the module's permute_qk
        return data if permute_heads is None else permute_qk(data, permute_heads)

    return load


def plan_tensors(checkpoint: Any, hp: HParams) -> list[TensorPlan]:
    """Map every checkpoint tensor to its GGUF name and loader (with the Q/K permutation where needed).

    Returns:
        Tensors in checkpoint order, plus ``rope_freqs.weight`` first for llama3 RoPE scaling.

    Raises:
        UnsupportedArchitectureError: a tensor has no GGUF name for this architecture.
        ModelLoadError: ``lm_head.weight`` is absent while embeddings are not tied.
    """
    import gguf

    arch_enum = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[hp.gguf_arch]
    name_map = gguf.get_tensor_name_map(arch_enum, hp.n_layer)
    plans: list[TensorPlan] = []
    if hp.rope_scaling is not None and hp.rope_scaling["rope_type"] == "llama3":
        factors = llama3_rope_factors(hp)
        plans.append(TensorPlan("rope_freqs.weight", factors.shape, lambda f=factors: f, "(computed)"))

    names = {n: n for n in checkpoint.tensors}
    if hp.gguf_arch == "gemma3":  # text part of Gemma3ForConditionalGeneration; vision tensors are dropped
        names = {n: t for n in checkpoint.tensors if (t := gemma3.text_tensor_name(n)) is not None}
    has_lm_head = "lm_head.weight" in names.values()
    if not hp.tie_embeddings and not has_lm_head:
        raise ModelLoadError(
            f"{checkpoint.model_dir}: lm_head.weight is missing and tie_word_embeddings is false",
            hint="the checkpoint is incomplete; download all of its safetensors files",
        )
    for stored, name in names.items():
        meta = checkpoint.tensors[stored]
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and hp.tie_embeddings:
            logger.info("tied embeddings: not writing output.weight (llama.cpp uses token_embd.weight)")
            continue
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UnsupportedArchitectureError(
                f"Tensor {name} of {checkpoint.architecture} has no GGUF name for arch {hp.gguf_arch}",
                hint="the checkpoint has layers this converter does not know; use a plain "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} checkpoint",
            )
        heads = None
        if hp.permute_qk and ".self_attn.q_proj." in name:
            heads = hp.n_head
        elif hp.permute_qk and ".self_attn.k_proj." in name:
            heads = hp.n_head_kv  # GQA: K has the KV head count
        shift = hp.norm_shift if name.endswith("norm.weight") else 0.0
        plans.append(TensorPlan(gguf_name, meta.shape, _loader(checkpoint, stored, heads, shift), stored))
    return plans
