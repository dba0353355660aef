"""HF checkpoint folder -> GGUF file, written with ``gguf.GGUFWriter`` one tensor at a time.

The GGUF layout (header, key/values, tensor infos, then aligned tensor data) is written in that order: the
tensor infos are declared from safetensors metadata first, then each tensor is loaded, transformed (Q/K
permutation, dtype cast) and streamed out, so peak memory is one tensor. The file is written under a
temporary name next to ``out_path``, fsynced, then renamed.

Spec: GGUF (ggml-org/ggml ``docs/gguf.md``); key names from ``gguf.constants.Keys``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from fieldpack.builder.convert.arch import HParams, TensorPlan, plan_tensors, read_hparams, write_hparams
from fieldpack.builder.convert.checkpoint import Checkpoint
from fieldpack.builder.convert.tokenizer import Vocab, read_vocab
from fieldpack.shared.errors import ModelLoadError, OutputNotWritableError, UsageError

logger = logging.getLogger(__name__)

OutType = Literal["f16", "f32"]
_GGUF_QUANT_VERSION = 2


@dataclass(frozen=True)
class ConversionResult:
    """What :func:`convert_hf_to_gguf` wrote.

    Attributes:
        path: the GGUF file.
        sha256: hex digest of the file. size_bytes: its size.
        architecture: GGUF arch name (``"llama"``, ``"qwen2"``).
        parameter_count: elements in all written tensors.
        n_ctx_train, n_embd, n_layer, n_head, n_head_kv, vocab_size: from config.json (tokens / counts).
        tensor_types: GGML type name -> number of tensors written with it (e.g. ``{"F16": 15, "F32": 5}``).
        chat_template: the Jinja template stored in ``tokenizer.chat_template``, or None.
        bos_id / eos_id / eot_id: special token ids (None when absent).
        stop_strings: texts of the end-of-generation tokens (EOT, EOM, EOS).
        tokenizer_model: ``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece).
        tokenizer_pre: llama.cpp pre-tokenizer name (``"llama-bpe"``, ``"qwen2"``...) or None for SentencePiece.
        add_bos: whether llama.cpp adds BOS when tokenizing. seconds: wall time of the conversion.
        head_dim: attention key/value length per head (Gemma: independent of n_embd / n_head); 0 when unknown.
    """

    path: Path
    sha256: str
    size_bytes: int
    architecture: str
    parameter_count: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    vocab_size: int
    tensor_types: dict[str, int]
    chat_template: str | None
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    stop_strings: list[str]
    tokenizer_model: str
    tokenizer_pre: str | None
    add_bos: bool = False
    seconds: float = 0.0
    tensor_names: list[str] = field(default_factory=list, repr=False)
    head_dim: int = 0


def _out_dtype(plan: TensorPlan, outtype: OutType) -> type[np.floating]:
    # llama.cpp convention: 1-D tensors (norms, biases, rope factors) stay F32; matrices take the outtype.
    if outtype == "f16" and len(plan.shape) >= 2:
        return np.float16
    return np.float32


def _write_vocab(writer, vocab: Vocab) -> None:  # writer: gguf.GGUFWriter
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
    if vocab.eot_id is not None:
        writer.add_eot_token_id(vocab.eot_id)
    if vocab.eom_id is not None:
        writer.add_eom_token_id(vocab.eom_id)
    if vocab.unk_id is not None:
        writer.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def convert_hf_to_gguf(model_dir: Path, out_path: Path, *, outtype: OutType = "f16") -> ConversionResult:
    """Convert a local Hugging Face checkpoint folder to a GGUF file llama.cpp loads.

    Args:
        model_dir: folder with config.json, ``*.safetensors`` (single or sharded with an index) and the
            tokenizer (tokenizer.json and/or tokenizer.model, tokenizer_config.json).
        out_path: GGUF file to write (parent folder is created).
        outtype: ``"f16"`` (matrices F16, 1-D tensors F32; what llama.cpp quantizes from) or ``"f32"``.

    Returns:
        A :class:`ConversionResult` describing the written file.

    Raises:
        InputNotFoundError: ``model_dir`` does not exist.
        ModelLoadError: config.json, weights or tokenizer missing/unreadable (message names the file).
        UnsupportedArchitectureError: the architecture, a tensor or a RoPE scaling type is not supported.
        UnsupportedTokenizerError: the tokenizer or its pre-tokenizer is not one llama.cpp reproduces.
        OutputNotWritableError: ``out_path`` cannot be written.
        UsageError: ``outtype`` is not ``"f16"``/``"f32"``.
    """
    import gguf

    if outtype not in ("f16", "f32"):
        raise UsageError(f"Unknown outtype {outtype!r}", hint="use outtype='f16' or outtype='f32'")
    t0 = time.perf_counter()
    ckpt = Checkpoint(Path(model_dir))
    hp: HParams = read_hparams(ckpt.config, ckpt.architecture, source=str(ckpt.model_dir))
    vocab = read_vocab(ckpt.model_dir, hp.n_vocab, ckpt.config)
    plans = plan_tensors(ckpt, hp)

    out_path = Path(out_path)
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(f"Cannot create {out_path.parent}: {exc}", hint="choose a writable path") from exc
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")

    writer = gguf.GGUFWriter(tmp, hp.gguf_arch)
    type_counts: Counter[str] = Counter()
    n_params = 0
    try:
        writer.add_name(ckpt.model_dir.name)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(_GGUF_QUANT_VERSION)
        write_hparams(writer, hp)
        _write_vocab(writer, vocab)
        dtypes = [_out_dtype(p, outtype) for p in plans]
        for plan, dt in zip(plans, dtypes, strict=True):
            nbytes = int(np.prod(plan.shape)) * np.dtype(dt).itemsize
            writer.add_tensor_info(plan.gguf_name, plan.shape, np.dtype(dt), nbytes)
            type_counts["F16" if dt is np.float16 else "F32"] += 1
            n_params += int(np.prod(plan.shape))
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for plan, dt in zip(plans, dtypes, strict=True):
                data = plan.load()
                if tuple(data.shape) != tuple(plan.shape):
                    raise ModelLoadError(
                        f"Tensor {plan.source} has shape {tuple(data.shape)}, expected {plan.shape}",
                        hint="the safetensors file is inconsistent; re-download the checkpoint",
                    )
                writer.write_tensor_data(np.ascontiguousarray(data.astype(dt, copy=False)))
            writer.close()
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
        except OSError as exc:
            raise OutputNotWritableError(
                f"Cannot write GGUF file {out_path}: {exc}", hint="check free disk space and permissions"
            ) from exc
        digest = _sha256(tmp)
        os.replace(tmp, out_path)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)

    result = ConversionResult(
        path=out_path,
        sha256=digest,
        size_bytes=out_path.stat().st_size,
        architecture=hp.gguf_arch,
        parameter_count=n_params,
        n_ctx_train=hp.n_ctx_train,
        n_embd=hp.n_embd,
        n_layer=hp.n_layer,
        n_head=hp.n_head,
        n_head_kv=hp.n_head_kv,
        vocab_size=hp.n_vocab,
        tensor_types=dict(sorted(type_counts.items())),
        chat_template=vocab.chat_template,
        bos_id=vocab.bos_id,
        eos_id=vocab.eos_id,
        eot_id=vocab.eot_id,
        stop_strings=vocab.stop_strings,
        tokenizer_model=vocab.model,
        tokenizer_pre=vocab.pre,
        add_bos=vocab.add_bos,
        seconds=round(time.perf_counter() - t0, 3),
        tensor_names=[p.gguf_name for p in plans],
        head_dim=hp.head_dim,
    )
    logger.info(
        "converted %s (%s, %d params, %s) -> %s (%d bytes, %.2f s)",
        ckpt.model_dir, hp.gguf_arch, n_params, result.tensor_types, out_path, result.size_bytes, result.seconds,
    )
    return result
