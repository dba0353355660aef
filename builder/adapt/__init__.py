"""Making the model domain-specific: LoRA continued pretraining on the documents (DAPT), RAFT fine-tuning on
questions with their sources, logit distillation from a teacher, and healing a pruned model by distillation
from the unpruned one (Minitron: Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation").

::

    checkpoint ─▶ LoRA adapters (lora.py, PEFT) ─▶ train (train.py, transformers Trainer / accelerate)
                     data (data.py): DAPT blocks of the calibration chunks | RAFT examples from --qa-train
                     and/or --qa-teacher questions (teacher.py: a GGUF or an OpenAI-compatible endpoint)
                     loss: next-token, or KD mixed with it (distill.py) given a teacher / the unpruned model
                ─▶ held-out PPL/KLD before and after (train.evaluate) ─▶ merge into float32 weights
                ─▶ a plain HF checkpoint folder (written atomically) for our converter and parity gate

Options: :mod:`.options` (``BuildConfig.adapt``); heal: ``heal = "kd"``, ``heal_steps`` in ``compression``.
torch, transformers and peft are imported lazily.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fieldpack.builder.adapt.options import AdaptOptions, parse_adapt_options
from fieldpack.shared.errors import AdaptationError

log = logging.getLogger(__name__)

__all__ = ["AdaptOptions", "AdaptReport", "adapt_checkpoint", "adapt_model", "heal_pruned", "parse_adapt_options"]

#: Written next to an adapted checkpoint: options, report and data hashes.
PROVENANCE_NAME = "fieldpack_adaptation.json"


@dataclass
class AdaptReport:
    """One adaptation run, as the quality report shows it (one row).

    Attributes:
        method: ``dapt``, ``raft``, ``kd``, ``dapt+kd``, ``heal-kd``.
        steps / tokens / seconds / tokens_per_s / device: the training run (tokens: input tokens, no padding).
        loss_first / loss_last: mean loss of the first / last tenth of the steps (nats per labelled token).
        ppl_before / ppl_after: held-out perplexity before and after.
        kld_after: mean KL(unadapted || adapted) on the held-out tokens (nats/token): how far the model moved.
        teacher_ppl / teacher_kld_before / teacher_kld_after: with a teacher, its PPL and KL(teacher || student).
        eval_tokens / train_sequences / n_abstain: counts (RAFT: examples without oracle).
        train_sha256 / held_out_sha256 / qa_sha256: what was trained and measured on (qa: every RAFT pair).
        qa_train_pairs: pairs from ``--qa-train``; qa_teacher: the question teacher (:func:`.teacher.teacher_label`);
        qa_teacher_sha256: sha256 of the JSONL of its kept pairs (in the adapt stage's cache);
        qa_teacher_gguf_sha256: a local GGUF teacher's file digest;
        qa_teacher_chunks / qa_teacher_kept / qa_teacher_dropped: chunks asked, pairs kept, pairs dropped;
        qa_teacher_dropped_why: ``"2 malformed, 1 duplicate"``.
        adapter: the unmerged LoRA written as a llama.cpp adapter GGUF (:class:`.lora_gguf.LoraGGUF`), or None.
    """

    method: str
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    device: str
    loss_first: float
    loss_last: float
    ppl_before: float
    ppl_after: float
    kld_after: float | None
    eval_tokens: int
    train_sequences: int
    train_sha256: str
    held_out_sha256: str
    qa_sha256: str | None = None
    n_abstain: int | None = None
    teacher: str | None = None
    teacher_ppl: float | None = None
    teacher_kld_before: float | None = None
    teacher_kld_after: float | None = None
    qa_train_pairs: int | None = None
    qa_teacher: str | None = None
    qa_teacher_sha256: str | None = None
    qa_teacher_gguf_sha256: str | None = None
    qa_teacher_chunks: int | None = None
    qa_teacher_kept: int | None = None
    qa_teacher_dropped: int | None = None
    qa_teacher_dropped_why: str | None = None
    adapter: Any = field(default=None, repr=False, compare=False)  # LoraGGUF when the adapter was exported

    @property
    def recovered(self) -> float | None:
        """Heal: share of the PPL lost to pruning that training won back, ``(before - after) / (before - teacher)``."""
        if self.teacher_ppl is None or not self.ppl_before > self.teacher_ppl:
            return None
        return (self.ppl_before - self.ppl_after) / (self.ppl_before - self.teacher_ppl)

    def row(self) -> dict[str, Any]:
        """Flat JSON-ready dict for ``manifest.quality.adaptation`` (floats rounded, None dropped)."""
        d = asdict(self)
        d.pop("adapter", None)  # the file itself is the adapt stage's record, not a quality figure
        d["ppl_ratio"] = self.ppl_after / self.ppl_before
        if self.recovered is not None:
            d["recovered"] = self.recovered
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v)
                for k, v in d.items() if v is not None}


def _load(model_dir: Path) -> tuple[Any, Any]:
    """(float32 causal LM, tokenizer) of a checkpoint folder. Raises AdaptationError naming it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise AdaptationError(f"cannot load {model_dir} for adaptation: {exc}",
                              hint="pass a local Hugging Face checkpoint folder") from exc
    return model.eval(), tok


def load_teacher(student_dir: Path, teacher_dir: Path) -> Any:
    """The teacher checkpoint (float32, frozen) after checking it shares the student's tokenizer.

    Raises:
        AdaptationError: missing folder, another tokenizer (named), or a checkpoint that does not load.
    """
    from fieldpack.builder.adapt.distill import check_same_tokenizer

    if not Path(teacher_dir).is_dir():
        raise AdaptationError(f"--distill-from {teacher_dir} is not a folder",
                              hint="give a local Hugging Face checkpoint folder of the teacher")
    check_same_tokenizer(Path(student_dir), Path(teacher_dir))
    return _load(Path(teacher_dir))[0]


def adapt_model(model: Any, tokenizer: Any, examples: Sequence[Any], held_out: Sequence[Any], opts: AdaptOptions, *,
                seed: int, method: str, train_sha256: str, held_out_sha256: str, teacher_model: Any = None,
                device: str | None = None, adapter_out: tuple[Path, Path] | None = None,
                **report_extra: Any) -> tuple[Any, AdaptReport]:
    """Attach LoRA to ``model``, train it on ``examples``, measure on ``held_out`` blocks, merge.

    Args:
        model: float32 causal LM (Llama, Qwen2 or Gemma 3 layout).
        tokenizer: its tokenizer (pad id).
        examples: training :class:`~.data.Example` sequences; held_out: evaluation blocks.
        opts: steps, batch size, learning rate, LoRA rank, KD weights, threads.
        teacher_model: a frozen causal LM sharing the tokenizer (KD), or None.
        report_extra: fields of :class:`AdaptReport` known to the caller (qa_sha256, n_abstain, teacher name).
        adapter_out: ``(base checkpoint folder, adapter .gguf path)``: also write the trained LoRA, unmerged, as a
            llama.cpp adapter GGUF (F16, :func:`.lora_gguf.export_lora_gguf`) before merging; its
            :class:`~.lora_gguf.LoraGGUF` goes into ``report.adapter``.

    Returns:
        ``(merged model, report)``; the merged model has no PEFT layers.

    Raises:
        AdaptationError: an architecture without LoRA targets; too little data for the steps.
    """
    from transformers import set_seed

    from fieldpack.builder.adapt.lora import attach_lora, merge_lora
    from fieldpack.builder.adapt.train import check_enough_data, evaluate, pick_device, train

    teacher = teacher_model
    check_enough_data(len(examples), steps=opts.steps, batch_size=opts.batch_size, max_epochs=opts.max_epochs,
                      what=method, steps_flag="--heal-steps" if method == "heal-kd" else "--adapt-steps")
    device = pick_device(device)
    set_seed(seed)
    peft_model = attach_lora(model, r=opts.lora_r, alpha=opts.alpha)
    ev = dict(device=device, threads=opts.threads)
    before = evaluate(peft_model, held_out, reference=teacher,  # adapters start at B = 0: the base model
                      label="PPL before training" + (" (and KLD from the teacher)" if teacher is not None else ""),
                      **ev)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    stats = train(peft_model, examples, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, seed=seed,
                  pad_id=pad, teacher=teacher, kd_alpha=opts.kd_alpha, kd_temperature=opts.kd_temperature,
                  device=device, threads=opts.threads, label=method)
    after = evaluate(peft_model, held_out, reference="base", label="PPL and KLD after training", **ev)
    t_after = evaluate(peft_model, held_out, reference=teacher, label="KLD from the teacher after training",
                       **ev) if teacher is not None else None
    t_ppl = evaluate(teacher, held_out, label="the teacher's PPL", **ev).ppl if teacher is not None else None
    adapter = None
    if adapter_out is not None:
        from fieldpack.builder.adapt.lora_gguf import export_lora_gguf

        adapter = export_lora_gguf(peft_model, adapter_out[0], adapter_out[1], outtype="f16")
    merged = merge_lora(peft_model).to("cpu")
    rep = AdaptReport(method=method, steps=stats.steps, tokens=stats.tokens, seconds=stats.seconds,
                      tokens_per_s=stats.tokens_per_s, device=device, loss_first=stats.mean_loss(True),
                      loss_last=stats.mean_loss(False), ppl_before=before.ppl, ppl_after=after.ppl,
                      kld_after=after.kld, eval_tokens=after.tokens, train_sequences=len(examples),
                      train_sha256=train_sha256, held_out_sha256=held_out_sha256, teacher_ppl=t_ppl,
                      teacher_kld_before=before.kld if teacher is not None else None,
                      teacher_kld_after=t_after.kld if t_after is not None else None, adapter=adapter,
                      **report_extra)
    log.info("%s: held-out PPL %.3f -> %.3f (%d steps, %d tokens, %.0f s)", method, rep.ppl_before, rep.ppl_after,
             rep.steps, rep.tokens, rep.seconds)
    return merged, rep


def adapt_checkpoint(model_dir: Path, out_dir: Path, opts: AdaptOptions, *, train_texts: Sequence[str],
                     held_out_texts: Sequence[str], seed: int = 0, chunks: Sequence[Any] | None = None,
                     render: Callable[[str, list[Any], list[Any]], str] | None = None, raft_k: int = 4,
                     stop_id: int | None = None, device: str | None = None, teacher_qa: Any = None,
                     teacher_qa_sha256: str | None = None,
                     adapter_path: Path | None = None) -> tuple[Path, AdaptReport]:
    """Adapt a checkpoint folder as ``opts`` says and write the merged float32 checkpoint to ``out_dir``.

    Args:
        model_dir: the Hugging Face checkpoint.
        out_dir: the adapted checkpoint folder to write (atomically: temp folder, fsync, rename).
        opts: validated options (method ``dapt`` / ``raft``, and/or a ``teacher`` to distil from).
        train_texts: the calibration chunk texts (DAPT blocks); held_out_texts: the held-out chunk texts.
        chunks: the build's chunks (RAFT oracle and distractors); render: the bundle's prompt renderer (RAFT);
        raft_k: sources per RAFT prompt (``opts.raft_k`` wins when set); stop_id: the token ending an answer
        (RAFT; default the tokenizer's EOS).
        teacher_qa: RAFT pairs a teacher wrote (:class:`.teacher.TeacherQA`, from ``--qa-teacher``), used with
        the ``--qa-train`` pairs when both are given; teacher_qa_sha256: the sha256 of their JSONL file.
        adapter_path: also write the LoRA, unmerged, as a llama.cpp adapter GGUF here (``report.adapter``).

    Returns:
        ``(out_dir, report)``.

    Raises:
        AdaptationError: bad QA file or source, tokenizer mismatch, unsupported architecture, too little data.
        OutputNotWritableError: ``out_dir`` cannot be written.
    """
    from fieldpack.builder.adapt import data
    from fieldpack.builder.compress.structured import save_checkpoint

    model_dir = Path(model_dir)
    teacher = load_teacher(model_dir, opts.teacher) if opts.teacher is not None else None
    model, tok = _load(model_dir)
    extra: dict[str, Any] = {"teacher": Path(opts.teacher).name if opts.teacher else None}
    if opts.method == "raft":
        if chunks is None or render is None or (opts.qa_train is None and teacher_qa is None):
            raise AdaptationError("RAFT needs the document chunks, the prompt renderer and --qa-train or "
                                  "--qa-teacher questions",
                                  hint="run it through `fieldpack build --adapt raft --qa-train FILE`")
        pairs = data.read_qa_file(opts.qa_train) if opts.qa_train is not None else []
        if opts.qa_train is not None:
            extra["qa_train_pairs"] = len(pairs)
        if teacher_qa is not None:
            log.info("RAFT questions: %d from --qa-train, %d from --qa-teacher %s", len(pairs), teacher_qa.kept,
                     teacher_qa.teacher)
            pairs = pairs + list(teacher_qa.pairs)
            extra.update(qa_teacher=teacher_qa.teacher, qa_teacher_sha256=teacher_qa_sha256,
                         qa_teacher_gguf_sha256=teacher_qa.gguf_sha256,
                         qa_teacher_chunks=teacher_qa.chunks_asked, qa_teacher_kept=teacher_qa.kept,
                         qa_teacher_dropped=teacher_qa.n_dropped,
                         qa_teacher_dropped_why=", ".join(f"{n} {k}" for k, n in teacher_qa.dropped.items()) or None)
        examples, n_abstain = data.raft_examples(
            pairs, chunks, render, tok, stop_id=stop_id if stop_id is not None else tok.eos_token_id,
            k=opts.raft_k or raft_k, abstain_share=opts.raft_abstain, seed=seed, max_len=2 * opts.seq_len,
            hard=opts.raft_hard, paired=opts.raft_paired)
        extra.update(qa_sha256=data.texts_sha256([f"{p.question}\0{p.answer}\0{p.source}" for p in pairs]),
                     n_abstain=n_abstain)
        train_hash = data.texts_sha256([p.question for p in pairs])
    else:
        examples = data.token_blocks(train_texts, tok, opts.seq_len, eos_id=tok.eos_token_id)
        train_hash = data.texts_sha256(train_texts)
    held = data.eval_blocks(held_out_texts, tok, opts.seq_len)
    merged, rep = adapt_model(model, tok, examples, held, opts, seed=seed, method=opts.label, teacher_model=teacher,
                              train_sha256=train_hash, held_out_sha256=data.texts_sha256(held_out_texts),
                              device=device, adapter_out=(model_dir, Path(adapter_path)) if adapter_path else None,
                              **extra)
    import torch

    save_checkpoint(merged, model_dir, Path(out_dir),
                    provenance={"options": opts.to_dict(), "report": rep.row()}, dtype=torch.float32,
                    provenance_name=PROVENANCE_NAME)
    return Path(out_dir), rep


def heal_pruned(model: Any, teacher_dir: Path, train_texts: Sequence[str], held_out_texts: Sequence[str], *,
                steps: int, seq_len: int, seed: int = 0, device: str | None = None,
                **options: Any) -> tuple[Any, AdaptReport]:
    """Heal a structurally pruned model by distillation from the unpruned checkpoint (Minitron): LoRA on the
    pruned model, loss = KD only (``kd_alpha`` 1: the teacher's softened logits carry more signal than the
    one-hot next token; Muralidharan et al. 2024 found logit-only distillation best), on DAPT blocks of
    ``train_texts``; PPL/KLD on ``held_out_texts`` before and after, and the teacher's PPL, so the report gives
    the share of the pruning loss recovered (:attr:`AdaptReport.recovered`).

    Args:
        model: the pruned float32 causal LM (its tokenizer is the teacher's).
        teacher_dir: the unpruned checkpoint folder.
        options: further :class:`AdaptOptions` fields (``lr``, ``lora_r``, ``batch_size``, ``threads``...).

    Returns:
        ``(healed model with the adapters merged, report)``.
    """
    from fieldpack.builder.adapt import data

    teacher, tok = _load(Path(teacher_dir))
    opts = AdaptOptions(teacher=Path(teacher_dir), steps=steps, seq_len=seq_len,
                        **{"kd_alpha": 1.0, "kd_temperature": 1.0, "lr": 5e-4, **options})
    examples = data.token_blocks(train_texts, tok, seq_len, eos_id=tok.eos_token_id)
    held = data.eval_blocks(held_out_texts, tok, seq_len)
    healed, rep = adapt_model(model, tok, examples, held, opts, seed=seed, method="heal-kd", teacher_model=teacher,
                              train_sha256=data.texts_sha256(train_texts),
                              held_out_sha256=data.texts_sha256(held_out_texts), device=device,
                              teacher=Path(teacher_dir).name)
    return healed, rep
