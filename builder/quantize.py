"""GGUF quantization through llama.cpp's ``llama_model_quantize`` (the library behind ``llama-quantize``).

:data:`QUANT_TYPES` names the llama.cpp file types fieldpack offers. ``*_K_M``/``*_K_S`` are *mixes*: llama.cpp
chooses a type per tensor (e.g. Q4_K_M keeps ``output.weight`` and some ``attn_v``/``ffn_down`` in Q6_K).
A tensor whose row length (``ne[0]``) is not a multiple of the wanted type's block (256 for K-quants, 32 for
Q4_0/Q5_0/Q8_0) is written in a fallback type instead; :func:`quantize_gguf` reports each such tensor, from
llama.cpp's own log lines, checked against the file it reads back with ``gguf.GGUFReader``.

An importance matrix (imatrix, from ``llama-imatrix``) can be passed: GGUF imatrix files (``<tensor>.in_sum2``
and ``<tensor>.counts``) and the legacy binary ``.dat`` format are read here and handed to the C API as its
NULL-terminated ``llama_model_imatrix_data`` array, with the same normalisation ``llama-quantize`` applies
(``in_sum2 / counts``; legacy values divided by ``ncall``). :func:`write_imatrix_gguf` writes the GGUF format.

References: llama.cpp ``src/llama-quant.cpp`` (type mixes, ``tensor_type_fallback``), ``tools/quantize/
quantize.cpp`` (``load_imatrix``), ``include/llama.h`` (``llama_model_quantize_params``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from fieldpack.shared.errors import InputNotFoundError, OutputNotWritableError, QuantizationError, UnknownQuantTypeError

logger = logging.getLogger(__name__)

#: fieldpack quant type name -> llama.cpp file type (``gguf.LlamaFileType``, ``LLAMA_FTYPE_*`` in llama.h).
QUANT_TYPES: dict[str, LlamaFileType] = {
    "F32": LlamaFileType.ALL_F32,
    "F16": LlamaFileType.MOSTLY_F16,
    "Q8_0": LlamaFileType.MOSTLY_Q8_0,
    "Q6_K": LlamaFileType.MOSTLY_Q6_K,
    "Q5_K_M": LlamaFileType.MOSTLY_Q5_K_M,
    "Q5_K_S": LlamaFileType.MOSTLY_Q5_K_S,
    "Q5_0": LlamaFileType.MOSTLY_Q5_0,
    "Q4_K_M": LlamaFileType.MOSTLY_Q4_K_M,
    "Q4_K_S": LlamaFileType.MOSTLY_Q4_K_S,
    "Q4_0": LlamaFileType.MOSTLY_Q4_0,
    "Q3_K_M": LlamaFileType.MOSTLY_Q3_K_M,
}

#: The GGML tensor type each file type is named after (what most matrices get).
NOMINAL_TENSOR_TYPE: dict[str, GGMLQuantizationType] = {
    "F32": GGMLQuantizationType.F32, "F16": GGMLQuantizationType.F16, "Q8_0": GGMLQuantizationType.Q8_0,
    "Q6_K": GGMLQuantizationType.Q6_K, "Q5_K_M": GGMLQuantizationType.Q5_K, "Q5_K_S": GGMLQuantizationType.Q5_K,
    "Q5_0": GGMLQuantizationType.Q5_0, "Q4_K_M": GGMLQuantizationType.Q4_K, "Q4_K_S": GGMLQuantizationType.Q4_K,
    "Q4_0": GGMLQuantizationType.Q4_0, "Q3_K_M": GGMLQuantizationType.Q3_K,
}


#: GGML tensor types offered for ``token_embd`` / ``output`` (llama.cpp's ``--token-embedding-type`` /
#: ``--output-tensor-type``): name -> ``gguf.GGMLQuantizationType``.
TENSOR_TYPES: dict[str, GGMLQuantizationType] = {
    n: GGMLQuantizationType[n] for n in ("F32", "F16", "Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K")
}


def tensor_type(name: str | None, *, option: str) -> GGMLQuantizationType | None:
    """The GGML type named ``name`` (case-insensitive; None passes through) for the CLI/recipe ``option``.

    Raises:
        UnknownQuantTypeError: not in :data:`TENSOR_TYPES` (the message names ``option`` and lists them).
    """
    if name is None:
        return None
    key = name.upper()
    if key not in TENSOR_TYPES:
        raise UnknownQuantTypeError(f"unknown {option} {name!r}", hint=f"use one of {', '.join(TENSOR_TYPES)}")
    return TENSOR_TYPES[key]


def file_type_name(ftype: int) -> str:
    """fieldpack's name of a ``general.file_type`` value (``"Q4_K_M"``), or gguf's enum name when fieldpack does
    not offer that type (``"MOSTLY_IQ2_XS"``), or ``"unknown(<n>)"``."""
    for name, value in QUANT_TYPES.items():
        if value == ftype:
            return name
    try:
        return LlamaFileType(ftype).name
    except ValueError:
        return f"unknown({ftype})"


_FALLBACK_RE = re.compile(
    r"warning:\s+(?P<name>\S+)\s+-\s+ncols\s+(?P<ncols>\d+)\s+not divisible by\s+(?P<blck>\d+)\s+"
    r"\(required for type\s+(?P<wanted>\S+)\)\s*(?:\(WARNING:[^)]*\)\s*)?->\s*falling back to\s+(?P<got>\S+)"
)


@dataclass(frozen=True)
class Fallback:
    """A tensor llama.cpp could not write in the wanted type because its rows do not fit the block size."""

    tensor: str
    wanted: str
    written: str


@dataclass(frozen=True)
class QuantResult:
    """What :func:`quantize_gguf` wrote.

    Attributes:
        path / sha256 / size_bytes: the output GGUF file.
        qtype: the requested quant type (a :data:`QUANT_TYPES` key).
        tensor_types: GGML type name -> number of tensors, as read back from the written file.
        fallbacks: tensors written in another type than wanted because of their row length.
        ratio_to_src: ``size_bytes / source size``.
        imatrix_entries: tensors for which importance data was passed (0 without an imatrix).
        seconds: wall time of the quantization.
        embd_type / output_type: GGML type written for ``token_embd.weight`` / ``output.weight`` ("" when the
            file has no such tensor: tied embeddings); ``*_requested``: what was asked (None: the mix's choice).
    """

    path: Path
    sha256: str
    size_bytes: int
    qtype: str
    tensor_types: dict[str, int]
    fallbacks: list[Fallback]
    ratio_to_src: float
    imatrix_entries: int = 0
    seconds: float = 0.0
    tensor_type_by_name: dict[str, str] = field(default_factory=dict, repr=False)
    embd_type: str = ""
    output_type: str = ""
    embd_type_requested: str | None = None
    output_type_requested: str | None = None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------
# imatrix files


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Read an importance matrix: GGUF (``.in_sum2``/``.counts``) or legacy ``llama-imatrix`` ``.dat``.

    Returns:
        GGUF tensor name -> float32 vector of mean squared input activations, ``(n_mat * n_per_row,)``
        (``n_mat`` is 1 for dense weights); the values ``llama-quantize`` would pass to the quantizer.

    Raises:
        InputNotFoundError: ``path`` does not exist.
        QuantizationError: the file is neither format, has unmatched sums/counts, or non-finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(
            f"imatrix file {path} does not exist", hint="run llama-imatrix first or quantize without an imatrix"
        )
    with path.open("rb") as fh:
        magic = fh.read(4)
    data = _read_imatrix_gguf(path) if magic == b"GGUF" else _read_imatrix_legacy(path)
    for name, v in data.items():
        if not np.all(np.isfinite(v)):
            raise QuantizationError(f"imatrix {path} has non-finite values for {name}", hint="recompute the imatrix")
    return data


def _read_imatrix_gguf(path: Path) -> dict[str, np.ndarray]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise QuantizationError(f"Cannot read imatrix {path}: {exc}", hint="recompute the imatrix") from exc
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        arr = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = arr.reshape(-1, int(t.shape[0]))  # (n_mat, n_per_row)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = arr.reshape(-1)  # (n_mat,)
    if not sums or set(sums) != set(counts):
        raise QuantizationError(
            f"imatrix {path} has no or mismatched .in_sum2/.counts tensors",
            hint="pass an imatrix written by llama-imatrix or write_imatrix_gguf",
        )
    out: dict[str, np.ndarray] = {}
    for name, s in sums.items():
        c = counts[name]
        # rows with no calibration input get 1 (no weighting), as llama-quantize does
        e = np.where(c[:, None] > 0, s / np.maximum(c[:, None], 1e-30), 1.0).astype(np.float32)
        out[name] = e.reshape(-1)
    return out


def _read_imatrix_legacy(path: Path) -> dict[str, np.ndarray]:
    buf = path.read_bytes()
    try:
        (n_entries,) = struct.unpack_from("<i", buf, 0)
        pos = 4
        if n_entries < 1:
            raise ValueError("no entries")
        out: dict[str, np.ndarray] = {}
        for _ in range(n_entries):
            (n,) = struct.unpack_from("<i", buf, pos)
            pos += 4
            name = buf[pos : pos + n].decode("utf-8")
            pos += n
            ncall, nval = struct.unpack_from("<ii", buf, pos)
            pos += 8
            if nval < 1:
                raise ValueError(f"entry {name} has {nval} values")
            v = np.frombuffer(buf, dtype="<f4", count=nval, offset=pos).astype(np.float32)
            pos += 4 * nval
            out[name] = v / ncall if ncall > 0 else v
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise QuantizationError(
            f"{path} is neither a GGUF nor a legacy llama-imatrix file ({exc})", hint="recompute the imatrix"
        ) from exc
    return out


def write_imatrix_gguf(
    path: Path, sums: dict[str, np.ndarray], counts: dict[str, float], *, dataset: str, chunk_count: int,
    chunk_size: int,
) -> Path:
    """Write an importance matrix in llama-imatrix's GGUF format.

    Args:
        sums: GGUF weight name -> ``(n_per_row,)`` float32 sum over calibration tokens of squared inputs.
        counts: weight name -> number of tokens summed.
        dataset / chunk_count / chunk_size: provenance stored as ``imatrix.*`` keys.
    """
    from fieldpack.builder.gguf_write import write_gguf_atomic

    path = Path(path)

    def fill(w: Any) -> None:
        w.add_type("imatrix")
        w.add_array("imatrix.datasets", [dataset])
        w.add_uint32("imatrix.chunk_count", chunk_count)
        w.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(sums):
            w.add_tensor(f"{name}.in_sum2", np.asarray(sums[name], dtype=np.float32).reshape(1, -1))
            w.add_tensor(f"{name}.counts", np.array([[counts[name]]], dtype=np.float32))

    return write_gguf_atomic(path, "", fill)


# --------------------------------------------------------------------------------------------------------
# quantization


def _ggml_type_names(path: Path) -> dict[str, tuple[str, int, int]]:
    """Tensor name -> (GGML type name, ne[0], n_dims) of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, int(t.shape[0]), len(t.shape)) for t in reader.tensors}


def _imatrix_array(data: dict[str, np.ndarray]) -> tuple[Any, list[Any]]:
    import llama_cpp

    keep: list[Any] = []
    arr = (llama_cpp.llama_model_imatrix_data * (len(data) + 1))()
    for i, (name, values) in enumerate(sorted(data.items())):
        v = np.ascontiguousarray(values, dtype=np.float32)
        nb = name.encode("utf-8")
        keep += [v, nb]
        arr[i].name = nb
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[len(data)].name = None  # terminator
    keep.append(arr)
    return ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), keep


def quantize_gguf(
    src: Path,
    dst: Path,
    qtype: str,
    *,
    imatrix: Path | None = None,
    nthread: int | None = None,
    allow_requantize: bool = False,
    embd_type: str | None = None,
    output_type: str | None = None,
) -> QuantResult:
    """Quantize an F16/F32 GGUF to ``qtype`` with llama.cpp; write ``dst`` atomically.

    Args:
        src: GGUF to quantize (normally the F16 conversion).
        dst: output GGUF.
        qtype: one of :data:`QUANT_TYPES` (case-insensitive).
        imatrix: optional importance matrix (GGUF or legacy .dat, see :func:`read_imatrix`).
        nthread: quantization threads (default: the CPUs this process may use).
        allow_requantize: accept an already quantized ``src`` (llama.cpp dequantizes and quantizes again, which
            compounds both rounding errors; used for a GGUF input re-quantized on request).
        embd_type / output_type: GGML type (a :data:`TENSOR_TYPES` key) for ``token_embd.weight`` / ``output.weight``
            instead of the mix's choice (llama.cpp's ``token_embedding_type`` / ``output_tensor_type``). A model with
            tied embeddings (Gemma) has no ``output.weight``: its ``token_embd`` is also the output projection.

    Returns:
        :class:`QuantResult`, with the tensor types read back from ``dst``.

    Raises:
        UnknownQuantTypeError: ``qtype`` is not in :data:`QUANT_TYPES`, or ``embd_type``/``output_type`` not in
            :data:`TENSOR_TYPES` (the message lists them).
        InputNotFoundError: ``src`` or ``imatrix`` is missing.
        QuantizationError: llama.cpp failed (message carries its error line), or the imatrix is unreadable.
        OutputNotWritableError: ``dst`` cannot be written.
    """
    import llama_cpp

    from fieldpack.builder.llama_eval import default_threads

    key = qtype.upper()
    if key not in QUANT_TYPES:
        raise UnknownQuantTypeError(
            f"Unknown quant type {qtype!r}", hint=f"use one of {', '.join(QUANT_TYPES)}"
        )
    embd = tensor_type(embd_type, option="--embd-type")
    out_t = tensor_type(output_type, option="--output-type")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise InputNotFoundError(f"GGUF file {src} does not exist", hint="convert the model to GGUF first")
    imatrix_data = read_imatrix(imatrix) if imatrix is not None else None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(f"Cannot create {dst.parent}: {exc}", hint="choose a writable path") from exc
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")

    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(nthread or default_threads())
    params.ftype = int(QUANT_TYPES[key])
    params.allow_requantize = bool(allow_requantize)
    if embd is not None:
        params.token_embedding_type = int(embd)
    if out_t is not None:
        params.output_tensor_type = int(out_t)
    keep: list[Any] = []
    if imatrix_data:
        params.imatrix, keep = _imatrix_array(imatrix_data)

    from fieldpack.builder.llama_eval import capture_llama_log

    t0 = time.perf_counter()
    try:
        with capture_llama_log() as lines:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        del keep
        if rc != 0 or not tmp.is_file():
            errors = [ln.strip() for ln in lines if "fail" in ln.lower() or "error" in ln.lower()]
            raise QuantizationError(
                f"llama.cpp could not quantize {src} to {key}: {errors[-1] if errors else f'return code {rc}'}",
                hint="pass an F16/F32 GGUF of a supported architecture (and an imatrix computed for that model)",
            )
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        digest = _sha256(tmp)
        os.replace(tmp, dst)
    except OSError as exc:
        raise OutputNotWritableError(
            f"Cannot write {dst}: {exc}", hint="check free disk space and permissions"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0

    written = _ggml_type_names(dst)
    fallbacks = _fallbacks("".join(lines), written, key)
    size = dst.stat().st_size
    result = QuantResult(
        path=dst,
        sha256=digest,
        size_bytes=size,
        qtype=key,
        tensor_types=dict(sorted(Counter(t for t, _, _ in written.values()).items())),
        fallbacks=fallbacks,
        ratio_to_src=size / src.stat().st_size,
        imatrix_entries=len(imatrix_data or {}),
        seconds=round(seconds, 3),
        tensor_type_by_name={n: t for n, (t, _, _) in written.items()},
        embd_type=written.get("token_embd.weight", ("",))[0],
        output_type=written.get("output.weight", ("",))[0],
        embd_type_requested=embd.name if embd is not None else None,
        output_type_requested=out_t.name if out_t is not None else None,
    )
    logger.info(
        "quantized %s -> %s (%s): %d bytes (%.3f of source), types %s, %d fallbacks, %.2f s",
        src.name, dst.name, key, size, result.ratio_to_src, result.tensor_types, len(fallbacks), seconds,
    )
    return result


def _fallbacks(log_text: str, written: dict[str, tuple[str, int, int]], key: str) -> list[Fallback]:
    """Fallbacks from llama.cpp's log, each with the type actually written; plus any quantizable matrix whose
    row length cannot hold the nominal type and that the log did not mention (should its format change)."""
    import gguf

    found: dict[str, Fallback] = {}
    for m in _FALLBACK_RE.finditer(log_text):
        name = m["name"]
        found[name] = Fallback(tensor=name, wanted=m["wanted"].upper(), written=written.get(name, ("?", 0, 0))[0])
    nominal = NOMINAL_TENSOR_TYPE[key]
    if nominal not in (GGMLQuantizationType.F16, GGMLQuantizationType.F32):
        blck = gguf.GGML_QUANT_SIZES[nominal][0]
        for name, (tname, ne0, n_dims) in written.items():
            matrix = n_dims >= 2 and name.endswith("weight") and "_norm" not in name
            if matrix and name not in found and ne0 % blck != 0:
                found[name] = Fallback(tensor=name, wanted=nominal.name, written=tname)
    return sorted(found.values(), key=lambda f: f.tensor)
