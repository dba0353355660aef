"""The one way fieldpack loads llama-cpp-python: :func:`llama_cpp_module`, safe on CPUs with Intel AMX.

llama.cpp's CPU backend places quantized weights in "extra" buffer types when the CPU offers them: Intel AMX
tiles (Sapphire Rapids and later Xeons, ``amx_int8`` in ``/proc/cpuinfo``) and the repacked ``REPACK`` layouts.
With llama-cpp-python 0.3.36 built natively on an AMX machine, the AMX path crashes the process (SIGSEGV in
``llama_decode``) on the first batch of any Q4_K_M / Q8_0 model, the tiny test models and Gemma 3 270M alike
(seen on this project's build hosts, 2026-12). llama-cpp-python's ``Llama`` does not expose the model parameter
that turns them off (``llama_model_params.use_extra_bufts``), so on such a CPU :func:`llama_cpp_module` wraps
``llama_model_default_params`` to return it False: weights stay in plain CPU buffers (the code path every non-AMX
x86 machine runs), at some speed cost on those Xeons only.

``FIELDPACK_LLAMA_EXTRA_BUFTS`` overrides the detection: ``off`` (plain buffers everywhere), ``on`` (llama.cpp's
default even with AMX, e.g. once a fixed llama.cpp ships), ``auto`` (default: off exactly when the CPU has AMX).

This module never imports llama_cpp itself (``shared`` stays light; see tests/test_import_boundary.py): the
builder and the device import it and hand it over, ``llama_cpp_module(llama_cpp)``. :func:`llama_server_command`
is the command line of llama-cpp-python's OpenAI-compatible server with the same guard, for tests and benchmarks.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

from fieldpack.shared.errors import UsageError

log = logging.getLogger(__name__)

ENV = "FIELDPACK_LLAMA_EXTRA_BUFTS"
_lock = threading.Lock()
_applied: bool | None = None  # None: not decided yet; True/False: extra buffer types turned off or not


def cpu_has_amx(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU advertises Intel AMX (``amx_int8`` or ``amx_tile`` among the flags); False where
    ``/proc/cpuinfo`` does not exist (not Linux) or cannot be read."""
    try:
        text = cpuinfo.read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"amx_int8", "amx_tile"})
    return False


def extra_buffer_types_off(env: str | None = None, *, amx: bool | None = None) -> bool:
    """Whether to turn llama.cpp's extra CPU buffer types off: ``env`` (default ``$FIELDPACK_LLAMA_EXTRA_BUFTS``)
    ``off`` -> True, ``on`` -> False, ``auto``/unset -> :func:`cpu_has_amx`.

    Raises:
        UsageError: the variable holds another value (one line naming it and the three it takes).
    """
    value = (os.environ.get(ENV, "auto") if env is None else env).strip().lower() or "auto"
    if value not in ("auto", "on", "off"):
        raise UsageError(f"environment variable {ENV}={value!r} is not auto, on or off",
                         hint=f"unset {ENV} (auto: off exactly on CPUs with Intel AMX) or set it to on or off")
    if value != "auto":
        return value == "off"
    return cpu_has_amx() if amx is None else amx


def llama_cpp_module(module: ModuleType) -> ModuleType:
    """Return the imported ``llama_cpp`` package ``module``, with llama.cpp's extra CPU buffer types turned off
    where :func:`extra_buffer_types_off` says so (decided once per process, before the caller loads a model
    through ``module.Llama`` or the low-level API). Usage: ``import llama_cpp; Llama = llama_cpp_module(llama_cpp).Llama``.

    Raises:
        UsageError: ``$FIELDPACK_LLAMA_EXTRA_BUFTS`` holds another value than auto, on or off.
    """
    global _applied
    if _applied is not None:
        return module
    with _lock:
        if _applied is None:
            off = extra_buffer_types_off()
            if off:
                _turn_off_extra_buffer_types(module)
                log.info("llama.cpp: extra CPU buffer types (AMX, repack) off (%s)",
                         f"{ENV}=off" if os.environ.get(ENV) else "this CPU has AMX")
            _applied = off
    return module


def _turn_off_extra_buffer_types(module: ModuleType) -> None:
    """Wrap ``llama_model_default_params`` (the low-level ``llama_cpp.llama_cpp`` module's, which ``Llama`` calls,
    and the package's re-export) so that every model load gets ``use_extra_bufts = False``."""
    low = module.llama_cpp  # the ctypes binding submodule, an attribute of the imported package
    original = low.llama_model_default_params
    if getattr(original, "_fieldpack_plain_buffers", False):
        return

    def default_params():  # type: ignore[no-untyped-def]
        params = original()
        params.use_extra_bufts = False
        return params

    default_params._fieldpack_plain_buffers = True  # type: ignore[attr-defined]
    low.llama_model_default_params = default_params
    module.llama_model_default_params = default_params  # type: ignore[attr-defined]


def llama_server_command(python: str, *args: str) -> list[str]:
    """The argv that runs ``python -m llama_cpp.server ARGS`` under :func:`llama_cpp_module`'s guard
    (``python``: the interpreter, e.g. ``sys.executable``; ``args``: the server's own options)."""
    code = ("import runpy, sys, llama_cpp; from fieldpack.shared.llama_backend import llama_cpp_module; "
            "llama_cpp_module(llama_cpp); sys.argv[0] = 'llama_cpp.server'; "
            "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)")
    return [python, "-c", code, *args]
