"""Tiny, really trained Hugging Face checkpoints for tests and the demo.

:func:`make_tiny_model` trains a byte-level BPE tokenizer and a 2-layer decoder (Llama or Qwen2 layout) on a
small corpus for a few hundred AdamW steps on CPU, and writes a checkpoint folder that looks like the real thing
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json`` with a ChatML
``chat_template``, ``generation_config.json``). The result exercises every path of the HF -> GGUF conversion
that a real Llama 3 / Qwen2.5 checkpoint does: GQA (so the Llama Q/K permutation matters), untied ``lm_head``
(llama) or tied embeddings with q/k/v biases (qwen2), a pre-tokenizer regex llama.cpp implements exactly, and
special tokens for the chat template (``<|im_start|>``, ``<|im_end|>`` as end-of-turn, ``<|endoftext|>`` as
EOS, ``<|begin_of_text|>`` as BOS for the llama variant).

Model shape (both variants): hidden 256, intermediate 512 (multiples of 256, so K-quants apply to every
matrix), 2 layers, 4 attention heads of 64 dims with 2 KV heads, RoPE theta 10000, RMSNorm eps 1e-5. The
config's ``vocab_size`` is the tokenizer's size (~1000) rounded up to a multiple of 64, as real checkpoints pad it.

Training is deterministic for a given ``seed`` and thread count (the function pins torch to 2 threads while
it trains). torch and transformers are imported lazily.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fieldpack.shared.errors import InputNotFoundError, ModelLoadError, NoDocumentsError, OutputNotWritableError
from fieldpack.shared.atomic import atomic_write_bytes

logger = logging.getLogger(__name__)

Arch = Literal["llama", "qwen2"]

#: Pre-tokenizer split regex of Llama 3's tokenizer.json; llama.cpp implements it as pre-type ``llama-bpe``.
LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: Pre-tokenizer split regex of Qwen2's tokenizer.json (single digits); llama.cpp pre-type ``qwen2``.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
BEGIN_OF_TEXT = "<|begin_of_text|>"

#: ChatML template (the one Qwen2.5 ships, without the default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 512
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
MAX_POSITIONS = 512
ROPE_THETA = 10000.0
RMS_EPS = 1e-5
TARGET_VOCAB = 1000
SEQ_LEN = 128
BATCH_SIZE = 8
LEARNING_RATE = 3e-3
TRAIN_THREADS = 2

_TEXT_SUFFIXES = {".md", ".txt", ".html", ".htm", ".csv", ".rst", ".json", ".xml", ".yaml", ".yml"}


@dataclass(frozen=True)
class TrainLog:
    """What one :func:`make_tiny_model` run measured (also written to ``train_log.json`` in the folder).

    Attributes:
        arch: ``"llama"`` or ``"qwen2"``.
        vocab_size: tokenizer size (tokens); the model's embedding has this rounded up to a multiple of 64.
        uniform_loss: ``ln(vocab_size)`` nats, the loss of a uniform guess.
        first_loss / final_loss: training cross-entropy (nats/token) of the first step and the mean of the last
            10 steps.
        steps: optimiser steps taken.
        train_tokens: tokens in the training stream (documents + chat pairs).
        seconds: wall time of the training loop.
    """

    arch: str
    vocab_size: int
    uniform_loss: float
    first_loss: float
    final_loss: float
    steps: int
    train_tokens: int
    seconds: float


def load_corpus(docs_dir: Path) -> list[str]:
    """Read every text file under ``docs_dir`` (recursively, sorted by relative path) as raw UTF-8.

    Files with a known text suffix (.md, .txt, .html, .csv, ...) are read as they are, markup included; empty
    files are skipped.

    Returns:
        One string per file, in sorted path order.

    Raises:
        InputNotFoundError: ``docs_dir`` does not exist or is not a directory.
        NoDocumentsError: no non-empty text file was found.
    """
    docs_dir = Path(docs_dir)
    if not docs_dir.is_dir():
        raise InputNotFoundError(
            f"Corpus folder {docs_dir} does not exist or is not a directory",
            hint="pass a folder of .md/.txt/.html/.csv files",
        )
    texts: list[str] = []
    for path in sorted(p for p in docs_dir.rglob("*") if p.is_file()):
        if path.suffix.lower() not in _TEXT_SUFFIXES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            texts.append(text)
    if not texts:
        raise NoDocumentsError(
            f"No text documents found under {docs_dir}",
            hint=f"add files with one of the suffixes {sorted(_TEXT_SUFFIXES)}",
        )
    return texts


def make_qa_pairs(corpus: list[str]) -> list[tuple[str, str]]:
    """Turn a corpus into (question, answer) pairs: one per sentence of each document.

    The question names the first words of the sentence ("What do the documents say about <words>?"), the
    answer is the sentence. Markup characters (``#``, ``<...>``, ``|``) are stripped from the answer. This is a
    deliberately simple, deterministic recipe: its job is to teach a tiny model the chat format and to end
    its turns with ``<|im_end|>``, not to make it clever.
    """
    pairs: list[tuple[str, str]] = []
    for doc in corpus:
        plain = re.sub(r"<[^>]+>", " ", doc)
        plain = re.sub(r"[#|*`>]+", " ", plain)
        for sentence in re.split(r"(?<=[.!?])\s+|\n\s*\n", plain):
            sentence = " ".join(sentence.split())
            words = sentence.split()
            if len(words) < 4:
                continue
            topic = " ".join(words[:4]).rstrip(".,:;")
            pairs.append((f"What do the documents say about {topic}?", sentence))
    return pairs


def chatml(question: str, answer: str) -> str:
    """Render one user/assistant exchange exactly as :data:`CHATML_TEMPLATE` renders it."""
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n"


def _train_tokenizer(arch: Arch, texts: list[str]):  # -> tokenizers.Tokenizer
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    regex = LLAMA3_SPLIT_REGEX if arch == "llama" else QWEN2_SPLIT_REGEX
    # Llama 3 sets ignore_merges (a whole pre-token found in the vocab is emitted as is); llama.cpp does the
    # same for pre-type llama-bpe, and not for qwen2. Matching it keeps HF and llama.cpp token ids identical.
    tok = Tokenizer(models.BPE(ignore_merges=(arch == "llama")))
    if arch == "qwen2":
        # Qwen2's tokenizer.json applies NFC (and transformers >= 5 adds it for model_type qwen2 anyway).
        # llama.cpp does not normalize, so only already-NFC text tokenizes identically there.
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [ENDOFTEXT, IM_START, IM_END] + ([BEGIN_OF_TEXT] if arch == "llama" else [])
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if arch == "llama":
        bos_id = tok.token_to_id(BEGIN_OF_TEXT)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BEGIN_OF_TEXT} $A",
            pair=f"{BEGIN_OF_TEXT} $A {BEGIN_OF_TEXT} $B",
            special_tokens=[(BEGIN_OF_TEXT, bos_id)],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _model_config(arch: Arch, vocab_size: int, ids: dict[str, int]):  # -> PretrainedConfig
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=RMS_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        hidden_act="silu",
        initializer_range=0.02,
        eos_token_id=ids[ENDOFTEXT],
        torch_dtype="float32",
    )
    if arch == "llama":
        return LlamaConfig(
            **common, tie_word_embeddings=False, attention_bias=False, mlp_bias=False, bos_token_id=ids[BEGIN_OF_TEXT]
        )
    # Qwen2 always has q/k/v biases; like Qwen2.5-0.5B the lm_head is tied to the embedding and the config's
    # bos_token_id is <|endoftext|> (no BOS is added when tokenizing).
    return Qwen2Config(**common, tie_word_embeddings=True, bos_token_id=ids[ENDOFTEXT], use_sliding_window=False)


def _write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def make_tiny_model(
    out_dir: Path,
    *,
    arch: Arch,
    corpus: list[str],
    steps: int = 300,
    seed: int = 0,
) -> Path:
    """Train a tiny tokenizer + decoder on ``corpus`` and write a Hugging Face checkpoint folder.

    Args:
        out_dir: folder to create (or overwrite files in).
        arch: ``"llama"`` (LlamaForCausalLM, untied lm_head, BOS ``<|begin_of_text|>``, pre-tokenizer
            ``llama-bpe``) or ``"qwen2"`` (Qwen2ForCausalLM, tied embeddings, q/k/v biases, no BOS,
            pre-tokenizer ``qwen2``).
        corpus: raw documents (see :func:`load_corpus`); chat-formatted Q/A pairs made from it
            (:func:`make_qa_pairs`) are added to the training stream.
        steps: AdamW steps (batch 8 x 128 tokens). 300 steps take ~20-60 s on 2 CPU cores.
        seed: seeds Python, torch and the batch sampler; same seed + same corpus -> same weights.

    Returns:
        ``out_dir``, holding config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json
        (with ``chat_template``), generation_config.json (eos = [``<|im_end|>``, ``<|endoftext|>``]) and
        train_log.json (a :class:`TrainLog`).

    Raises:
        NoDocumentsError: ``corpus`` is empty or blank.
        OutputNotWritableError: ``out_dir`` cannot be created.
        ModelLoadError: ``arch`` is not one of the two variants.
    """
    import torch

    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"Unknown tiny-model arch {arch!r}", hint="use arch='llama' or arch='qwen2'")
    docs = [d for d in corpus if d.strip()]
    if not docs:
        raise NoDocumentsError("The corpus for the tiny model is empty", hint="pass load_corpus(<docs folder>)")
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(f"Cannot create {out_dir}: {exc}", hint="choose a writable folder") from exc

    random.seed(seed)
    torch.manual_seed(seed)
    pairs = make_qa_pairs(docs)
    chats = [chatml(q, a) for q, a in pairs]

    tok = _train_tokenizer(arch, docs + [a for _, a in pairs])
    ids = {t: tok.token_to_id(t) for t in (ENDOFTEXT, IM_START, IM_END, BEGIN_OF_TEXT)}
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    padded_vocab = int(math.ceil(n_tokens / 64) * 64)

    # Training stream: every document ends with <|endoftext|>; every chat sample ends with its <|im_end|>\n.
    # BOS (llama) is added by the tokenizer's post-processor, as at inference time.
    samples = [d + ENDOFTEXT for d in docs] + chats
    encoded = [tok.encode(s, add_special_tokens=True).ids for s in samples]
    stream: list[int] = []
    order = list(range(len(encoded)))
    for _ in range(max(1, math.ceil((SEQ_LEN * 4) / max(1, sum(map(len, encoded)))))):
        random.shuffle(order)
        for i in order:
            stream.extend(encoded[i])
    data = torch.tensor(stream, dtype=torch.long)

    config = _model_config(arch, padded_vocab, ids)
    from transformers import AutoModelForCausalLM

    prev_threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.95), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps)))
        )
        gen = torch.Generator().manual_seed(seed)
        n_windows = max(1, data.numel() - SEQ_LEN - 1)
        losses: list[float] = []
        t0 = time.perf_counter()
        for step in range(steps):
            starts = torch.randint(0, n_windows, (BATCH_SIZE,), generator=gen)
            batch = torch.stack([data[s : s + SEQ_LEN] for s in starts.tolist()])  # (B, T) int64
            out = model(input_ids=batch, labels=batch)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(out.loss.item())
            if step % 50 == 0 or step == steps - 1:
                logger.info("tiny %s step %d/%d loss %.3f", arch, step + 1, steps, losses[-1])
        seconds = time.perf_counter() - t0
        model.eval()
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        torch.set_num_threads(prev_threads)

    tok.save(str(out_dir / "tokenizer.json"))
    added = {
        str(ids[t]): {"content": t, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
                      "special": True}
        for t in (ENDOFTEXT, IM_START, IM_END, BEGIN_OF_TEXT)
        if ids[t] is not None
    }
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": arch == "llama",
            "add_eos_token": False,
            "bos_token": BEGIN_OF_TEXT if arch == "llama" else None,
            "eos_token": ENDOFTEXT,
            "pad_token": ENDOFTEXT,
            "unk_token": None,
            "additional_special_tokens": [IM_START, IM_END],
            "added_tokens_decoder": added,
            "chat_template": CHATML_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "model_max_length": MAX_POSITIONS,
        },
    )
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
            "pad_token_id": ids[ENDOFTEXT],
            "do_sample": False,
        },
    )
    tail = losses[-10:] if losses else [float("nan")]
    log = TrainLog(
        arch=arch,
        vocab_size=n_tokens,
        uniform_loss=math.log(n_tokens),
        first_loss=losses[0] if losses else float("nan"),
        final_loss=sum(tail) / len(tail),
        steps=steps,
        train_tokens=len(stream),
        seconds=round(seconds, 2),
    )
    _write_json(out_dir / "train_log.json", log.__dict__)
    logger.info(
        "tiny %s: vocab %d, loss %.3f -> %.3f (uniform %.3f), %d steps in %.1f s -> %s",
        arch, n_tokens, log.first_loss, log.final_loss, log.uniform_loss, steps, seconds, out_dir,
    )
    return out_dir


def read_train_log(model_dir: Path) -> TrainLog:
    """Load the :class:`TrainLog` a :func:`make_tiny_model` run wrote into ``model_dir``.

    Raises:
        InputNotFoundError: ``model_dir/train_log.json`` is missing (not a tiny-model folder).
    """
    path = Path(model_dir) / "train_log.json"
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found", hint="pass a folder written by make_tiny_model")
    return TrainLog(**json.loads(path.read_text(encoding="utf-8")))
