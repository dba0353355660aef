"""The trim gate: the trimmed GGUF must tokenize and predict like the untrimmed one, or no bundle is made.

Checks, each named in the one-line error when it fails:

* ``tokenization``: every held-out chunk tokenizes (llama.cpp, both files) to the same tokens, trimmed ids
  mapped back to the untrimmed ones. Exact: the vocabulary comes from all documents, so a difference is a
  closure or writing defect, never a domain gap.
* ``round-trip``: out-of-domain text (scripts, code, emoji, combining marks, :data:`OOD_SAMPLES`) detokenizes
  back to itself with the trimmed tokenizer: text outside the kept vocabulary falls back to pieces and bytes.
* ``top-1`` and ``KLD``: on held-out windows, the untrimmed model's most likely next token must be one the
  trimmed model keeps and ranks first (agreement >= :data:`MIN_TOP1`), and the trimmed distribution ``Q`` must
  stay close to the untrimmed ``P``: mean ``KL(Q || P)`` over positions <= :data:`MAX_KLD` nats/token.
  ``KL(Q || P)``, not llama.cpp's ``KL(P || Q)``: ``Q`` is zero on removed tokens, so ``KL(P || Q)`` is infinite
  whenever ``P`` puts any mass there. Before quantization the kept logits are exactly the untrimmed ones, so
  ``Q = P`` restricted to the kept ids and renormalised, and ``KL(Q || P) = -log P(kept)``: the log of the
  probability mass the trim removed.

Thresholds: :data:`MAX_KLD` is 0.02 nats/token, about four times the KLD Q4_K_M quantization costs Gemma 3
270M on these documents (0.005): trimming may cost no more than one quantization step. :data:`MIN_TOP1` is
0.99: on domain text the untrimmed model's greedy choice is a domain token; at most one position in a hundred
may prefer a token the trim removed (greedy answers would change there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fieldpack.shared.errors import TrimError

log = logging.getLogger(__name__)

MAX_KLD = 0.02
MIN_TOP1 = 0.99
#: Text outside any technical domain: scripts, code, emoji (with ZWJ sequences and skin tones), combining marks.
OOD_SAMPLES: tuple[str, ...] = (
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "敏捷的棕色狐狸跳过了懒狗。日本語のテキストも、カタカナもひらがなも。",
    "العربية: الثعلب البني السريع يقفز فوق الكلب الكسول",
    "हिन्दी में एक वाक्य। ελληνικά: Γαζέες καὶ μυρτιὲς δὲν θὰ βρῶ πιά. עברית שלום",
    "def f(x: int) -> dict[str, list[int]]:\n\treturn {'a': [x ** 2 for _ in range(3)]}  # λ ≠ ∞\n",
    "SELECT * FROM t WHERE a <> b AND c ~* '^[0-9]{3}$';\r\n{\"json\": [1, 2.5e-3, null, true]}",
    "emoji 👩‍🔬🏳️‍🌈👍🏽 🇩🇪 ✨ and math 𝔸𝕓𝕔 ∮ E⋅da = Q, n → ∞, ∑ f(i) = ∏ g(i)",
    "Ǆ e\u0301 a\u030a ﬁ ½ ⅷ Ω Å K µ — “quotes” ‘single’ … ¿¡ ß ŉ İı",
    "   leading spaces, trailing tabs\t\t\n\n\nand\u00a0no-break\u2009thin\u3000ideographic   ",
    "zxqvj wwwqqq aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa 0123456789876543210 ~~~~ ^^^^ |||| \\\\",
)


@dataclass(frozen=True)
class TrimGateReport:
    """Figures of the trim gate. Token counts in model tokens; KLD in nats/token (``KL(Q_trim || P_untrimmed)``
    averaged over positions); ``removed_mass``: mean probability the untrimmed model put on removed tokens."""

    passed: bool
    failed: str | None
    held_out_chunks: int
    held_out_tokens: int
    tokenization_identical: bool
    tokenization_mismatches: int
    ood_samples: int
    ood_round_trips: int
    positions: int
    top1_agreement: float
    kld_mean: float
    removed_mass: float
    max_kld: float = MAX_KLD
    min_top1: float = MIN_TOP1


def compare_logits(full: np.ndarray, trimmed: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position: ``KL(Q || P)`` (nats), top-1 agreement (bool) and the mass ``P`` puts on removed ids.

    Args:
        full: ``(n, n_vocab_full)`` untrimmed logits. trimmed: ``(n, n_kept)`` trimmed logits.
        keep: ``(n_kept,)`` untrimmed id of each trimmed id.
    """
    from fieldpack.builder.llama_eval import log_softmax

    logp = log_softmax(full)
    logq = log_softmax(trimmed)
    logp_kept = logp[:, keep]
    q = np.exp(logq)
    kld = (q * (logq - logp_kept)).sum(axis=-1)
    top1 = keep[trimmed.argmax(axis=-1)] == full.argmax(axis=-1)
    removed = 1.0 - np.exp(logp_kept).sum(axis=-1)
    return np.maximum(kld, 0.0), top1, np.clip(removed, 0.0, 1.0)


def check_trim(untrimmed: Path, trimmed: Path, keep: list[int], held_out: list[str], *, n_ctx: int = 256,
               max_windows: int = 8, ood: tuple[str, ...] = OOD_SAMPLES, raise_on_fail: bool = True) -> TrimGateReport:
    """Run the trim gate (module docstring) on the held-out chunks.

    Args:
        untrimmed / trimmed: the GGUF before and after trimming (same weights otherwise).
        keep: untrimmed id of each trimmed id (ascending).
        held_out: held-out document chunks.
        n_ctx / max_windows: logits are compared on at most ``max_windows`` windows of ``n_ctx`` tokens.

    Raises:
        TrimError: a check failed (one line naming it), unless ``raise_on_fail`` is False.
    """
    from fieldpack.builder.llama_eval import logits_for, open_gguf, vocab_only

    keep_arr = np.asarray(keep, dtype=np.int64)
    full_tok, trim_tok = vocab_only(untrimmed), vocab_only(trimmed)
    mismatches, n_tokens = 0, 0
    stream: list[int] = []
    for text in held_out:
        a = full_tok.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        b = trim_tok.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        n_tokens += len(a)
        if [int(keep_arr[t]) for t in b] != list(a):
            mismatches += 1
        stream += b
    trips = 0
    for text in ood:
        ids = trim_tok.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        trips += trim_tok.detokenize(ids) == text.encode("utf-8")

    windows = [stream[i:i + n_ctx] for i in range(0, len(stream) - n_ctx + 1, n_ctx)][:max_windows]
    if not windows and stream:
        windows = [stream[:n_ctx]]
    kl, agree, removed = [], [], []
    with open_gguf(untrimmed, n_ctx=n_ctx) as full_llm, open_gguf(trimmed, n_ctx=n_ctx) as trim_llm:
        bos = [trim_llm.token_bos()] if trim_llm.token_bos() >= 0 else []
        for w in windows:
            w_trim = (bos + w)[:n_ctx]
            w_full = [int(keep_arr[t]) for t in w_trim]
            k, a, r = compare_logits(logits_for(full_llm, w_full), logits_for(trim_llm, w_trim), keep_arr)
            kl.append(k), agree.append(a), removed.append(r)
    kl_all = np.concatenate(kl) if kl else np.zeros(0)
    top1 = float(np.concatenate(agree).mean()) if agree else 1.0
    kld = float(kl_all.mean()) if kl_all.size else 0.0
    failed = None
    if mismatches:
        failed = f"tokenization: {mismatches} of {len(held_out)} held-out chunks tokenize differently than untrimmed"
    elif trips < len(ood):
        failed = f"round-trip: {len(ood) - trips} of {len(ood)} out-of-domain samples do not detokenize to themselves"
    elif top1 < MIN_TOP1:
        failed = f"top-1: agreement {top1:.4f} with the untrimmed model on held-out text is below {MIN_TOP1}"
    elif kld > MAX_KLD:
        failed = f"KLD: {kld:.4f} nats/token vs the untrimmed model on held-out text is above {MAX_KLD}"
    report = TrimGateReport(
        passed=failed is None, failed=failed, held_out_chunks=len(held_out), held_out_tokens=n_tokens,
        tokenization_identical=mismatches == 0, tokenization_mismatches=mismatches, ood_samples=len(ood),
        ood_round_trips=trips, positions=int(kl_all.size), top1_agreement=top1, kld_mean=kld,
        removed_mass=float(np.concatenate(removed).mean()) if removed else 0.0)
    log.info("trim gate: %s", report)
    if failed and raise_on_fail:
        raise TrimError(f"trim gate failed on {failed}", hint="raise --keep-general, add documents, or build "
                                                              "without --trim-vocab")
    return report
