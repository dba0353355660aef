"""Replace the data of some tensors of a GGUF file, keeping every other byte: header, key/values, tensor infos,
alignment and the other tensors stay exactly as the source has them.

Used to store integers chosen by a calibrated quantizer (GPTQ) in the file llama.cpp wrote for the same type:
the tensor keeps its type and shape, so the file has the same size and layout as llama.cpp's, and any reader
of that type (llama.cpp, ``gguf.quants.dequantize``) reads the new values. Spec: GGUF (ggml-org/ggml
``docs/gguf.md``: tensor data at ``data_offset``, ``type_size`` bytes per block of ``block_size`` elements).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

from fieldpack.shared.atomic import atomic_path
from fieldpack.shared.errors import InputNotFoundError, QuantizationError


def replace_tensor_data(src: Path, dst: Path, blocks: dict[str, np.ndarray], *,
                        expect_type: str | None = None) -> str:
    """Copy ``src`` to ``dst`` (atomically) with the data of the named tensors replaced.

    Args:
        src: a GGUF file.
        dst: the output file.
        blocks: GGUF tensor name -> its new data as uint8, exactly ``n_bytes`` of the tensor in ``src``.
        expect_type: GGML type name each replaced tensor must have in ``src`` (``"Q4_0"``), or None.

    Returns:
        the sha256 (hex) of ``dst``.

    Raises:
        InputNotFoundError: ``src`` is missing.
        QuantizationError: a named tensor is absent, of another type, or the new data has another byte length.
        OutputNotWritableError: ``dst`` cannot be written.
    """
    import gguf

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputNotFoundError(f"GGUF file {src} does not exist", hint="quantize the model first")
    tensors = {t.name: t for t in gguf.GGUFReader(src).tensors}
    where: list[tuple[int, bytes]] = []
    for name, data in blocks.items():
        t = tensors.get(name)
        if t is None:
            raise QuantizationError(f"{src} has no tensor {name}", hint="quantize the same model that was calibrated")
        if expect_type is not None and t.tensor_type.name != expect_type:
            raise QuantizationError(f"{name} is {t.tensor_type.name} in {src}, not {expect_type}",
                                    hint="report this as a bug: the calibrated tensor must keep llama.cpp's type")
        raw = np.ascontiguousarray(data, dtype=np.uint8).tobytes()
        if len(raw) != int(t.n_bytes):
            raise QuantizationError(f"new data of {name} has {len(raw)} bytes, the tensor in {src} {int(t.n_bytes)}",
                                    hint="report this as a bug: shapes of the calibrated and written model differ")
        where.append((int(t.data_offset), raw))
    h = hashlib.sha256()
    with atomic_path(dst, suffix=".tmp.gguf") as tmp:
        shutil.copyfile(src, tmp)
        with open(tmp, "r+b") as fh:
            for offset, raw in sorted(where):
                fh.seek(offset)
                fh.write(raw)
        with open(tmp, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()
