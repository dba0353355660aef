"""A GGUF the user already has as the model of a build (``fieldpack build --model path/model.gguf``).

:func:`inspect_gguf` reads the file with ``gguf.GGUFReader`` (keys from ``gguf.Keys``), checks that it is whole
(every tensor's data lies inside the file), that it has a tokenizer, and that llama.cpp loads it (the real
loader, so an architecture or tensor layout llama.cpp does not know is refused here, not on the device), and
returns a :class:`GgufInput`: the same facts a conversion reports (:class:`~.convert.ConversionResult`) plus
the file type and whether it is already quantized. Nothing is written.

The build then skips conversion and the parity gate (there is no reference to compare with; the manifest says
``parity: not applicable, GGUF input``). By default the file ships as is; re-quantizing it (``--quant`` naming
another type) is recorded as re-quantized from an already quantized file, with the measured ΔPPL/KLD.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldpack.builder.convert.writer import ConversionResult
from fieldpack.shared.errors import InputNotFoundError, ModelLoadError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)

#: ``general.file_type`` values of unquantized GGUFs (``gguf.LlamaFileType`` ALL_F32, MOSTLY_F16, MOSTLY_BF16).
_UNQUANTIZED = frozenset({0, 1, 32})
#: Note recorded in the manifest's parity figures for a GGUF input.
PARITY_NOT_APPLICABLE = "not applicable, GGUF input"


@dataclass(frozen=True)
class GgufInput:
    """What :func:`inspect_gguf` found.

    Attributes:
        model: the facts a conversion would report (architecture, shape, vocabulary, special tokens, chat
            template, sha256, size in bytes); ``seconds`` is the inspection time.
        file_type: fieldpack's name of ``general.file_type`` (``"Q4_K_M"``), or gguf's (``"MOSTLY_IQ2_XS"``).
        file_type_id: the raw ``general.file_type`` (``gguf.LlamaFileType``), -1 when absent.
        quantized: True unless the file is F32/F16/BF16.
    """

    model: ConversionResult
    file_type: str
    file_type_id: int
    quantized: bool


def is_gguf_path(model: str | Path) -> bool:
    """Whether ``--model`` names a GGUF file (by suffix, or by the ``GGUF`` magic of an existing file)."""
    p = Path(model)
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with p.open("rb") as fh:
            return fh.read(4) == b"GGUF"
    except OSError:
        return False


def _int(kv: dict[str, Any], key: str) -> int | None:
    v = kv.get(key)
    if isinstance(v, list):  # per-layer arrays (e.g. head_count_kv of hybrid models): the largest
        v = max(v) if v else None
    return None if v is None else int(v)


def _check_llama_cpp_loads(path: Path, arch: str) -> None:
    """Load the file with llama.cpp (weights mmapped, tiny context); raise naming llama.cpp's own reason."""
    from fieldpack.builder.llama_eval import open_gguf
    from fieldpack.builder.llama_eval import capture_llama_log

    with capture_llama_log() as lines:
        try:
            with open_gguf(path, n_ctx=64, logits_all=False):
                return
        except (ValueError, RuntimeError, ModelLoadError) as exc:
            reason = next((ln.strip() for ln in lines if "error" in ln.lower() or "unknown" in ln.lower()),
                          str(exc))
            cls = UnsupportedArchitectureError if "architecture" in reason.lower() else ModelLoadError
            raise cls(f"llama.cpp cannot load GGUF {path} (architecture {arch!r}): {reason}",
                      hint="use a GGUF made for this llama.cpp version (llama-cpp-python's), or convert a "
                      "Hugging Face checkpoint with fieldpack") from exc


def inspect_gguf(path: Path, *, load_check: bool = True) -> GgufInput:
    """Validate and describe a GGUF model file for the build.

    Args:
        path: the ``.gguf`` file.
        load_check: also load it with llama.cpp (default; tests of the metadata checks may skip it).

    Returns:
        A :class:`GgufInput`.

    Raises:
        InputNotFoundError: ``path`` is not a file.
        ModelLoadError: the file is truncated or corrupt, has no tokenizer (``tokenizer.ggml.model`` /
            ``tokenizer.ggml.tokens``) or no EOS token, or llama.cpp cannot load it.
        UnsupportedArchitectureError: no ``general.architecture``, or one llama.cpp does not know.
    """
    import time
    from collections import Counter

    import gguf
    from gguf import Keys

    from fieldpack.builder.gguf_header import read_gguf_header
    from fieldpack.builder.convert.special_tokens import EOT_CANDIDATES
    from fieldpack.builder.quantize import _sha256, file_type_name

    t0 = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"GGUF file {path} does not exist", hint="pass the path of a .gguf model file")
    head = read_gguf_header(path, arrays={Keys.Tokenizer.LIST, Keys.Tokenizer.TOKEN_TYPE,
                                          Keys.Attention.HEAD_COUNT_KV.format(arch="")})
    kv = head.kv
    if not head.tensors or head.data_end > head.file_size:
        raise ModelLoadError(
            f"GGUF file {path} is truncated: its tensors need {head.data_end} bytes, the file has {head.file_size}",
            hint="download or copy the file again; its size must match the original")
    arch = kv.get(Keys.General.ARCHITECTURE)
    if not arch:
        raise UnsupportedArchitectureError(f"GGUF file {path} has no {Keys.General.ARCHITECTURE}",
                                           hint="the file is not a llama.cpp model; convert the model again")
    arch = str(arch)
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise UnsupportedArchitectureError(f"GGUF file {path} has architecture {arch!r}, which llama.cpp does not know",
                                           hint="use a GGUF of an architecture llama.cpp supports")
    tokens = kv.get(Keys.Tokenizer.LIST)
    tok_model = kv.get(Keys.Tokenizer.MODEL)
    if not tokens or not tok_model or tok_model == "none":
        raise ModelLoadError(f"GGUF file {path} has no tokenizer ({Keys.Tokenizer.MODEL} / {Keys.Tokenizer.LIST})",
                             hint="use a GGUF that embeds its tokenizer, as llama.cpp's converter writes it")
    eos = _int(kv, Keys.Tokenizer.EOS_ID)
    if eos is None:
        raise ModelLoadError(f"GGUF file {path} has no {Keys.Tokenizer.EOS_ID}",
                             hint="use a GGUF whose tokenizer names its end-of-sequence token")
    if load_check:
        _check_llama_cpp_loads(path, arch)

    def llm(key: str) -> int | None:
        return _int(kv, key.format(arch=arch))

    n_embd = llm(Keys.LLM.EMBEDDING_LENGTH) or 0
    n_head = llm(Keys.Attention.HEAD_COUNT) or 1
    types = kv.get(Keys.Tokenizer.TOKEN_TYPE) or [int(gguf.TokenType.NORMAL)] * len(tokens)
    eot = _int(kv, Keys.Tokenizer.EOT_ID)
    if eot is None:  # llama.cpp finds EOT by text when the key is absent (e.g. Gemma's <end_of_turn>)
        control = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == gguf.TokenType.CONTROL}
        eot = next((control[t] for t in EOT_CANDIDATES if t in control), None)
    stops: list[str] = []
    for tid in (eot, _int(kv, Keys.Tokenizer.EOM_ID), eos):
        if tid is not None and 0 <= tid < len(tokens) and tokens[tid] not in stops:
            stops.append(tokens[tid])
    bos = _int(kv, Keys.Tokenizer.BOS_ID)
    add_bos = kv.get(Keys.Tokenizer.ADD_BOS)
    ftype_id = _int(kv, Keys.General.FILE_TYPE)
    ftype_id = -1 if ftype_id is None else ftype_id
    template = kv.get(Keys.Tokenizer.CHAT_TEMPLATE)
    model = ConversionResult(
        path=path, sha256=_sha256(path), size_bytes=head.file_size, architecture=arch,
        parameter_count=sum(t.n_elements for t in head.tensors),
        n_ctx_train=llm(Keys.LLM.CONTEXT_LENGTH) or 2048, n_embd=n_embd, n_layer=llm(Keys.LLM.BLOCK_COUNT) or 0,
        n_head=n_head, n_head_kv=llm(Keys.Attention.HEAD_COUNT_KV) or n_head, vocab_size=len(tokens),
        tensor_types=dict(sorted(Counter(t.type_name for t in head.tensors).items())),
        chat_template=str(template) if template else None,
        bos_id=bos, eos_id=eos, eot_id=eot, stop_strings=stops, tokenizer_model=str(tok_model),
        tokenizer_pre=kv.get(Keys.Tokenizer.PRE),
        add_bos=bool(add_bos) if add_bos is not None else bos is not None,
        seconds=round(time.perf_counter() - t0, 3), tensor_names=[t.name for t in head.tensors],
        head_dim=llm(Keys.Attention.KEY_LENGTH) or n_embd // n_head,
    )
    info = GgufInput(model=model, file_type=file_type_name(ftype_id) if ftype_id >= 0 else "unknown",
                     file_type_id=ftype_id, quantized=ftype_id not in _UNQUANTIZED)
    logger.info("GGUF input %s: %s %s, %d params, %d layers, vocab %d (%s), %d bytes", path, arch, info.file_type,
                model.parameter_count, model.n_layer, model.vocab_size, tok_model, model.size_bytes)
    return info


def requantize_requested(requested: str | None, source: GgufInput) -> bool:
    """Whether the build re-quantizes the GGUF: a ``--quant`` was given and names another type than the file's."""
    return requested is not None and requested.upper() != source.file_type.upper()


def copy_as_is(src: Path, dst: Path) -> Path:
    """Hard-link (or copy) the input GGUF into the work folder, so the bundle step reads it from there."""
    import shutil

    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def check_gguf_build(path: Path, requested_quant: str | None, *, compression: bool) -> Path:
    """The build's input checks for a GGUF model, before any heavy work: the file is whole, has a tokenizer,
    llama.cpp loads it, and the options fit a GGUF input.

    Args:
        path: the ``--model`` GGUF file.
        requested_quant: ``--quant`` as given (None: keep the file as is).
        compression: whether pruning/imatrix options were given.

    Returns:
        ``path``.

    Raises:
        CompressionOptionError: compression options (they need a Hugging Face checkpoint).
        UnknownQuantTypeError: ``requested_quant`` is neither the file's own type nor one fieldpack offers.
        InputNotFoundError / ModelLoadError / UnsupportedArchitectureError: from :func:`inspect_gguf`.
    """
    from fieldpack.builder.quantize import QUANT_TYPES
    from fieldpack.shared.errors import CompressionOptionError, UnknownQuantTypeError

    if compression:
        raise CompressionOptionError(
            f"pruning and --imatrix need a Hugging Face checkpoint, and {path} is a GGUF file",
            hint="build from the checkpoint to compress, or drop the compression options to ship the GGUF")
    info = inspect_gguf(path)
    if requested_quant is not None and requantize_requested(requested_quant, info) \
            and requested_quant.upper() not in QUANT_TYPES:
        raise UnknownQuantTypeError(f"unknown --quant {requested_quant!r}",
                                    hint=f"use one of {', '.join(sorted(QUANT_TYPES))}, or leave it out to ship "
                                         f"{path.name} as is ({info.file_type})")
    return path
