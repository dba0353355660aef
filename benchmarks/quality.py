"""Quality: ``fieldpack eval`` of a bundle built from the Debian Administrator's Handbook, on the shared QA set.

The bundle is built by the real pipeline (:func:`builder.pipeline.build_bundle`) from the handbook's 127 HTML
pages and the tiny e2e model (2-layer Llama trained on demo/docs, so its answers are not meant to be good:
retrieval, citations to the retrieved sources and abstention are what this run measures). The eval report is
written as ``quality-eval.json`` and ``quality-eval.html`` next to ``quality.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from benchmarks import common as C

log = logging.getLogger(__name__)

FAMILY = "quality"


def tiny_model() -> Path:
    """The tiny e2e Llama (trained on demo/docs, as tests/e2e/conftest.py makes it), cached."""
    from fieldpack.builder import tinymodel

    def build(tmp: Path) -> None:
        tinymodel.make_tiny_model(tmp, arch="llama", corpus=tinymodel.load_corpus(C.DEMO_DOCS))

    return C.cached_dir("tiny-llama", C.content_key(Path(tinymodel.__file__), *sorted(
        str(p.stat().st_size) + p.name for p in C.DEMO_DOCS.rglob("*") if p.is_file())), build)


def debian_bundle() -> tuple[Path, Path]:
    """Signed Q4_K_M bundle of the tiny model over the handbook; ``(bundle, public key)``, cached."""
    from fieldpack.builder import pipeline
    from fieldpack.builder.config import BuildConfig
    from fieldpack.shared.signing import generate_keypair

    model = tiny_model()
    corpus = C.stage_corpus("debian-handbook", C.DEBIAN_HANDBOOK)
    key = C.content_key(str(model), str(corpus.docs), *sorted(str(p.relative_to(C.REPO)) + str(p.stat().st_size)
                                                               for p in (C.REPO / "builder").rglob("*.py")))

    def build(tmp: Path) -> None:
        generate_keypair(tmp / "keys")
        cfg = BuildConfig(model=str(model), docs=corpus.docs, name="debian-handbook", version="1.0.0",
                          quant="Q4_K_M", sign=tmp / "keys" / "builder.key", output=tmp / "debian.fpk", n_ctx=1024)
        pipeline.build_bundle(cfg)

    d = C.cached_dir("debian-bundle", key, build)
    return d / "debian.fpk", d / "keys" / "builder.pub"


def run(out: Path, *, quick: bool = False) -> dict[str, Any]:
    """Build (cached) and evaluate the handbook bundle; ``--quick`` skips generation (retrieval only)."""
    from fieldpack.device.evaluate.report import write_html, write_json
    from fieldpack.device.evaluate.run import EvalOptions, evaluate

    info = C.machine_info()
    bundle, pub = debian_bundle()
    report = evaluate([bundle], C.DEBIAN_QA, EvalOptions(k=10, generate=not quick, trusted_keys=(pub,),
                                                          threads=C.bench_threads(), max_tokens=64))
    doc = report.to_dict()
    write_json(doc, out / "quality-eval.json")
    write_html(doc, out / "quality-eval.html")
    b = doc["bundles"][0]
    summary = {"family": FAMILY, "quick": quick, "machine": info, "bundle": b["label"], "info": b["info"],
               "qa": doc["qa"], "retrieval": {m: {k: v for k, v in r.items() if k != "recall_curve"}
                                             for m, r in b["retrieval"].items()},
               "generation": b["generation"]}
    C.write_result(out, FAMILY, summary, None)
    return summary


def summarize(doc: dict[str, Any]) -> list[str]:
    i = doc["info"]
    lines = [f"## Quality: eval of {doc['bundle']} ({i['documents']} pages, {i['chunks']} chunks, embedder "
             f"{i['embedder']} {i['embedder_precision']}) on the shared QA ({doc['qa']['questions']} questions, "
             f"{doc['qa']['unanswerable']} unanswerable)", ""]
    rows = []
    for m, r in doc["retrieval"].items():
        sec = r.get("section", {})
        rows.append([m, r.get("recall@1"), r.get("recall@5"), r.get("recall@10"), r.get("mrr"), r.get("ndcg@10"),
                     sec.get("recall@5"), r["latency_ms"]["p50"], r["latency_ms"]["p95"]])
    lines += C.md_table(["mode", "recall@1", "recall@5", "recall@10", "MRR", "nDCG@10", "section recall@5",
                         "p50 ms", "p95 ms"], rows)
    g = doc.get("generation")
    if g:
        lines += ["", *C.md_table(["citation precision", "context recall", "facts all", "abstention acc.",
                                   "false abstention", "TTFT p50 ms", "total p50 ms"],
                                  [[g["citation_precision"], g["context_recall"], g["answer_contains_rate"],
                                    g["abstention_accuracy"], g["false_abstention_rate"],
                                    g["latency_ms"]["time_to_first_token"]["p50"], g["latency_ms"]["total"]["p50"]]])]
    return lines + ["", "Full report: quality-eval.html / quality-eval.json.", ""]
