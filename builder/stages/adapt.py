"""The ``adapt`` stage: LoRA continued pretraining (DAPT), RAFT fine-tuning and/or distillation of the checkpoint
(:mod:`fieldpack.builder.adapt`), merged into float32 weights, before our converter and the parity gate.

It runs after ``eval split`` and trains on the calibration chunks only (the held-out chunks that ``quality``
measures stay untouched); its record's checkpoint replaces the source checkpoint for ``convert``, ``parity``,
``compress`` and ``quality`` (the adapted F16/F32 GGUF is the quantization reference)::

    convert (source) ─▶ eval split ─▶ adapt ─▶ convert (adapted) ─▶ parity ─▶ [compress] ─▶ quantize ─▶ quality

Paths (``qa_train``, ``teacher``) enter the key by content hash, never by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fieldpack.builder.stages.base import Input, Stage, StageInputs, StageRecord, hash_tree

ADAPTED_NAME = "adapted"
_PATH_OPTIONS = ("qa_train", "teacher")


class AdaptInputs(StageInputs):
    checkpoint: Input
    split: Input
    options: dict[str, Any]  # AdaptOptions without the path options (those are the Inputs below)
    seed: int
    chunks: Input | None = None  # RAFT: the ingest chunks (oracle and distractors)
    qa_train: Input | None = None
    teacher: Input | None = None
    prompt: dict[str, Any] | None = None  # RAFT: the PromptPlan fields (the bundle's own prompt)
    raft_k: int = 4
    stop_id: int | None = None  # RAFT: the token that ends an answer

    @classmethod
    def from_config(cls, options: dict[str, Any], *, checkpoint: Input, split: Input, seed: int,
                    **extra: Any) -> "AdaptInputs":
        """Inputs from ``BuildConfig.adapt``: path options hashed as Inputs, the rest kept as options."""
        plain = {k: v for k, v in options.items() if k not in _PATH_OPTIONS}
        qa = options.get("qa_train")
        teacher = options.get("teacher")
        return cls(checkpoint=checkpoint, split=split, options=plain, seed=seed,
                   qa_train=Input.file(Path(qa)) if qa else None,
                   teacher=Input.tree(Path(teacher)) if teacher else None, **extra)


class AdaptRecord(StageRecord):
    """``checkpoint``: the adapted HF folder; ``row``: the quality-report row (:meth:`AdaptReport.row`)."""

    checkpoint: Path
    row: dict[str, Any]

    def checkpoint_input(self) -> Input:
        """The adapted checkpoint as a downstream input (hashed like any checkpoint folder)."""
        return Input(path=self.checkpoint, sha256=hash_tree(self.checkpoint))


def run_adapt(inputs: AdaptInputs, out_dir: Path) -> AdaptRecord:
    """Adapt, merge and write the checkpoint. Raises AdaptationError on bad input (before training)."""
    from fieldpack.builder.adapt import adapt_checkpoint, parse_adapt_options
    from fieldpack.builder.quiet import quiet_third_party
    from fieldpack.builder.stages.quant import load_split

    quiet_third_party()
    opts = parse_adapt_options({**inputs.options,
                                "qa_train": inputs.qa_train.path if inputs.qa_train else None,
                                "teacher": inputs.teacher.path if inputs.teacher else None})
    calib, held_out = load_split(inputs.split.path)
    chunks = render = None
    if opts.method == "raft":
        from fieldpack.builder.prompt_plan import PromptPlan
        from fieldpack.builder.stages.docs import _read_chunks

        assert inputs.chunks is not None and inputs.prompt is not None
        chunks = _read_chunks(inputs.chunks.path)
        render = PromptPlan(**inputs.prompt).renderer()
    out, rep = adapt_checkpoint(inputs.checkpoint.path, out_dir / ADAPTED_NAME, opts, train_texts=calib,
                                held_out_texts=held_out, seed=inputs.seed, chunks=chunks, render=render,
                                raft_k=inputs.raft_k, stop_id=inputs.stop_id)
    return AdaptRecord(checkpoint=out, row=rep.row())


ADAPT = Stage("adapt", "1", AdaptRecord, run_adapt, libraries=("torch", "transformers", "peft", "accelerate",
                                                               "tokenizers", "safetensors"),
              code=("fieldpack.builder.adapt", "fieldpack.builder.compress.structured",
                    "fieldpack.shared.prompt_format"),
              label=lambda i: "adapt " + "+".join(
                  [str(i.options.get("method"))] * bool(i.options.get("method")) + ["kd"] * (i.teacher is not None)))
