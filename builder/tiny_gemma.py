"""A tiny, randomly initialised Gemma 3 checkpoint for fast converter tests (no training: seconds to make).

:func:`make_tiny_gemma3` writes a ``Gemma3ForCausalLM`` folder shaped like the real thing in every way the
GGUF conversion cares about, at toy size:

* a SentencePiece-style tokenizer as Gemma's ``tokenizer.json`` spells it (byte-fallback BPE, spaces replaced
  by ``▁`` in the normalizer, no pre-tokenizer split, ``<0x00>``..``<0xFF>`` byte pieces, ``<bos>`` added by the
  post-processor), trained on a small corpus; ids 0..5 are ``<pad> <eos> <bos> <unk> <start_of_turn>
  <end_of_turn>`` as in Gemma;
* hidden 64, 4 layers, 4 query heads of ``head_dim`` 32 (so ``n_head * head_dim = 128 != hidden``), 2 KV heads,
  q/k norms, pre/post feed-forward norms, post-attention norm, tied embeddings;
* a sliding window of 8 tokens (so the parity prompts exceed it), a non-default layer pattern (sliding,
  sliding, full, sliding) and a non-default local RoPE base (20,000), so a converter that drops any of them
  fails parity;
* RMSNorm weights drawn at random (HF initialises them to 0), so every norm, and its ``w + 1`` convention,
  changes the logits.

torch, transformers and tokenizers are imported lazily.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fieldpack.shared.atomic import atomic_write_text
from fieldpack.shared.errors import NoDocumentsError

logger = logging.getLogger(__name__)

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>")
TARGET_VOCAB = 700
HIDDEN_SIZE = 64
INTERMEDIATE_SIZE = 128
LAYER_TYPES = ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention")
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32
SLIDING_WINDOW = 8
ROPE_THETA_GLOBAL = 1_000_000.0
ROPE_THETA_LOCAL = 20_000.0


def _train_tokenizer(texts: list[str]):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    # 1. learn merges within words (Metaspace split), as SentencePiece BPE does
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=TARGET_VOCAB, min_frequency=2, show_progress=False)
    learner.train_from_iterator(texts, trainer=trainer)
    learned = json.loads(learner.to_str())["model"]
    # 2. Gemma's id layout: specials, then byte pieces, then the learned pieces
    vocab: dict[str, int] = {}
    for piece in [*SPECIALS, *(f"<0x{b:02X}>" for b in range(256))]:
        vocab[piece] = len(vocab)
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return tok


def make_tiny_gemma3(out_dir: Path, *, corpus: list[str], seed: int = 0) -> Path:
    """Write a random tiny ``Gemma3ForCausalLM`` checkpoint with a tokenizer trained on ``corpus``.

    Args:
        out_dir: folder to fill (created); gets config.json, model.safetensors (float32), tokenizer.json,
            tokenizer_config.json.
        corpus: texts for the tokenizer (e.g. :func:`builder.tinymodel.load_corpus` of ``demo/docs``).
        seed: torch seed for the weights.

    Returns:
        ``out_dir``.

    Raises:
        NoDocumentsError: ``corpus`` holds no text.
    """
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    texts = [t for t in corpus if t.strip()]
    if not texts:
        raise NoDocumentsError("No text to train the tiny Gemma tokenizer on", hint="pass a non-empty corpus")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(texts)
    n_tokens = tok.get_vocab_size()
    config = Gemma3TextConfig(
        vocab_size=(n_tokens + 63) // 64 * 64,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=SLIDING_WINDOW,
        layer_types=list(LAYER_TYPES),
        max_position_embeddings=512,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": ROPE_THETA_GLOBAL},
            "sliding_attention": {"rope_type": "default", "rope_theta": ROPE_THETA_LOCAL},
        },
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
        tie_word_embeddings=True,
    )
    config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.5)
            elif name.endswith("embed_tokens.weight"):
                param.normal_(0.0, 0.5)  # larger logits than the 0.02 init, so top-1 is not a tie everywhere
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save(str(out_dir / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 512,
    }
    atomic_write_text(out_dir / "tokenizer_config.json", json.dumps(tcfg, indent=2) + "\n")
    logger.info("tiny gemma3: vocab %d (config %d) -> %s", n_tokens, config.vocab_size, out_dir)
    return out_dir
