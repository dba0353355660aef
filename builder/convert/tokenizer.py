"""Read a Hugging Face tokenizer folder into the vocabulary llama.cpp expects in a GGUF file.

Two tokenizer families are supported, the two llama.cpp implements for Llama-family and Qwen2 models:

* **byte-level BPE** (``tokenizer.json`` with a ``BPE`` model and a ``ByteLevel`` pre-tokenizer; Llama 3,
  Qwen2, SmolLM, GPT-2) -> GGUF ``tokenizer.ggml.model = "gpt2"``, with the merges and a
  ``tokenizer.ggml.pre`` name that selects llama.cpp's pre-tokenizer regex. The name is found by matching the
  pre-tokenizer *configuration* against the ones llama.cpp implements (:data:`KNOWN_PRE_TOKENIZERS`); an
  unknown one is refused with :class:`~shared.errors.UnsupportedTokenizerError`, never guessed, because a wrong
  regex silently changes token ids.
* **SentencePiece** (``tokenizer.model`` protobuf, read without the ``sentencepiece`` package, or a
  ``tokenizer.json`` with a byte-fallback BPE model and ``▁`` whitespace handling; Llama 2, TinyLlama,
  Mistral v0.1) -> GGUF ``tokenizer.ggml.model = "llama"`` with scores and token types.

Token types follow ``gguf.TokenType``: special added tokens are CONTROL (never produced from plain text),
non-special added tokens USER_DEFINED (matched verbatim in text), ``<0xXX>`` BYTE, padding rows
(config ``vocab_size`` larger than the tokenizer) UNUSED ``[PAD<i>]``.

References: llama.cpp ``src/llama-vocab.cpp`` (pre-tokenizer names and regexes, SPM/BPE algorithms);
SentencePiece ``sentencepiece_model.proto`` (ModelProto field numbers).
"""

from __future__ import annotations

import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fieldpack.shared.errors import ModelLoadError, UnsupportedTokenizerError

logger = logging.getLogger(__name__)

# gguf.TokenType values, spelled here so this module does not import gguf at import time.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

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

#: End-of-turn tokens, in order of preference, as chat templates spell them.
EOT_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|END_OF_TURN_TOKEN|>")
#: End-of-message token (Llama 3.1 tool calls).
EOM_CANDIDATES = ("<|eom_id|>",)


@dataclass
class Vocab:
    """A tokenizer as GGUF stores it.

    Attributes:
        model: ``"gpt2"`` (byte-level BPE) or ``"llama"`` (SentencePiece).
        pre: llama.cpp pre-tokenizer name for ``gpt2`` (``"llama-bpe"``, ``"qwen2"``, ...), None for ``llama``.
        tokens: token text per id, length == the model's vocab size (padded with ``[PAD<i>]``).
        token_types: ``gguf.TokenType`` value per id.
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


# --------------------------------------------------------------------------------------------------------
# helpers


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(
            f"Cannot read {path}: {exc}", hint="re-download the checkpoint; the file must be valid UTF-8 JSON"
        ) from exc


def _token_content(value: Any) -> str | None:
    """``tokenizer_config.json`` spells special tokens as a string or as ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


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


def _bpe_merges(model: dict[str, Any]) -> list[str]:
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


def _post_processor_adds(tokenizer_json: dict[str, Any], token: str | None, where: str) -> bool:
    """Whether the post-processor's single-sequence template puts ``token`` first (``where="first"``) or last."""
    if token is None:
        return False
    pp = tokenizer_json.get("post_processor") or {}
    procs = pp.get("processors", []) if pp.get("type") == "Sequence" else [pp]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            if not single:
                continue
            item = single[0] if where == "first" else single[-1]
            if "SpecialToken" in item and item["SpecialToken"].get("id") == token:
                return True
    return False


# --------------------------------------------------------------------------------------------------------
# SentencePiece protobuf (ModelProto), read without the sentencepiece package


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
        pieces: (text, score, type) per id; type uses SentencePiece's enum, which equals ``gguf.TokenType``.
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
                text, score, ptype = "", 0.0, NORMAL
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


# --------------------------------------------------------------------------------------------------------
# main entry


def _is_spm_style(tokenizer_json: dict[str, Any]) -> bool:
    """A tokenizer.json that behaves like SentencePiece: byte-fallback BPE with ▁ for spaces."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    blob = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")])
    return "\\u2581" in blob or "▁" in blob


def _spm_prefix_from_json(tokenizer_json: dict[str, Any]) -> bool:
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


def read_vocab(model_dir: Path, vocab_size: int, config: dict[str, Any]) -> Vocab:
    """Read the tokenizer of a checkpoint folder into a :class:`Vocab` of exactly ``vocab_size`` tokens.

    Args:
        model_dir: checkpoint folder (``tokenizer.json`` and/or ``tokenizer.model``, ``tokenizer_config.json``).
        vocab_size: rows of the model's embedding (config ``vocab_size``); the vocab is padded with UNUSED
            ``[PAD<i>]`` tokens up to it.
        config: the parsed ``config.json`` (fallback for BOS/EOS ids).

    Raises:
        ModelLoadError: no tokenizer file, unreadable files, or more tokens than ``vocab_size``.
        UnsupportedTokenizerError: a tokenizer type or pre-tokenizer llama.cpp cannot reproduce.
    """
    model_dir = Path(model_dir)
    tj_path, spm_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    tcfg_path = model_dir / "tokenizer_config.json"
    tcfg = _read_json(tcfg_path) if tcfg_path.is_file() else {}
    tj = _read_json(tj_path) if tj_path.is_file() else None

    if tj is not None and (tj.get("model") or {}).get("type") == "BPE" and not _is_spm_style(tj):
        vocab = _read_bpe(tj, vocab_size, tj_path)
    elif spm_path.is_file():
        vocab = _read_spm_proto(spm_path, tj, vocab_size)
    elif tj is not None and _is_spm_style(tj):
        vocab = _read_spm_json(tj, vocab_size, tj_path)
    elif tj is not None:
        kind = (tj.get("model") or {}).get("type")
        raise UnsupportedTokenizerError(
            f"Tokenizer model type {kind!r} in {tj_path} is not supported",
            hint="fieldpack converts byte-level BPE and SentencePiece tokenizers (Llama, Qwen2, SmolLM, Mistral)",
        )
    else:
        raise ModelLoadError(
            f"No tokenizer found in {model_dir}: neither tokenizer.json nor tokenizer.model exists",
            hint="copy the tokenizer files of the checkpoint into the folder",
        )

    _resolve_specials(vocab, tj, tcfg, config)
    vocab.chat_template = _chat_template(model_dir, tcfg)
    return vocab


def _pad(tokens: list[str], types: list[int], vocab_size: int, source: Path, scores: list[float] | None = None) -> int:
    if len(tokens) > vocab_size:
        raise ModelLoadError(
            f"{source} defines {len(tokens)} tokens but the model's vocab_size is {vocab_size}",
            hint="the tokenizer does not belong to this checkpoint; use the matching tokenizer files",
        )
    n_pad = vocab_size - len(tokens)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(UNUSED)
        if scores is not None:
            scores.append(-1000.0)
    return n_pad


def _added_tokens(tj: dict[str, Any] | None) -> dict[int, tuple[str, bool]]:
    if tj is None:
        return {}
    return {int(a["id"]): (a["content"], bool(a.get("special"))) for a in tj.get("added_tokens", [])}


def _read_bpe(tj: dict[str, Any], vocab_size: int, source: Path) -> Vocab:
    pre = detect_pre_tokenizer(tj, source=str(source))
    model = tj["model"]
    id_to_tok: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    added = _added_tokens(tj)
    for i, (content, _special) in added.items():
        id_to_tok[i] = content
    n = max(id_to_tok) + 1 if id_to_tok else 0
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i in added:
            tokens.append(added[i][0])
            types.append(CONTROL if added[i][1] else USER_DEFINED)
        elif i in id_to_tok:
            tokens.append(id_to_tok[i])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    n_pad = _pad(tokens, types, vocab_size, source)
    return Vocab(model="gpt2", pre=pre, tokens=tokens, token_types=types, merges=_bpe_merges(model), n_padding=n_pad)


def _read_spm_proto(path: Path, tj: dict[str, Any] | None, vocab_size: int) -> Vocab:
    spm = read_sentencepiece_model(path)
    tokens = [p[0] for p in spm.pieces]
    scores = [p[1] for p in spm.pieces]
    types = [p[2] if p[2] in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE) else NORMAL for p in spm.pieces]
    for i, (content, special) in sorted(_added_tokens(tj).items()):
        if i < len(tokens):
            continue  # already a SentencePiece piece (e.g. <s>)
        while len(tokens) < i:
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(-1000.0)
            types.append(UNUSED)
        tokens.append(content)
        scores.append(-1000.0)
        types.append(CONTROL if special else USER_DEFINED)
    n_pad = _pad(tokens, types, vocab_size, path, scores)
    return Vocab(
        model="llama", pre=None, tokens=tokens, token_types=types, scores=scores,
        add_space_prefix=spm.add_dummy_prefix, n_padding=n_pad,
        extra={"spm_model_type": spm.model_type},
    )


def _read_spm_json(tj: dict[str, Any], vocab_size: int, source: Path) -> Vocab:
    """SentencePiece-style BPE from tokenizer.json: score = -(rank of the merge that makes the token)."""
    model = tj["model"]
    id_to_tok = {int(i): t for t, i in model.get("vocab", {}).items()}
    rank: dict[str, int] = {}
    for r, m in enumerate(_bpe_merges(model)):
        left, _, right = m.partition(" ")
        rank.setdefault(left + right, r)
    added = _added_tokens(tj)
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
            types.append(UNKNOWN if content == unk else CONTROL if special else USER_DEFINED)
            continue
        text = id_to_tok.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(UNUSED)
            continue
        tokens.append(text)
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            scores.append(0.0)
            types.append(BYTE)
        elif text == unk:
            scores.append(0.0)
            types.append(UNKNOWN)
        else:
            scores.append(-float(rank[text]) if text in rank else 0.0)
            types.append(NORMAL)
    n_pad = _pad(tokens, types, vocab_size, source, scores)
    return Vocab(
        model="llama", pre=None, tokens=tokens, token_types=types, scores=scores,
        add_space_prefix=_spm_prefix_from_json(tj), n_padding=n_pad,
    )


def _resolve_specials(vocab: Vocab, tj: dict[str, Any] | None, tcfg: dict[str, Any], config: dict[str, Any]) -> None:
    index = {t: i for i, t in enumerate(vocab.tokens) if vocab.token_types[i] != UNUSED}

    def by_name(key: str) -> int | None:
        content = _token_content(tcfg.get(key))
        return index.get(content) if content is not None else None

    def by_config(key: str) -> int | None:
        v = config.get(key)
        if isinstance(v, list):
            v = v[0] if v else None
        return v if isinstance(v, int) and 0 <= v < len(vocab.tokens) else None

    vocab.bos_id = by_name("bos_token") if "bos_token" in tcfg else by_config("bos_token_id")
    if vocab.bos_id is None and tcfg.get("bos_token") is None:
        vocab.bos_id = by_config("bos_token_id")
    vocab.eos_id = by_name("eos_token")
    if vocab.eos_id is None:
        vocab.eos_id = by_config("eos_token_id")
    vocab.unk_id = by_name("unk_token")
    vocab.pad_id = by_name("pad_token")
    if vocab.pad_id is None:
        vocab.pad_id = by_config("pad_token_id")
    if vocab.model == "llama":
        # SentencePiece defaults: <unk>=0, <s>=1, </s>=2 (as llama.cpp assumes without keys).
        vocab.unk_id = vocab.unk_id if vocab.unk_id is not None else index.get("<unk>")
        vocab.bos_id = vocab.bos_id if vocab.bos_id is not None else index.get("<s>")
        vocab.eos_id = vocab.eos_id if vocab.eos_id is not None else index.get("</s>")
    vocab.eot_id = next((index[t] for t in EOT_CANDIDATES if t in index), None)
    vocab.eom_id = next((index[t] for t in EOM_CANDIDATES if t in index), None)

    bos_text = vocab.tokens[vocab.bos_id] if vocab.bos_id is not None else None
    eos_text = vocab.tokens[vocab.eos_id] if vocab.eos_id is not None else None
    if "add_bos_token" in tcfg:
        vocab.add_bos = bool(tcfg["add_bos_token"]) and vocab.bos_id is not None
    elif tj is not None and tj.get("post_processor"):
        vocab.add_bos = _post_processor_adds(tj, bos_text, "first")
    else:
        vocab.add_bos = vocab.model == "llama" and vocab.bos_id is not None  # SentencePiece default
    if "add_eos_token" in tcfg:
        vocab.add_eos = bool(tcfg["add_eos_token"]) and vocab.eos_id is not None
    elif tj is not None and tj.get("post_processor"):
        vocab.add_eos = _post_processor_adds(tj, eos_text, "last")


def _chat_template(model_dir: Path, tcfg: dict[str, Any]) -> str | None:
    tmpl = tcfg.get("chat_template")
    if isinstance(tmpl, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    if isinstance(tmpl, str):
        return tmpl
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    cj = model_dir / "chat_template.json"
    if cj.is_file():
        t = _read_json(cj).get("chat_template")
        return t if isinstance(t, str) else None
    return None
