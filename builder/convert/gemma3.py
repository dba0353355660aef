"""Gemma 3 (``Gemma3ForCausalLM``, and the text part of ``Gemma3ForConditionalGeneration``) for llama.cpp.

What llama.cpp's ``gemma3`` loader (``src/llama-model.cpp``) expects, and how the HF checkpoint differs:

* **RMSNorm weights**: HF ``Gemma3RMSNorm`` stores ``w`` and computes ``x_hat * (1 + w)``; llama.cpp computes
  ``x_hat * w``. Every ``*norm.weight`` tensor (input, post-attention, pre/post feed-forward, q/k norms, final
  norm) is written as ``w + 1`` (:data:`NORM_SHIFT`).
* **Sliding-window attention**: ``{arch}.attention.sliding_window`` (tokens; a key at distance >= window is
  masked, as HF's ``sliding_window_overlay``). Which layers slide: llama.cpp's default period is 6 (layer ``i``
  is global iff ``(i + 1) % 6 == 0``), which is what every Gemma 3 release uses; another ``layer_types`` list is
  written as the per-layer ``{arch}.attention.sliding_window_pattern`` bool array.
* **Two RoPE bases**: ``{arch}.rope.freq_base`` for global layers (``rope_theta``, 1e6) and
  ``{arch}.rope.freq_base_swa`` for sliding layers (``rope_local_base_freq``, 1e4). Linear RoPE scaling applies to
  global layers only, as in llama.cpp.
* **Attention scale**: llama.cpp uses ``1/sqrt(head_dim)`` (``1/sqrt(n_embd/n_head)`` for the 62-layer 27B);
  a ``query_pre_attn_scalar`` other than that is refused, as are attention/final logit soft-capping and
  bidirectional attention, which the ``gemma3`` graph does not compute.
* **head_dim** is independent of ``n_embd / n_head`` (640 / 4 != 256 for 270M): key/value lengths are written.
* **Embedding scale** ``sqrt(n_embd)`` and GELU-tanh feed-forward are built into llama.cpp's graph: nothing to write.
* **Tied embeddings**: no ``output.weight``.

Config spellings handled: transformers 4.x (``rope_theta``, ``rope_local_base_freq``, ``rope_scaling``,
``sliding_window_pattern``) and 5.x (``rope_parameters = {"full_attention": {...}, "sliding_attention": {...}}``,
``layer_types``). Reference: llama.cpp ``convert_hf_to_gguf.py`` ``Gemma3Model``; transformers
``models/gemma3/modeling_gemma3.py``.
"""

from __future__ import annotations

from typing import Any

from fieldpack.shared.errors import UnsupportedArchitectureError

#: Added to every ``*norm.weight`` (HF stores ``w``, applies ``1 + w``; llama.cpp applies the stored value).
#: Read at conversion time, so a test can break the convention and watch the parity gate fail.
NORM_SHIFT = 1.0
#: llama.cpp's default sliding-window period for ``gemma3``.
DEFAULT_SWA_PERIOD = 6
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def text_config(config: dict[str, Any], architecture: str) -> dict[str, Any]:
    """The language-model part of a config: ``text_config`` for ``Gemma3ForConditionalGeneration``."""
    if architecture == "Gemma3ForConditionalGeneration":
        sub = config.get("text_config")
        return sub if isinstance(sub, dict) else {}
    return config


def text_tensor_name(name: str) -> str | None:
    """Map a checkpoint tensor name to the ``Gemma3ForCausalLM`` spelling; None for vision tensors.

    ``model.language_model.X`` (transformers 5) and ``language_model.model.X`` (4.x) become ``model.X``.
    """
    if name.startswith(_VISION_PREFIXES):
        return None
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    if name.startswith("language_model.lm_head."):
        return name[len("language_model."):]
    return name


def rope_bases(config: dict[str, Any]) -> tuple[float, float, dict[str, Any] | None]:
    """(global theta, sliding theta, global RoPE scaling dict or None) from a 4.x or 5.x Gemma 3 config."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        full, local = params["full_attention"], params.get("sliding_attention") or {}
        theta = float(full.get("rope_theta", 1_000_000.0))
        theta_swa = float(local.get("rope_theta", 10_000.0))
        kind = full.get("rope_type", "default")
        scaling = None if kind in (None, "default") else {**full, "rope_type": kind}
        if local.get("rope_type", "default") not in (None, "default"):
            raise UnsupportedArchitectureError(
                f"RoPE scaling {local.get('rope_type')!r} on sliding-window layers is not supported by llama.cpp",
                hint="use a Gemma 3 checkpoint with default RoPE on sliding layers",
            )
        return theta, theta_swa, scaling
    theta = float(config.get("rope_theta", 1_000_000.0))
    theta_swa = float(config.get("rope_local_base_freq", 10_000.0))
    rs = config.get("rope_scaling")
    scaling = None
    if isinstance(rs, dict):
        kind = rs.get("rope_type", rs.get("type", "default"))
        scaling = None if kind in (None, "default") else {**rs, "rope_type": kind}
    return theta, theta_swa, scaling


def sliding_layers(config: dict[str, Any], n_layer: int) -> list[bool]:
    """Per layer: True if it uses sliding-window attention (``layer_types``, else the period pattern)."""
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == n_layer:
        return [t == "sliding_attention" for t in types]
    period = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or DEFAULT_SWA_PERIOD)
    return [bool((i + 1) % period) for i in range(n_layer)]


def default_pattern(n_layer: int) -> list[bool]:
    """llama.cpp's sliding pattern when no pattern key is written."""
    return [bool((i + 1) % DEFAULT_SWA_PERIOD) for i in range(n_layer)]


def check_supported(config: dict[str, Any], *, n_embd: int, n_head: int, n_layer: int, head_dim: int,
                    source: str) -> None:
    """Refuse Gemma 3 variants llama.cpp's ``gemma3`` graph computes differently.

    Raises:
        UnsupportedArchitectureError: soft-capping, bidirectional attention, a query scale llama.cpp does not
            use, or a RoPE scaling other than linear; the message names the setting.
    """
    def refuse(what: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(
            f"Gemma 3 checkpoint {source} uses {what}, which llama.cpp's gemma3 graph does not compute",
            hint="use a standard Gemma 3 text checkpoint (google/gemma-3-*)",
        )

    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key) is not None:
            raise refuse(f"{key}={config[key]}")
    if config.get("use_bidirectional_attention"):
        raise refuse("bidirectional attention")
    scalar = config.get("query_pre_attn_scalar")
    allowed = {head_dim} | ({n_embd // n_head} if n_layer == 62 else set())  # 27B: llama.cpp uses n_embd/n_head
    if scalar is not None and int(scalar) not in allowed:
        raise refuse(f"query_pre_attn_scalar={scalar} (llama.cpp scales by 1/sqrt({head_dim}))")
