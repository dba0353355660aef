"""The parity gate: does the GGUF llama.cpp runs compute what the Hugging Face checkpoint computes?

Two checks on a set of prompts (by default :data:`DEFAULT_PROMPTS`: Unicode, emoji, CJK, CRLF, leading and
repeated spaces, tabs, code, contractions, long numbers, markup):

1. **Tokenization**: the HF tokenizer (``AutoTokenizer``, special tokens added as the model adds them) and
   ``llama_cpp.Llama.tokenize`` (``special=False``, BOS per the GGUF's ``add_bos_token``) must give the same
   ids for every prompt.
2. **Logits**: the HF model (float32, eager PyTorch) and llama.cpp (CPU, F32 KV cache so cache rounding is not
   counted) are fed the *same* token ids (the HF ones); at every position the logits are compared.

Tolerance (``logit_atol``, absolute, in logits) defaults by the GGUF's file type:

* F32 GGUF: ``1e-3``. Only float32 summation order differs; measured max |diff| on the tiny models is ~1e-5.
* F16/BF16 GGUF: ``5e-2``. Weights are rounded to 11-bit mantissas and llama.cpp's CPU F16 matmul rounds
  activations to F16 too; measured max |diff| on the tiny models is ~5e-3 to 1e-2 for logits of magnitude ~15.
* GELU architectures (Gemma family): ``1e-1`` for F32, F16 and BF16 alike. ggml's CPU GELU (``GGML_GELU_FP16``,
  on by default) looks its input up in an F16 table, so even an F32 GGUF computes the feed-forward activations
  at F16 precision, and Gemma's logits are large (|logit| up to ~50). Measured on Gemma 3 270M (284 positions):
  max |diff| 0.031 (F32) and 0.049 (F16), top-1 identical except within ties; a wrong RMSNorm convention
  gives differences of several logits and fails.
* quantized GGUFs have no default: use :func:`builder.llama_eval.perplexity_kld` for them, or pass a tolerance.

Top-1 rule: the argmax token must be the same at every position, except where the HF top-2 logits are within
``logit_atol`` of each other (a tie at the stated precision, where either answer is correct);
``top1_agreement`` reports the strict share of identical argmaxes. The gate passes when tokenization is
identical, ``max_abs_logit_diff <= logit_atol`` and (with ``require_top1``) there is no top-1 flip beyond a tie.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import Keys, LlamaFileType

from fieldpack.builder.llama_eval import adds_bos, logits_for, open_gguf
from fieldpack.shared.errors import InputNotFoundError, ModelLoadError, ParityError, UsageError

logger = logging.getLogger(__name__)

DEFAULT_PROMPTS: list[str] = [
    "When the pump 3 discharge pressure alarm sounds, check that valve V-31 is fully open.",
    "Ünïcödé façade — naïve café in Zürich, 1234567 units at +3.14e-10 °C.",
    "emoji: 😀🚰💧 ✓ ✗ ★ 👩‍🔧 🇫🇮",
    "中文测试：水处理厂的泵。日本語のテキスト、한국어 문장.",
    "line one\r\nline two\r\n\r\nline four\n",
    "   leading spaces,  double  spaces,\ttabs\t\tand trailing   ",
    "def pump_ok(p: float) -> bool:\n    return p <= 6.5  # bar\n\nprint(pump_ok(7))\n",
    "It's, they're, we'll, I'd, SHE'S, 'quoted' \"double\" and (parens) [brackets] {braces}",
    "<html><body><p class=\"note\">Filter 2 backwash &amp; rinse</p></body></html>",
    "0123456789 9876543210 3.14159 1e6 0x1F 2024-05-01T12:00:00Z",
]

TOLERANCE_BY_FILE_TYPE: dict[int, float] = {
    LlamaFileType.ALL_F32: 1e-3, LlamaFileType.MOSTLY_F16: 5e-2, LlamaFileType.MOSTLY_BF16: 5e-2,
}
#: GGUF architectures whose feed-forward is GELU, computed by ggml through an F16 table (module docstring).
GELU_ARCHITECTURES = frozenset({"gemma", "gemma2", "gemma3"})
GELU_TOLERANCE = 1e-1


def default_tolerance(file_type: int, architecture: str) -> float | None:
    """The default ``logit_atol`` for a GGUF of ``file_type`` (``general.file_type``) and ``architecture``, or
    None for quantized file types (module docstring)."""
    if file_type not in TOLERANCE_BY_FILE_TYPE:
        return None
    return GELU_TOLERANCE if architecture in GELU_ARCHITECTURES else TOLERANCE_BY_FILE_TYPE[file_type]


@dataclass(frozen=True)
class ParityReport:
    """Outcome of :func:`check_parity`.

    Attributes:
        prompts: the prompts compared.
        tokens_compared: logit positions compared (sum of HF token counts).
        tokenization_identical: HF and llama.cpp ids equal for every prompt.
        top1_agreement: share (0..1) of positions where both argmax tokens are identical.
        max_abs_logit_diff / mean_abs_logit_diff: over all positions and vocabulary entries (logits).
        tolerance: the ``logit_atol`` applied.
        passed: the gate's verdict (see module docstring).
        tokenization_mismatches: prompts whose ids differ.
        top1_flips: positions whose argmax differs by more than a tie within ``tolerance``.
        file_type: the GGUF's ``general.file_type`` (0 F32, 1 F16, ...).
    """

    prompts: list[str]
    tokens_compared: int
    tokenization_identical: bool
    top1_agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    tolerance: float
    passed: bool
    tokenization_mismatches: list[str] = field(default_factory=list)
    top1_flips: int = 0
    file_type: int = -1

    def summary(self) -> str:
        """One line with the figures."""
        n_bad = len(self.tokenization_mismatches)
        tok = "identical" if self.tokenization_identical else f"DIFFERS on {n_bad} prompt(s)"
        return (
            f"tokenization {tok}"
            f", top-1 agreement {self.top1_agreement:.4f} ({self.top1_flips} flips beyond ties)"
            f", max |Δlogit| {self.max_abs_logit_diff:.3g} (tolerance {self.tolerance:.3g})"
            f", mean |Δlogit| {self.mean_abs_logit_diff:.3g} over {self.tokens_compared} positions"
        )


def gguf_file_type(path: Path) -> int:
    """``general.file_type`` of a GGUF (``LLAMA_FTYPE_*``), or -1 when the key is absent."""
    return _gguf_type_and_arch(path)[0]


def _gguf_type_and_arch(path: Path) -> tuple[int, str]:
    from fieldpack.builder.gguf_header import read_gguf_header

    kv = read_gguf_header(path).kv  # not gguf.GGUFReader: it takes minutes on a 262k-token vocabulary
    return int(kv.get(Keys.General.FILE_TYPE, -1)), str(kv.get(Keys.General.ARCHITECTURE, ""))


def check_parity(
    model_dir: Path,
    gguf_path: Path,
    *,
    prompts: list[str] | None = None,
    logit_atol: float | None = None,
    require_top1: bool = True,
) -> ParityReport:
    """Compare tokenization and logits of an HF checkpoint and its GGUF conversion.

    Args:
        model_dir: the HF checkpoint folder the GGUF was converted from.
        gguf_path: the GGUF file (F32 or F16 for the default tolerance).
        prompts: texts to compare (default :data:`DEFAULT_PROMPTS`); empty strings are skipped.
        logit_atol: absolute logit tolerance; default from the GGUF file type (module docstring).
        require_top1: also require identical argmax at every position (ties within tolerance excepted).

    Returns:
        A passing :class:`ParityReport`.

    Raises:
        ParityError: tokenization differs or logits are outside tolerance; the message carries the figures
            and the exception's ``report`` attribute the full :class:`ParityReport`.
        UsageError: no default tolerance for this (quantized) file type and none given, or no prompts.
        InputNotFoundError / ModelLoadError: the checkpoint or the GGUF cannot be loaded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    if not model_dir.is_dir():
        raise InputNotFoundError(f"model folder {model_dir} does not exist", hint="pass the HF checkpoint folder")
    if not gguf_path.is_file():
        raise InputNotFoundError(f"GGUF file {gguf_path} does not exist", hint="convert the model first")
    texts = [p for p in (prompts if prompts is not None else DEFAULT_PROMPTS) if p]
    if not texts:
        raise UsageError("No prompts to compare", hint="pass non-empty prompts or use the defaults")
    ftype, arch = _gguf_type_and_arch(gguf_path)
    if logit_atol is None:
        logit_atol = default_tolerance(ftype, arch)
        if logit_atol is None:
            raise UsageError(
                f"{gguf_path} has file type {ftype}, which has no default parity tolerance",
                hint="run the parity gate on the F32/F16 conversion and measure quantized files with perplexity_kld",
            )

    hf_logging.disable_progress_bar()
    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(
            f"transformers cannot load {model_dir}: {exc}", hint="check that the folder is a complete HF checkpoint"
        ) from exc

    hf_ids = [list(tok(t, add_special_tokens=True)["input_ids"]) for t in texts]
    n_ctx = max(64, max(len(i) for i in hf_ids) + 8)
    mismatches: list[str] = []
    diffs_max: list[float] = []
    diffs_sum = 0.0
    n_pos = n_same = n_flips = n_vocab = 0
    with open_gguf(gguf_path, n_ctx=n_ctx, f32_kv=True) as llm:
        add_bos = adds_bos(llm)
        for text, ids in zip(texts, hf_ids, strict=True):
            ll_ids = list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False))
            if ll_ids != ids:
                mismatches.append(text)
                logger.warning("tokenization differs for %r: HF %s vs llama.cpp %s", text, ids[:16], ll_ids[:16])
            if not ids:
                continue
            with torch.no_grad():
                ref = model(torch.tensor([ids])).logits[0].float().numpy()  # (T, n_vocab) float32
            got = logits_for(llm, ids)  # (T, n_vocab) float32
            if got.shape != ref.shape:
                raise ParityError(
                    f"{gguf_path} gives logits of shape {got.shape}, {model_dir} gives {ref.shape}",
                    hint="the GGUF's vocabulary does not match the checkpoint; re-convert it",
                )
            n_vocab = ref.shape[-1]
            d = np.abs(ref.astype(np.float64) - got)
            diffs_max.append(float(d.max()))
            diffs_sum += float(d.sum())
            hf_top, ll_top = ref.argmax(-1), got.argmax(-1)
            same = hf_top == ll_top
            margin = ref[np.arange(len(ids)), hf_top] - ref[np.arange(len(ids)), ll_top]  # >= 0
            n_flips += int(np.sum(~same & (margin > logit_atol)))
            n_same += int(same.sum())
            n_pos += len(ids)

    max_diff = max(diffs_max) if diffs_max else 0.0
    mean_diff = diffs_sum / max(1, n_pos * n_vocab)
    passed = not mismatches and max_diff <= logit_atol and (not require_top1 or n_flips == 0)
    report = ParityReport(
        prompts=texts,
        tokens_compared=n_pos,
        tokenization_identical=not mismatches,
        top1_agreement=n_same / max(1, n_pos),
        max_abs_logit_diff=max_diff,
        mean_abs_logit_diff=mean_diff,
        tolerance=float(logit_atol),
        passed=passed,
        tokenization_mismatches=mismatches,
        top1_flips=n_flips,
        file_type=ftype,
    )
    logger.info("parity %s vs %s: %s -> %s", gguf_path.name, model_dir.name, report.summary(),
                "PASS" if passed else "FAIL")
    if not passed:
        err = ParityError(
            f"GGUF {gguf_path} does not match {model_dir}: {report.summary()}",
            hint="the conversion is wrong for this model (tokenizer, Q/K permutation or tensor mapping); "
            "do not ship it",
        )
        err.report = report  # type: ignore[attr-defined]  # the figures, for callers and tests
        raise err
    return report
