"""The calibration set: token windows cut from the domain's calibration chunks, fed to pruning and imatrix.

The pipeline splits the document chunks into calibration and held-out evaluation (fixed by seed); this module
takes the calibration side, picks ``n_chunks`` of them (seeded), joins them with blank lines, tokenizes them with
the checkpoint's own tokenizer, and cuts the stream into non-overlapping windows of ``seq_len`` tokens (the last,
shorter remainder is dropped unless it is the only window). Each window starts with BOS when the tokenizer adds
one, as the model saw text in training. This follows SparseGPT/Wanda, which calibrate on random fixed-length
windows of text (there from C4; here from the user's own documents).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldpack.shared.errors import CompressionConfigError

log = logging.getLogger(__name__)


@dataclass
class CalibrationSet:
    """Calibration token windows.

    Attributes:
        input_ids: ``(n_windows, seq_len)`` torch.int64 token ids.
        n_chunks: document chunks the windows were cut from.
        seq_len: window length in tokens.
    """

    input_ids: Any  # torch.LongTensor (n_windows, seq_len)
    n_chunks: int
    seq_len: int

    @property
    def n_tokens(self) -> int:
        """Tokens in the set (``n_windows * seq_len``)."""
        return int(self.input_ids.numel())

    @property
    def n_windows(self) -> int:
        return int(self.input_ids.shape[0])


def load_tokenizer(model_dir: Path) -> Any:
    """The checkpoint's Hugging Face tokenizer (fast, from ``tokenizer.json``).

    Raises:
        CompressionConfigError: the folder has no tokenizer transformers can load.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise CompressionConfigError(f"cannot load the tokenizer of {model_dir} for calibration: {exc}",
                                     hint="pass a checkpoint folder with tokenizer.json") from exc


def build_calibration(model_dir: Path, texts: list[str], *, n_chunks: int, seq_len: int, seed: int = 0,
                      tokenizer: Any = None) -> CalibrationSet:
    """Tokenize ``n_chunks`` of ``texts`` (chosen with ``seed``) into windows of ``seq_len`` tokens.

    Args:
        model_dir: checkpoint folder (its tokenizer is used unless ``tokenizer`` is given).
        texts: calibration chunk texts (never the held-out ones).
        n_chunks: how many chunks to use (all of them when there are fewer).
        seq_len: window length in model tokens.

    Returns:
        a :class:`CalibrationSet` of at least one window.

    Raises:
        CompressionConfigError: no non-empty calibration text.
    """
    import torch

    pool = [t for t in texts if t.strip()]
    if not pool:
        raise CompressionConfigError("no calibration text: every chunk went to the held-out set or is empty",
                                     hint="add documents, or raise --calib-chunks")
    rng = random.Random(seed)
    picked = pool if len(pool) <= n_chunks else rng.sample(pool, n_chunks)
    tok = tokenizer or load_tokenizer(model_dir)
    ids: list[int] = tok("\n\n".join(picked), add_special_tokens=False, verbose=False)["input_ids"]
    lead = tok("a", add_special_tokens=True)["input_ids"]
    bos = lead[0] if tok.bos_token_id is not None and lead and lead[0] == tok.bos_token_id else None
    body = seq_len - (1 if bos is not None else 0)
    n_windows = max(1, len(ids) // body)
    windows: list[list[int]] = []
    for w in range(n_windows):
        piece = ids[w * body:(w + 1) * body]
        windows.append(([bos] if bos is not None else []) + piece)
    if len(windows) == 1 and len(windows[0]) < seq_len:
        seq_len = len(windows[0])
    calib = CalibrationSet(input_ids=torch.tensor(windows, dtype=torch.long), n_chunks=len(picked), seq_len=seq_len)
    log.info("calibration: %d chunks -> %d windows x %d tokens (%d tokens)", calib.n_chunks, calib.n_windows,
             seq_len, calib.n_tokens)
    return calib


def require_tokens(calib: CalibrationSet, needed: int, why: str) -> None:
    """Raise CompressionConfigError when the set has fewer than ``needed`` tokens, saying why they are needed."""
    if calib.n_tokens < needed:
        per_chunk = max(1, calib.n_tokens // max(1, calib.n_chunks))
        raise CompressionConfigError(
            f"the calibration set has {calib.n_tokens} tokens ({calib.n_chunks} chunks); {why} needs at least "
            f"{needed}",
            hint=f"raise --calib-chunks to about {-(-needed // per_chunk)} (or add documents)")


def load_float_model(model_dir: Path, purpose: str) -> Any:
    """The checkpoint as a float32 Hugging Face causal LM in eval mode, for ``purpose`` (``"pruning"``, ``"gptq"``).

    Raises:
        CompressionConfigError: transformers cannot load the folder.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise CompressionConfigError(f"cannot load {model_dir} for {purpose}: {exc}",
                                     hint="pass a local Hugging Face checkpoint folder") from exc
    return model.eval()
