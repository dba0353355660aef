"""Fast read of a GGUF file's header: key/values and tensor infos, without touching tensor data.

``gguf.GGUFReader`` builds a numpy view for every element of every array, which for a 262,144-token
vocabulary (Gemma 3) takes tens of seconds to minutes on a small CPU. This reader walks the same layout with
``struct`` and decodes large arrays only when asked (``arrays``), so reading the header of a 250 MB Gemma GGUF
takes well under a second. Type codes come from the ``gguf`` package (``GGUFValueType``,
``GGMLQuantizationType``, ``GGML_QUANT_SIZES``).

Layout (ggml-org/ggml ``docs/gguf.md``, version 2 and 3, little-endian): magic ``GGUF``, uint32 version,
uint64 tensor count, uint64 kv count; kv pairs (string key, uint32 value type, value); tensor infos (string name,
uint32 n_dims, uint64 dims[n_dims], uint32 ggml type, uint64 offset); padding to ``general.alignment``
(default 32); tensor data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from fieldpack.shared.errors import ModelLoadError

_SCALARS = {  # GGUFValueType value -> struct format
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: name, shape (GGUF order, ``ne[0]`` first), GGML type name, data offset (bytes
    from the start of the data section) and size in bytes."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GgufHeader:
    """The header of a GGUF file: ``kv`` (scalars and strings decoded; arrays decoded when asked for, else
    their length as ``int``), ``tensors``, ``data_start`` (byte offset of the data section) and ``file_size``."""

    version: int
    kv: dict[str, Any]
    tensors: list[TensorInfo] = field(default_factory=list)
    data_start: int = 0
    file_size: int = 0

    @property
    def data_end(self) -> int:
        """Byte offset just past the last tensor's data."""
        return self.data_start + max((t.offset + t.n_bytes for t in self.tensors), default=0)


class _Reader:
    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh

    def take(self, n: int) -> bytes:
        b = self.fh.read(n)
        if len(b) != n:
            raise EOFError("file ends inside the header")
        return b

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int, decode_arrays: bool) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.scalar("<I"), self.scalar("<Q")
            if itype in _SCALARS and not decode_arrays:
                self.fh.seek(count * struct.calcsize(_SCALARS[itype]), 1)
                return count
            if itype in _SCALARS:
                fmt = _SCALARS[itype]
                return list(struct.unpack(f"<{count}{fmt[1]}", self.take(count * struct.calcsize(fmt))))
            if itype == _STRING and not decode_arrays:
                for _ in range(count):
                    self.fh.seek(self.scalar("<Q"), 1)
                return count
            return [self.value(itype, decode_arrays) for _ in range(count)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_header(path: Path, *, arrays: frozenset[str] | set[str] = frozenset()) -> GgufHeader:
    """Read the key/values and tensor infos of ``path``.

    Args:
        path: a GGUF file.
        arrays: keys, or key suffixes, whose array values to decode (e.g. ``{"tokenizer.ggml.tokens",
            ".attention.head_count_kv"}``); other arrays are skipped and stored as their length.

    Raises:
        ModelLoadError: not a GGUF file, an unsupported version, or the file ends inside the header.
    """
    import gguf

    path = Path(path)
    try:
        with path.open("rb") as fh:
            r = _Reader(fh)
            if r.take(4) != b"GGUF":
                raise ValueError("no GGUF magic at the start")
            version = r.scalar("<I")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (fieldpack reads 2 and 3)")
            n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
            kv: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string()
                kv[key] = r.value(r.scalar("<I"), any(key.endswith(a) for a in arrays))
            tensors: list[TensorInfo] = []
            for _ in range(n_tensors):
                name = r.string()
                shape = tuple(r.scalar("<Q") for _ in range(r.scalar("<I")))
                qtype = gguf.GGMLQuantizationType(r.scalar("<I"))
                offset = r.scalar("<Q")
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                n = 1
                for d in shape:
                    n *= d
                tensors.append(TensorInfo(name, shape, qtype.name, offset, n // block * type_size))
            align = int(kv.get(gguf.Keys.General.ALIGNMENT, 32))
            pos = fh.tell()
            data_start = pos + (-pos) % align
    except (OSError, EOFError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"GGUF file {path} is truncated or corrupt ({exc})",
                             hint="download or copy the file again; its size must match the original") from exc
    return GgufHeader(version, kv, tensors, data_start, path.stat().st_size)
