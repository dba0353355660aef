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
    t = None if teacher_logits is None else teacher_logits[:, :-1]
    return kd_loss_aligned(student_logits[:, :-1], t, labels[:, 1:], alpha=alpha, temperature=temperature)


def kd_loss_aligned(student_logits: Any, teacher_logits: Any, targets: Any, *, alpha: float,
                    temperature: float) -> Any:
    """:func:`kd_loss` on logits already aligned with their targets: ``student_logits[:, i]`` predicts
    ``targets[:, i]`` (``(batch, n, vocab)`` and ``(batch, n)``; ``-100``: no target). What the trainer uses when
    it computes logits only at the positions that carry a target (:func:`target_positions`)."""
    import torch.nn.functional as F

    vocab = student_logits.shape[-1]
    s = student_logits.float()
    mask = targets != IGNORE_INDEX
    n = mask.sum().clamp(min=1)
    ce = F.cross_entropy(s.reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum") / n
    if alpha == 0.0 or teacher_logits is None:
        return ce
    t = teacher_logits[..., :vocab].float()
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)  # (batch, n), KL(teacher || student)
    kl = (kl * mask).sum() / n
    return alpha * temperature ** 2 * kl + (1.0 - alpha) * ce


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
