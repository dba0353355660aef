"""The vocabulary record a GGUF stores (``tokenizer.ggml.*``), and the helpers every tokenizer reader shares.

Token types are ``gguf.TokenType``: special added tokens CONTROL (never produced from plain text), non-special
added tokens USER_DEFINED (matched verbatim in text), ``<0xXX>`` BYTE, padding rows (config ``vocab_size``
larger than the tokenizer) UNUSED ``[PAD<i>]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf import TokenType

from fieldpack.shared.errors import ModelLoadError


@dataclass
class Vocab:
    """A tokenizer as GGUF stores it.

    Attributes:
        model: ``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece).
        pre: llama.cpp pre-tokenizer name for ``gpt2`` (``"llama-bpe"``, ``"qwen2"``, ...), None for ``llama``.
        tokens: token text per id, length == the model's vocab size (padded with ``[PAD<i>]``).
        token_types: ``gguf.TokenType`` value per id (int).
        scores: SentencePiece score per id (``llama`` only; higher merges first), else None.
        merges: BPE merges ``"left right"`` in rank order (``gpt2`` only), else None.
        bos_id / eos_id / eot_id / eom_id / unk_id / pad_id: special token ids or None.
        add_bos / add_eos: whether a BOS/EOS is added when tokenizing plain text.
        add_space_prefix: SentencePiece "add dummy prefix" (``llama`` only).
        chat_template: Jinja chat template string, or None.
        n_padding: number of ``[PAD<i>]`` rows added to reach the model's vocab size.
    """

    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    eot_id: int | None = None
    eom_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = False
    chat_template: str | None = None
    n_padding: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stop_strings(self) -> list[str]:
        """Texts of the end-of-generation tokens (EOT, EOM, EOS; unique, in that order)."""
        out: list[str] = []
        for tid in (self.eot_id, self.eom_id, self.eos_id):
            if tid is not None and self.tokens[tid] not in out:
                out.append(self.tokens[tid])
        return out


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"Cannot read {path}: {exc}", hint="re-download the checkpoint; the file must be valid UTF-8 JSON"
        ) from exc


def pad_vocab(
    tokens: list[str], types: list[int], vocab_size: int, source: Path, scores: list[float] | None = None
) -> int:
    """Pad ``tokens``/``types`` (and ``scores``) in place with UNUSED ``[PAD<i>]`` rows up to
    ``vocab_size``; returns the number of rows added.

    Raises:
        ModelLoadError: the tokenizer has more tokens than ``vocab_size`` (it belongs to another model).
    """
    if len(tokens) > vocab_size:
        raise ModelLoadError(
            f"{source} defines {len(tokens)} tokens but the model's vocab_size is {vocab_size}",
            hint="the tokenizer does not belong to this checkpoint; use the matching tokenizer files",
        )
    n_pad = vocab_size - len(tokens)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(int(TokenType.UNUSED))
        if scores is not None:
            scores.append(-1000.0)
    return n_pad


def added_tokens(tj: dict[str, Any] | None) -> dict[int, tuple[str, bool]]:
    """``added_tokens`` of a tokenizer.json: id -> (content, special)."""
    if tj is None:
        return {}
    return {int(a["id"]): (a["content"], bool(a.get("special"))) for a in tj.get("added_tokens", [])}
