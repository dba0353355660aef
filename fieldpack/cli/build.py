"""Build-host commands: keygen, build, inspect, verify, demo."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Optional

import typer

from fieldpack.cli.usage import INTERRUPT_EXIT, explain_interrupt

#: The demo's question: its answer is a fact of demo/docs/database.md ("Slow trend screens": VACUUM ANALYZE).
DEMO_QUESTION = "What should I run when trend screens are slow?"
#: The tiny model's question (its text is not an answer; the citation is the point).
TINY_DEMO_QUESTION = "The connection pool is exhausted. What should I do?"
#: The demo bundle's name (the OpenAI API's ``model``; README "In a browser, and over the OpenAI API").
DEMO_BUNDLE_NAME = "riverside-ops"


def _repo_demo_docs() -> Path:
    return Path(__file__).resolve().parents[2] / "demo" / "docs"


def keygen(out: Path = typer.Option(..., "--out", help="folder for builder.key (0600) and builder.pub")) -> None:
    """Make an ed25519 signing key pair."""
    from fieldpack.shared.signing import generate_keypair, key_id, load_public_key

    priv, pub = generate_keypair(out)
    typer.echo(f"wrote {priv} and {pub} (key id {key_id(load_public_key(pub).raw)})")


#: Off a terminal (a log file, CI), a running stage that reports counts prints its progress at most this often
#: (seconds): a trial's build log was silent for the 7.5 minutes of its quality stage.
PLAIN_PROGRESS_S = 30.0


class _StageProgress:
    """Shows the build's stages on stderr: on a terminal a rich progress bar per stage (a spinner until the stage
    reports counts, then a bar with done/total, elapsed time and ETA); off a terminal, one line per finished
    stage and, for a long one, a progress line (``… quality: 12/27 held-out windows, 95 s``) at most every
    ``plain_every_s`` seconds. Remembers the running stage so an interrupt can name it."""

    def __init__(self, plain_every_s: float = PLAIN_PROGRESS_S) -> None:
        from fieldpack.cli.console import console

        self.console = console(stderr=True)
        self.current: str | None = None
        self.last_done: str | None = None
        self.counts: tuple[int, int, str] | None = None  # the latest report (the bar, an interrupt)
        self.summary: tuple[int, int, str] | None = None  # the latest that is not an evaluation pass's
        self._progress = None
        self._task = None
        self._plain_every_s = plain_every_s
        self._plain_last = 0.0  # perf_counter of the last plain progress line (or of the stage start)
        if self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                                      TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True)

    def __enter__(self) -> "_StageProgress":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def stage(self, name: str, event: str) -> None:
        """The pipeline's stage hook: ``event`` is ``"start"``, ``"done"`` or ``"cached"`` (reused, no work)."""
        import time

        if event == "start":
            self.current, self.counts, self.summary, self._t0 = name, None, None, time.perf_counter()
            self._plain_last = self._t0
            if self._progress is not None:
                self._task = self._progress.add_task(name, total=None, unit="")
            return
        if self._progress is not None and self._task is not None:
            self._progress.remove_task(self._task)
            self._task = None
        self.last_done = name
        if event == "cached":  # reused from the build cache: no work, no time
            self.console.print(f"✓ {name} (cached)", markup=False, highlight=False)
            self.current = None
            return
        summary = self.summary or self.counts
        done = f" ({summary[1]} {summary[2]})" if summary else ""
        self.console.print(f"✓ {name}{done} {time.perf_counter() - self._t0:.1f} s", markup=False, highlight=False)
        self.current = None

    def count(self, done: int, total: int, unit: str) -> None:
        """builder.progress sink: ``done`` of ``total`` ``unit`` in the running stage."""
        from fieldpack.builder.progress import is_evaluation

        self.counts = (done, total, unit)
        if not is_evaluation(unit):
            self.summary = self.counts
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total, unit=unit)
        elif self._progress is None and self.current is not None:
            import time

            now = time.perf_counter()
            if now - self._plain_last >= self._plain_every_s:
                self._plain_last = now
                self.console.print(f"… {self.current}: {done}/{total} {unit}, {now - self._t0:.0f} s", markup=False,
                                   highlight=False)


def build(
    model: Optional[str] = typer.Option(None, "--model", help="local HF checkpoint folder, a .gguf file, or a hub id when online"),
    docs: Optional[Path] = typer.Option(None, "--docs", help="folder of documents (.md .txt .html .pdf .csv)"),
    exclude: Optional[list[str]] = typer.Option(None, "--exclude", metavar="GLOB", help="glob of files or folders under --docs not "
                                                "to index, e.g. 'release-*.html' or 'old/' (repeatable; a pattern "
                                                "without '/' matches a name at any depth)"),
    quant: Optional[str] = typer.Option(None, "--quant", help="Q4_K_M (default), Q8_0, Q6_K, Q5_K_M, Q5_K_S, Q5_0, "
                                        "Q4_K_S, Q4_0, Q3_K_M, F16, F32; a .gguf ships as is unless given"),
    embd_type: Optional[str] = typer.Option(None, "--embd-type", help="GGML type of token_embd.weight (Q8_0, Q6_K, "
                                            "Q5_K, Q4_K, Q4_0, F16); default: the --quant mix's choice"),
    output_type: Optional[str] = typer.Option(None, "--output-type", help="GGML type of output.weight (as "
                                              "--embd-type); tied embeddings have none: token_embd is the output"),
    trim_vocab: Optional[bool] = typer.Option(None, "--trim-vocab", help="trim the vocabulary to the documents' "
                                              "tokens (smaller, faster model; gated against the untrimmed one)"),
    keep_general: Optional[int] = typer.Option(None, "--keep-general", min=0, help="with --trim-vocab: general "
                                               "tokens kept besides the domain's (default 32768)"),
    name: Optional[str] = typer.Option(None, "--name", help="bundle name"),
    version: Optional[str] = typer.Option(None, "--version", help="bundle version"),
    sign: Optional[Path] = typer.Option(None, "--sign", help="ed25519 private key from `fieldpack keygen`"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="the .fpk to write"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="replay a recipe.toml (options given here override it)"),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", help="default context length on the device (tokens)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="default answer length cap (tokens)"),
    top_k_chunks: Optional[int] = typer.Option(None, "--top-k-chunks",
                                               help="passages put in the prompt on the device (default 4; 1 suits "
                                                    "a small base model, see README)"),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="sentence-transformers folder (default all-MiniLM-L6-v2)"),
    adapt_embedder: Optional[bool] = typer.Option(None, "--adapt-embedder/--no-adapt-embedder",
                                                  help="fine-tune the embedder on the documents (CPU minutes); "
                                                       "kept only if it beats the base one on held-out pseudo-queries"),
    prune: Optional[str] = typer.Option(None, "--prune", help="magnitude | wanda | sparsegpt | depth | width"),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="unstructured sparsity in (0, 1)"),
    pattern: Optional[str] = typer.Option(None, "--pattern", help="N:M semi-structured pattern, e.g. 2:4"),
    drop_layers: Optional[int] = typer.Option(None, "--drop-layers", help="depth pruning: decoder blocks to drop"),
    ffn_keep: Optional[float] = typer.Option(None, "--ffn-keep", help="width pruning: share of MLP channels kept"),
    imatrix: Optional[str] = typer.Option(None, "--imatrix", help="'domain': importance matrix from the documents"),
    quantizer: Optional[str] = typer.Option(None, "--quantizer", help="rtn (default, llama.cpp) | gptq (Q4_0/Q8_0) | "
                                            "awq (any type): calibrated on the documents"),
    calib_chunks: Optional[int] = typer.Option(None, "--calib-chunks", help="calibration chunks for pruning/imatrix"),
    heal: Optional[str] = typer.Option(None, "--heal", help="'kd': after --prune depth|width, distil the pruned model "
                                                          "from the unpruned one (LoRA)"),
    heal_steps: Optional[int] = typer.Option(None, "--heal-steps", help="optimizer steps of --heal (default 100)"),
    adapt: Optional[str] = typer.Option(None, "--adapt", help="dapt: LoRA continued pretraining on the documents; "
                                                            "raft: LoRA fine-tuning on --qa-train / --qa-teacher questions"),
    qa_train: Optional[Path] = typer.Option(None, "--qa-train", help="raft: JSONL of question, answer, source "
                                                                   "(a document path under --docs)"),
    qa_teacher: Optional[str] = typer.Option(None, "--qa-teacher", help="raft: a .gguf or an OpenAI-compatible "
                                             "http(s)://host:port/v1 endpoint that writes questions with answers "
                                             "from the calibration chunks (with --qa-train: both are used)"),
    qa_teacher_model: Optional[str] = typer.Option(None, "--qa-teacher-model", help="the endpoint's model (default: "
                                                   "the first it serves); API key from $FIELDPACK_TEACHER_API_KEY"),
    qa_per_chunk: Optional[int] = typer.Option(None, "--qa-per-chunk", help="--qa-teacher questions per chunk "
                                               "(default 1)"),
    qa_max: Optional[int] = typer.Option(None, "--qa-max", help="cap on the --qa-teacher questions kept (default 200)"),
    distill_from: Optional[Path] = typer.Option(None, "--distill-from", help="teacher checkpoint folder (same "
                                                "tokenizer): KD on its softened logits, mixed with next-token loss"),
    adapt_steps: Optional[int] = typer.Option(None, "--adapt-steps", help="optimizer steps (default 100)"),
    adapt_seq_len: Optional[int] = typer.Option(None, "--adapt-seq-len", help="training block length in model tokens "
                                                "(default 256; a RAFT example, sources + question + answer, may be "
                                                "twice as long, longer ones are left out with a warning)"),
    adapt_lr: Optional[float] = typer.Option(None, "--adapt-lr", help="AdamW learning rate of the LoRA "
                                             "weights (default 2e-4)"),
    adapt_batch: Optional[int] = typer.Option(None, "--adapt-batch", help="sequences per optimizer step (default 4)"),
    eval_max_chunks: Optional[int] = typer.Option(None, "--eval-max-chunks", help="held-out chunks for PPL/KLD, at "
                                                  "most (default 64): the quality stage and the adapt/heal passes "
                                                  "before and after training; fewer is faster and noisier"),
    lora_r: Optional[int] = typer.Option(None, "--lora-r", help="LoRA rank (default 16)"),
    raft_hard: Optional[int] = typer.Option(None, "--raft-hard", help="raft: distractors per prompt taken from the "
                                            "documents closest to the question instead of at random (default 0)"),
    raft_paired: Optional[bool] = typer.Option(None, "--raft-paired/--no-raft-paired",
                                               help="raft: questions with a no-answer example also keep their "
                                                    "answered example (default off)"),
    raft_abstain: Optional[float] = typer.Option(None, "--raft-abstain", help="raft: share of questions with a "
                                                 "no-answer example (default 0.2)"),
    ship_adapter: Optional[bool] = typer.Option(None, "--ship-adapter/--merge-adapter",
                                                help="ship the LoRA as a llama.cpp adapter GGUF beside the unadapted "
                                                     "base model (small updates; the device reads the model into RAM, "
                                                     "mmap off) instead of merging it (default: merge)"),
    prompt_format: Optional[str] = typer.Option(
        None, "--prompt-format", help="chat | completion (default: from the model's chat template; completion "
                                       "for base models without one)"),
    json_out: bool = typer.Option(False, "--json", help="print the manifest as JSON when done"),
    force: bool = typer.Option(False, "--force", help="overwrite the output .fpk if it exists"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="build cache: stage results reused when their "
                                             "inputs are unchanged (default ~/.cache/fieldpack/build)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="run every stage; reuse and keep nothing"),
) -> None:
    """Build a signed bundle from a checkpoint and a folder of documents."""
    from fieldpack.builder.config import BuildConfig

    compression: dict[str, Any] = {k: v for k, v in dict(prune=prune, sparsity=sparsity, pattern=pattern,
                                   drop_layers=drop_layers, ffn_keep=ffn_keep, imatrix=imatrix,
                                   quantizer=quantizer, calib_chunks=calib_chunks, heal=heal,
                                   heal_steps=heal_steps).items() if v is not None}
    adapt_opts: dict[str, Any] = {k: (str(v) if isinstance(v, Path) else v) for k, v in dict(
        method=adapt, qa_train=qa_train, qa_teacher=qa_teacher, qa_teacher_model=qa_teacher_model,
        qa_per_chunk=qa_per_chunk, qa_max=qa_max, teacher=distill_from, steps=adapt_steps, seq_len=adapt_seq_len,
        lr=adapt_lr, batch_size=adapt_batch, lora_r=lora_r, raft_hard=raft_hard, raft_paired=raft_paired, raft_abstain=raft_abstain).items()
        if v is not None}
    opts = dict(model=model, docs=docs, exclude=exclude or None, quant=quant, name=name, version=version, sign=sign, output=output,
                n_ctx=n_ctx, max_tokens=max_tokens, top_k_chunks=top_k_chunks, embedder=embedder,
                prompt_format=prompt_format,
                embd_type=embd_type, output_type=output_type, trim_vocab=trim_vocab, keep_general=keep_general,
                adapt_embedder=adapt_embedder, ship_adapter=ship_adapter, eval_max_chunks=eval_max_chunks)
    if recipe:
        overrides = {k: v for k, v in opts.items() if v is not None}
        if compression:
            overrides["compression"] = compression
        if adapt_opts:
            overrides["adapt"] = adapt_opts
        cfg = BuildConfig.from_toml(recipe, **overrides)
    else:
        missing = [f"--{k}" if k != "output" else "-o" for k in ("model", "docs", "name", "sign", "output") if opts[k] is None]
        if missing:
            from fieldpack.shared.errors import UsageError

            raise UsageError(f"missing {', '.join(missing)}",
                             hint=f"give {'them' if len(missing) > 1 else 'it'}, or replay a build with --recipe "
                                  "recipe.toml")
        data = {k: v for k, v in opts.items() if v is not None}
        if compression:
            data["compression"] = compression
        if adapt_opts:
            data["adapt"] = adapt_opts
        cfg = BuildConfig.validated(data)
    _check_output(cfg.output, force=force)
    if cfg.compression:
        from fieldpack.builder.compress import validate_compression

        local = Path(cfg.model)
        validate_compression(cfg.compression, model_dir=local if local.exists() else None, qtype=cfg.quant)
    if cfg.adapt:
        from fieldpack.builder.pipeline import check_adaptation

        check_adaptation(cfg)
    result = _build_with_progress(cfg, cache_dir=cache_dir, use_cache=not no_cache)
    m = result.manifest
    size = result.bundle.stat().st_size
    typer.echo(f"wrote {result.bundle} ({size / 2**20:.1f} MiB): {m.label}, {m.model.architecture} "
               f"{m.model.file_type}, {m.index.documents} documents, {m.index.chunks} chunks")
    typer.echo("stage seconds: " + ", ".join(f"{s.name} {s.seconds:.1f}" + (" (cached)" if s.cached else "")
                                             for s in result.stages))
    if json_out:
        typer.echo(m.to_bytes().decode())


def _check_output(output: Path, *, force: bool) -> None:
    """Refuse, before any stage runs, an output that is a folder, or an existing file unless ``force``."""
    from fieldpack.shared.errors import OutputNotWritableError

    if output.is_dir():
        raise OutputNotWritableError(f"-o {output} is a folder", hint="give -o a file name such as plant-ops-1.0.0.fpk")
    if output.exists() and not force:
        raise OutputNotWritableError(f"-o {output} already exists",
                                     hint="pass --force to overwrite it, or choose another -o")


def _build_with_progress(cfg: Any, **options: Any) -> Any:
    """Run :func:`builder.pipeline.build_bundle` (``options``: its keyword options, e.g. the build cache) with a
    progress bar per stage; print the ingest report.

    Ctrl-C says which stage it interrupted (and how far it got) and exits 130; SIGTERM likewise with 143; nothing
    is left at the output. A Ctrl-C that llama.cpp's ctypes callbacks swallowed (:mod:`shared.interrupts`) is
    raised at the next stage or progress step."""
    import threading

    from fieldpack.builder.pipeline import build_bundle
    from fieldpack.builder.progress import progress_sink
    from fieldpack.shared.interrupts import SIGTERM_EXIT, interrupts_that_stick, raise_if_interrupted

    with _StageProgress() as shown:

        def stage(*args: Any) -> None:
            raise_if_interrupted()
            shown.stage(*args)

        def count(*args: Any) -> None:
            if threading.current_thread() is threading.main_thread():  # never raise in a worker thread
                raise_if_interrupted()
            shown.count(*args)

        try:
            with interrupts_that_stick(), progress_sink(count):
                result = build_bundle(cfg, on_stage=stage, **options)
        except SystemExit as exc:
            if exc.code != SIGTERM_EXIT:
                raise
            shown.console.print(f"stopped by SIGTERM{f' during stage {shown.current!r}' if shown.current else ''}; "
                                f"no bundle was written to {cfg.output}", markup=False, highlight=False)
            explain_interrupt()
            raise typer.Exit(SIGTERM_EXIT) from None
        except KeyboardInterrupt:
            if shown.current:
                where = f"during stage '{shown.current}'"
                if shown.counts:
                    where += f" at {shown.counts[0]}/{shown.counts[1]} {shown.counts[2]}"
            elif shown.last_done:  # between stages (the cache hashing the next one's inputs)
                where = f"after stage '{shown.last_done}', before the next one started"
            else:
                where = "before the first stage"
            shown.console.print(f"interrupted {where}; no bundle was written to {cfg.output}",
                                markup=False, highlight=False)
            explain_interrupt()
            raise typer.Exit(INTERRUPT_EXIT) from None
    _print_ingest_report(result.ingest_report)
    return result


def _print_ingest_report(report: list[dict[str, Any]]) -> None:
    from collections import Counter

    from rich.table import Table

    from fieldpack.builder.ingest.exclude import EXCLUDED_REASON

    from fieldpack.cli.console import console as make_console

    indexed = [r for r in report if r.get("status") == "indexed"]
    excluded = Counter(str(r["reason"]) for r in report if str(r.get("reason", "")).startswith(EXCLUDED_REASON))
    skipped = [r for r in report if r.get("status") != "indexed" and str(r.get("reason")) not in excluded]
    console = make_console(stderr=True)
    console.print(f"ingest: {len(indexed)} files indexed, {len(skipped)} skipped, "
                  f"{sum(int(r.get('chunks', 0)) for r in indexed)} chunks", markup=False, highlight=False)
    for reason, n in excluded.items():
        console.print(f"ingest: {n} file{'s' if n != 1 else ''} {reason}", markup=False, highlight=False)
    if skipped:
        t = Table("skipped file", "reason")
        for r in skipped[:50]:
            t.add_row(str(r.get("path")), str(r.get("reason")))
        console.print(t)
    noted = [r for r in indexed if r.get("note")]
    if noted:  # anything guessed or replaced while decoding, or repaired in a PDF text layer, is said, per file
        t = Table("file", "encoding", "note", title="text report (guessed, replaced or repaired)")
        for r in noted:
            t.add_row(str(r.get("path")), str(r.get("encoding")), str(r.get("note")))
        console.print(t)


def inspect(bundle: Path = typer.Argument(..., help="the .fpk"),
            json_out: bool = typer.Option(False, "--json", help="print the whole manifest as JSON"),
            trust: Optional[list[Path]] = typer.Option(None, "--trust", metavar="KEY.pub",
                                                        help="public key(s) to check the signature")) -> None:
    """Show a bundle's manifest: model, tensor types, index, memory, quality figures, signature status.

    With --trust, exits 4 unless one of those keys verifies the signature ("valid signature"); a bundle signed by
    another key is reported as "signer not trusted", an altered one as INVALID. --json adds a ``signature``
    object (status, key_id, message) to the manifest."""
    from fieldpack.cli.show import print_manifest
    from fieldpack.shared.bundle import open_bundle
    from fieldpack.shared.errors import SignatureError
    from fieldpack.shared.signing import load_public_key, signature_status

    keys = [load_public_key(p) for p in trust or []]
    with open_bundle(bundle) as reader:
        sig = signature_status(reader.manifest_bytes, reader.signature_bytes, keys)
        if json_out:
            doc = json.loads(reader.manifest.to_bytes())
            doc["signature"] = sig.to_dict()
            typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))
        else:
            print_manifest(reader.manifest, bundle_size=reader.path.stat().st_size, signature=sig.message)
    if keys and not sig.ok:
        if sig.status in ("invalid", "malformed"):  # the right key, but the bytes changed after signing
            hint = "do not install it; get a fresh copy of the bundle from the builder"
        else:
            hint = ("trust the builder's key (`--trust KEY.pub`) only if you know it; else get a bundle signed by a "
                    "trusted builder")
        raise SignatureError(f"{bundle}: {sig.message}", hint=hint)


def verify(bundle: Optional[Path] = typer.Argument(None, help="the .fpk"),
           trust: Optional[list[Path]] = typer.Option(None, "--trust", metavar="KEY.pub", help="trusted public key(s)"),
           installed: bool = typer.Option(False, "--installed", help="re-hash the device's active slot instead"),
           data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="device data dir (with --installed)")) -> None:
    """Check a bundle's signature and every member's sha256; or, with --installed, the active slot's files."""
    from fieldpack.shared.bundle import open_bundle
    from fieldpack.shared.errors import UsageError
    from fieldpack.shared.signing import load_public_key

    if installed:
        if bundle is not None:
            raise UsageError("give either a bundle or --installed", hint="e.g. `fieldpack verify --installed`")
        _verify_installed(data_dir)
        return
    if bundle is None or not trust:
        raise UsageError("verify needs a bundle and --trust KEY.pub (or --installed)",
                         hint="e.g. `fieldpack verify b.fpk --trust builder.pub`")
    keys = [load_public_key(p) for p in trust]
    with open_bundle(bundle) as reader:
        k = reader.verify(keys)
        typer.echo(f"OK {reader.manifest.label}: signature by key {k.key_id}, {len(reader.manifest.members)} members verified")


def _verify_installed(data_dir: Optional[Path]) -> None:
    """Re-hash every member of the active slot against its manifest; exit 4 (IntegrityError) on damage."""
    from fieldpack.device.slots import default_data_dir, open_data_dir
    from fieldpack.shared.errors import IntegrityError

    dd = open_data_dir(data_dir or default_data_dir())
    slot = dd.require_active_slot_path().name  # NoActiveBundleError when none is active
    try:
        m = dd.verify_slot(slot)
    except IntegrityError as exc:
        raise IntegrityError(f"active {exc.message}",
                             hint="repair it with `fieldpack install` of the same bundle, or `fieldpack rollback`") from exc
    typer.echo(f"OK {m.label} in slot {slot}: {len(m.members)} members match their manifest")


def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", help="work folder (keys, model cache, bundle, device)"),
    docs: Path = typer.Option(None, "--docs", help="documents (default: the embedded demo set)"),
    question: Optional[str] = typer.Option(None, "--question", help="question to ask after install"),
    tiny: bool = typer.Option(False, "--tiny", help="train a tiny model in a minute instead of the real Gemma 3 "
                                                   "270M (its text is not an answer)"),
    quant: str = typer.Option("Q4_K_M", "--quant", help="quant type of the tiny model's bundle"),
) -> None:
    """The main job end to end on the embedded demo: build a bundle from Gemma 3 270M (or --tiny), install it, ask."""
    import time

    from fieldpack.builder.config import BuildConfig
    from fieldpack.builder.pipeline import quiet_third_party
    from fieldpack.device.install import install_bundle
    from fieldpack.device.runtime import Runtime, check_slot
    from fieldpack.device.slots import init_data_dir, open_data_dir
    from fieldpack.shared.signing import generate_keypair

    quiet_third_party()
    docs = docs or _repo_demo_docs()
    out.mkdir(parents=True, exist_ok=True)
    keys = out / "keys"
    if not (keys / "builder.key").exists():
        generate_keypair(keys)
    if tiny:
        from fieldpack.builder.tinymodel import load_corpus, make_tiny_model

        model = out / "model"
        if not (model / "config.json").exists():
            typer.echo("training a tiny Llama-architecture model on the demo documents (about a minute on 2 cores)…",
                       err=True)
            make_tiny_model(model, arch="llama", corpus=load_corpus(docs))
        model_opts: dict[str, Any] = dict(model=str(model), quant=quant, n_ctx=1024, max_tokens=128)
    else:
        from fieldpack.builder.demo_model import ensure_gemma_gguf

        typer.echo("model: Gemma 3 270M (pretrained base, Q4_K_M GGUF; Gemma terms of use apply)", err=True)
        gguf = ensure_gemma_gguf(out / "cache")
        # the real path: a Hugging Face checkpoint made from the GGUF (once, cached), then our converter, the
        # parity gate against transformers, llama.cpp's quantizer and PPL/KLD, as for any checkpoint
        hf_dir = out / "cache" / f"{gguf.stem}-hf"
        if not (hf_dir / "config.json").is_file():
            from fieldpack.builder.convert.from_gguf_checkpoint import hf_checkpoint_from_gguf

            typer.echo("making a Hugging Face checkpoint of it (once; about a minute)…", err=True)
            shutil.rmtree(hf_dir, ignore_errors=True)
            hf_checkpoint_from_gguf(gguf, hf_dir)
        # one source in the prompt: measured on the demo documents, Gemma 3 270M base states the cited fact with
        # the best passage alone and drifts to the neighbouring passages with two or four (README "A real model")
        model_opts = dict(model=str(hf_dir), quant="Q4_K_M", n_ctx=2048, max_tokens=64, top_k_chunks=1)
    question = question or (TINY_DEMO_QUESTION if tiny else DEMO_QUESTION)
    bundle = out / f"{DEMO_BUNDLE_NAME}-1.0.0.fpk"
    cfg = BuildConfig.validated(dict(docs=docs, name=DEMO_BUNDLE_NAME, version="1.0.0", sign=keys / "builder.key",
                                     output=bundle, **model_opts))
    t0 = time.perf_counter()
    _build_with_progress(cfg)
    typer.echo(f"built {bundle} ({bundle.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t0:.0f} s")
    data_dir = out / "device"
    if not (data_dir / "state.json").exists():
        init_data_dir(data_dir, [keys / "builder.pub"])
    dd = open_data_dir(data_dir)
    res = install_bundle(bundle, dd, check=check_slot)
    typer.echo(res.message)
    from fieldpack.cli.show import print_answer

    with Runtime(dd.require_active_slot_path()) as rt:
        typer.echo(f"\nQ: {question}\nA: ", nl=False)
        ans = rt.answer(question, on_token=lambda t: typer.echo(t, nl=False))
        typer.echo("")
        print_answer(ans, streamed=True)


def register(root: typer.Typer) -> None:
    """Add the build-host commands to the root app."""
    root.command("keygen")(keygen)
    root.command("build")(build)
    root.command("inspect")(inspect)
    root.command("verify")(verify)
    root.command("demo")(demo)
