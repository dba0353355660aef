"""LoRA adapters as a GGUF adapter file that llama.cpp applies on top of the base model at load time, instead of
merging them into the weights.

Format (llama.cpp's ``convert_lora_to_gguf.py`` and ``src/llama-adapter.cpp``, read by
``llama_adapter_lora_init``; llama-cpp-python's ``Llama(lora_path=...)``): a GGUF with the base model's
``general.architecture``, ``general.type = "adapter"``, ``adapter.type = "lora"`` and ``adapter.lora.alpha``; for
every adapted linear layer whose base tensor is ``<name>`` (e.g. ``blk.3.attn_q.weight``) two tensors,
``<name>.lora_a`` = PEFT's ``A`` (``r x in``, numpy order) and ``<name>.lora_b`` = ``B`` (``out x r``). llama.cpp
adds ``scale * (alpha / r) * B @ (A @ x)`` to the layer's output, ``scale`` being the user's adapter scale (1.0).
Q/K rows of ``B`` get the same RoPE permutation as the base tensors (:func:`.convert.arch.permute_qk`, Llama
layout), so the adapter matches our converter's GGUF.

The cost on the device (stated in README): llama-cpp-python turns mmap off when an adapter is given
(``use_mmap = use_mmap and lora_path is None``), so the whole base model is read into anonymous memory at load
instead of being paged in from the file; the adapter's extra matmuls run on every token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fieldpack.shared.errors import AdaptationError, OutputNotWritableError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraGGUF:
    """A written adapter: path, size (bytes), rank, alpha, adapted base tensors and the sha256 of the file."""

    path: Path
    size_bytes: int
    rank: int
    alpha: float
    tensors: int
    sha256: str


def _hf_name(peft_name: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj`` -> ``model.layers.0.self_attn.q_proj.weight``."""
    return f"{peft_name.removeprefix('base_model.model.')}.weight"


def export_lora_gguf(peft_model: Any, model_dir: Path, out_path: Path, *, outtype: str = "f32") -> LoraGGUF:
    """Write the LoRA adapters of ``peft_model`` (not merged) as a llama.cpp GGUF adapter (module docstring).

    Args:
        peft_model: a PEFT ``PeftModel`` with one LoRA adapter (``default``), as :func:`.lora.attach_lora` makes.
        model_dir: the base Hugging Face checkpoint it was attached to (its config gives the GGUF names and the
            Q/K permutation, as in :func:`fieldpack.builder.convert.convert_hf_to_gguf`).
        out_path: the ``.gguf`` to write (temp file, fsync, rename).
        outtype: ``"f32"`` or ``"f16"`` for the ``lora_a``/``lora_b`` tensors.

    Returns:
        :class:`LoraGGUF`.

    Raises:
        AdaptationError: no LoRA module, several adapters or ranks, a module without a GGUF name.
        OutputNotWritableError: ``out_path`` cannot be written.
    """
    import gguf

    from fieldpack.builder.convert.arch import permute_qk, read_hparams
    from fieldpack.builder.convert.checkpoint import Checkpoint
    from fieldpack.builder.convert.gemma3 import text_tensor_name
    from fieldpack.shared.hashing import sha256_file

    if outtype not in ("f32", "f16"):
        raise AdaptationError(f"LoRA adapter outtype {outtype!r}", hint="use f32 or f16")
    ckpt = Checkpoint(Path(model_dir))
    hp = read_hparams(ckpt.config, ckpt.architecture, source=str(ckpt.model_dir))
    arch_enum = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[hp.gguf_arch]
    name_map = gguf.get_tensor_name_map(arch_enum, hp.n_layer)
    cfgs = getattr(peft_model, "peft_config", {})
    if len(cfgs) != 1:
        raise AdaptationError(f"the model carries {len(cfgs)} LoRA adapters; one is exported",
                              hint="train one adapter per build")
    (adapter_name, cfg), = cfgs.items()
    alpha = float(cfg.lora_alpha)
    dt = np.float32 if outtype == "f32" else np.float16
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []
    ranks: set[int] = set()
    for mod_name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or adapter_name not in lora_a:
            continue
        a = module.lora_A[adapter_name].weight.detach().float().cpu().numpy()  # (r, in)
        b = module.lora_B[adapter_name].weight.detach().float().cpu().numpy()  # (out, r)
        hf = _hf_name(mod_name)
        if hp.gguf_arch == "gemma3":
            hf = text_tensor_name(hf) or hf
        base = name_map.get_name(hf, try_suffixes=(".weight",))
        if base is None:
            raise AdaptationError(f"LoRA module {mod_name} has no GGUF tensor name for {hp.gguf_arch}",
                                  hint="adapt a Llama, Qwen2 or Gemma 3 checkpoint")
        if hp.permute_qk and ".self_attn.q_proj." in hf:
            b = permute_qk(b, hp.n_head)
        elif hp.permute_qk and ".self_attn.k_proj." in hf:
            b = permute_qk(b, hp.n_head_kv)
        ranks.add(a.shape[0])
        pairs.append((base, a, b))
    if not pairs:
        raise AdaptationError("the model has no LoRA adapters to export", hint="attach LoRA (--adapt) first")
    if len(ranks) != 1:
        raise AdaptationError(f"LoRA ranks differ across modules ({sorted(ranks)})", hint="use one rank")
    from fieldpack.builder.gguf_write import write_gguf_atomic

    def fill(writer: Any) -> None:
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_float32("adapter.lora.alpha", alpha)
        for base, a, b in pairs:
            writer.add_tensor(f"{base}.lora_a", np.ascontiguousarray(a.astype(dt)))
            writer.add_tensor(f"{base}.lora_b", np.ascontiguousarray(b.astype(dt)))

    out_path = Path(out_path)
    try:
        write_gguf_atomic(out_path, hp.gguf_arch, fill)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot write LoRA adapter {out_path}: {exc}",
                                     hint="check free disk space and permissions") from exc
    size, (rank,) = out_path.stat().st_size, ranks
    log.info("LoRA adapter %s: %d tensors, r=%d, alpha=%g, %d bytes", out_path.name, 2 * len(pairs), rank, alpha,
             size)
    return LoraGGUF(path=out_path, size_bytes=size, rank=rank, alpha=alpha, tensors=2 * len(pairs),
                    sha256=sha256_file(out_path))
