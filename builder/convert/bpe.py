"""Byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM, GPT-2): ``tokenizer.json`` -> GGUF ``gpt2`` vocabulary.

The llama.cpp pre-tokenizer name (``tokenizer.ggml.pre``) is found by matching the pre-tokenizer
*configuration* against the ones llama.cpp implements (:data:`KNOWN_PRE_TOKENIZERS`); an unknown one is refused
with :class:`~fieldpack.shared.errors.UnsupportedTokenizerError`, never guessed, because a wrong regex silently
changes token ids. Reference: llama.cpp ``src/llama-vocab.cpp`` (pre-tokenizer names and regexes).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from gguf import TokenType

from fieldpack.builder.convert.vocab import Vocab, added_tokens, pad_vocab
from fieldpack.shared.errors import ModelLoadError, UnsupportedTokenizerError

logger = logging.getLogger(__name__)

_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Canonical pre-tokenizer signatures (see :func:`pre_tokenizer_signature`) -> llama.cpp ``tokenizer.ggml.pre``.
#: Each entry is a configuration whose splitting llama.cpp reproduces exactly (llama-vocab.cpp).
KNOWN_PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    # Llama 3 / 3.1 / 3.2 (and our tiny llama): Split(regex, isolated) + ByteLevel without its own regex.
    ("split:" + _LLAMA3_RE, "bytelevel:noregex"): "llama-bpe",
    # Qwen2 / Qwen2.5 (and our tiny qwen2): same shape, single-digit numbers.
    ("split:" + _QWEN2_RE, "bytelevel:noregex"): "qwen2",
    # SmolLM / SmolLM2 (StarCoder-style): individual digits, then GPT-2's ByteLevel regex.
    ("digits:individual", "bytelevel:regex"): "smollm",
    # GPT-2 itself: ByteLevel with its built-in regex.
    ("bytelevel:regex",): "gpt-2",
}


def pre_tokenizer_signature(pre: dict[str, Any] | None) -> tuple[str, ...]:
    """Reduce a ``tokenizer.json`` ``pre_tokenizer`` block to a canonical tuple of steps.

    Only the settings that change how text is split are kept: a ``Split`` step becomes
    ``"split:<regex>"`` (it must be ``isolated`` and not inverted, else it is spelled out in full so it never
    matches a known entry), ``ByteLevel`` becomes ``"bytelevel:regex"`` or ``"bytelevel:noregex"`` (with
    ``+prefix`` if it adds a prefix space), ``Digits`` ``"digits:individual"`` / ``"digits:grouped"``.
    Anything else is spelled as ``"<type>:<json>"``.
    """
    if pre is None:
        return ()
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    sig: list[str] = []
    for step in steps:
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern", {})
            regex = pattern.get("Regex") if isinstance(pattern, dict) else None
            if regex is not None and str(step.get("behavior", "")).lower() == "isolated" and not step.get("invert"):
                sig.append("split:" + regex)
            else:
                sig.append("split-other:" + json.dumps(step, sort_keys=True))
        elif kind == "ByteLevel":
            s = "bytelevel:" + ("regex" if step.get("use_regex", True) else "noregex")
            if step.get("add_prefix_space"):
                s += "+prefix"
            sig.append(s)
        elif kind == "Digits":
            sig.append("digits:" + ("individual" if step.get("individual_digits") else "grouped"))
        else:
            sig.append(f"{kind}:" + json.dumps(step, sort_keys=True))
    return tuple(sig)


def detect_pre_tokenizer(tokenizer_json: dict[str, Any], *, source: str = "tokenizer.json") -> str:
    """Map a byte-level BPE ``tokenizer.json`` to llama.cpp's ``tokenizer.ggml.pre`` name.

    Raises:
        UnsupportedTokenizerError: the pre-tokenizer (or a normalizer llama.cpp would not apply) is not one
            llama.cpp reproduces exactly; the message names it.
    """
    sig = pre_tokenizer_signature(tokenizer_json.get("pre_tokenizer"))
    name = KNOWN_PRE_TOKENIZERS.get(sig)
    if name is None:
        described = " + ".join(s if len(s) < 160 else s[:157] + "..." for s in sig) or "none"
        raise UnsupportedTokenizerError(
            f"Unknown pre-tokenizer in {source}: {described}",
            hint="fieldpack converts only pre-tokenizers llama.cpp implements exactly "
            f"({', '.join(sorted(set(KNOWN_PRE_TOKENIZERS.values())))}); use a model with one of them",
        )
    normalizer = tokenizer_json.get("normalizer")
    if normalizer is not None:
        kind = normalizer.get("type")
        # Qwen2's tokenizer.json applies NFC; llama.cpp does not, which only matters for text that is not
        # already NFC, so it is accepted as llama.cpp's own converter does (callers should NFC-normalize text
        # before tokenizing with llama.cpp). Any other normalizer changes ordinary text and is refused.
        if kind != "NFC":
            raise UnsupportedTokenizerError(
                f"Byte-level BPE tokenizer in {source} has a {kind} normalizer that llama.cpp does not apply",
                hint="use a tokenizer without a normalizer (or with NFC only, as Qwen2's)",
            )
        logger.warning("%s: NFC normalizer is not applied by llama.cpp; NFC-normalize text before tokenizing", source)
    return name


def bpe_merges(model: dict[str, Any]) -> list[str]:
    """Merges of a tokenizer.json BPE ``model`` as ``"left right"`` strings, in rank order."""
    merges = model.get("merges") or []
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            out.append(f"{m[0]} {m[1]}")
        else:
            raise ModelLoadError(f"Malformed BPE merge {m!r} in tokenizer.json", hint="re-export the tokenizer")
    return out


def read_bpe_vocab(tj: dict[str, Any], vocab_size: int, source: Path) -> Vocab:
    """A byte-level BPE ``tokenizer.json`` as a ``gpt2`` :class:`Vocab` of ``vocab_size`` tokens."""
    pre = detect_pre_tokenizer(tj, source=str(source))
    model = tj["model"]
    id_to_tok: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    added = added_tokens(tj)
    for i, (content, _special) in added.items():
        id_to_tok[i] = content
    n = max(id_to_tok) + 1 if id_to_tok else 0
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i in added:
            tokens.append(added[i][0])
            types.append(int(TokenType.CONTROL if added[i][1] else TokenType.USER_DEFINED))
        elif i in id_to_tok:
            tokens.append(id_to_tok[i])
            types.append(int(TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]")
            types.append(int(TokenType.UNUSED))
    n_pad = pad_vocab(tokens, types, vocab_size, source)
    return Vocab(model="gpt2", pre=pre, tokens=tokens, token_types=types, merges=bpe_merges(model), n_padding=n_pad)
