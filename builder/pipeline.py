"""The build: checkpoint (or GGUF file) + documents -> signed ``.fpk``, as a chain of cached stages.

::

    check inputs ─▶ stages (builder.stages: embedder, ingest, index, smoke question, convert, parity,
        eval split, [compress], quantize, quality; a GGUF input: read GGUF, eval split, [quantize], quality;
        each reused from the build cache when its inputs are unchanged) ─▶ manifest (builder.manifest_build,
        from the stage records) ─▶ signed bundle (temp, fsync, rename)

Every input is checked before any heavy work starts (model folder, docs folder, quant type, signing key,
output path), so a bad option fails in a second with one line, and no partial bundle is ever left behind.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fieldpack.builder.config import BuildConfig
from fieldpack.builder.manifest_build import RUNTIME_OVERHEAD_BYTES, builder_version
from fieldpack.builder.quiet import quiet_third_party
from fieldpack.builder.stages.cache import StageHook, StageTiming
from fieldpack.builder.stages.docs import choose_smoke_question
from fieldpack.builder.stages.quant import eval_window, split_eval
from fieldpack.builder.prompt_plan import PromptPlan, check_real_prompt, gguf_token_counter, plan_prompt, plan_prompt_for_gguf
from fieldpack.shared.errors import (
    InputNotFoundError,
    NoDocumentsError,
    OutputNotWritableError,
    UnknownQuantTypeError,
)
from fieldpack.shared.manifest import Manifest
from fieldpack.shared.signing import load_private_key

__all__ = ["RUNTIME_OVERHEAD_BYTES", "BuildResult", "StageTiming", "build_bundle", "builder_version",
           "check_inputs", "choose_smoke_question", "eval_window", "quiet_third_party", "split_eval"]

log = logging.getLogger(__name__)

@dataclass
class BuildResult:
    """What a build produced: the bundle path, its manifest, per-stage seconds, and the ingest report."""

    bundle: Path
    manifest: Manifest
    stages: list[StageTiming] = field(default_factory=list)
    ingest_report: list[dict[str, Any]] = field(default_factory=list)
    records: Any = None  # builder.stages.orchestrator.BuildRecords: every stage's record (cached flags included)


def check_inputs(cfg: BuildConfig) -> tuple[Path, PromptPlan]:
    """Fail fast on every user input before heavy work. Returns the local model folder (or GGUF file) and the
    prompt format the device will use (decided from the chat template and ``cfg.prompt_format``).

    Raises:
        InputNotFoundError: model or docs folder missing.
        UnknownQuantTypeError: ``cfg.quant`` is not a supported tensor type mix.
        ModelLoadError, UnsupportedArchitectureError, CompressionConfigError: a GGUF input that is damaged,
            that llama.cpp cannot load, or given with compression options.
        SigningKeyError: the key is missing or not an ed25519 private key.
        OutputNotWritableError: the output's folder is missing or not writable.
        UsageError: a hub id given while offline; a malformed ``SOURCE_DATE_EPOCH``.
        ChatTemplateError: the prompt format cannot be decided (fix: ``--prompt-format``).
        UnsupportedTokenizerError: ``--trim-vocab`` with a tokenizer the trimmer cannot keep exact (WordPiece,
            Unigram, SentencePiece without byte fallback).
        AdaptationError: bad ``--adapt`` options, QA file or teacher (:func:`check_adaptation`).
    """
    from fieldpack.builder.convert import hub_or_local
    from fieldpack.builder.gguf_input import is_gguf_path
    from fieldpack.builder.quantize import QUANT_TYPES

    from fieldpack.builder.manifest_build import build_time

    build_time()  # a malformed SOURCE_DATE_EPOCH is refused before any work, not at the manifest
    gguf_input = is_gguf_path(cfg.model)
    if cfg.quant.upper() not in QUANT_TYPES and not gguf_input:  # a GGUF input's own type is checked below
        raise UnknownQuantTypeError(f"unknown --quant {cfg.quant!r}",
                                    hint=f"use one of {', '.join(sorted(QUANT_TYPES))}")
    from fieldpack.builder.quantize import tensor_type

    tensor_type(cfg.embd_type, option="--embd-type")
    tensor_type(cfg.output_type, option="--output-type")
    check_docs_folder(cfg.docs, cfg.exclude)
    load_private_key(cfg.sign)
    out_dir = cfg.output.parent
    if not out_dir.is_dir():
        raise OutputNotWritableError(f"output folder {out_dir} does not exist", hint="create it or choose another -o path")
    try:
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as exc:
        raise OutputNotWritableError(f"cannot write in {out_dir}: {exc.strerror}", hint="choose a writable -o path") from exc
    if cfg.adapt:
        check_adaptation(cfg, gguf_input=gguf_input)
    if gguf_input:  # --- GGUF input (builder/gguf_input.py) ---
        from fieldpack.builder.gguf_input import check_gguf_build

        path = check_gguf_build(Path(cfg.model), requested_quant(cfg), compression=bool(cfg.compression))
        if cfg.trim_vocab:
            from fieldpack.builder.trim.gguf_trim import read_gguf_vocab
            from fieldpack.builder.trim.vocab import check_trimmable

            gv = read_gguf_vocab(path)
            check_trimmable(gv.model, gv.types, source=str(path))
        if (cfg.embd_type or cfg.output_type) and requested_quant(cfg) is None:
            from fieldpack.shared.errors import UsageError

            raise UsageError(f"--embd-type/--output-type need a re-quantization of {path.name}",
                             hint="add --quant (e.g. --quant Q4_K_M), or leave them out to ship the file as is")
        return path, plan_prompt_for_gguf(path, cfg.prompt_format)
    model_dir = hub_or_local(cfg.model)
    vocab = preflight_model(model_dir)
    if cfg.trim_vocab:
        from fieldpack.builder.trim.vocab import check_trimmable

        check_trimmable(vocab.model, vocab.token_types, source=str(model_dir))

    def text(tid: int | None) -> str:
        return vocab.tokens[tid] if tid is not None and 0 <= tid < len(vocab.tokens) else ""

    plan = plan_prompt(vocab.chat_template, cfg.prompt_format, bos_token=text(vocab.bos_id),
                       eos_token=text(vocab.eos_id), origin=f"model {model_dir}")
    return model_dir, plan


def check_adaptation(cfg: BuildConfig, *, gguf_input: bool = False) -> None:
    """Cheap checks of ``cfg.adapt`` before any heavy work: the options, the QA file (every line's fields, every
    source a document under ``--docs``), the teacher's tokenizer against the student's, and the question
    teacher (``--qa-teacher``: a GGUF file, or an endpoint that answers and serves the model).

    Raises:
        AdaptationError: naming the input and the fix.
    """
    from fieldpack.builder.adapt import parse_adapt_options
    from fieldpack.builder.adapt.data import read_qa_file
    from fieldpack.builder.adapt.distill import check_same_tokenizer
    from fieldpack.shared.errors import AdaptationOptionError

    opts = parse_adapt_options(cfg.adapt)
    if gguf_input:
        raise AdaptationOptionError(
            f"--adapt / --distill-from train a Hugging Face checkpoint, and {cfg.model} is a GGUF",
            hint="pass --model the checkpoint folder the GGUF was made from")
    if opts.qa_train is not None:
        read_qa_file(opts.qa_train, cfg.docs)
    if opts.qa_teacher is not None:
        from fieldpack.builder.adapt.teacher import check_qa_teacher

        check_qa_teacher(opts.qa_teacher, opts.qa_teacher_model)
    if opts.teacher is not None:
        if not Path(opts.teacher).is_dir():
            raise AdaptationOptionError(f"--distill-from {opts.teacher} is not a folder",
                                        hint="give a local Hugging Face checkpoint folder of the teacher")
        if Path(cfg.model).is_dir():
            check_same_tokenizer(Path(cfg.model), Path(opts.teacher))


def requested_quant(cfg: BuildConfig) -> str | None:
    """The quant type the user asked for (``--quant`` or a recipe), None when the default applies."""
    return cfg.quant if "quant" in cfg.model_fields_set else None


def check_docs_folder(docs: Path, exclude: Sequence[str] = ()) -> None:
    """Cheap look before heavy work: the folder exists and holds at least one non-empty file of a supported
    type that no ``exclude`` pattern (``--exclude``) leaves out. (Ingest still reports per file what it indexed
    or skipped and why.)

    Raises:
        InputNotFoundError: not a folder.  NoDocumentsError: no candidate file.
    """
    from fieldpack.builder.ingest.exclude import Excludes
    from fieldpack.builder.ingest.pipeline import FORMATS

    if not docs.is_dir():
        raise InputNotFoundError(f"docs folder {docs} does not exist", hint="pass --docs a folder of documents")
    excludes = Excludes.parse(exclude)
    seen = excluded = 0
    for p in docs.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            seen += 1
            if p.suffix.lower() in FORMATS and p.stat().st_size > 0:
                if excludes.match(p.relative_to(docs).as_posix()) is None:
                    return
                excluded += 1
    if excluded:
        raise NoDocumentsError(f"--exclude leaves nothing to index in {docs} (it matches all {excluded} "
                               "documents there)", hint="narrow the --exclude patterns")
    raise NoDocumentsError(
        f"docs folder {docs} has nothing indexable ({seen} files, none a non-empty "
        f"{'/'.join(sorted(FORMATS))} file)", hint="put Markdown, text, HTML, PDF or CSV documents in it")


def preflight_model(model_dir: Path) -> Any:
    """Read the checkpoint's config and tokenizer (no weights) so an unsupported architecture or tokenizer is
    refused in a second, before any export or training-time work. Returns the tokenizer as GGUF will store it
    (``builder.convert.tokenizer.Vocab``).

    Raises:
        InputNotFoundError, ModelLoadError, UnsupportedArchitectureError, UnsupportedTokenizerError.
    """
    from fieldpack.builder.convert.arch import read_hparams
    from fieldpack.builder.convert.checkpoint import Checkpoint
    from fieldpack.builder.convert.tokenizer import read_vocab

    ckpt = Checkpoint(model_dir)
    hp = read_hparams(ckpt.config, ckpt.architecture, source=str(ckpt.model_dir))
    return read_vocab(ckpt.model_dir, hp.n_vocab, ckpt.config)


def build_bundle(cfg: BuildConfig, *, workdir: Path | None = None, on_stage: StageHook | None = None,
                 keep_workdir: bool = False, cache_dir: Path | None = None, use_cache: bool = True) -> BuildResult:
    """Run every stage (reusing cached results) and write the signed bundle to ``cfg.output``.

    Args:
        cfg: the build configuration (also saved as the recipe).
        workdir: scratch folder (default: a temp folder beside the output, removed afterwards).
        on_stage: progress hook called with (stage, "start" | "done" | "cached").
        cache_dir: the build cache (default :func:`~fieldpack.builder.stages.cache.default_cache_dir`).
        use_cache: False: nothing is reused or kept; every stage runs inside ``workdir``.

    Raises:
        Any BuildError subclass from a stage (ParityError, QuantizationError, NoDocumentsError, ...), UsageError
        and SigningKeyError from :func:`check_inputs`, OutputNotWritableError when writing. Nothing is left at
        ``cfg.output`` on failure.
    """
    from fieldpack.builder.stages.cache import Runner, StageCache, default_cache_dir

    quiet_third_party(heavy=False)  # stages that import torch/transformers quiet them when they run
    runner = Runner(None, on_stage)
    with runner.step("check inputs"):
        model_dir, prompt = check_inputs(cfg)
    own_work = workdir is None
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=".fieldpack-build-", dir=cfg.output.parent))
    work.mkdir(parents=True, exist_ok=True)
    try:
        runner.cache = StageCache(Path(cache_dir) if cache_dir and use_cache else
                                  default_cache_dir() if use_cache else work / "stages")
        return _build(cfg, model_dir, prompt, work, runner)
    finally:
        if own_work and not keep_workdir:
            shutil.rmtree(work, ignore_errors=True)


def _build(cfg: BuildConfig, model_dir: Path, prompt: PromptPlan, work: Path, runner: Any) -> BuildResult:
    from fieldpack.builder.ingest import report_to_dict
    from fieldpack.builder.manifest_build import assemble_manifest, bundle_files
    from fieldpack.builder.stages.orchestrator import run_stages
    from fieldpack.shared.bundle import write_bundle

    records = run_stages(cfg, model_dir, runner, prompt)
    with runner.step("real prompt"):
        _check_real_prompt(cfg, model_dir, prompt, records)
    with runner.step("bundle"):
        recipe_path = work / "recipe.toml"
        recipe_path.write_text(cfg.recipe_toml(), encoding="utf-8")
        files = bundle_files(records, recipe_path)
        manifest = assemble_manifest(cfg, records, files, prompt)
        write_bundle(cfg.output, manifest, files, cfg.sign)
    return BuildResult(bundle=cfg.output, manifest=manifest, stages=runner.timings, records=records,
                       ingest_report=[report_to_dict(r) for r in records.ingest.report])


def _check_real_prompt(cfg: BuildConfig, model_dir: Path, prompt: PromptPlan, records: Any) -> int:
    """Render the device's real prompt for the smoke question over its real hits (not cached: it is cheap and
    depends on the template), so a template that breaks on real content fails the build, not the first ``ask``.

    Raises:
        ChatTemplateError: the template fails. BuildError: not even one source fits n_ctx - max_tokens.
    """
    from fieldpack.builder.gguf_input import is_gguf_path
    from fieldpack.builder.stages.quant import model_token_counter
    from fieldpack.retrieval.embedder import OnnxEmbedder
    from fieldpack.retrieval.search import Retriever

    e = records.embedder.export
    embedder = OnnxEmbedder(e.onnx_path, e.tokenizer_path, max_tokens=e.max_tokens)
    try:
        retriever = Retriever(records.index.stats.path, embedder)
        try:
            hits = retriever.search(records.smoke.question, k=cfg.top_k_chunks)
        finally:
            retriever.close()
    finally:
        embedder.close()
    if is_gguf_path(model_dir):
        count = gguf_token_counter(model_dir)
    else:
        tok = model_dir / "tokenizer.json"
        count = model_token_counter(tok if tok.is_file() else None)
    return check_real_prompt(prompt, records.smoke.question, hits, count_tokens=count,
                             budget_tokens=cfg.n_ctx - cfg.max_tokens)

