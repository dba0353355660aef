"""Hybrid retrieval latency: BM25 one after the vector search (one thread) against BM25 in a worker thread on its
own connection (:attr:`fieldpack.retrieval.search.SearchConfig.concurrent_bm25`, the default), same run,
interleaved per question, on one or more built indexes.

``python -m benchmarks.retrieval_latency INDEX.sqlite [INDEX2.sqlite ...] --embedder EXPORT_DIR [--repeats 2]``

Each index must have been embedded with ``--embedder`` (an ONNX export folder: ``export.json``, ``embedder.onnx``,
``tokenizer.json``; e.g. the bench cache's ``embedder-int8-*``; ``benchmarks.retrieval_scale`` builds the 1k-100k
indexes). Queries: every question of ``benchmarks/qa/*.jsonl`` (111). Prints p50/p95 of
:meth:`~fieldpack.retrieval.search.Retriever.search` (k=5, query embedding included) per setting, their ratio, and
whether the two settings returned identical hits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from benchmarks.common import REPO


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("index", type=Path, nargs="+")
    p.add_argument("--embedder", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    from benchmarks.retrieval_quality import load_export
    from fieldpack.retrieval.embedder import OnnxEmbedder
    from fieldpack.retrieval.search import DEFAULT_SEARCH, Retriever

    qs = [json.loads(line)["question"] for f in sorted((REPO / "benchmarks" / "qa").glob("*.jsonl"))
          if "train" not in f.name for line in f.read_text().splitlines() if line.strip()]
    emb = load_export(a.embedder)
    settings = {"sequential": dataclasses.replace(DEFAULT_SEARCH, concurrent_bm25=False), "concurrent": DEFAULT_SEARCH}
    for path in a.index:
        with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]), max_tokens=int(emb["max_tokens"]),
                          threads=1) as e:
            rs = {k: Retriever(path, e, cfg) for k, cfg in settings.items()}
            lat: dict[str, list[float]] = {k: [] for k in rs}
            same = total = 0
            for q in qs[:5]:  # warm the page cache and the worker thread
                for r in rs.values():
                    r.search(q, k=5)
            for _ in range(a.repeats):
                for q in qs:
                    got = {}
                    for k, r in rs.items():
                        t0 = time.perf_counter()
                        got[k] = [h.chunk_id for h in r.search(q, k=5)]
                        lat[k].append((time.perf_counter() - t0) * 1e3)
                    same += got["sequential"] == got["concurrent"]
                    total += 1
            chunks = rs["concurrent"].stats()["chunks"]
            for r in rs.values():
                r.close()
        p50 = {k: statistics.median(v) for k, v in lat.items()}
        p95 = {k: sorted(v)[int(0.95 * (len(v) - 1))] for k, v in lat.items()}
        print(json.dumps({"index": str(path), "chunks": chunks, "queries": total,
                          "p50_ms": {k: round(v, 1) for k, v in p50.items()},
                          "p95_ms": {k: round(v, 1) for k, v in p95.items()},
                          "p50_ratio": round(p50["concurrent"] / p50["sequential"], 3),
                          "identical_hits": f"{same}/{total}"}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
