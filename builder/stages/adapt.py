"""The ``adapt`` stage: LoRA continued pretraining (DAPT), RAFT fine-tuning and/or distillation of the checkpoint
(:mod:`fieldpack.builder.adapt`), merged into float32 weights, before our converter and the parity gate.

It runs after ``eval split`` and trains on the calibration chunks only (the held-out chunks that ``quality``
measures stay untouched); its record's checkpoint replaces the source checkpoint for ``convert``, ``parity``,
``compress`` and ``quality`` (the adapted F16/F32 GGUF is the quantization reference)::

    convert (source) ─▶ eval split ─▶ adapt ─▶ convert (adapted) ─▶ parity ─▶ [compress] ─▶ quantize ─▶ quality

Paths (``qa_train``, ``teacher``, a GGUF ``qa_teacher``) enter the key by content hash, never by name; an
endpoint ``qa_teacher`` enters as its URL and the model it serves (resolved when the key is made). With a
question teacher the stage first writes the teacher's pairs to ``teacher_qa.jsonl`` in its own output folder
(atomically), then trains on them: a cached stage replays the same pairs; a fresh run against a remote teacher
may get others (an endpoint is not deterministic).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fieldpack.builder.stages.base import Input, Stage, StageInputs, StageRecord, hash_tree

ADAPTED_NAME = "adapted"
ADAPTER_NAME = "adapter.gguf"
TEACHER_QA_NAME = "teacher_qa.jsonl"
_PATH_OPTIONS = ("qa_train", "teacher", "qa_teacher", "qa_teacher_model")


class AdaptInputs(StageInputs):
    checkpoint: Input
    split: Input
    options: dict[str, Any]  # AdaptOptions without the path options (those are the Inputs below)
    seed: int
    chunks: Input | None = None  # RAFT: the ingest chunks (oracle and distractors)
    qa_train: Input | None = None
    teacher: Input | None = None
    qa_teacher: Input | None = None  # --qa-teacher GGUF (by content hash)
    qa_endpoint: dict[str, str] | None = None  # --qa-teacher endpoint: {"url", "model"}
    prompt: dict[str, Any] | None = None  # RAFT: the PromptPlan fields (the bundle's own prompt)
    raft_k: int = 4
    stop_id: int | None = None  # RAFT: the token that ends an answer
    export_adapter: bool = False  # --ship-adapter: also write the unmerged LoRA as a llama.cpp adapter GGUF

    @classmethod
    def from_config(cls, options: dict[str, Any], *, checkpoint: Input, split: Input, seed: int,
                    **extra: Any) -> "AdaptInputs":
        """Inputs from ``BuildConfig.adapt``: path options hashed as Inputs, the rest kept as options."""
        plain = {k: v for k, v in options.items() if k not in _PATH_OPTIONS}
        from fieldpack.builder.adapt.teacher import is_endpoint, resolve_endpoint_model

        qa = options.get("qa_train")
        teacher = options.get("teacher")
        qa_teacher = options.get("qa_teacher")
        endpoint = None
        if qa_teacher and is_endpoint(qa_teacher):
            url = str(qa_teacher).rstrip("/")
            endpoint = {"url": url, "model": resolve_endpoint_model(url, options.get("qa_teacher_model"))}
        return cls(checkpoint=checkpoint, split=split, options=plain, seed=seed,
                   qa_train=Input.file(Path(qa)) if qa else None,
                   teacher=Input.tree(Path(teacher)) if teacher else None,
                   qa_teacher=Input.file(Path(qa_teacher)) if qa_teacher and endpoint is None else None,
                   qa_endpoint=endpoint, **extra)


class AdaptRecord(StageRecord):
    """``checkpoint``: the adapted HF folder; ``row``: the quality-report row (:meth:`AdaptReport.row`);
    ``adapter`` (with ``export_adapter``): the unmerged LoRA as a llama.cpp adapter GGUF, and ``adapter_info`` its
    rank, alpha, tensor count and size in bytes."""

    checkpoint: Path
    row: dict[str, Any]
    adapter: Path | None = None
    adapter_info: dict[str, Any] | None = None

    def adapter_input(self) -> Input:
        """The adapter GGUF as a downstream input. Raises BuildError when the stage wrote none."""
        if self.adapter is None:
            from fieldpack.shared.errors import BuildError

            raise BuildError("the adapt stage wrote no LoRA adapter", hint="report this as a bug")
        return self.input_for(self.adapter)

    def checkpoint_input(self) -> Input:
        """The adapted checkpoint as a downstream input (hashed like any checkpoint folder)."""
        return Input(path=self.checkpoint, sha256=hash_tree(self.checkpoint))


def run_adapt(inputs: AdaptInputs, out_dir: Path) -> AdaptRecord:
    """Adapt, merge and write the checkpoint. Raises AdaptationError on bad input (before training)."""
    from fieldpack.builder.adapt import adapt_checkpoint, parse_adapt_options
    from fieldpack.builder.quiet import quiet_third_party
    from fieldpack.builder.stages.quant import load_split

    quiet_third_party()
    ep = inputs.qa_endpoint or {}
    opts = parse_adapt_options({**inputs.options,
                                "qa_train": inputs.qa_train.path if inputs.qa_train else None,
                                "teacher": inputs.teacher.path if inputs.teacher else None,
                                "qa_teacher": str(inputs.qa_teacher.path) if inputs.qa_teacher else ep.get("url"),
                                "qa_teacher_model": ep.get("model")})
    calib, held_out = load_split(inputs.split.path)
    chunks = render = None
    if opts.method == "raft":
        from fieldpack.builder.prompt_plan import PromptPlan
        from fieldpack.builder.stages.docs import _read_chunks

        assert inputs.chunks is not None and inputs.prompt is not None
        chunks = _read_chunks(inputs.chunks.path)
        render = PromptPlan(**inputs.prompt).renderer()
    teacher_qa = qa_sha = None
    if opts.qa_teacher is not None:
        assert chunks is not None
        teacher_qa, qa_sha = _teacher_pairs(opts, chunks, calib, held_out, out_dir / TEACHER_QA_NAME,
                                            seed=inputs.seed)
        teacher_qa.gguf_sha256 = inputs.qa_teacher.sha256 if inputs.qa_teacher else None
    out, rep = adapt_checkpoint(inputs.checkpoint.path, out_dir / ADAPTED_NAME, opts, train_texts=calib,
                                held_out_texts=held_out, seed=inputs.seed, chunks=chunks, render=render,
                                raft_k=inputs.raft_k, stop_id=inputs.stop_id, teacher_qa=teacher_qa,
                                teacher_qa_sha256=qa_sha,
                                adapter_path=out_dir / ADAPTER_NAME if inputs.export_adapter else None)
    ad = rep.adapter
    return AdaptRecord(checkpoint=out, row=rep.row(), adapter=ad.path if ad is not None else None,
                       adapter_info=dict(rank=ad.rank, alpha=ad.alpha, tensors=ad.tensors, size_bytes=ad.size_bytes)
                       if ad is not None else None)


def calibration_chunks(chunks: list[Any], calib: list[str], held_out: list[str]) -> list[Any]:
    """The chunks whose text is a calibration text and no held-out one (what a teacher may read)."""
    cal, held = set(calib), set(held_out)
    return [c for c in chunks if c.text in cal and c.text not in held]


def _teacher_pairs(opts: Any, chunks: list[Any], calib: list[str], held_out: list[str], path: Path, *,
                   seed: int) -> tuple[Any, str]:
    """Ask ``opts.qa_teacher`` about the calibration chunks, write the kept pairs to ``path`` (JSONL, atomic).
    Returns ``(TeacherQA, sha256 of the file)``. Raises AdaptationError (unreachable, no usable pair)."""
    import hashlib

    from fieldpack.builder.adapt.data import read_qa_file
    from fieldpack.builder.adapt.teacher import teacher_questions
    from fieldpack.shared.atomic import atomic_write_bytes

    known = [p.question for p in read_qa_file(opts.qa_train)] if opts.qa_train is not None else []
    got = teacher_questions(opts.qa_teacher, calibration_chunks(chunks, calib, held_out),
                            model=opts.qa_teacher_model, per_chunk=opts.qa_per_chunk, max_pairs=opts.qa_max,
                            seed=seed, threads=opts.threads, known_questions=known)
    data = got.to_jsonl().encode("utf-8")
    atomic_write_bytes(path, data)
    return got, hashlib.sha256(data).hexdigest()


ADAPT = Stage("adapt", "1", AdaptRecord, run_adapt, libraries=("torch", "transformers", "peft", "accelerate",
                                                               "tokenizers", "safetensors", "llama_cpp_python"),
              code=("fieldpack.builder.adapt", "fieldpack.builder.compress.structured",
                    "fieldpack.shared.prompt_format"),
              label=lambda i: "adapt " + "+".join(
                  [str(i.options.get("method"))] * bool(i.options.get("method")) + ["kd"] * (i.teacher is not None))
              + (" (questions: --qa-train + --qa-teacher)"
                 if i.qa_train is not None and (i.qa_teacher or i.qa_endpoint) else ""))


# --- adapter check (--ship-adapter) ------------------------------------------------------------------------------
#: Largest mean KL(merged || base + adapter) the adapter check accepts (nats/token). Both sides hold the same
#: weights, rounded differently: the merged GGUF rounds ``W + (alpha/r)·B·A`` to F16 once, the adapter path rounds
#: ``W``, ``A`` and ``B`` to F16 separately and adds the product at run time, so only rounding separates them
#: (measured on the tiny test Llama, F16 both sides: 1.2e-7). 1e-3 is 20x below the trim gate's 0.02 and 5x
#: below what Q4_K_M costs Gemma 3 270M (0.005): an adapter that is merely rounded passes; one that does not belong
#: to the reference, or whose tensors are misnamed, mispermuted or unscaled, fails (the tiny Llama with a LoRA of
#: B ~ N(0, 0.05) measured against its unadapted self: 2.5e-3).
ADAPTER_MAX_KLD = 1e-3
#: Smallest top-1 agreement between the two on the held-out windows.
ADAPTER_MIN_TOP1 = 0.99
#: Held-out windows the check scores (it runs both models once; the quality stage scores the rest).
ADAPTER_CHECK_WINDOWS = 4


class AdapterCheckInputs(StageInputs):
    base: Input  # F16/F32 GGUF of the unadapted checkpoint (what the bundle's model.gguf is quantized from)
    adapter: Input  # the LoRA adapter GGUF
    merged: Input  # F16/F32 GGUF of the merged adapted checkpoint
    split: Input
    n_ctx: int


class AdapterCheckRecord(StageRecord):
    """The adapter check's figures: ``kld_mean`` (nats/token), ``top1_agreement``, ``tokens_scored``."""

    kld_mean: float
    top1_agreement: float
    tokens_scored: int


def run_adapter_check(inputs: AdapterCheckInputs, out_dir: Path) -> AdapterCheckRecord:
    """Score the base GGUF + adapter against the merged GGUF on held-out windows (llama.cpp, both sides).

    Raises:
        ParityError: KLD above :data:`ADAPTER_MAX_KLD` or top-1 agreement below :data:`ADAPTER_MIN_TOP1`; the
            one-line message names the figure and the fix.
    """
    from fieldpack.builder.llama_eval import perplexity_kld
    from fieldpack.builder.stages.quant import load_split
    from fieldpack.shared.errors import ParityError

    _, held_out = load_split(inputs.split.path)
    fig = perplexity_kld(inputs.merged.path, inputs.base.path, held_out, n_ctx=inputs.n_ctx,
                         max_chunks=ADAPTER_CHECK_WINDOWS, test_lora=inputs.adapter.path)
    if fig.kld_mean > ADAPTER_MAX_KLD or fig.top1_agreement < ADAPTER_MIN_TOP1:
        raise ParityError(f"adapter check failed: base + LoRA adapter differs from the merged model (KLD "
                          f"{fig.kld_mean:.3g} nats/token, limit {ADAPTER_MAX_KLD:g}; top-1 {fig.top1_agreement:.3f}, "
                          f"limit {ADAPTER_MIN_TOP1})",
                          hint="build without --ship-adapter (the merged model ships) and report this as a bug")
    return AdapterCheckRecord(kld_mean=fig.kld_mean, top1_agreement=fig.top1_agreement,
                              tokens_scored=fig.tokens_scored)


ADAPTER_CHECK = Stage("adapter-check", "1", AdapterCheckRecord, run_adapter_check,
                      libraries=("llama_cpp_python", "gguf", "numpy"),
                      code=("fieldpack.builder.llama_eval", "fieldpack.builder.stages.adapt"),
                      label=lambda _: "adapter check")
