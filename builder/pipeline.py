"""The build orchestrator: checkpoint + documents -> signed ``.fpk``.

Stages hand files to each other inside one work folder, each returning a small record::

    check inputs ─▶ embedder (ONNX export + int8 gate) ─▶ ingest (chunks) ─▶ index (embed + sqlite-vec/FTS5)
        ─▶ convert (HF -> GGUF f16) ─▶ parity gate ─▶ [compress] ─▶ quantize ─▶ PPL/KLD on held-out chunks
        ─▶ smoke question ─▶ manifest + signature ─▶ bundle (temp file, fsync, rename)

Every input is checked before any heavy work starts (model folder, docs folder, quant type, signing key,
output path), so a bad option fails in a second with one line, and no partial bundle is ever left behind.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fieldpack.builder.config import BuildConfig
from fieldpack.builder.prompt_plan import (
    PromptPlan,
    check_real_prompt,
    gguf_token_counter,
    plan_prompt,
    plan_prompt_for_gguf,
)
from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.bundle import describe_members, hash_file, write_bundle
from fieldpack.shared.kv_cache import kv_cache_bytes
from fieldpack.shared.errors import (
    BuildError,
    InputNotFoundError,
    NoDocumentsError,
    OutputNotWritableError,
    UnknownQuantTypeError,
)
from fieldpack.shared.manifest import (
    EmbedderInfo,
    IndexInfo,
    Manifest,
    MemoryNeeds,
    ModelInfo,
    Quality,
    RuntimeDefaults,
    SmokeTest,
)
from fieldpack.shared.signing import load_private_key

log = logging.getLogger(__name__)

#: Fixed runtime overhead on the device besides weights/KV/embedder/index (bytes): Python, llama.cpp compute
#: buffers at n_batch=512, ONNX Runtime arenas. An estimate, recorded as such in the manifest.
RUNTIME_OVERHEAD_BYTES = 96 * 1024 * 1024

StageHook = Callable[[str, str], None]  # (stage name, event "start"/"done") for progress display


@dataclass
class StageTiming:
    name: str
    seconds: float


@dataclass
class BuildResult:
    """What a build produced: the bundle path, its manifest, per-stage seconds, and the ingest report."""

    bundle: Path
    manifest: Manifest
    stages: list[StageTiming] = field(default_factory=list)
    ingest_report: list[dict[str, Any]] = field(default_factory=list)


def builder_version() -> str:
    """fieldpack's installed version (package metadata), recorded in the manifest."""
    from importlib.metadata import version

    return version("fieldpack")


def quiet_third_party() -> None:
    """Silence libraries' progress bars and advisory warnings (transformers weight loading, the torch ONNX
    exporter's optional-op notes, onnxruntime's quantization pre-processing advice); our stages report progress."""
    import os
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:  # torch configures its own loggers on import, so import it first, then lower them
        import torch._logging

        torch._logging.set_logs(onnx=logging.ERROR)
    except (ImportError, AttributeError, ValueError):
        pass
    for name in ("torch.onnx", "torch._dynamo", "onnxscript", "onnx_ir", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"torch\.onnx.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # transformers is a builder dependency; absent only in broken installs
        pass

    class _DropOrtAdvice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    for h in logging.getLogger().handlers:
        h.addFilter(_DropOrtAdvice())


def check_inputs(cfg: BuildConfig) -> tuple[Path, PromptPlan]:
    """Fail fast on every user input before heavy work. Returns the local model folder (or GGUF file) and the
    prompt format the device will use (decided from the chat template and ``cfg.prompt_format``).

    Raises:
        InputNotFoundError: model or docs folder missing.
        UnknownQuantTypeError: ``cfg.quant`` is not a supported tensor type mix.
        SigningKeyError: the key is missing or not an ed25519 private key.
        OutputNotWritableError: the output's folder is missing or not writable.
        UsageError: a hub id given while offline.
        ChatTemplateError: the prompt format cannot be decided (fix: ``--prompt-format``).
    """
    from fieldpack.builder.convert import hub_or_local
    from fieldpack.builder.gguf_input import is_gguf_path
    from fieldpack.builder.quantize import QUANT_TYPES

    gguf_input = is_gguf_path(cfg.model)
    if cfg.quant.upper() not in QUANT_TYPES and not gguf_input:  # a GGUF input's own type is checked below
        raise UnknownQuantTypeError(f"unknown --quant {cfg.quant!r}",
                                    hint=f"use one of {', '.join(sorted(QUANT_TYPES))}")
    check_docs_folder(cfg.docs)
    load_private_key(cfg.sign)
    out_dir = cfg.output.parent
    if not out_dir.is_dir():
        raise OutputNotWritableError(f"output folder {out_dir} does not exist", hint="create it or choose another -o path")
    try:
        tempfile.TemporaryFile(dir=out_dir).close()
    except OSError as exc:
        raise OutputNotWritableError(f"cannot write in {out_dir}: {exc.strerror}", hint="choose a writable -o path") from exc
    if gguf_input:  # --- GGUF input (builder/gguf_input.py) ---
        from fieldpack.builder.gguf_input import check_gguf_build

        path = check_gguf_build(Path(cfg.model), requested_quant(cfg), compression=bool(cfg.compression))
        return path, plan_prompt_for_gguf(path, cfg.prompt_format)
    model_dir = hub_or_local(cfg.model)
    vocab = preflight_model(model_dir)

    def text(tid: int | None) -> str:
        return vocab.tokens[tid] if tid is not None and 0 <= tid < len(vocab.tokens) else ""

    plan = plan_prompt(vocab.chat_template, cfg.prompt_format, bos_token=text(vocab.bos_id),
                       eos_token=text(vocab.eos_id), origin=f"model {model_dir}")
    return model_dir, plan


def requested_quant(cfg: BuildConfig) -> str | None:
    """The quant type the user asked for (``--quant`` or a recipe), None when the default applies."""
    return cfg.quant if "quant" in cfg.model_fields_set else None


def check_docs_folder(docs: Path) -> None:
    """Cheap look before heavy work: the folder exists and holds at least one non-empty file of a supported
    type. (Ingest still reports per file what it indexed or skipped and why.)

    Raises:
        InputNotFoundError: not a folder.  NoDocumentsError: no candidate file.
    """
    from fieldpack.builder.ingest.pipeline import FORMATS

    if not docs.is_dir():
        raise InputNotFoundError(f"docs folder {docs} does not exist", hint="pass --docs a folder of documents")
    seen = 0
    for p in docs.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            seen += 1
            if p.suffix.lower() in FORMATS and p.stat().st_size > 0:
                return
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


def split_eval(texts: list[str], fraction: float, max_chunks: int, seed: int, *,
               count_tokens: Callable[[str], int] = lambda t: max(1, len(t) // 4),
               min_tokens: int = 0) -> tuple[list[str], list[str]]:
    """Split chunk texts into (calibration, evaluation), fixed by ``seed``.

    The evaluation split takes ``fraction`` of the chunks (at most ``max_chunks``, at least 1), then grows, in the
    same seeded order, until it holds ``min_tokens`` model tokens or half of all chunks, so small document sets
    still give a few perplexity windows.
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_eval = min(max_chunks, max(1, round(len(texts) * fraction)))
    tokens = sum(count_tokens(texts[i]) for i in order[:n_eval])
    while tokens < min_tokens and n_eval < len(texts) // 2:
        tokens += count_tokens(texts[order[n_eval]])
        n_eval += 1
    eval_idx = set(order[:n_eval])
    return ([t for i, t in enumerate(texts) if i not in eval_idx], [t for i, t in enumerate(texts) if i in eval_idx])


def eval_window(held_out_tokens: int, n_ctx_train: int, *, preferred: int = 256, min_windows: int = 4) -> int:
    """Perplexity window (even, tokens): ``preferred`` if the held-out text gives ``min_windows`` of it, else the
    largest even length that does (never below 32, never above n_ctx_train)."""
    n = min(preferred, n_ctx_train, held_out_tokens // min_windows)
    return max(32, n - n % 2)


def choose_smoke_question(chunks: list[Any], search: Callable[[str, int], list[str]], k: int = 5) -> tuple[str, str]:
    """Pick a smoke question for the device's post-install check: a section title (or the chunk's first
    sentence) whose own document comes back in the top ``k``. Returns (question, expected source)."""
    candidates: list[tuple[str, str]] = []
    for c in chunks:
        title = c.section.split(" > ")[-1].strip() if c.section else ""
        if len(title.split()) >= 2:
            candidates.append((title, c.source))
    for c in chunks:
        first = c.text.strip().split(". ")[0][:200]
        if len(first.split()) >= 4:
            candidates.append((first, c.source))
    for question, source in candidates[:200]:
        if source in search(question, k):
            return question, source
    raise BuildError("no smoke question retrieves its own document from the index",
                     hint="check the documents: they may be near-duplicates or too short")


def build_bundle(cfg: BuildConfig, *, workdir: Path | None = None, on_stage: StageHook | None = None,
                 keep_workdir: bool = False) -> BuildResult:
    """Run every stage and write the signed bundle to ``cfg.output``.

    Args:
        cfg: the build configuration (also saved as the recipe).
        workdir: scratch folder (default: a temp folder beside the output, removed afterwards).
        on_stage: progress hook called with (stage, "start"|"done").

    Raises:
        Any BuildError subclass from a stage (ParityError, QuantizationError, NoDocumentsError, ...), UsageError
        and SigningKeyError from :func:`check_inputs`, OutputNotWritableError when writing. Nothing is left at
        ``cfg.output`` on failure.
    """
    timings: list[StageTiming] = []
    quiet_third_party()

    def stage(name: str):
        class _S:
            def __enter__(self_inner):
                self_inner.t = time.perf_counter()
                if on_stage:
                    on_stage(name, "start")
                log.info("stage %s", name)

            def __exit__(self_inner, et, ev, tb):
                timings.append(StageTiming(name, time.perf_counter() - self_inner.t))
                if on_stage and et is None:
                    on_stage(name, "done")
                return False

        return _S()

    with stage("check inputs"):
        model_dir, prompt = check_inputs(cfg)
    own_work = workdir is None
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=".fieldpack-build-", dir=cfg.output.parent))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = _run(cfg, model_dir, prompt, work, stage)
        result.stages = timings
        return result
    finally:
        if own_work and not keep_workdir:
            shutil.rmtree(work, ignore_errors=True)


def _run(cfg: BuildConfig, model_dir: Path, prompt: PromptPlan, work: Path, stage: Callable[[str], Any]) -> BuildResult:
    from fieldpack.builder.embedder_export import export_embedder
    from fieldpack.builder.gguf_input import is_gguf_path
    from fieldpack.builder.index_build import build_index, embed_chunks
    from fieldpack.builder.ingest import ingest, report_to_dict
    from fieldpack.retrieval.embedder import OnnxEmbedder
    from fieldpack.retrieval.search import DEFAULT_MIN_SIMILARITY, Retriever

    count_model_tokens = (gguf_token_counter(model_dir) if is_gguf_path(model_dir)
                          else _model_token_counter(model_dir))
    with stage("embedder"):
        emb = export_embedder(cfg.embedder, work / "embedder", int8=cfg.embedder_int8)
        embedder = OnnxEmbedder(emb.onnx_path, emb.tokenizer_path, max_tokens=emb.max_tokens)
    try:
        with stage("ingest"):
            ing = ingest(cfg.docs, count_tokens=embedder.count_tokens, chunk_tokens=cfg.chunk_tokens,
                         overlap_tokens=cfg.overlap_tokens)
        with stage("index"):
            vectors = embed_chunks(ing.chunks, embedder)
            index_path = work / "index.sqlite"
            idx = build_index(ing.chunks, vectors, index_path, embedder_name=emb.name)
        with stage("smoke question"):
            retriever = Retriever(index_path, embedder)
            try:
                smoke_q, smoke_src = choose_smoke_question(
                    ing.chunks, lambda q, k: [h.source for h in retriever.search(q, k=k)])
                # the device's real prompt for the smoke question renders (a failing template stops the build)
                check_real_prompt(prompt, smoke_q, retriever.search(smoke_q, k=cfg.top_k_chunks),
                                  count_tokens=count_model_tokens, budget_tokens=cfg.n_ctx - cfg.max_tokens)
            finally:
                retriever.close()
    finally:
        embedder.close()

    if is_gguf_path(model_dir):  # --- GGUF input (builder/gguf_input.py): no conversion, no parity gate ---
        ms = _gguf_model_stages(cfg, model_dir, [c.text for c in ing.chunks], work, stage)
    else:
        ms = _hf_model_stages(cfg, model_dir, [c.text for c in ing.chunks], work, stage)
    f16, shipped, quant_path, qtype = ms.source, ms.shipped, ms.model_path, ms.file_type
    if ms.recipe_quant != cfg.quant:  # a GGUF kept as is: the recipe replays as "keep"
        cfg = cfg.model_copy(update={"quant": ms.recipe_quant})

    with stage("bundle"):
        recipe_path = work / "recipe.toml"
        recipe_path.write_text(cfg.recipe_toml(), encoding="utf-8")
        files = {
            fmt.MODEL_NAME: quant_path,
            fmt.EMBEDDER_NAME: emb.onnx_path,
            fmt.EMBEDDER_TOKENIZER_NAME: emb.tokenizer_path,
            fmt.INDEX_NAME: index_path,
            fmt.RECIPE_NAME: recipe_path,
        }
        n_ctx = min(cfg.n_ctx, f16.n_ctx_train)
        emb_bytes = hash_file(emb.onnx_path)[0]
        mem = dict(weights_bytes=quant_path.stat().st_size,
                   kv_cache_bytes=kv_cache_bytes(n_ctx, n_layer=shipped.n_layer, n_head_kv=shipped.n_head_kv,
                                                 head_dim=shipped.head_dim or shipped.n_embd // shipped.n_head),
                   embedder_bytes=2 * emb_bytes, index_bytes=idx.size_bytes, overhead_bytes=RUNTIME_OVERHEAD_BYTES)
        mem["total_bytes"] = sum(mem.values())
        manifest = Manifest(
            format_version=fmt.FORMAT_VERSION,
            name=cfg.name,
            version=cfg.version,
            builder_version=builder_version(),
            created_at=datetime.now(timezone.utc).replace(microsecond=0),
            members=describe_members(files),
            model=ModelInfo(
                architecture=shipped.architecture, parameter_count=shipped.parameter_count, file_type=qtype,
                tensor_types=ms.tensor_types, n_ctx_train=shipped.n_ctx_train, n_embd=shipped.n_embd,
                n_layer=shipped.n_layer, n_head=shipped.n_head, n_head_kv=shipped.n_head_kv,
                vocab_size=shipped.vocab_size,
                chat_template_present=bool(f16.chat_template), bos_id=f16.bos_id, eos_id=f16.eos_id,
                eot_id=f16.eot_id, tokenizer_model=f16.tokenizer_model, tokenizer_pre=f16.tokenizer_pre,
                source=Path(cfg.model).name or cfg.model),
            embedder=EmbedderInfo(name=emb.name, dimension=emb.dimension, pooling=emb.pooling,
                                  normalized=emb.normalized, max_tokens=emb.max_tokens, precision=emb.precision),
            index=IndexInfo(documents=idx.documents, chunks=idx.chunks, metric="cosine",
                            chunk_tokens=cfg.chunk_tokens, overlap_tokens=cfg.overlap_tokens,
                            skipped_files=sum(1 for r in ing.report if r.status != "indexed")),
            runtime=RuntimeDefaults(n_ctx=n_ctx, max_tokens=cfg.max_tokens, temperature=0.0,
                                    top_k_chunks=cfg.top_k_chunks,
                                    stop=[*f16.stop_strings, *(s for s in prompt.extra_stop if s not in f16.stop_strings)],
                                    prompt_format=prompt.prompt_format,
                                    completion_template=prompt.completion_template,
                                    min_similarity=cfg.min_similarity if cfg.min_similarity is not None
                                    else DEFAULT_MIN_SIMILARITY,
                                    memory=MemoryNeeds(**mem)),
            smoke=SmokeTest(question=smoke_q, expected_source=smoke_src, k=5),
            recipe=cfg.to_recipe(),
            quality=Quality(
                parity=ms.parity,
                quantization=ms.quantization,
                embedder=dict(_as_dict(emb.gate), precision=emb.precision, kept_int8=emb.kept_int8,
                              parity_min_cosine=emb.parity_min_cosine, fp32_bytes=emb.fp32_bytes,
                              int8_bytes=emb.int8_bytes) if emb.gate is not None else
                         dict(precision=emb.precision, parity_min_cosine=emb.parity_min_cosine),
                stages=ms.stages_quality,
            ),
        )
        write_bundle(cfg.output, manifest, files, cfg.sign)
    return BuildResult(bundle=cfg.output, manifest=manifest, ingest_report=[report_to_dict(r) for r in ing.report])


@dataclass
class ModelStages:
    """What the model stages hand to the manifest, whichever the input (HF checkpoint or GGUF).

    Attributes:
        source: facts of the model as converted (HF) or as read (GGUF input).
        shipped: facts of the model that ships (after depth/width pruning; else ``source``).
        model_path: the GGUF that goes into the bundle. file_type: its type name (``"Q4_K_M"``).
        tensor_types: GGML type name -> tensor count of that file.
        parity: the manifest's parity figures. quantization: its quantization figures.
        stages_quality: the compression report rows. recipe_quant: ``quant`` as the recipe must record it.
    """

    source: Any
    shipped: Any
    model_path: Path
    file_type: str
    tensor_types: dict[str, int]
    parity: dict[str, Any]
    quantization: dict[str, Any]
    stages_quality: list[dict[str, Any]] = field(default_factory=list)
    recipe_quant: str = ""


def _hf_model_stages(cfg: BuildConfig, model_dir: Path, texts: list[str], work: Path,
                     stage: Callable[[str], Any]) -> ModelStages:
    """convert -> parity gate -> [compress] -> quantize -> PPL/KLD, for a Hugging Face checkpoint."""
    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.llama_eval import perplexity_kld
    from fieldpack.builder.parity import check_parity
    from fieldpack.builder.quantize import quantize_gguf

    with stage("convert"):
        f16 = convert_hf_to_gguf(model_dir, work / f"model-{cfg.parity_outtype}.gguf", outtype=cfg.parity_outtype)
    with stage("parity"):
        parity = check_parity(model_dir, f16.path)

    count_model_tokens = _model_token_counter(model_dir)
    calib, held_out = split_eval(texts, cfg.eval_fraction, cfg.eval_max_chunks, cfg.seed,
                                 count_tokens=count_model_tokens, min_tokens=4 * 256)
    n_ctx_eval = eval_window(sum(count_model_tokens(t) for t in held_out), f16.n_ctx_train)
    dense = f16.path
    stages_quality: list[dict[str, Any]] = []
    if cfg.compression:
        with stage("compress"):
            from fieldpack.builder.compress import apply_compression  # issue "Compression"

            dense, stages_quality = apply_compression(cfg, model_dir, f16, calib, held_out, work)
    # the manifest describes the model that ships: after depth/width pruning, read its shape from the GGUF
    shipped = shipped_model_facts(f16, dense) if dense != f16.path else f16

    qtype = cfg.quant.upper()
    with stage(f"quantize {qtype}"):
        imatrix = None
        if cfg.compression.get("imatrix"):
            from fieldpack.builder.compress import compute_imatrix

            imatrix = compute_imatrix(dense, calib, work / "imatrix.dat")
        quant = quantize_gguf(dense, work / "model.gguf", qtype, imatrix=imatrix)
    with stage("quality"):
        qfig = perplexity_kld(f16.path, quant.path, held_out, n_ctx=n_ctx_eval)

    return ModelStages(
        source=f16, shipped=shipped, model_path=quant.path, file_type=qtype, tensor_types=quant.tensor_types,
        parity=_as_dict(parity),
        quantization=dict(_as_dict(qfig), qtype=qtype, size_bytes=quant.size_bytes,
                          ratio_to_f16=quant.size_bytes / max(1, f16.size_bytes), fallbacks=len(quant.fallbacks),
                          held_out_chunks=len(held_out), window_tokens=n_ctx_eval),
        stages_quality=stages_quality, recipe_quant=cfg.quant)


def _gguf_model_stages(cfg: BuildConfig, path: Path, texts: list[str], work: Path,
                       stage: Callable[[str], Any]) -> ModelStages:
    """read GGUF -> [re-quantize] -> PPL (and KLD vs the input when re-quantized), for a GGUF input."""
    from fieldpack.builder.gguf_input import PARITY_NOT_APPLICABLE, copy_as_is, inspect_gguf, requantize_requested
    from fieldpack.builder.llama_eval import perplexity, perplexity_kld
    from fieldpack.builder.quantize import quantize_gguf

    with stage("read GGUF"):
        src = inspect_gguf(path, load_check=False)  # validated, llama.cpp load included, by check_inputs
    calib, held_out = split_eval(texts, cfg.eval_fraction, cfg.eval_max_chunks, cfg.seed, min_tokens=4 * 256)
    n_ctx_eval = eval_window(sum(max(1, len(t) // 4) for t in held_out), src.model.n_ctx_train)
    figures: dict[str, Any] = dict(source_file_type=src.file_type, source_sha256=src.model.sha256,
                                   held_out_chunks=len(held_out), window_tokens=n_ctx_eval)
    requested = requested_quant(cfg)
    if requested is not None and requantize_requested(requested, src):
        qtype = requested.upper()
        with stage(f"re-quantize {qtype}"):
            quant = quantize_gguf(path, work / "model.gguf", qtype, allow_requantize=src.quantized)
        with stage("quality"):
            qfig = perplexity_kld(path, quant.path, held_out, n_ctx=n_ctx_eval)
        figures.update(_as_dict(qfig), qtype=qtype, requantized=True, requantized_from=src.file_type,
                       reference="input GGUF" + (" (already quantized: figures are vs it, not vs F16)"
                                                 if src.quantized else ""),
                       size_bytes=quant.size_bytes, ratio_to_input=quant.size_bytes / max(1, src.model.size_bytes),
                       fallbacks=len(quant.fallbacks))
        model_path, ttypes, recipe_quant = quant.path, quant.tensor_types, qtype
    else:
        qtype = src.file_type
        model_path = copy_as_is(path, work / "model.gguf")
        with stage("quality"):
            ppl = perplexity(model_path, held_out, n_ctx=n_ctx_eval)
        figures.update(qtype=qtype, requantized=False, ppl=ppl, size_bytes=src.model.size_bytes)
        ttypes, recipe_quant = src.model.tensor_types, qtype
    return ModelStages(source=src.model, shipped=src.model, model_path=model_path, file_type=qtype,
                       tensor_types=ttypes, parity={"status": PARITY_NOT_APPLICABLE}, quantization=figures,
                       recipe_quant=recipe_quant)


def shipped_model_facts(f16: Any, gguf_path: Path) -> Any:
    """``f16`` (a ConversionResult) with the shape fields re-read from a pruned GGUF: block count, widths, head
    counts and parameter count (sum of tensor elements). Raises BuildError if the file lacks the keys."""
    import dataclasses

    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    arch = f16.architecture

    def field(key: str) -> int:
        f = reader.fields.get(f"{arch}.{key}")
        if f is None:
            raise BuildError(f"pruned model {gguf_path} has no {arch}.{key}", hint="report this as a bug")
        return int(f.parts[f.data[0]][0])

    return dataclasses.replace(
        f16, n_layer=field("block_count"), n_embd=field("embedding_length"), n_head=field("attention.head_count"),
        n_head_kv=field("attention.head_count_kv"), parameter_count=int(sum(int(t.n_elements) for t in reader.tensors)))


def _model_token_counter(model_dir: Path) -> Callable[[str], int]:
    """Count model tokens with the checkpoint's tokenizer.json (fast, no model load); ~4 chars/token otherwise."""
    tok_file = model_dir / "tokenizer.json"
    if tok_file.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_file))
        return lambda text: len(tok.encode(text, add_special_tokens=False).ids)
    return lambda text: max(1, len(text) // 4)


def _as_dict(obj: Any) -> dict[str, Any]:
    """Flatten a result dataclass into JSON-ready scalars (paths -> str, lists kept)."""
    import dataclasses

    if obj is None:
        return {}
    d = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, float) and v != v:  # NaN is not JSON
            v = None
        out[k] = v
    return out
