"""Stages from the converted model to the shipped one, and its measured quality:

``eval split`` (document chunks -> calibration / held-out texts), ``compress`` (pruning, only when asked),
``quantize`` (llama.cpp, with a domain imatrix when asked) and ``quality`` (PPL/KLD of the quantized model
against the F16/F32 reference on the held-out chunks; PPL only for a GGUF input that ships as is).

``quantize`` reads the documents only through an imatrix or a calibrated quantizer (``--quantizer gptq|awq``,
which also measures RTN and RTN + imatrix of the same type beside it): without either, its key holds no
document hash, so a docs-only rebuild reuses it. ``eval split`` and ``quality`` follow the documents.
"""

from __future__ import annotations

import logging
import json
import random
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fieldpack.builder.llama_eval import EvalFigures
from fieldpack.builder.quantize import QuantResult
from fieldpack.builder.stages.base import Input, Stage, StageInputs, StageRecord

log = logging.getLogger(__name__)

LLAMA_LIBRARIES = ("llama_cpp_python", "gguf", "numpy")
SPLIT_NAME = "split.json"


# --- eval split ------------------------------------------------------------------------------------------------
def split_eval(texts: list[str], fraction: float, max_chunks: int, seed: int, *,
               count_tokens: Callable[[str], int] = lambda t: max(1, len(t) // 4),
               min_tokens: int = 0) -> tuple[list[str], list[str]]:
    """Split chunk texts into (calibration, evaluation), fixed by ``seed``.

    The evaluation split takes ``fraction`` of the chunks (at most ``max_chunks``, at least 1), then grows, in the
    same seeded order, until it holds ``min_tokens`` model tokens or half of all chunks, so small document sets
    still give a few perplexity windows.
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_eval = min(max_chunks, max(1, round(len(texts) * fraction)))
    tokens = sum(count_tokens(texts[i]) for i in order[:n_eval])
    while tokens < min_tokens and n_eval < len(texts) // 2:
        tokens += count_tokens(texts[order[n_eval]])
        n_eval += 1
    eval_idx = set(order[:n_eval])
    return ([t for i, t in enumerate(texts) if i not in eval_idx], [t for i, t in enumerate(texts) if i in eval_idx])


def eval_window(held_out_tokens: int, n_ctx_train: int, *, preferred: int = 256, min_windows: int = 4) -> int:
    """Perplexity window (even, tokens): ``preferred`` if the held-out text gives ``min_windows`` of it, else the
    largest even length that does (never below 32, never above n_ctx_train)."""
    n = min(preferred, n_ctx_train, held_out_tokens // min_windows)
    return max(32, n - n % 2)


def model_token_counter(tokenizer_json: Path | None) -> Callable[[str], int]:
    """Count model tokens with the checkpoint's ``tokenizer.json`` (fast, no model load); ~4 chars/token without."""
    if tokenizer_json is not None and tokenizer_json.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_json))
        return lambda text: len(tok.encode(text, add_special_tokens=False).ids)
    return lambda text: max(1, len(text) // 4)


class SplitInputs(StageInputs):
    chunks: Input
    tokenizer: Input | None  # the language model's tokenizer.json (None: ~4 characters per token)
    fraction: float
    max_chunks: int
    seed: int
    n_ctx_train: int


class SplitRecord(StageRecord):
    """Counts (chunks, model tokens) and the PPL window; the texts are in ``split.json``."""

    calib_chunks: int
    held_out_chunks: int
    held_out_tokens: int
    n_ctx_eval: int

    def split(self) -> Input:
        return self.artefact(SPLIT_NAME).as_input()

    def texts(self) -> tuple[list[str], list[str]]:
        """(calibration texts, held-out texts)."""
        return load_split(self.artefact(SPLIT_NAME).path)


def load_split(path: Path) -> tuple[list[str], list[str]]:
    """(calibration, held-out) texts from a ``split.json``."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return list(doc["calib"]), list(doc["held_out"])


def run_split(inputs: SplitInputs, out_dir: Path) -> SplitRecord:
    from fieldpack.builder.stages.docs import _read_chunks

    count = model_token_counter(inputs.tokenizer.path if inputs.tokenizer else None)
    calib, held_out = split_eval([c.text for c in _read_chunks(inputs.chunks.path)], inputs.fraction,
                                 inputs.max_chunks, inputs.seed, count_tokens=count, min_tokens=4 * 256)
    (out_dir / SPLIT_NAME).write_text(json.dumps({"calib": calib, "held_out": held_out}, ensure_ascii=False),
                                      encoding="utf-8")
    held_tokens = sum(count(t) for t in held_out)
    return SplitRecord(calib_chunks=len(calib), held_out_chunks=len(held_out), held_out_tokens=held_tokens,
                       n_ctx_eval=eval_window(held_tokens, inputs.n_ctx_train))


SPLIT = Stage("eval-split", "1", SplitRecord, run_split, libraries=("tokenizers",),
              code=("fieldpack.builder.stages.quant",), label=lambda _: "eval split")


# --- compress --------------------------------------------------------------------------------------------------
class CompressInputs(StageInputs):
    checkpoint: Input
    reference: Input  # the unpruned F16/F32 GGUF (ΔPPL/KLD reference)
    architecture: str  # its GGUF architecture name
    n_ctx_train: int
    options: dict[str, Any]
    seed: int
    outtype: str
    split: Input


class CompressRecord(StageRecord):
    """``gguf``: the pruned F16/F32 GGUF to quantize; ``rows``: quality rows for ``manifest.quality.stages``;
    ``resolved``: the options with defaults filled in (what the recipe stores); ``shape``: the shipped model's
    block count, widths, head counts and parameter count, read back from the pruned GGUF; ``heal``: see below."""

    gguf: Path
    rows: list[dict[str, Any]]
    resolved: dict[str, Any]
    shape: dict[str, int]
    heal: dict[str, Any] | None = None  # the heal run's adaptation row (``--heal kd``), None without healing

    def dense(self) -> Input:
        return self.input_for(self.gguf)


def run_compress(inputs: CompressInputs, out_dir: Path) -> CompressRecord:
    """Prune, convert and gate the pruned checkpoint. Raises CompressionConfigError, ParityError."""
    from fieldpack.builder.compress import apply_compression
    from fieldpack.builder.quiet import quiet_third_party

    quiet_third_party()  # this stage loads torch/transformers
    cfg = SimpleNamespace(compression=dict(inputs.options), seed=inputs.seed, parity_outtype=inputs.outtype)
    ref = SimpleNamespace(path=inputs.reference.path, n_ctx_train=inputs.n_ctx_train)
    calib, held_out = load_split(inputs.split.path)
    dense, rows = apply_compression(cfg, inputs.checkpoint.path, ref, calib, held_out, out_dir)
    heal = rows[-1].pop("heal", None) if rows else None
    return CompressRecord(gguf=dense, rows=rows, resolved=cfg.compression, shape=gguf_shape(dense, inputs.architecture),
                          heal=heal)


COMPRESS = Stage("compress", "1", CompressRecord, run_compress, libraries=LLAMA_LIBRARIES + ("torch", "transformers"),
                 code=("fieldpack.builder.compress", "fieldpack.builder.convert", "fieldpack.builder.parity",
                       "fieldpack.builder.adapt"))


def gguf_shape(gguf_path: Path, arch: str) -> dict[str, int]:
    """Block count, widths, head counts (``n_layer``, ``n_embd``, ``n_head``, ``n_head_kv``) and
    ``parameter_count`` (sum of tensor elements) of a GGUF of GGUF architecture ``arch`` (``"llama"``).
    Raises BuildError if it lacks the keys."""
    import gguf
    from fieldpack.shared.errors import BuildError

    reader = gguf.GGUFReader(str(gguf_path))

    def field(key: str) -> int:
        f = reader.fields.get(f"{arch}.{key}")
        if f is None:
            raise BuildError(f"pruned model {gguf_path} has no {arch}.{key}", hint="report this as a bug")
        return int(f.parts[f.data[0]][0])

    return dict(n_layer=field("block_count"), n_embd=field("embedding_length"), n_head=field("attention.head_count"),
                n_head_kv=field("attention.head_count_kv"),
                parameter_count=int(sum(int(t.n_elements) for t in reader.tensors)))


# --- quantize --------------------------------------------------------------------------------------------------
class QuantizeInputs(StageInputs):
    source: Input  # F16/F32 GGUF (pruned when compress ran), or a GGUF input re-quantized on request
    qtype: str
    imatrix_from: Input | None = None  # split.json: calibration texts for a domain imatrix; None: no imatrix
    allow_requantize: bool = False  # ``source`` is already quantized (a GGUF input): llama.cpp may re-quantize
    embd_type: str | None = None  # GGML type of token_embd.weight (None: the mix's choice)
    output_type: str | None = None  # GGML type of output.weight (None: the mix's choice)
    # --quantizer gptq|awq (None: llama.cpp's RTN): the checkpoint and split.json it calibrates on, and the
    # calibration windows / quality window
    quantizer: str | None = None
    checkpoint: Input | None = None
    calib_from: Input | None = None
    calib: dict[str, int] = {}


class QuantizeRecord(StageRecord):
    """``quant``: the shipped GGUF; with ``--quantizer gptq|awq``, ``detail`` (calibration figures) and ``rows``
    (quality rows: the F16 reference, the calibrated file, RTN and RTN + domain imatrix of the same type)."""

    quant: QuantResult
    detail: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []

    def model(self) -> Input:
        return Input(path=self.quant.path, sha256=self.quant.sha256)


def run_quantize(inputs: QuantizeInputs, out_dir: Path) -> QuantizeRecord:
    """Quantize with llama.cpp (after computing the imatrix when asked), or with GPTQ/AWQ when asked.
    Raises QuantizationError, CompressionConfigError."""
    from fieldpack.builder.quantize import quantize_gguf

    if inputs.quantizer is not None:
        return _run_calibrated(inputs, out_dir)
    imatrix = None
    if inputs.imatrix_from is not None:
        from fieldpack.builder.compress import compute_imatrix

        calib, _ = load_split(inputs.imatrix_from.path)
        imatrix = compute_imatrix(inputs.source.path, calib, out_dir / "imatrix.dat")
    return QuantizeRecord(quant=quantize_gguf(inputs.source.path, out_dir / "model.gguf", inputs.qtype,
                                              imatrix=imatrix, allow_requantize=inputs.allow_requantize,
                                              embd_type=inputs.embd_type, output_type=inputs.output_type))


def _run_calibrated(inputs: QuantizeInputs, out_dir: Path) -> QuantizeRecord:
    """GPTQ/AWQ (:func:`builder.compress.quantizers.calibrated_quantize`), then the quality rows beside RTN and
    RTN + domain imatrix of the same type, all against the F16/F32 source on the held-out chunks."""
    from fieldpack.builder.compress import compute_imatrix
    from fieldpack.builder.compress.quantizers import calibrated_quantize
    from fieldpack.builder.compress.report import quality_rows
    from fieldpack.builder.quantize import quantize_gguf
    from fieldpack.builder.quiet import quiet_third_party

    quiet_third_party()  # this path loads torch/transformers
    assert inputs.checkpoint is not None and inputs.calib_from is not None
    calib, held_out = load_split(inputs.calib_from.path)
    c = inputs.calib
    res = calibrated_quantize(inputs.quantizer or "", inputs.checkpoint.path, inputs.source.path, calib,
                              inputs.qtype, out_dir, imatrix_texts=calib if inputs.imatrix_from is not None else None,
                              calib_chunks=c.get("calib_chunks", 128), calib_seq_len=c.get("calib_seq_len", 256),
                              seed=c.get("seed", 0))
    imx_path = out_dir / "imatrix.dat"
    src_imx = compute_imatrix(inputs.source.path, calib, out_dir / "imatrix-src.dat") \
        if inputs.quantizer == "awq" or not imx_path.is_file() else imx_path
    rtn = res.rtn if res.rtn is not None and inputs.imatrix_from is None else \
        quantize_gguf(inputs.source.path, out_dir / "rtn.gguf", inputs.qtype)
    rtn_imx = quantize_gguf(inputs.source.path, out_dir / "rtn-imatrix.gguf", inputs.qtype, imatrix=src_imx)
    label = f"{inputs.quantizer}{' + imatrix' if inputs.imatrix_from is not None else ''}"
    variants = [("quantized", label, inputs.qtype, res.quant.path), ("quantized", "rtn", inputs.qtype, rtn.path),
                ("quantized", "rtn + imatrix", inputs.qtype, rtn_imx.path)]
    rows = [r.to_dict() for r in quality_rows(inputs.source.path, variants, held_out,
                                              n_ctx=c.get("n_ctx", 256), measure=False)]
    for r in rows:
        r.pop("note", None)
    rows[1].update(res.detail)
    return QuantizeRecord(quant=res.quant, detail=res.detail, rows=rows)


QUANTIZE = Stage("quantize", "1", QuantizeRecord, run_quantize, libraries=LLAMA_LIBRARIES,
                 code=("fieldpack.builder.quantize", "fieldpack.builder.compress.imatrix",
                       "fieldpack.builder.compress.quantizers", "fieldpack.builder.compress.gptq",
                       "fieldpack.builder.compress.awq", "fieldpack.builder.convert.patch"),
                 label=lambda i: f"{'re-quantize' if i.allow_requantize else 'quantize'} {i.qtype}"
                 + (f" ({i.quantizer})" if i.quantizer else "")
                 + (f" (token_embd {i.embd_type.upper()})" if i.embd_type else "")
                 + (f" (output {i.output_type.upper()})" if i.output_type else ""))


# --- quality ---------------------------------------------------------------------------------------------------
class QualityInputs(StageInputs):
    reference: Input | None  # None: no reference (a GGUF input shipped as is), perplexity of ``model`` only
    model: Input
    split: Input
    n_ctx: int
    adapter: Input | None = None  # --ship-adapter: the LoRA adapter GGUF applied to ``model`` (reference: merged)


class QualityRecord(StageRecord):
    """``figures``: PPL of both models and KLD (None without a reference); ``ppl``: the model's perplexity
    when there is no reference (None otherwise); ``note``: why nothing was measured (a document set too small
    for one evaluation window), carried by the manifest instead of figures."""

    figures: EvalFigures | None = None
    ppl: float | None = None
    note: str | None = None


def run_quality(inputs: QualityInputs, out_dir: Path) -> QualityRecord:
    """PPL of both models and KLD on the held-out texts, or the model's PPL alone without a reference; with too
    little text for one window, no figures and a ``note``. With ``adapter`` the model is scored as the device runs
    it: the quantized base with the LoRA adapter applied."""
    from fieldpack.builder.llama_eval import TooLittleEvalTextError, perplexity, perplexity_kld

    _, held_out = load_split(inputs.split.path)
    try:
        if inputs.reference is None:
            return QualityRecord(ppl=perplexity(inputs.model.path, held_out, n_ctx=inputs.n_ctx))
        return QualityRecord(figures=perplexity_kld(inputs.reference.path, inputs.model.path, held_out,
                                                    n_ctx=inputs.n_ctx,
                                                    test_lora=inputs.adapter.path if inputs.adapter else None))
    except TooLittleEvalTextError as exc:
        note = f"PPL/KLD not measured: {exc.message}"
        log.warning("%s", note)
        return QualityRecord(note=note)


QUALITY = Stage("quality", "3", QualityRecord, run_quality, libraries=LLAMA_LIBRARIES,
                code=("fieldpack.builder.llama_eval",))
