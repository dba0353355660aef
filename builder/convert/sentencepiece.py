"""SentencePiece tokenizers (Llama 2, TinyLlama, Mistral v0.1, Gemma) -> GGUF ``llama`` vocabulary with scores.

Two sources: a ``tokenizer.model`` protobuf (``ModelProto``), read with a minimal wire-format reader instead of
the ``sentencepiece`` package, or a ``tokenizer.json`` that behaves like SentencePiece (byte-fallback BPE with
``▁`` for spaces), whose scores are minus the rank of the merge that makes each token.
Reference: SentencePiece ``sentencepiece_model.proto`` (ModelProto field numbers).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import TokenType

from fieldpack.builder.convert.bpe import bpe_merges
from fieldpack.builder.convert.vocab import Vocab, added_tokens, pad_vocab
from fieldpack.shared.errors import ModelLoadError


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes):
    """Yield (field_number, wire_type, value) for one protobuf message; LEN values are bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 1:
            val, pos = buf[pos : pos + 8], pos + 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            val, pos = buf[pos : pos + n], pos + n
        elif wt == 5:
            val, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield num, wt, val


@dataclass
class SentencePieceModel:
    """The parts of a SentencePiece ``ModelProto`` llama.cpp needs.

    Attributes:
        pieces: (text, score, type) per id; type uses SentencePiece's enum, whose values are ``gguf.TokenType``'s.
        model_type: 1 unigram, 2 BPE, 3 word, 4 char (``TrainerSpec.model_type``).
        add_dummy_prefix: ``NormalizerSpec.add_dummy_prefix`` (default True).
        remove_extra_whitespaces: ``NormalizerSpec.remove_extra_whitespaces`` (default True).
    """

    pieces: list[tuple[str, float, int]]
    model_type: int = 1
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def read_sentencepiece_model(path: Path) -> SentencePieceModel:
    """Parse a SentencePiece ``tokenizer.model`` (protobuf ``ModelProto``) with a minimal wire-format reader.

    Field numbers from sentencepiece_model.proto: ModelProto.pieces=1 (SentencePiece: piece=1 string,
    score=2 float, type=3 enum, default NORMAL), trainer_spec=2 (model_type=3), normalizer_spec=3
    (add_dummy_prefix=3, remove_extra_whitespaces=4).

    Raises:
        ModelLoadError: the file cannot be read or is not a ModelProto.
    """
    try:
        buf = Path(path).read_bytes()
        pieces: list[tuple[str, float, int]] = []
        spm = SentencePieceModel(pieces=pieces)
        for num, wt, val in _proto_fields(buf):
            if num == 1 and wt == 2:
                text, score, ptype = "", 0.0, int(TokenType.NORMAL)
                for n2, w2, v2 in _proto_fields(val):
                    if n2 == 1 and w2 == 2:
                        text = v2.decode("utf-8")
                    elif n2 == 2 and w2 == 5:
                        score = struct.unpack("<f", v2)[0]
                    elif n2 == 3 and w2 == 0:
                        ptype = int(v2)
                pieces.append((text, score, ptype))
            elif num == 2 and wt == 2:
                for n2, w2, v2 in _proto_fields(val):
                    if n2 == 3 and w2 == 0:
                        spm.model_type = int(v2)
            elif num == 3 and wt == 2:
                for n2, w2, v2 in _proto_fields(val):
                    if n2 == 3 and w2 == 0:
                        spm.add_dummy_prefix = bool(v2)
                    elif n2 == 4 and w2 == 0:
                        spm.remove_extra_whitespaces = bool(v2)
    except (OSError, ValueError, UnicodeDecodeError, struct.error) as exc:
        raise ModelLoadError(
            f"Cannot parse SentencePiece model {path}: {exc}", hint="re-download tokenizer.model"
        ) from exc
    if not pieces:
        raise ModelLoadError(f"{path} holds no SentencePiece pieces", hint="re-download tokenizer.model")
    return spm


def is_spm_style(tokenizer_json: dict[str, Any]) -> bool:
    """A tokenizer.json that behaves like SentencePiece: byte-fallback BPE with ▁ for spaces."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    blob = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")])
    return "\\u2581" in blob or "▁" in blob


def spm_prefix_from_json(tokenizer_json: dict[str, Any]) -> bool:
    """SentencePiece add_dummy_prefix as a tokenizer.json spells it (Prepend normalizer or Metaspace)."""
    norm = tokenizer_json.get("normalizer") or {}
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    if any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in norms):
        return True
    pre = tokenizer_json.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for p in pres:
        if p.get("type") == "Metaspace":
            if "prepend_scheme" in p:
                return p["prepend_scheme"] in ("first", "always")
            return bool(p.get("add_prefix_space", True))
    return False


def read_spm_proto_vocab(path: Path, tj: dict[str, Any] | None, vocab_size: int) -> Vocab:
    """A ``tokenizer.model`` (plus tokenizer.json added tokens) as a ``llama`` :class:`Vocab`."""
    spm = read_sentencepiece_model(path)
    tokens = [p[0] for p in spm.pieces]
    scores = [p[1] for p in spm.pieces]
    known = {int(t) for t in TokenType}  # SentencePiece's piece-type enum has gguf.TokenType's values
    types = [p[2] if p[2] in known else int(TokenType.NORMAL) for p in spm.pieces]
    for i, (content, special) in sorted(added_tokens(tj).items()):
        if i < len(tokens):
            continue  # already a SentencePiece piece (e.g. <s>)
        while len(tokens) < i:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
        tokens.append(content)
        scores.append(-1000.0)
        types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    n_pad = pad_vocab(tokens, types, vocab_size, path, scores)
    return Vocab(
        model="llama", pre=None, tokens=tokens, token_types=types, scores=scores,
        add_space_prefix=spm.add_dummy_prefix, n_padding=n_pad,
        extra={"spm_model_type": spm.model_type},
    )


def read_spm_json_vocab(tj: dict[str, Any], vocab_size: int, source: Path) -> Vocab:
    """SentencePiece-style BPE from tokenizer.json: score = -(rank of the merge that makes the token)."""
    model = tj["model"]
    id_to_tok = {int(i): t for t, i in model.get("vocab", {}).items()}
    rank: dict[str, int] = {}
    for r, m in enumerate(bpe_merges(model)):
        left, _, right = m.partition(" ")
        rank.setdefault(left + right, r)
    added = added_tokens(tj)
    n = max(list(id_to_tok) + list(added)) + 1
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    unk = model.get("unk_token")
    for i in range(n):
        if i in added:
            content, special = added[i]
            tokens.append(content)
            scores.append(0.0)
            kind = TokenType.UNKNOWN if content == unk else TokenType.CONTROL if special else TokenType.USER_DEFINED
            types.append(kind)
            continue
        text = id_to_tok.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
            continue
        tokens.append(text)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            scores.append(0.0)
            types.append(TokenType.BYTE)
        elif text == unk:
            scores.append(0.0)
            types.append(TokenType.UNKNOWN)
        else:
            scores.append(-float(rank[text]) if text in rank else 0.0)
            types.append(TokenType.NORMAL)
    n_pad = pad_vocab(tokens, types, vocab_size, source, scores)
    return Vocab(
        model="llama", pre=None, tokens=tokens, token_types=types, scores=scores,
        add_space_prefix=spm_prefix_from_json(tj), n_padding=n_pad,
    )
