"""Writing a small GGUF (every tensor in memory: an imatrix, a LoRA adapter) atomically with ``gguf.GGUFWriter``."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_gguf_atomic(path: Path, arch: str, fill: Callable[[Any], None]) -> Path:
    """Write ``path`` as a GGUF: ``fill(writer)`` adds the KV pairs and tensors to a ``gguf.GGUFWriter`` (arch
    ``arch``), then header, KV data and tensors go to a temp file beside ``path``, fsync, rename.

    Returns:
        ``path``.

    Raises:
        OSError: the file cannot be written (nothing is left at ``path`` or in the temp file).
    """
    import gguf

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(tmp, arch=arch)
    try:
        fill(w)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return path
