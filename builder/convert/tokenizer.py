"""Read a Hugging Face tokenizer folder into the vocabulary llama.cpp expects in a GGUF file.

This module only picks the reader; each job lives in its own module:

* :mod:`.bpe` -- byte-level BPE (``tokenizer.json`` with a ``ByteLevel`` pre-tokenizer; Llama 3, Qwen2, SmolLM,
  GPT-2) -> ``tokenizer.ggml.model = "gpt2"``, merges, and the llama.cpp pre-tokenizer name detected from the
  pre-tokenizer configuration (unknown ones refused).
* :mod:`.sentencepiece` -- SentencePiece (``tokenizer.model`` protobuf, or a byte-fallback BPE ``tokenizer.json``
  with ``▁`` whitespace; Llama 2, TinyLlama, Mistral v0.1, Gemma) -> ``"llama"`` with scores and token types.
* :mod:`.special_tokens` -- BOS/EOS/EOT/EOM ids, add_bos/add_eos, chat template.
* :mod:`.vocab` -- the :class:`~.vocab.Vocab` record and shared helpers (padding, added tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fieldpack.builder.convert.bpe import KNOWN_PRE_TOKENIZERS, read_bpe_vocab
from fieldpack.builder.convert.sentencepiece import (
    is_spm_style,
    read_sentencepiece_model,
    read_spm_json_vocab,
    read_spm_proto_vocab,
)
from fieldpack.builder.convert.special_tokens import chat_template, resolve_specials
from fieldpack.builder.convert.vocab import Vocab, read_json
from fieldpack.shared.errors import ModelLoadError, UnsupportedTokenizerError

__all__ = ["KNOWN_PRE_TOKENIZERS", "Vocab", "read_sentencepiece_model", "read_vocab"]


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
    tcfg = read_json(tcfg_path) if tcfg_path.is_file() else {}
    tj = read_json(tj_path) if tj_path.is_file() else None

    if tj is not None and (tj.get("model") or {}).get("type") == "BPE" and not is_spm_style(tj):
        vocab = read_bpe_vocab(tj, vocab_size, tj_path)
    elif spm_path.is_file():
        vocab = read_spm_proto_vocab(spm_path, tj, vocab_size)
    elif tj is not None and is_spm_style(tj):
        vocab = read_spm_json_vocab(tj, vocab_size, tj_path)
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

    resolve_specials(vocab, tj, tcfg, config)
    vocab.chat_template = chat_template(model_dir, tcfg)
    return vocab
