"""Importance matrix (imatrix) from the domain's calibration chunks, computed the way ``llama-imatrix`` does.

For every matrix multiplication ``W @ x`` of a decoder block, llama.cpp's ``llama-imatrix`` (``tools/imatrix/
imatrix.cpp``, ``IMatrixCollector::collect_imatrix``) accumulates, per input column ``j`` of ``W``, the sum over
tokens of ``x_j^2`` and the number of tokens; the quantizer then weights each column's rounding error by
``sum / count``, the mean squared activation, so the columns the domain actually drives are quantized more
carefully (``ggml-quants.c``, the ``quant_weights`` of the K-quants' ``make_qkx*_quants``).

This module does exactly that through llama.cpp itself: the GGUF to be quantized is loaded with an eval
callback (``llama_context_params.cb_eval``, the hook ``llama-imatrix`` uses); the scheduler asks about each
graph node, we ask for the ``MUL_MAT`` nodes whose weight is a ``blk.*`` tensor and whose activations are F32
with at least 16 tokens (``llama-imatrix``'s rules; ``output.weight`` is skipped as it is by default), and read
the activations as they are computed. The text is tokenized once, cut into windows of ``n_ctx`` tokens (BOS first
when the model adds one) and each window is decoded from an empty KV cache, as ``llama-imatrix`` does.

The result is written in llama-imatrix's GGUF format (``<tensor>.in_sum2``, ``<tensor>.counts``,
``imatrix.datasets``/``chunk_count``/``chunk_size``) by :func:`builder.quantize.write_imatrix_gguf`, which
:func:`builder.quantize.quantize_gguf` reads back and hands to ``llama_model_quantize`` as its
``llama_model_imatrix_data`` array: no llama-quantize binary is needed.

Reading ``struct ggml_tensor`` fields from Python needs its layout; :class:`_GGMLTensor` mirrors ``ggml.h`` and
is checked against ggml's own accessors (``ggml_get_name``, ``ggml_get_data``, ``ggml_nelements``) on the first
node, so a ggml version with a different layout fails loudly instead of reading garbage.
"""

from __future__ import annotations

import ctypes
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fieldpack.shared.errors import InputNotFoundError, ModelLoadError, QuantizationError, UsageError

log = logging.getLogger(__name__)

#: llama-imatrix ignores matrix multiplications over fewer tokens than this (``collect_imatrix``).
MIN_TOKENS_PER_CALL = 16
DEFAULT_IMATRIX_CTX = 512


class _GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` of ``ggml/include/ggml.h`` (GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10,
    GGML_MAX_NAME 64)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


@dataclass(frozen=True)
class ImatrixResult:
    """What :func:`compute_imatrix_gguf` measured.

    Attributes:
        path: the imatrix file (GGUF format). entries: weight matrices with data.
        chunks: windows decoded. n_ctx: window length (tokens). tokens: tokens decoded.
        seconds: wall time.
    """

    path: Path
    entries: int
    chunks: int
    n_ctx: int
    tokens: int
    seconds: float


def _ggml_base() -> ctypes.CDLL:
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).exists():
            lib = ctypes.CDLL(str(libdir / name))
            break
    else:
        raise QuantizationError(f"cannot find ggml-base in {libdir}", hint="reinstall llama-cpp-python")
    lib.ggml_get_name.restype = ctypes.c_void_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_op_desc.restype = ctypes.c_char_p
    lib.ggml_op_desc.argtypes = [ctypes.c_void_p]
    lib.ggml_get_data.restype = ctypes.c_void_p
    lib.ggml_get_data.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    return lib


def _weight_name(raw: bytes) -> str:
    """llama-imatrix's ``filter_tensor_name``: ``"CUDA0#blk.0.attn_q.weight#0"`` -> ``"blk.0.attn_q.weight"``."""
    name = raw.decode("utf-8", errors="replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


class _Collector:
    """The eval callback: sums of squared activations per weight, per input column."""

    def __init__(self) -> None:
        import llama_cpp

        self.lib = _ggml_base()
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, float] = {}
        self.checked = False
        self.error: BaseException | None = None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._cb)  # kept alive with the collector

    def _check_layout(self, addr: int, t: _GGMLTensor) -> None:
        lib = self.lib
        name_off = lib.ggml_get_name(addr) - addr
        ok = (name_off == _GGMLTensor.name.offset and lib.ggml_get_data(addr) == (t.data or None)
              and lib.ggml_nelements(addr) == math.prod(t.ne))
        if not ok:
            raise QuantizationError(
                "this llama.cpp build's struct ggml_tensor layout differs from the one fieldpack reads",
                hint="install the llama-cpp-python version fieldpack pins (0.3.36), or drop --imatrix")
        self.checked = True

    def _cb(self, addr: int, ask: bool, _user: Any) -> bool:
        try:
            t = _GGMLTensor.from_address(addr)
            if not self.checked:
                self._check_layout(addr, t)
            if self.lib.ggml_op_desc(addr) != b"MUL_MAT" or not t.src[0] or not t.src[1]:
                return False if ask else True
            src0 = _GGMLTensor.from_address(t.src[0])
            src1 = _GGMLTensor.from_address(t.src[1])
            wname = _weight_name(src0.name)
            if ask:
                return (wname.startswith("blk.") and src1.ne[1] >= MIN_TOKENS_PER_CALL
                        and self.lib.ggml_type_name(src1.type) == b"f32")
            if src1.buffer and not self.lib.ggml_backend_buffer_is_host(src1.buffer):
                raise QuantizationError("imatrix activations are not in host memory",
                                        hint="compute the imatrix with n_gpu_layers=0 (the default here)")
            ne, nb = list(src1.ne), list(src1.nb)
            span = sum((ne[i] - 1) * nb[i] for i in range(4)) + 4
            buf = (ctypes.c_char * span).from_address(src1.data)
            x = np.lib.stride_tricks.as_strided(np.frombuffer(buf, dtype=np.float32), shape=ne[::-1],
                                                strides=nb[::-1])  # (ne3, ne2, ne1, ne0) float32 view
            x = x.reshape(-1, ne[0]).astype(np.float64)
            if ne[0] != src0.ne[0]:
                raise QuantizationError(f"activation width {ne[0]} != weight {wname} width {src0.ne[0]}",
                                        hint="report this llama.cpp version")
            acc = self.sums.get(wname)
            self.sums[wname] = (x * x).sum(axis=0) + (acc if acc is not None else 0.0)
            self.counts[wname] = self.counts.get(wname, 0.0) + x.shape[0]
            return True
        except BaseException as exc:  # never let an exception cross the C boundary
            self.error = self.error or exc
            return False


def compute_imatrix_gguf(gguf_path: Path, texts: list[str], out_path: Path, *, n_ctx: int = DEFAULT_IMATRIX_CTX,
                         max_chunks: int | None = None, threads: int | None = None) -> ImatrixResult:
    """Compute an importance matrix for ``gguf_path`` on ``texts`` with llama.cpp and write it to ``out_path``.

    Args:
        gguf_path: the F16/F32 GGUF that will be quantized.
        texts: calibration chunk texts (joined with blank lines).
        out_path: imatrix file to write (GGUF imatrix format, whatever the suffix).
        n_ctx: window length in tokens (clipped to the model's training context).
        max_chunks: decode at most this many windows.
        threads: llama.cpp threads (default: the CPUs this process may use).

    Returns:
        an :class:`ImatrixResult`.

    Raises:
        InputNotFoundError: ``gguf_path`` is missing.
        UsageError: the text is empty.
        ModelLoadError: llama.cpp cannot load the GGUF.
        QuantizationError: the ggml tensor layout differs or decoding fails.
    """
    import llama_cpp
    from gguf import Keys

    from fieldpack.builder.llama_eval import capture_llama_log, default_threads, llama_cause, vocab_only
    from fieldpack.builder.quantize import write_imatrix_gguf
    from fieldpack.shared.llama_backend import llama_cpp_module

    llama_cpp_module(llama_cpp)

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise InputNotFoundError(f"GGUF file {gguf_path} does not exist", hint="convert the model first")
    text = "\n\n".join(t for t in texts if t.strip())
    if not text:
        raise UsageError("no calibration text for the imatrix", hint="add documents or raise --calib-chunks")
    t0 = time.perf_counter()
    try:
        vocab_llm = vocab_only(gguf_path)
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"llama.cpp cannot load {gguf_path}: {exc}", hint="re-convert the model") from exc
    try:
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(vocab_llm.model)))
        bos = vocab_llm.token_bos()
        stream = vocab_llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        meta = vocab_llm.metadata
        arch = meta.get(Keys.General.ARCHITECTURE, "")
        n_ctx_train = int(meta.get(Keys.LLM.CONTEXT_LENGTH.format(arch=arch), 0) or 0)
    finally:
        vocab_llm.close()
    n_ctx = max(MIN_TOKENS_PER_CALL, min(n_ctx, n_ctx_train or n_ctx, len(stream)))
    n_chunks = len(stream) // n_ctx
    if max_chunks is not None:
        n_chunks = min(n_chunks, max_chunks)

    collector = _Collector()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0
    with capture_llama_log() as load_log:  # load-time notes (a full-size SWA cache) go to DEBUG, not the terminal
        model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), mparams)
    if not model:
        raise ModelLoadError(f"llama.cpp cannot load {gguf_path}{llama_cause(load_log)}", hint="re-convert the model")
    try:
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx
        cparams.n_threads = cparams.n_threads_batch = int(threads or default_threads())
        cparams.cb_eval = collector.callback
        cparams.cb_eval_user_data = None
        cparams.no_perf = True
        with capture_llama_log() as ctx_log:
            ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise ModelLoadError(f"llama.cpp cannot create a context for {gguf_path}{llama_cause(ctx_log)}",
                                 hint="lower n_ctx")
        # every position asks for logits, as llama-imatrix's batches do: otherwise llama.cpp computes the last
        # block's MLP for the final token only and those matrices would get no data
        batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        try:
            for c in range(n_chunks):
                window = list(stream[c * n_ctx:(c + 1) * n_ctx])
                if add_bos:
                    window[0] = bos
                llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
                batch.n_tokens = len(window)
                for i, tok in enumerate(window):
                    batch.token[i] = tok
                    batch.pos[i] = i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = 1
                rc = llama_cpp.llama_decode(ctx, batch)
                if collector.error is not None:
                    raise collector.error
                if rc != 0:
                    raise QuantizationError(f"llama_decode returned {rc} while computing the imatrix",
                                            hint="lower n_ctx or check the GGUF")
        finally:
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
    if not collector.sums:
        raise QuantizationError(f"no matrix activations were collected from {gguf_path}",
                                hint=f"give at least {n_ctx} tokens of calibration text")
    write_imatrix_gguf(Path(out_path), {k: v.astype(np.float32) for k, v in collector.sums.items()},
                       collector.counts, dataset="fieldpack:domain-calibration-chunks", chunk_count=n_chunks,
                       chunk_size=n_ctx)
    res = ImatrixResult(path=Path(out_path), entries=len(collector.sums), chunks=n_chunks, n_ctx=n_ctx,
                        tokens=n_chunks * n_ctx, seconds=time.perf_counter() - t0)
    log.info("imatrix: %d matrices from %d windows x %d tokens in %.1f s -> %s", res.entries, n_chunks, n_ctx,
             res.seconds, out_path)
    return res
