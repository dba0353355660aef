"""Special tokens of a tokenizer folder: BOS/EOS/EOT/EOM/UNK/PAD ids, whether BOS/EOS are added, chat template.

Ids come from ``tokenizer_config.json`` (``bos_token`` ...), then ``config.json`` (``bos_token_id`` ...), then
SentencePiece defaults (``<unk>``, ``<s>``, ``</s>``). End-of-turn is the first of :data:`EOT_CANDIDATES` the
vocabulary holds (``<end_of_turn>`` for Gemma). Whether BOS/EOS are added follows ``add_bos_token`` /
``add_eos_token``, else the tokenizer.json post-processor template, else the SentencePiece default (BOS added).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf import TokenType

from fieldpack.builder.convert.vocab import Vocab, read_json

#: End-of-turn tokens, in order of preference, as chat templates spell them.
EOT_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|END_OF_TURN_TOKEN|>")
#: End-of-message token (Llama 3.1 tool calls).
EOM_CANDIDATES = ("<|eom_id|>",)


def token_content(value: Any) -> str | None:
    """``tokenizer_config.json`` spells special tokens as a string or as ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def post_processor_adds(tokenizer_json: dict[str, Any], token: str | None, where: str) -> bool:
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


def resolve_specials(vocab: Vocab, tj: dict[str, Any] | None, tcfg: dict[str, Any], config: dict[str, Any]) -> None:
    """Set the special-token ids and add_bos/add_eos of ``vocab`` in place (module docstring for the order)."""
    index = {t: i for i, t in enumerate(vocab.tokens) if vocab.token_types[i] != TokenType.UNUSED}

    def by_name(key: str) -> int | None:
        content = token_content(tcfg.get(key))
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
        vocab.add_bos = post_processor_adds(tj, bos_text, "first")
    else:
        vocab.add_bos = vocab.model == "llama" and vocab.bos_id is not None  # SentencePiece default
    if "add_eos_token" in tcfg:
        vocab.add_eos = bool(tcfg["add_eos_token"]) and vocab.eos_id is not None
    elif tj is not None and tj.get("post_processor"):
        vocab.add_eos = post_processor_adds(tj, eos_text, "last")


def chat_template(model_dir: Path, tcfg: dict[str, Any]) -> str | None:
    """The Jinja chat template: tokenizer_config.json, else chat_template.jinja / chat_template.json."""
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
        t = read_json(cj).get("chat_template")
        return t if isinstance(t, str) else None
    return None
