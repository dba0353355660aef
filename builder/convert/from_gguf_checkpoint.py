"""A Hugging Face checkpoint made from a GGUF file, offline, with transformers' GGUF loader.

transformers (>= 4.50, with ``accelerate``) dequantizes a GGUF into torch tensors
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``) and rebuilds the tokenizer from the GGUF's
``tokenizer.ggml.*`` keys (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``). ``save_pretrained``
then writes ``config.json``, safetensors and ``tokenizer.json``: a real network with a real tokenizer whose
weights are the GGUF's (for a Q4_K_M file, the Q4_K_M values, not the original release's).

Used by the slow tests, the demo and the benchmarks to get a Gemma 3 checkpoint for the converter and parity
gate without a network. The output folder appears whole or not at all (temp folder, fsync, rename).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Literal

from fieldpack.shared.atomic import fsync_dir
from fieldpack.shared.errors import InputNotFoundError, ModelLoadError, OutputNotWritableError

logger = logging.getLogger(__name__)

SaveDType = Literal["bfloat16", "float32"]


def hf_checkpoint_from_gguf(gguf_path: Path, out_dir: Path, *, dtype: SaveDType = "bfloat16") -> Path:
    """Dequantize ``gguf_path`` with transformers and save it as an HF checkpoint folder ``out_dir``.

    Args:
        gguf_path: a GGUF file of an architecture transformers' GGUF loader knows (llama, qwen2, gemma3...).
        out_dir: folder to create (must not exist yet; its parent is created). Holds ``config.json``,
            ``model.safetensors`` (``dtype``), ``tokenizer.json``, ``tokenizer_config.json`` afterwards.
        dtype: tensor dtype saved: ``"float32"`` (exact dequantized values; ~1.1 GB for Gemma 3 270M) or
            ``"bfloat16"`` (half the size, rounded).

    Returns:
        ``out_dir``.

    Raises:
        InputNotFoundError: ``gguf_path`` is not a file.
        ModelLoadError: transformers cannot load the GGUF (unknown architecture, corrupt file).
        OutputNotWritableError: ``out_dir`` exists or cannot be written.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise InputNotFoundError(f"GGUF file {gguf_path} does not exist", hint="pass the path of a .gguf file")
    if out_dir.exists():
        raise OutputNotWritableError(f"{out_dir} already exists", hint="remove it or choose another folder")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(f"Cannot create {out_dir.parent}: {exc}", hint="choose a writable path") from exc
    t0 = time.perf_counter()
    hf_logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=getattr(torch, dtype))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(
            f"transformers cannot load GGUF {gguf_path}: {exc}",
            hint="use a GGUF of an architecture transformers' GGUF loader supports, or an HF checkpoint",
        ) from exc
    # The dequantized weights are plain tensors now; a saved quantization_config would make transformers
    # look for the GGUF again when the checkpoint is loaded.
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    model.config.dtype = getattr(torch, dtype)

    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        for p in tmp.iterdir():
            with p.open("rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        os.rename(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except OSError as exc:
        raise OutputNotWritableError(f"Cannot write {out_dir}: {exc}", hint="check free disk space") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("HF checkpoint %s from %s in %.1f s", out_dir, gguf_path, time.perf_counter() - t0)
    return out_dir
