"""Fixtures for the model half of the builder: trained tiny checkpoints (cached on disk), their GGUF
conversions, and small hand-built variants (odd row lengths, a SentencePiece-style tokenizer).

The trained checkpoints are cached under ``cache_dir`` keyed by a hash of the demo corpus, the training
settings, the source of :mod:`builder.tinymodel` and :data:`TINY_CACHE_VERSION`; everything else is cheap and
built per session under pytest's tmp dir.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest

from fieldpack.builder import tinymodel
from tests.conftest import DEMO_DOCS, TINY_SEED, TINY_STEPS, cached_dir  # noqa: F401  (shared fixtures live there)
from fieldpack.builder.convert import ConversionResult, convert_hf_to_gguf

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_dirs(tiny_llama_dir: Path, tiny_qwen2_dir: Path) -> dict[str, Path]:
    return {"llama": tiny_llama_dir, "qwen2": tiny_qwen2_dir}


@pytest.fixture(scope="session")
def converted(
    tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], ConversionResult]:
    """``converted(arch, outtype)`` -> ConversionResult of the tiny model, converted once per session."""
    root = tmp_path_factory.mktemp("gguf")
    done: dict[tuple[str, str], ConversionResult] = {}

    def get(arch: str, outtype: str) -> ConversionResult:
        if (arch, outtype) not in done:
            out = root / f"{arch}-{outtype}.gguf"
            done[(arch, outtype)] = convert_hf_to_gguf(tiny_dirs[arch], out, outtype=outtype)
        return done[(arch, outtype)]

    return get


def _random_llama(out: Path, tokenizer_src: Path | None, *, vocab_size: int, intermediate: int, seed: int = 0,
                  hidden: int = 256, extra: dict | None = None) -> Path:
    """An untrained LlamaForCausalLM (GQA 4/2 heads) saved next to a tokenizer; for shape-driven tests."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, initializer_range=0.2, **(extra or {}),
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(out)
    if tokenizer_src is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_src / name, out / name)
    return out


@pytest.fixture(scope="session")
def odd_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random llama whose ffn_down rows are 320 long: not a multiple of 256, so K-quants must fall back."""
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    return _random_llama(tmp_path_factory.mktemp("odd-llama"), tiny_llama_dir, vocab_size=vocab, intermediate=320)


def make_spm_style_tokenizer(corpus: list[str], out: Path) -> int:
    """Write a Llama-2-style tokenizer.json (byte-fallback BPE, ``▁`` for spaces, Prepend normalizer) trained
    on ``corpus``: <unk>, <s>, </s>, then the 256 ``<0xXX>`` byte tokens, then merges. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    # Train with whitespace splitting (as SentencePiece does, so no piece has an inner ▁) ...
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=2, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    base.train_from_iterator(corpus, trainer=trainer)
    trained = json.loads(base.to_str())
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok, _ in sorted(trained["model"]["vocab"].items(), key=lambda kv: kv[1]):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["model"]["merges"]]
    # ... then ship it the Llama 2 way: no pre-tokenizer, a Prepend("▁") + Replace(" ", "▁") normalizer.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
    }))
    return tok.get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="session")
def spm_llama_dir(demo_corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random llama with a SentencePiece-style tokenizer.json (converted as ``tokenizer.ggml.model=llama``)."""
    out = tmp_path_factory.mktemp("spm-llama")
    n = make_spm_style_tokenizer(demo_corpus, out)
    _random_llama(out, None, vocab_size=n, intermediate=256, hidden=128)
    return out
