"""LoRA through PEFT (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): which linear
layers get adapters per architecture, attaching them, and merging them back into full-precision weights.

Each targeted ``nn.Linear`` ``W`` (out x in) gets ``W + (alpha / r) * B @ A`` with ``A`` (r x in, Kaiming-uniform)
and ``B`` (out x r, zeros), so training starts from the unchanged model. Merging (PEFT ``merge_and_unload``) adds
the product into ``W`` in the model's own float32 weights, never into quantized ones: the merged checkpoint is a
plain Hugging Face folder that our converter and parity gate take like any other.
"""

from __future__ import annotations

import logging
from typing import Any

from fieldpack.shared.errors import AdaptationError

log = logging.getLogger(__name__)

#: Linear layers of a Llama-layout decoder block: attention projections and the gated MLP.
_LLAMA_LAYOUT = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: ``config.model_type`` -> LoRA target module names (suffixes of ``named_modules``).
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_LAYOUT,
    "mistral": _LLAMA_LAYOUT,
    "qwen2": _LLAMA_LAYOUT,
    "gemma3_text": _LLAMA_LAYOUT,
    "gemma3": _LLAMA_LAYOUT,
}


def lora_targets(model: Any) -> tuple[str, ...]:
    """The LoRA target module names for ``model`` (a transformers causal LM), checked against its modules.

    Raises:
        AdaptationError: the architecture is not one we adapt (named), or a target module is absent from the
            model (named: a config that renamed or removed it).
    """
    mtype = str(getattr(model.config, "model_type", "") or "")
    targets = LORA_TARGETS.get(mtype)
    if targets is None:
        arch = ",".join(getattr(model.config, "architectures", None) or [type(model).__name__])
        raise AdaptationError(f"LoRA adaptation does not support architecture {arch} (model_type {mtype!r})",
                              hint=f"use a Llama, Qwen2 or Gemma 3 checkpoint ({', '.join(sorted(LORA_TARGETS))})")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise AdaptationError(f"{mtype} model has no {', '.join(missing)} module(s) to put LoRA adapters on",
                              hint="use an unmodified Llama, Qwen2 or Gemma 3 checkpoint")
    return targets


def attach_lora(model: Any, *, r: int, alpha: int, dropout: float = 0.0) -> Any:
    """Wrap ``model`` in a PEFT ``PeftModel`` with LoRA adapters on :func:`lora_targets`; only the adapters train.

    The adapters' initial ``A`` matrices come from torch's RNG: seed it first for a reproducible run.

    Returns:
        the PEFT model (trainable parameters: the adapters, float32).
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(lora_targets(model)),
                     bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%d on %s: %d trainable parameters", r, alpha, ",".join(cfg.target_modules), trainable)
    return peft_model


def merge_lora(peft_model: Any) -> Any:
    """Merge the adapters into the base weights and return the plain transformers model (no PEFT layers)."""
    merged = peft_model.merge_and_unload()
    leftover = [n for n, _ in merged.named_modules() if "lora_" in n]
    if leftover:  # would reach the converter as unknown tensors
        raise AdaptationError(f"LoRA merge left adapter modules behind ({leftover[0]})", hint="report this as a bug")
    return merged
