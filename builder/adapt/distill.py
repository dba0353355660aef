"""Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"):
the student matches the teacher's temperature-softened next-token distribution, mixed with the usual
next-token loss on the data.

::

    L = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))  +  (1 - alpha) * CE(z_s, y)

forward KL (teacher first), averaged over the positions that carry a label; the ``T^2`` keeps the soft term's
gradient scale independent of ``T``. Teacher and student must share a tokenizer (the same token ids mean the same
text), which :func:`check_same_tokenizer` enforces before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fieldpack.shared.errors import AdaptationError

IGNORE_INDEX = -100


#: Logit elements (rows x vocabulary) the loss handles at once: 2**25 float32 is 128 MiB per intermediate, 128
#: positions of Gemma 3's 262,144-token vocabulary.
KD_CHUNK_ELEMENTS = 1 << 25


def kd_loss(student_logits: Any, teacher_logits: Any, labels: Any, *, alpha: float, temperature: float) -> Any:
    """The mixed distillation loss (see the module docstring).

    Args:
        student_logits / teacher_logits: ``(batch, seq, vocab)`` float tensors (the teacher's without grad; None:
            next-token loss only). A teacher whose vocabulary is padded wider is cut to the student's width.
        labels: ``(batch, seq)`` int64 next-token targets *aligned with the input* (shifted here, as transformers
            does): ``labels[:, t+1]`` is predicted from position ``t``; ``-100`` marks positions without a target.
        alpha: weight of the KD term in [0, 1] (1: distillation only).
        temperature: softening temperature ``T > 0``.

    Returns:
        scalar float32 tensor (nats per labelled position).
    """
    import torch

    # Shift the targets, not the logits: slicing the logits to [:, :-1] would make them non-contiguous and cost a
    # copy of the whole (batch, seq, vocab) tensor; the last position simply gets no target.
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return kd_loss_aligned(student_logits, teacher_logits, targets, alpha=alpha, temperature=temperature)


def kd_loss_aligned(student_logits: Any, teacher_logits: Any, targets: Any, *, alpha: float,
                    temperature: float) -> Any:
    """:func:`kd_loss` on logits already aligned with their targets: ``student_logits[:, i]`` predicts
    ``targets[:, i]`` (``(batch, n, vocab)`` and ``(batch, n)``; ``-100``: no target). What the trainer uses when
    it computes logits only at the positions that carry a target (:func:`target_positions`).

    Memory: the loss runs over chunks of :data:`KD_CHUNK_ELEMENTS` logits, each under activation checkpointing
    (its softmaxes are recomputed in the backward pass instead of kept). Computed whole, the KL term needs about
    five float32 copies of ``(batch, n, vocab)`` beyond the two logit tensors (1 GiB each at batch 4 x 256
    positions on Gemma 3's 262,144-token vocabulary); chunked, about two (the student's gradient and one chunk's
    intermediates): ``python -m benchmarks.kd_memory`` measures 4.98 -> 2.08 GiB. The value and the gradients are
    the same up to float rounding (tested).
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab)
    y = targets.reshape(-1)
    n = (y != IGNORE_INDEX).sum().clamp(min=1)
    use_teacher = teacher_logits is not None and alpha != 0.0
    t = teacher_logits[..., :vocab].reshape(-1, vocab) if use_teacher else None
    rows = max(1, KD_CHUNK_ELEMENTS // vocab)
    ce = kl = torch.zeros((), dtype=torch.float32, device=s.device)
    s_parts = s.split(rows)  # one SplitBackward: the chunk gradients are joined once
    t_parts = t.split(rows) if t is not None else (None,) * len(s_parts)
    for s_part, t_part, y_part in zip(s_parts, t_parts, y.split(rows), strict=True):
        if s_part.requires_grad:
            c, k = checkpoint(_chunk_terms, s_part, t_part, y_part, temperature, use_reentrant=False)
        else:
            c, k = _chunk_terms(s_part, t_part, y_part, temperature)
        ce, kl = ce + c, kl + k
    if not use_teacher:
        return ce / n
    return alpha * temperature ** 2 * kl / n + (1.0 - alpha) * ce / n


def _chunk_terms(s: Any, t: Any, y: Any, temperature: float) -> tuple[Any, Any]:
    """Summed next-token cross-entropy and summed ``KL(teacher || student)`` at temperature ``T`` of ``(rows,
    vocab)`` logits over the rows whose target ``y`` is not ``-100`` (KL 0 without a teacher)."""
    import torch
    import torch.nn.functional as F

    s = s.float()
    ce = F.cross_entropy(s, y, ignore_index=IGNORE_INDEX, reduction="sum")
    if t is None:
        return ce, torch.zeros((), dtype=torch.float32, device=s.device)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t.float() / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return ce, (kl * (y != IGNORE_INDEX)).sum()


def target_positions(labels: Any) -> Any:
    """The input positions whose next token carries a target in any row of the batch, or None when that is
    (nearly) every position.

    RAFT examples label only the answer (a few dozen tokens after a prompt of ~1,000): projecting only those
    positions onto the vocabulary (transformers' ``logits_to_keep``) skips almost all of the ``(seq, vocab)``
    logits, which on a 262,144-token vocabulary (Gemma 3) is most of a training step's time and memory.

    Args:
        labels: ``(batch, seq)`` int64, ``-100`` where there is no target (aligned with the input).

    Returns:
        ``(n,)`` int64 positions ``t`` (position ``t`` predicts ``labels[:, t+1]``), ascending; None when more
        than half of the positions carry a target (no saving worth a gather).
    """
    has = (labels[:, 1:] != IGNORE_INDEX).any(0)
    if int(has.sum()) * 2 > has.numel():
        return None
    return has.nonzero().squeeze(-1)


def tokenizer_fingerprint(model_dir: Path) -> dict[str, int]:
    """Token text -> id of a checkpoint's ``tokenizer.json`` (added tokens included).

    Raises:
        AdaptationError: the folder has no readable ``tokenizer.json``.
    """
    path = Path(model_dir) / "tokenizer.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdaptationError(f"{path} cannot be read: {exc}",
                              hint="give a Hugging Face checkpoint folder with tokenizer.json") from exc
    vocab = dict(doc.get("model", {}).get("vocab") or {})
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {p[0]: i for i, p in enumerate(vocab)}
    for tok in doc.get("added_tokens", []):
        vocab[tok["content"]] = int(tok["id"])
    return vocab


def check_same_tokenizer(student_dir: Path, teacher_dir: Path) -> None:
    """Refuse a teacher whose tokenizer differs from the student's.

    Raises:
        AdaptationError: naming the teacher, the vocabulary sizes and a token that differs.
    """
    s, t = tokenizer_fingerprint(student_dir), tokenizer_fingerprint(teacher_dir)
    if s == t:
        return
    diff = next((k for k in sorted(set(s) | set(t)) if s.get(k) != t.get(k)), "?")
    raise AdaptationError(
        f"teacher {teacher_dir} has another tokenizer than the student {student_dir} "
        f"({len(t)} vs {len(s)} tokens; {diff!r} is {t.get(diff)} vs {s.get(diff)})",
        hint="distil from a checkpoint of the same model family (same tokenizer.json), e.g. a larger Gemma 3 "
             "for a Gemma 3 student")
