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

from builder import tinymodel
from builder.convert import ConversionResult, convert_hf_to_gguf

REPO = Path(__file__).resolve().parents[2]
DEMO_DOCS = REPO / "demo" / "docs"
#: Bump to retrain the cached tiny models even though no input changed.
TINY_CACHE_VERSION = "tiny-1"
TINY_STEPS = 300
TINY_SEED = 0


def _key(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def cached_dir(root: Path, name: str, build: Callable[[Path], None]) -> Path:
    """Return ``root/name``, building it with ``build(tmp)`` and renaming into place if absent.

    An exclusive ``flock`` on ``root/.name.lock`` makes concurrent sessions (other engineers' test runs in
    the same tree) wait for one build instead of each training their own copy.
    """
    final = root / name
    if (final / ".complete").is_file():
        return final
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (final / ".complete").is_file():
                return final
            for stale in root.glob(f".{name}.*.tmp"):  # left by killed runs
                if not _pid_alive(stale.name.rsplit(".", 2)[-2]):
                    shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(final, ignore_errors=True)
            tmp = root / f".{name}.{os.getpid()}.tmp"
            tmp.mkdir(parents=True)
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            os.rename(tmp, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


@pytest.fixture(scope="session")
def demo_corpus() -> list[str]:
    return tinymodel.load_corpus(DEMO_DOCS)


@pytest.fixture(scope="session")
def heldout_texts(demo_corpus: list[str]) -> list[str]:
    """The demo sentences in a shuffled order: in-vocabulary text the models never saw in this sequence."""
    sents = [s.strip() for d in demo_corpus for s in re.split(r"(?<=[.!?])\s+", d) if s.strip()]
    random.Random(1).shuffle(sents)
    return [" ".join(sents)]


def _tiny(cache_dir: Path, corpus: list[str], arch: str) -> Path:
    source = Path(tinymodel.__file__).read_bytes()
    key = _key(TINY_CACHE_VERSION, arch, str(TINY_STEPS), str(TINY_SEED), source, *corpus)
    return cached_dir(
        cache_dir,
        f"tiny-{arch}-{key}",
        lambda d: tinymodel.make_tiny_model(d, arch=arch, corpus=corpus, steps=TINY_STEPS, seed=TINY_SEED),
    )


@pytest.fixture(scope="session")
def tiny_llama_dir(cache_dir: Path, demo_corpus: list[str]) -> Path:
    return _tiny(cache_dir, demo_corpus, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(cache_dir: Path, demo_corpus: list[str]) -> Path:
    return _tiny(cache_dir, demo_corpus, "qwen2")


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
