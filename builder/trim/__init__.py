"""Domain vocabulary trimming: a GGUF whose vocabulary, merges and embedding/output rows hold only the tokens a
domain needs, with a tokenizer llama.cpp loads and that still tokenizes any text.

::

    documents + prompt texts ─▶ llama.cpp tokenization (domain counts)
        ─▶ select_tokens (special, bytes, domain, general top-N, merge closure)          (vocab.py)
        ─▶ write_trimmed_gguf (tokens/scores/types/merges, special ids, embedding rows)  (gguf_trim.py)
        ─▶ check_trim (held-out tokenization, OOD round-trip, top-1, KLD)               (gate.py)

:func:`trim_gguf` runs the first three; the build's ``trim`` stage (``builder.stages.trim``) adds the gate.
The device needs no change: it loads the smaller GGUF. Reference: Ushio et al., "An Efficient Multilingual
Language Model Compression through Vocabulary Trimming" (2023).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fieldpack.builder.trim.gguf_trim import TrimmedFile, read_gguf_vocab, write_trimmed_gguf
from fieldpack.builder.trim.vocab import MIN_DOC_TOKENS, Selection, check_trimmable, select_tokens

log = logging.getLogger(__name__)

#: Default ``--keep-general``: general tokens kept besides the domain's (see README "Vocabulary trimming" for
#: the measurement behind it).
DEFAULT_KEEP_GENERAL = 32768

__all__ = ["DEFAULT_KEEP_GENERAL", "MIN_DOC_TOKENS", "TrimResult", "domain_counts", "predicted_order", "prompt_texts",
           "trim_gguf"]


@dataclass(frozen=True)
class TrimResult:
    """The trimmed file, the kept ids (untrimmed id of each new id) and the selection's counts."""

    file: TrimmedFile
    keep: list[int] = field(repr=False)
    reasons: dict[str, int]
    domain_tokens: int
    keep_general: int


def prompt_texts() -> list[str]:
    """The fixed texts of every prompt format the device renders (instructions, completion template, stops)."""
    from fieldpack.shared import prompt_format as pf

    return [pf.INSTRUCTIONS, pf.COMPLETION_TEMPLATE, *pf.COMPLETION_STOP]


def domain_counts(gguf_path: Path, texts: Iterable[str], special_texts: Iterable[str] = ()) -> Counter[int]:
    """Token id -> occurrences of ``texts`` (as plain text) and ``special_texts`` (special tokens parsed, as
    the device does for prompts), tokenized by llama.cpp with the GGUF's own tokenizer (no weights loaded)."""
    from fieldpack.builder.llama_eval import vocab_only

    tok = vocab_only(gguf_path)
    counts: Counter[int] = Counter()
    for text in texts:
        counts.update(tok.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    for text in special_texts:
        counts.update(tok.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        counts.update(tok.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    return counts


def predicted_order(gguf_path: Path, texts: list[str], *, n_ctx: int = 256, max_windows: int = 6) -> list[int]:
    """Every token id, from the highest to the lowest mean probability the model itself predicts for it on
    windows of ``texts`` (the general tokens a trim should keep: the removed ones' probability mass is what the
    trim's KLD is made of).

    Args:
        gguf_path: the untrimmed GGUF (its weights are loaded).
        texts: document chunks to predict on (the build passes its calibration chunks, never the held-out ones).
        n_ctx / max_windows: at most ``max_windows`` windows of ``n_ctx`` tokens (each costs one forward pass and a
            ``(n_ctx, n_vocab)`` float64 softmax).

    Returns:
        ``n_vocab`` ids (ties by id). Measured on Gemma 3 270M / PostgreSQL (README "Vocabulary trimming"): with
        this order instead of the merge order, 4,096 general tokens give KLD 0.011 instead of ~0.02.
    """
    import numpy as np

    from fieldpack.builder.llama_eval import log_softmax, logits_for, open_gguf
    from fieldpack.builder.llama_eval import vocab_only

    tok = vocab_only(gguf_path)
    stream: list[int] = []
    for text in texts:
        stream += tok.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if len(stream) >= n_ctx * max_windows:
            break
    windows = [stream[i:i + n_ctx - 1] for i in range(0, len(stream), n_ctx - 1)][:max_windows]
    with open_gguf(gguf_path, n_ctx=n_ctx) as llm:
        bos = [llm.token_bos()] if llm.token_bos() >= 0 else []
        mass = np.zeros(llm.n_vocab(), dtype=np.float64)
        for w in windows:
            if w:
                mass += np.exp(log_softmax(logits_for(llm, bos + w))).sum(axis=0)
    order = np.lexsort((np.arange(mass.size), -mass))
    return [int(i) for i in order]


def trim_gguf(src: Path, dst: Path, texts: list[str], *, keep_general: int = DEFAULT_KEEP_GENERAL,
              extra_texts: Iterable[str] | None = None, min_doc_tokens: int = MIN_DOC_TOKENS,
              general_texts: list[str] | None = None) -> TrimResult:
    """Trim ``src``'s vocabulary to the domain of ``texts`` (documents) plus ``extra_texts`` (prompt format;
    default :func:`prompt_texts`) and write ``dst``. ``min_doc_tokens``: fewest document tokens accepted.
    ``general_texts``: choose the ``keep_general`` general tokens by the model's predicted probability on these
    texts (:func:`predicted_order`); None: by the tokenizer's merge order.

    Raises:
        UnsupportedTokenizerError: the tokenizer is not byte-level BPE or byte-fallback SentencePiece.
        TrimError: the documents hold fewer than :data:`MIN_DOC_TOKENS` model tokens.
        ModelLoadError: ``src`` has no tokenizer or inconsistent per-token tensors.
    """
    vocab = read_gguf_vocab(src)
    check_trimmable(vocab.model, vocab.types, source=str(src))
    counts = domain_counts(src, texts)
    prompt_counts = domain_counts(src, (), prompt_texts() if extra_texts is None else extra_texts)
    if sum(counts.values()) < min_doc_tokens:  # the documents alone, prompt texts not counted
        select_tokens(vocab, counts, keep_general=keep_general, min_doc_tokens=min_doc_tokens)  # raises TrimError
    general = predicted_order(src, general_texts) if general_texts and keep_general > 0 else None
    sel: Selection = select_tokens(vocab, counts + prompt_counts, keep_general=keep_general, min_doc_tokens=0,
                                   general=general)
    written = write_trimmed_gguf(src, dst, sel.keep)
    return TrimResult(file=written, keep=sel.keep, reasons=sel.reasons, domain_tokens=sel.domain_tokens,
                      keep_general=keep_general)
