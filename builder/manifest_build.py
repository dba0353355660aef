"""The manifest, assembled from the stage records of one build (no model, index or embedder is opened here).

``assemble_manifest(cfg, records, files)`` -> :class:`~fieldpack.shared.manifest.Manifest`: members (size,
sha256) of ``files``, the shipped model's facts (after pruning, when it ran), embedder and index facts, runtime
defaults with the memory estimate (bytes), the smoke question, the recipe and the quality figures.

For a GGUF input (:mod:`~fieldpack.builder.stages.gguf`) the parity figures say ``not applicable, GGUF input``,
and the quantization figures name the input's type and sha256 and whether it was re-quantized (then with
PPL/KLD against the input) or shipped as is (then with its PPL).
"""

from __future__ import annotations

import dataclasses
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from fieldpack.builder.gguf_input import PARITY_NOT_APPLICABLE
from fieldpack.builder.stages.orchestrator import BuildRecords
from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.bundle import describe_members
from fieldpack.shared.kv_cache import kv_cache_bytes
from fieldpack.shared.manifest import (
    AdapterInfo,
    EmbedderInfo,
    IndexInfo,
    Manifest,
    MemoryNeeds,
    ModelInfo,
    Quality,
    RuntimeDefaults,
    SmokeTest,
)

#: Fixed runtime overhead on the device besides weights/KV/embedder/index (bytes): Python, llama.cpp compute
#: buffers at n_batch=512, ONNX Runtime arenas. An estimate, recorded as such in the manifest.
RUNTIME_OVERHEAD_BYTES = 96 * 1024 * 1024


#: The environment variable that fixes a build's recorded time (https://reproducible-builds.org/specs/source-date-epoch/).
SOURCE_DATE_EPOCH = "SOURCE_DATE_EPOCH"


def build_time(environ: Mapping[str, str] | None = None) -> datetime:
    """The manifest's ``created_at`` (UTC, whole seconds): ``SOURCE_DATE_EPOCH`` (seconds since 1970-01-01 UTC, a
    non-negative decimal integer, per the reproducible-builds.org specification) when set, else now. With it set,
    two builds from the same inputs, options, input paths and output path write the same ``.fpk`` bytes (the
    archive has fixed member times, and ed25519 signatures are deterministic), provided that stages which record
    measured seconds in the manifest (LoRA adaptation, embedder adaptation, GPTQ/AWQ calibration) come from the
    same build cache; a plain build has none.

    Raises:
        UsageError: ``SOURCE_DATE_EPOCH`` is set but not such an integer (or beyond year 9999).
    """
    import os

    raw = (os.environ if environ is None else environ).get(SOURCE_DATE_EPOCH)
    if raw is None or raw == "":
        return datetime.now(timezone.utc).replace(microsecond=0)
    from fieldpack.shared.errors import UsageError

    try:
        if not re.fullmatch(r"[0-9]+", raw):  # ASCII digits only, as `date +%s` prints (str.isdigit takes more)
            raise ValueError(raw)
        return datetime.fromtimestamp(int(raw), tz=timezone.utc)
    except (ValueError, OverflowError, OSError) as exc:
        raise UsageError(f"{SOURCE_DATE_EPOCH}={raw!r} is not a time in whole seconds since 1970-01-01 UTC",
                         hint=f"set it to a non-negative integer, e.g. {SOURCE_DATE_EPOCH}=$(git log -1 --format=%ct), "
                              "or unset it") from exc


def builder_version() -> str:
    """fieldpack's installed version (package metadata), recorded in the manifest."""
    from importlib.metadata import version

    return version("fieldpack")


def bundle_files(records: BuildRecords, recipe_path: Path) -> dict[str, Path]:
    """Bundle member name -> file: the quantized model, the embedder and its tokenizer, the index, the recipe, and
    with ``--ship-adapter`` the LoRA adapter GGUF."""
    e = records.embedder.export
    files = {
        fmt.MODEL_NAME: records.shipped_model().path,
        fmt.EMBEDDER_NAME: e.onnx_path,
        fmt.EMBEDDER_TOKENIZER_NAME: e.tokenizer_path,
        fmt.INDEX_NAME: records.index.stats.path,
        fmt.RECIPE_NAME: recipe_path,
    }
    adapter = records.shipped_adapter()
    if adapter is not None:  # --ship-adapter
        files[fmt.ADAPTER_NAME] = adapter.path
    return files


def assemble_manifest(cfg: Any, records: BuildRecords, files: Mapping[str, Path], prompt: Any = None) -> Manifest:
    """The manifest of a bundle holding ``files``, from the build config (:class:`BuildConfig`), the stage records
    and the prompt plan decided at check-inputs (:class:`~fieldpack.builder.prompt_plan.PromptPlan`; None: chat)."""
    from fieldpack.retrieval.search import DEFAULT_MIN_SIMILARITY

    f16 = records.convert.conversion
    shipped = dataclasses.replace(f16, **records.compress.shape) if records.compress else f16
    quant = records.quantize.quant if records.quantize else None
    emb = records.embedder.export
    idx = records.index.stats
    qtype = cfg.quant.upper()
    n_ctx = min(cfg.n_ctx, f16.n_ctx_train)
    adapter = adapter_info(records)
    # with an adapter llama-cpp-python reads the whole model into anonymous memory (mmap off): both files count
    shipped_bytes = records.shipped_model().path.stat().st_size + (adapter.size_bytes if adapter else 0)
    mem = dict(weights_bytes=shipped_bytes,
               kv_cache_bytes=kv_cache_bytes(n_ctx, n_layer=shipped.n_layer, n_head_kv=shipped.n_head_kv,
                                             head_dim=shipped.head_dim or shipped.n_embd // shipped.n_head),
               embedder_bytes=2 * emb.size_bytes, index_bytes=idx.size_bytes, overhead_bytes=RUNTIME_OVERHEAD_BYTES)
    mem["total_bytes"] = sum(mem.values())
    return Manifest(
        format_version=fmt.ADAPTER_FORMAT_VERSION if adapter is not None else fmt.FORMAT_VERSION,
        adapter=adapter,
        name=cfg.name,
        version=cfg.version,
        builder_version=builder_version(),
        created_at=build_time(),
        members=describe_members(files),
        model=ModelInfo(
            architecture=shipped.architecture, parameter_count=shipped.parameter_count, file_type=qtype,
            tensor_types=quant.tensor_types if quant else f16.tensor_types, n_ctx_train=shipped.n_ctx_train,
            n_embd=shipped.n_embd, n_layer=shipped.n_layer, n_head=shipped.n_head, n_head_kv=shipped.n_head_kv,
            vocab_size=records.trim.vocab_size if records.trim else shipped.vocab_size,
            chat_template_present=bool(f16.chat_template), bos_id=f16.bos_id, eos_id=f16.eos_id,
            eot_id=f16.eot_id, tokenizer_model=f16.tokenizer_model, tokenizer_pre=f16.tokenizer_pre,
            source=Path(cfg.model).name or cfg.model),
        embedder=EmbedderInfo(name=emb.name, dimension=emb.dimension, pooling=emb.pooling,
                              normalized=emb.normalized, max_tokens=emb.max_tokens, precision=emb.precision),
        index=IndexInfo(documents=idx.documents, chunks=idx.chunks, metric="cosine",
                        chunk_tokens=cfg.chunk_tokens, overlap_tokens=cfg.overlap_tokens,
                        skipped_files=records.ingest.skipped_files),
        runtime=RuntimeDefaults(n_ctx=n_ctx, max_tokens=cfg.max_tokens, temperature=0.0,
                                top_k_chunks=cfg.top_k_chunks,
                                stop=[*f16.stop_strings, *(s for s in (prompt.extra_stop if prompt else ())
                                                            if s not in f16.stop_strings)],
                                **({"prompt_format": prompt.prompt_format,
                                    "completion_template": prompt.completion_template} if prompt else {}),
                                min_similarity=cfg.min_similarity if cfg.min_similarity is not None
                                else DEFAULT_MIN_SIMILARITY,
                                memory=MemoryNeeds(**mem)),
        smoke=SmokeTest(question=records.smoke.question, expected_source=records.smoke.expected_source,
                        k=records.smoke.k),
        recipe=cfg.to_recipe(),
        quality=Quality(
            parity=as_dict(records.parity.report) if records.parity else {"status": PARITY_NOT_APPLICABLE},
            quantization=quantization_figures(records, qtype),
            embedder=_embedder_quality(records),
            stages=(records.compress.rows if records.compress else []) + ([records.trim.row] if records.trim else [])
            + (records.quantize.rows if records.quantize is not None else []),
            adaptation=adaptation_rows(records),
        ),
    )


def adapter_info(records: BuildRecords) -> AdapterInfo | None:
    """``manifest.adapter`` for a ``--ship-adapter`` build (the adapt stage's adapter and the adapter check's
    figures), else None."""
    check, adapt = records.adapter_check, records.adapt
    if check is None or adapt is None or adapt.adapter_info is None:
        return None
    a = adapt.adapter_info
    return AdapterInfo(member=fmt.ADAPTER_NAME, method=str(adapt.row.get("method", "lora")), rank=a["rank"],
                       alpha=a["alpha"], scale=1.0, tensors=a["tensors"], size_bytes=a["size_bytes"],
                       check_kld_mean=round(check.kld_mean, 9), check_top1_agreement=check.top1_agreement)


def adaptation_rows(records: BuildRecords) -> list[dict[str, Any]]:
    """``manifest.quality.adaptation``: the adapt stage's row and the heal row of compress, in build order."""
    rows = [records.adapt.row] if records.adapt is not None else []
    if records.compress is not None and records.compress.heal:
        rows.append(records.compress.heal)
    return rows


def _embedder_quality(records: BuildRecords) -> dict[str, Any]:
    """``manifest.quality.embedder``: the int8 gate (when tried), the ONNX parity and, with
    ``--adapt-embedder``, ``adaptation``: the domain-adaptation gate (MRR@10 base vs adapted on held-out
    pseudo-queries, kept or not, training size and seconds)."""
    emb = records.embedder.export
    out = (dict(as_dict(emb.gate), precision=emb.precision, kept_int8=emb.kept_int8,
                parity_min_cosine=emb.parity_min_cosine, fp32_bytes=emb.fp32_bytes, int8_bytes=emb.int8_bytes)
           if emb.gate is not None else dict(precision=emb.precision, parity_min_cosine=emb.parity_min_cosine))
    if records.embedder_adapt is not None:
        r = records.embedder_adapt.result.to_dict()
        r.pop("model_dir", None)
        out["adaptation"] = r
    return out


def quantization_figures(records: BuildRecords, qtype: str) -> dict[str, Any]:
    """``manifest.quality.quantization``: the quality stage's figures, the shipped type and size (bytes), and
    the held-out chunks and PPL window (tokens) they were measured on. From a HF checkpoint: PPL/KLD vs the
    F16/F32 conversion, ``ratio_to_f16`` and the fallback count. From a GGUF input: its type and sha256, and
    either ``requantized`` with PPL/KLD vs the input and ``ratio_to_input``, or kept as is with its ``ppl``."""
    src, quant, fig = records.convert.conversion, records.quantize, records.quality
    gguf = records.gguf_input
    if gguf is None:
        assert quant is not None  # a checkpoint build always quantizes
        q = quant.quant
        measured = as_dict(fig.figures) if fig.figures is not None else {"note": fig.note}
        if records.adapter_check is not None:  # --ship-adapter: what the device runs against what was trained
            measured["reference"] = "merged adapted model (F16/F32); measured: quantized base + LoRA adapter"
        return dict(measured, qtype=qtype, **embd_output_types(q), size_bytes=q.size_bytes,
                    ratio_to_f16=q.size_bytes / max(1, src.size_bytes), fallbacks=len(q.fallbacks),
                    held_out_chunks=records.split.held_out_chunks, window_tokens=records.split.n_ctx_eval)
    out: dict[str, Any] = dict(source_file_type=gguf.file_type, source_sha256=src.sha256,
                               held_out_chunks=records.split.held_out_chunks, window_tokens=records.split.n_ctx_eval)
    if quant is None:
        out.update(qtype=qtype, requantized=False, ppl=fig.ppl, size_bytes=records.shipped_model().path.stat().st_size)
        if fig.note:
            out["note"] = fig.note
    else:
        q = quant.quant
        out.update(as_dict(fig.figures) if fig.figures is not None else {"note": fig.note}, qtype=qtype,
                   requantized=True, requantized_from=gguf.file_type, **embd_output_types(q),
                   reference="input GGUF" + (" (already quantized: figures are vs it, not vs F16)"
                                             if gguf.quantized else ""),
                   size_bytes=q.size_bytes, ratio_to_input=q.size_bytes / max(1, src.size_bytes),
                   fallbacks=len(q.fallbacks))
    return out


def embd_output_types(q: Any) -> dict[str, Any]:
    """The GGML types written for ``token_embd.weight`` and ``output.weight`` of a :class:`QuantResult` ("tied":
    no output tensor, token_embd is the output projection), and whether they were chosen (``--embd-type`` /
    ``--output-type``) or left to the mix."""
    return dict(token_embd_type=q.embd_type, output_type=q.output_type or "tied",
                embd_output_chosen=bool(q.embd_type_requested or q.output_type_requested))


def as_dict(obj: Any) -> dict[str, Any]:
    """Flatten a result dataclass into JSON-ready scalars (paths -> str, NaN -> None, lists kept)."""
    if obj is None:
        return {}
    d = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, float) and math.isnan(v):  # NaN is not JSON
            v = None
        out[k] = v
    return out
