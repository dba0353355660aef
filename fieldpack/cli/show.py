"""Readable terminal rendering of manifests and answers (rich). Used by the CLI only."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

from fieldpack.cli.console import console as make_console
from rich.table import Table

from fieldpack.device.types import Answer
from fieldpack.shared.manifest import Manifest


#: GGUF ``tokenizer.ggml.model`` -> the tokenizer family it stands for (llama.cpp's llama-vocab.cpp).
_TOKENIZER_KINDS = {"llama": "SentencePiece", "gpt2": "byte-level BPE", "bert": "WordPiece", "t5": "Unigram",
                    "rwkv": "RWKV", "plamo2": "PLaMo-2"}


def tokenizer_text(model: str, pre: str | None) -> str:
    """``"SentencePiece (GGUF llama)"``, ``"byte-level BPE (GGUF gpt2, pre qwen2)"``: what ``inspect`` shows for
    the GGUF's ``tokenizer.ggml.model`` and ``tokenizer.ggml.pre`` (Gemma 3 is ``llama`` with no ``pre``)."""
    kind = _TOKENIZER_KINDS.get(model)
    details = f"GGUF {model}" + (f", pre {pre}" if pre else "")
    return f"{kind} ({details})" if kind else details


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return f"{len(v)} items" if len(str(v)) > 60 else str(v)
    return str(v)


def quality_figures(fig: dict[str, Any], headline: Any) -> str:
    """One quality row as ``headline(fig)`` (a sentence of its main figures), or, when the row lacks a key the
    headline needs (an older or a GGUF-input build), its scalar figures three ``key=value`` to a line. Every figure
    stays in ``fieldpack inspect --json``."""
    try:
        return str(headline(fig))
    except (KeyError, TypeError, ValueError):
        items = [f"{k}={_fmt(v)}" for k, v in fig.items() if not isinstance(v, (list, dict))]
        return "\n".join(", ".join(items[i:i + 3]) for i in range(0, len(items), 3))


def _parity_line(f: dict[str, Any]) -> str:
    return (f"{'passed' if f['passed'] else 'FAILED'}: top-1 agreement {f['top1_agreement']:.4f}, max |Δlogit| "
            f"{f['max_abs_logit_diff']:.3g} (tolerance {f['tolerance']:g}) over {f['tokens_compared']} tokens, "
            f"tokenization {'identical' if f['tokenization_identical'] else 'DIFFERS'}")


def _quantization_line(f: dict[str, Any]) -> str:
    return (f"{f['qtype']}: PPL {f['ppl_ref']:.2f} -> {f['ppl_test']:.2f} ({f['delta_ppl']:+.2f}), KLD mean "
            f"{f['kld_mean']:.4f} (p99 {f['kld_p99']:.4f}), top-1 agreement {f['top1_agreement']:.3f} over "
            f"{f['tokens_scored']} held-out tokens; {_mib(f['size_bytes'])}, {f['ratio_to_f16']:.2f}x f16")


def _embedder_gate_line(f: dict[str, Any]) -> str:
    kept = "int8 kept" if f["kept_int8"] else "fp32 kept (int8 failed the gate)"
    size = _mib(f["int8_bytes"] if f["kept_int8"] else f["fp32_bytes"])
    return (f"{kept}: mean cosine {f['mean_cosine']:.4f} (min {f['min_cosine']:.4f}), recall@{f['k']} agreement "
            f"{f['recall_at_k']:.2f}; {size} (fp32 {_mib(f['fp32_bytes'])})")


def print_manifest(m: Manifest, *, bundle_size: int, signature: str, console: Console | None = None) -> None:
    """Print the manifest as a few tables: identity, model, embedder/index, memory, quality, members."""
    c = console or make_console()
    c.print(f"[bold]{m.label}[/]  format v{m.format_version}, built {m.created_at.isoformat()} by fieldpack "
            f"{m.builder_version}, {_mib(bundle_size)}")
    c.print(f"signature: {signature}")
    mo = m.model
    t = Table(title="model", show_header=False)
    for k, v in [("architecture", mo.architecture), ("parameters", f"{mo.parameter_count:,}"),
                 ("file type", mo.file_type),
                 ("tensor types", ", ".join(f"{k}×{v}" for k, v in sorted(mo.tensor_types.items()))),
                 ("n_ctx_train", mo.n_ctx_train), ("layers / heads / kv heads", f"{mo.n_layer} / {mo.n_head} / {mo.n_head_kv}"),
                 ("vocab", mo.vocab_size), ("tokenizer", tokenizer_text(mo.tokenizer_model, mo.tokenizer_pre)),
                 ("chat template", "yes" if mo.chat_template_present else "no"),
                 ("BOS / EOS / EOT ids", f"{mo.bos_id} / {mo.eos_id} / {mo.eot_id}")]:
        t.add_row(k, str(v))
    if m.adapter is not None:
        a = m.adapter
        t.add_row("LoRA adapter", f"{a.member} ({a.method}, r {a.rank}, alpha {a.alpha:g}, scale {a.scale:g}, "
                                  f"{a.tensors} tensors, {_mib(a.size_bytes)}); check vs merged: KLD "
                                  f"{a.check_kld_mean:.2g} nats/token, top-1 {a.check_top1_agreement:.3f}; "
                                  "loaded with mmap off")
    c.print(t)
    e, i, r = m.embedder, m.index, m.runtime
    t = Table(title="retrieval", show_header=False)
    t.add_row("embedder", f"{e.name}, dim {e.dimension}, {e.pooling} pooling, "
                          f"{'L2-normalised' if e.normalized else 'raw'}, {e.precision}, max {e.max_tokens} tokens")
    exclude = ((m.recipe or {}).get("build") or {}).get("exclude") or []
    not_indexed = (f"{i.skipped_files} files not indexed (skipped, or left out by --exclude "
                   f"{', '.join(repr(p) for p in exclude)})" if exclude else f"{i.skipped_files} files skipped")
    t.add_row("index", f"{i.documents} documents, {i.chunks} chunks ({i.chunk_tokens} tokens, overlap "
                       f"{i.overlap_tokens}), {i.metric}, {not_indexed}")
    t.add_row("smoke check", f"{m.smoke.question!r} -> {m.smoke.expected_source}")
    c.print(t)
    mem = r.memory
    t = Table(title="runtime defaults and memory at n_ctx", show_header=False)
    t.add_row("n_ctx / max_tokens / top-k chunks", f"{r.n_ctx} / {r.max_tokens} / {r.top_k_chunks}")
    t.add_row("prompt format", {"chat": "chat template, instructions as a system turn",
                                "chat-no-system": "chat template, instructions folded into the first user turn",
                                "completion": "plain-text completion (base model): sources, question, 'Answer:'"}
              [r.prompt_format])
    if r.completion_template:
        t.add_row("completion template", r.completion_template)
    t.add_row("stop strings", ", ".join(repr(x) for x in r.stop))
    t.add_row("abstain below cosine", f"{r.min_similarity:.2f}")
    for k in ("weights_bytes", "kv_cache_bytes", "embedder_bytes", "index_bytes", "overhead_bytes", "total_bytes"):
        t.add_row(k.replace("_bytes", "").replace("_", " "), _mib(getattr(mem, k)))
    c.print(t)
    q = m.quality
    t = Table("quality", "figures", title="quality")
    for name, fig, headline in [("parity (HF vs GGUF)", q.parity, _parity_line),
                                ("quantization vs f16", q.quantization, _quantization_line),
                                ("embedder int8 gate", q.embedder, _embedder_gate_line)]:
        if fig:
            t.add_row(name, quality_figures(fig, headline))
    c.print(t)
    trim_rows = [r for r in q.stages if r.get("stage") == "vocabulary trim"]
    compress_rows = [r for r in q.stages if r.get("stage") != "vocabulary trim"]
    for row in trim_rows:
        t = Table("figure", "value", title="vocabulary trim (vs the untrimmed model, held-out document chunks)")
        for k, v in row.items():
            if k != "stage":
                t.add_row(k, _fmt(v))
        c.print(t)
    if compress_rows:
        cols = list(compress_rows[0].keys())
        t = Table(*cols, title="compression stages (vs dense f16, held-out document chunks)")
        for row in compress_rows:
            t.add_row(*[_fmt(row.get(k)) for k in cols])
        c.print(t)
        c.print("note: unstructured and N:M sparsity are stored densely in GGUF: they do not make the file smaller or "
                "faster in llama.cpp today; only depth/width pruning and quantization do.")
    if q.adaptation:
        cols = ["method", "steps", "tokens", "seconds", "tokens_per_s", "device", "loss_first", "loss_last",
                "ppl_before", "ppl_after", "kld_after", "teacher_ppl", "teacher_kld_before", "teacher_kld_after",
                "recovered", "train_sha256", "held_out_sha256", "qa_sha256", "qa_teacher", "qa_teacher_kept",
                "qa_teacher_dropped", "qa_teacher_sha256"]
        cols = [k for k in cols if any(k in row for row in q.adaptation)]
        t = Table(*cols, title="adaptation (LoRA merged into float32; held-out document chunks, measured in torch)")
        for row in q.adaptation:
            t.add_row(*[(str(row[k])[:12] + "…") if k.endswith("sha256") and row.get(k) else _fmt(row.get(k))
                        for k in cols])
        c.print(t)
    t = Table("member", "bytes", "sha256", title="members")
    for mem_ in m.members:
        # on a terminal the hash is cut to fit; piped (a log, a ticket) it is whole, as README promises no "…"
        t.add_row(mem_.name, f"{mem_.size:,}", mem_.sha256[:16] + "…" if c.is_terminal else mem_.sha256)
    c.print(t)


def print_status(info: dict[str, Any], console: Console | None = None) -> None:
    """The device summary a technician reads (``fieldpack status``); ``info`` is ``device.install.status()``
    plus an optional ``metrics`` dict."""
    c = console or make_console()
    c.print(f"data dir {info['data_dir']}", markup=False, highlight=False)
    for role in ("active", "previous"):
        rec = info.get(role)
        if rec is None:
            c.print(f"{role}: none", markup=False, highlight=False)
            continue
        b = rec.get("bundle") or {}
        c.print(f"{role}: {rec['label']} in slot {rec['slot']}, installed {rec['installed_at']}"
                + (f", built {b['created_at']}" if b else "") + f", signed by {rec['key_id']}",
                markup=False, highlight=False)
        if b:
            c.print(f"  model {b['architecture']} {b['file_type']} ({b['parameters']:,} parameters), "
                    f"{b['documents']} documents, {b['chunks']} chunks, embedder {b['embedder']}", markup=False,
                    highlight=False)
            c.print(f"  memory at n_ctx {b['n_ctx']}: {_mib(b['memory_bytes'])}; on disk {_mib(rec['size_bytes'])}",
                    markup=False, highlight=False)
        if rec.get("damage"):
            c.print(f"  DAMAGED: {rec['damage']} (check with `fieldpack verify --installed`; repair with "
                    f"`fieldpack install` of the same bundle)", markup=False, highlight=False)
    keys = info.get("trusted_keys") or []
    c.print(f"trusted keys: {', '.join(keys) if keys else 'none'}", markup=False, highlight=False)
    m = info.get("metrics")
    if isinstance(m, dict):
        for line in metrics_lines(m):
            c.print(line, markup=False, highlight=False)
    elif m is not None:
        c.print(f"daemon metrics: {m}", markup=False, highlight=False)


def metrics_lines(m: dict[str, Any], *, now: float | None = None) -> list[str]:
    """The MQTT daemon's ``metrics.json`` (:class:`shared.protocol.Metrics` as a dict) in words: who and when,
    the counters, and the p50/p95 of the latency summaries that have values. ``now``: epoch seconds (default:
    the clock), for the age of the figures. A file that is no Metrics message is shown as it is, on one line."""
    import time

    from fieldpack.shared import protocol

    try:
        mt = protocol.decode_metrics(json.dumps(m).encode())
    except Exception:  # noqa: BLE001 - a hand-edited or foreign file: show it rather than fail `status`
        return [f"daemon metrics: {m}"]
    age = (time.time() if now is None else now) - mt.ts
    when = f"written {_ago(age)} ago" if mt.ts else "never written"
    counts = {"requests": mt.requests, "answered": mt.answered, "errors": mt.errors, "busy": mt.busy,
              "expired": mt.expired, "cancelled": mt.cancelled, "reconnects": mt.reconnects}
    lines = [f"daemon {mt.device}: {when}, up {_ago(mt.uptime_s)}",
             "  " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f", {mt.queue_depth} queued"]
    summaries = [("first token", mt.ttft_ms, "ms"), ("retrieval", mt.retrieval_ms, "ms"),
                 ("queue wait", mt.queue_ms, "ms"), ("answer", mt.total_ms, "ms"), ("decode", mt.tokens_per_s, "tok/s")]
    shown = [f"{label} p50 {st.p50:.0f} / p95 {st.p95:.0f} {unit}" for label, st, unit in summaries
             if st.n and st.p50 is not None and st.p95 is not None]
    if shown:
        lines.append(f"  last {max(st.n for _, st, _ in summaries)} answers: " + ", ".join(shown))
    return lines


def _ago(seconds: float) -> str:
    """``seconds`` as ``"42 s"``, ``"7 min"``, ``"3.5 h"`` or ``"2.0 days"``."""
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h" if s < 172800 else f"{s / 86400:.1f} days"


def print_answer(ans: Answer, *, streamed: bool = False, console: Console | None = None) -> None:
    """Print the answer (unless already streamed), numbered sources and timings."""
    from rich.text import Text

    from fieldpack.device.types import answer_notices

    c = console or make_console()
    if not streamed:
        c.print(ans.text, markup=False, highlight=False)
    for line in answer_notices(ans, "--max-tokens N"):
        c.print(Text(line, style="dim"))
    if ans.sources:  # in rank order; the fused score is an RRF sum, no measure for a reader (it is in --json)
        c.print("\n[bold]Sources[/]")
        for i, h in enumerate(ans.sources, start=1):
            c.print(f"  [{i}] {h.citation()}", markup=False, highlight=False)
    tm = ans.timings
    if ans.abstained:  # no generation ran: only retrieval has a time
        c.print(f"[dim]retrieval {tm.retrieval_ms:.0f} ms, abstained without running the model, {ans.bundle}[/]",
                highlight=False)
        return
    c.print(f"[dim]retrieval {tm.retrieval_ms:.0f} ms, first token {tm.time_to_first_token_ms:.0f} ms, "
            f"{tm.completion_tokens} tokens at {tm.tokens_per_s:.1f} tok/s, {ans.bundle}[/]", highlight=False)
