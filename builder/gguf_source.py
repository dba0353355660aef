"""A GGUF the user already has as the build's model (``--model path/to/model.gguf``), kept as is.

Reads the GGUF header (key/value metadata and tensor infos; spec: ggml ``docs/gguf.md``) with a small reader
that skips tensor data and parses arrays with one ``struct`` call per element, so a 262,144-token vocabulary
takes a fraction of a second (``gguf.GGUFReader`` builds numpy views per element and took over a minute here).
The facts come back in the shape of a conversion result so the pipeline records them the same way.

There is nothing to compare the file to, so no parity gate runs; the manifest says so.
"""

from __future__ import annotations

import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fieldpack.shared.errors import InputNotFoundError, ModelLoadError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9

#: llama.cpp ``llama_ftype`` value -> fieldpack quant name (inverse of builder.quantize.QUANT_TYPES, plus F32).
def _ftype_name(value: int | None) -> str:
    from fieldpack.builder.quantize import QUANT_TYPES

    names = {v: k for k, v in QUANT_TYPES.items()}
    return names.get(int(value), f"ftype-{value}") if value is not None else "unknown"


@dataclass
class GgufModel:
    """What the pipeline needs of a model file (the fields of ``convert.writer.ConversionResult`` it reads)."""

    path: Path
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
    file_type: str
    chat_template: str | None
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    stop_strings: list[str]
    tokenizer_model: str
    tokenizer_pre: str | None
    add_bos: bool
    head_dim: int
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    def token_text(self, tid: int | None) -> str:
        toks = self.metadata.get("tokenizer.ggml.tokens") or []
        return toks[tid] if tid is not None and 0 <= tid < len(toks) else ""


def _read(f: BinaryIO, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise EOFError
    return b


def _string(f: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _read(f, 8))
    return _read(f, n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        etype, n = struct.unpack("<IQ", _read(f, 12))
        if etype == _STRING:
            return [_string(f) for _ in range(n)]
        fmt = _SCALARS.get(etype)
        if fmt is None:
            raise ValueError(f"array of type {etype}")
        size = struct.calcsize(fmt)
        return list(struct.unpack(f"<{n}{fmt[1]}", _read(f, size * n)))
    fmt = _SCALARS.get(vtype)
    if fmt is None:
        raise ValueError(f"value type {vtype}")
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def read_gguf_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, list[int], int]]]:
    """Metadata and tensor infos ``(name, dims, ggml type id)`` of a GGUF file, without its tensor data.

    Raises:
        InputNotFoundError: no such file.  ModelLoadError: not a GGUF, or truncated, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"model file {path} does not exist", hint="pass --model a GGUF file or a checkpoint folder")
    try:
        with open(path, "rb") as f:
            if _read(f, 4) != b"GGUF":
                raise ModelLoadError(f"{path} is not a GGUF file (bad magic)", hint="pass a .gguf made by llama.cpp tools")
            version, n_tensors, n_kv = struct.unpack("<IQQ", _read(f, 20))
            if version < 2:
                raise ModelLoadError(f"{path} is GGUF version {version}; only 2 and 3 are read",
                                     hint="re-convert it with a recent llama.cpp")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = _string(f)
                (vtype,) = struct.unpack("<I", _read(f, 4))
                meta[key] = _value(f, vtype)
            tensors = []
            for _ in range(n_tensors):
                name = _string(f)
                (n_dims,) = struct.unpack("<I", _read(f, 4))
                dims = list(struct.unpack(f"<{n_dims}Q", _read(f, 8 * n_dims)))
                ttype, _offset = struct.unpack("<IQ", _read(f, 12))
                tensors.append((name, dims, ttype))
    except EOFError as exc:
        raise ModelLoadError(f"{path} is truncated (the GGUF header ends early)",
                             hint="copy or download the file again") from exc
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise ModelLoadError(f"{path} has a malformed GGUF header: {exc}", hint="pass a .gguf made by llama.cpp tools") from exc
    return meta, tensors


def read_gguf_model(path: Path) -> GgufModel:
    """The facts a bundle records about a GGUF model (see :class:`GgufModel`).

    Raises:
        InputNotFoundError, ModelLoadError: missing, not a GGUF, truncated, or without architecture/tokenizer keys.
    """
    import gguf

    meta, tensors = read_gguf_header(path)
    arch = meta.get("general.architecture")
    toks = meta.get("tokenizer.ggml.tokens")
    if not arch:
        raise ModelLoadError(f"{path} has no general.architecture", hint="pass a .gguf made by llama.cpp tools")
    if not toks or "tokenizer.ggml.model" not in meta:
        raise ModelLoadError(f"{path} has no tokenizer (tokenizer.ggml.tokens / tokenizer.ggml.model)",
                             hint="use a GGUF that embeds its tokenizer, as llama.cpp's converter writes")

    def a(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    def tid(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}_token_id")
        return int(v) if v is not None else None

    size = Path(path).stat().st_size
    total_elems = 0
    types: Counter[str] = Counter()
    for _name, dims, ttype in tensors:
        n = 1
        for d in dims:
            n *= int(d)
        total_elems += n
        try:
            types[gguf.GGMLQuantizationType(ttype).name] += 1
        except ValueError:
            types[f"type-{ttype}"] += 1
    bos, eos, eot, eom = tid("bos"), tid("eos"), tid("eot"), tid("eom")
    if eot is None and "<end_of_turn>" in toks:  # Gemma: llama.cpp detects EOT by this text
        eot = toks.index("<end_of_turn>")
    stops: list[str] = []
    for t in (eot, eom, eos):
        if t is not None and 0 <= t < len(toks) and toks[t] not in stops:
            stops.append(toks[t])
    n_head = int(a("attention.head_count", 1))
    return GgufModel(
        path=Path(path), size_bytes=size, architecture=str(arch), parameter_count=max(1, total_elems),
        n_ctx_train=int(a("context_length", 2048)), n_embd=int(a("embedding_length", 1)),
        n_layer=int(a("block_count", 1)), n_head=n_head, n_head_kv=int(a("attention.head_count_kv", n_head)),
        vocab_size=len(toks), tensor_types=dict(types), file_type=_ftype_name(meta.get("general.file_type")),
        chat_template=meta.get("tokenizer.chat_template"), bos_id=bos, eos_id=eos if eos is not None else 0,
        eot_id=eot, stop_strings=stops, tokenizer_model=str(meta["tokenizer.ggml.model"]),
        tokenizer_pre=meta.get("tokenizer.ggml.pre"), add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        head_dim=int(a("attention.key_length", 0) or int(a("embedding_length", 1)) // n_head), metadata=meta)


def is_gguf_path(model: str) -> bool:
    """Whether ``--model`` names a GGUF file (by suffix) rather than a checkpoint folder or hub id."""
    return model.lower().endswith(".gguf")


def gguf_token_counter(path: Path) -> Any:
    """``text -> number of model tokens`` with llama.cpp's own tokenizer (vocab only, no weights loaded)."""
    from llama_cpp import Llama

    from fieldpack.builder.quantize import _capture_llama_log

    with _capture_llama_log():  # llama.cpp logs context warnings even for a vocab-only load
        llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    return lambda text: len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
