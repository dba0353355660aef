"""`fieldpack inspect`'s tokenizer row names the family, not only the GGUF key (Gemma 3 showed "llama (-)")."""

from __future__ import annotations

from fieldpack.cli.show import tokenizer_text


def test_tokenizer_row_names_the_family() -> None:
    assert tokenizer_text("llama", None) == "SentencePiece (GGUF llama)"  # Gemma 3, Llama 2, TinyLlama
    assert tokenizer_text("gpt2", "qwen2") == "byte-level BPE (GGUF gpt2, pre qwen2)"
    assert tokenizer_text("bert", "") == "WordPiece (GGUF bert)"
    assert tokenizer_text("newkind", "x") == "GGUF newkind, pre x"  # unknown: the raw keys, nothing invented
