"""Training LoRA adapters with the transformers ``Trainer`` (accelerate underneath: the GPU when there is one, the
CPU otherwise; ``accelerate launch`` spreads it over several GPUs), and measuring the result in torch.

:func:`train` runs a fixed number of optimizer steps (AdamW, cosine schedule with 5% warm-up) over
:class:`~.data.Example` sequences, with next-token loss or, given a teacher, the distillation loss of
:mod:`.distill`. Progress (step, loss, tokens/s) goes to :func:`fieldpack.builder.progress.report` (the CLI's bar)
and the log. :func:`evaluate` gives held-out perplexity and the mean KL divergence from a reference distribution.

Reproducibility: the seed fixes the LoRA initialisation and the data order; on the CPU torch is pinned to
``threads`` threads while training, so the same inputs give the same weights (and GGUF sha256) on the same
hardware and library versions. On a GPU, bf16 autocast is used where the device supports it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fieldpack.builder.adapt.data import Example
from fieldpack.builder.adapt.distill import IGNORE_INDEX, kd_loss, kd_loss_aligned, target_positions
from fieldpack.shared.errors import AdaptationError

log = logging.getLogger(__name__)

#: Share of the steps spent warming the learning rate up.
WARMUP_SHARE = 0.05


@dataclass
class TrainStats:
    """What :func:`train` did.

    Attributes:
        steps: optimizer steps. tokens: input tokens processed (padding excluded). seconds: wall time of the loop.
        losses: loss of every step (nats per labelled token). device: ``cpu`` / ``cuda``.
    """

    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    device: str = "cpu"

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def mean_loss(self, head: bool) -> float:
        """Mean loss of the first (``head``) or last tenth of the steps (at least one step)."""
        n = max(1, len(self.losses) // 10)
        part = self.losses[:n] if head else self.losses[-n:]
        return sum(part) / len(part) if part else float("nan")


def pick_device(requested: str | None = None) -> str:
    """``requested``, else ``cuda`` when torch sees a GPU, else ``cpu``.

    Raises:
        AdaptationError: ``cuda`` requested where torch sees no GPU.
    """
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise AdaptationError("CUDA was requested but torch sees no GPU",
                              hint="run on a host with a CUDA GPU and a CUDA build of torch, or use the CPU")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Pin torch's intra-op threads to ``n`` inside the block (None: unchanged)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether a causal LM's forward takes transformers' ``logits_to_keep`` (a PEFT wrapper is looked through)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def _collate(pad_id: int):  # -> Callable[[list[Example]], dict[str, Tensor]]
    import torch

    def collate(batch: list[Example]) -> dict[str, Any]:
        n = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[i, :len(e.labels)] = torch.tensor(e.labels)
            mask[i, :len(e.input_ids)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return collate


class _ListDataset:
    """A map-style dataset over examples (what the Trainer's sampler indexes)."""

    def __init__(self, examples: Sequence[Example]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def check_enough_data(n_examples: int, *, steps: int, batch_size: int, max_epochs: float, what: str,
                      steps_flag: str = "--adapt-steps") -> None:
    """Refuse a run that would pass over the training data more than ``max_epochs`` times.

    Raises:
        AdaptationError: naming the counts and the largest step count that fits.
    """
    need = steps * batch_size
    if n_examples == 0 or need > n_examples * max_epochs:
        fits = int(n_examples * max_epochs // batch_size)
        raise AdaptationError(
            f"{what}: {n_examples} training sequences are too few for {steps} steps of {batch_size} "
            f"({need / max(n_examples, 1):.0f} passes over the data, more than max_epochs={max_epochs:g})",
            hint=(f"lower {steps_flag} to at most {fits}" if fits >= 1 else "lower --adapt-seq-len") +
                 " or add documents / questions")


def train(model: Any, examples: Sequence[Example], *, steps: int, batch_size: int, lr: float, seed: int,
          pad_id: int, teacher: Any = None, kd_alpha: float = 0.5, kd_temperature: float = 2.0,
          device: str | None = None, threads: int | None = 2, label: str = "adapt") -> TrainStats:
    """Train ``model``'s trainable parameters (the LoRA adapters) for ``steps`` optimizer steps.

    Args:
        model: a PEFT model (or any causal LM whose trainable parameters are the ones to train), float32.
        examples: the training sequences (cycled in seeded random order; ``steps * batch_size`` may exceed them).
        steps / batch_size / lr / seed: the run.
        pad_id: token id used to pad a batch (masked out of attention and loss).
        teacher: a causal LM sharing the tokenizer: distillation loss (:func:`.distill.kd_loss`) instead of
            the next-token loss alone. Kept frozen, on the same device.
        device: ``cuda`` / ``cpu`` (default: :func:`pick_device`).
        threads: torch CPU threads while training.
        label: names the run in progress and logs.

    Returns:
        :class:`TrainStats` (per-step losses, tokens, seconds, device).

    Raises:
        KeyboardInterrupt: passed through (nothing is written by this function).
    """
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from fieldpack.builder.progress import report

    device = pick_device(device)
    use_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    stats = TrainStats(steps=0, tokens=0, seconds=0.0, device=device)
    keep_logits = accepts_logits_to_keep(model) and (teacher is None or accepts_logits_to_keep(teacher))
    state: dict[str, float] = {"tokens": 0, "t0": 0.0}

    class AdaptTrainer(Trainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            labels = inputs["labels"]
            fwd = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
            pos = target_positions(labels) if keep_logits else None
            if pos is not None:  # logits only where a target is (the answer of a RAFT example)
                fwd["logits_to_keep"] = pos
            out = model(**fwd)
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(**fwd).logits
            alpha = kd_alpha if teacher is not None else 0.0
            if pos is None:
                loss = kd_loss(out.logits, t_logits, labels, alpha=alpha, temperature=kd_temperature)
            else:
                loss = kd_loss_aligned(out.logits, t_logits, labels[:, 1:][:, pos], alpha=alpha,
                                       temperature=kd_temperature)
            state["tokens"] += int(inputs["attention_mask"].sum())
            stats.losses.append(float(loss.detach()))
            return (loss, out) if return_outputs else loss

    class Progress(TrainerCallback):
        def on_train_begin(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            state["t0"] = time.perf_counter()

        def on_step_end(self, args: Any, st: Any, control: Any, **kw: Any) -> None:
            dt = time.perf_counter() - state["t0"]
            tps = state["tokens"] / dt if dt > 0 else 0.0
            loss = stats.losses[-1] if stats.losses else float("nan")
            report(st.global_step, steps, f"steps, loss {loss:.3f}, {tps:,.0f} tok/s")
            if st.global_step == 1 or st.global_step % max(1, steps // 10) == 0 or st.global_step == steps:
                log.info("%s step %d/%d loss %.4f %.0f tok/s (%s)", label, st.global_step, steps, loss, tps, device)

    with torch_threads(threads if device == "cpu" else None), tempfile.TemporaryDirectory(prefix="fp-adapt-") as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
            learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, int(WARMUP_SHARE * steps)),
            weight_decay=0.0, optim="adamw_torch", seed=seed, data_seed=seed, save_strategy="no",
            eval_strategy="no", logging_strategy="no", report_to=[], disable_tqdm=True,
            dataloader_num_workers=0, dataloader_drop_last=len(examples) >= batch_size, remove_unused_columns=False, use_cpu=device == "cpu", bf16=use_bf16,
            max_grad_norm=1.0, log_level="warning")
        if teacher is not None:
            teacher.to(args.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        trainer = AdaptTrainer(model=model, args=args, train_dataset=_ListDataset(examples),
                               data_collator=_collate(pad_id), callbacks=[Progress()])
        trainer.remove_callback(PrinterCallback)  # it prints the run's summary dict to stdout
        t0 = time.perf_counter()
        trainer.train()
        stats.seconds = time.perf_counter() - t0
    stats.steps, stats.tokens = len(stats.losses), int(state["tokens"])
    model.eval()
    log.info("%s: %d steps, %d tokens in %.1f s (%.0f tok/s, %s), loss %.4f -> %.4f", label, stats.steps,
             stats.tokens, stats.seconds, stats.tokens_per_s, device, stats.mean_loss(True), stats.mean_loss(False))
    return stats


@dataclass(frozen=True)
class EvalFigures:
    """Held-out figures of one model: perplexity, mean KL divergence from a reference (nats/token; None without
    one) and the number of predicted tokens."""

    ppl: float
    kld: float | None
    tokens: int


def evaluate(model: Any, blocks: Sequence[Example], *, reference: Any = None, device: str | None = None,
             threads: int | None = 2, label: str = "held-out PPL") -> EvalFigures:
    """Perplexity of ``model`` on ``blocks`` (one block at a time) and, with ``reference``, the mean
    ``KL(reference || model)`` per predicted token.

    Args:
        reference: a causal LM, or the string ``"base"`` for a PEFT model's own base (adapters disabled).
        label: what the progress bar calls this pass (:func:`fieldpack.builder.progress.report_evaluation`, one
            report a block: ``3/19 held-out blocks: <label>``), so a long evaluation is seen and an interrupt names
            it.
    """
    import torch
    import torch.nn.functional as F

    from fieldpack.builder.progress import report_evaluation

    report_evaluation(0, len(blocks), label)
    device = pick_device(device)
    nll = kl = 0.0
    n = 0
    with torch_threads(threads if device == "cpu" else None), torch.no_grad():
        model.to(device).eval()
        if reference is not None and reference != "base":
            reference.to(device).eval()
        for done, b in enumerate(blocks):
            ids = torch.tensor([b.input_ids], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = ids[0, 1:]
            nll += float(F.cross_entropy(logits, target, reduction="sum"))
            if reference is not None:
                if reference == "base":
                    with model.disable_adapter():
                        ref = model(input_ids=ids).logits[0, :-1].float()
                else:
                    ref = reference(input_ids=ids).logits[0, :-1, :logits.shape[-1]].float()
                lp, lq = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
                kl += float((lp.exp() * (lp - lq)).sum())
            n += int(target.numel())
            report_evaluation(done + 1, len(blocks), label)
    if n == 0:
        raise AdaptationError("no held-out tokens to evaluate", hint="add documents")
    return EvalFigures(ppl=math.exp(nll / n), kld=kl / n if reference is not None else None, tokens=n)
