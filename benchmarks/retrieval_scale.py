"""Retrieval at scale: vector search over 1k / 10k / 13.6k / 100k chunks with float32, int8 and binary vectors.

Corpus. Real chunks of the installed Debian documentation packages, ingested as a build does (200/40 tokens)
and embedded once with the bundle embedder (MiniLM-L6 int8 ONNX; embeddings cached under the bench cache):
``postgresql-doc-15`` (13.6k chunks), ``sqlite3-doc`` (14.0k) and the English Debian Administrator's Handbook
(2.0k): 29.6k real chunks. Embedding more on this shared CPU costs 2-3 minutes per 1k chunks (1 thread), so
the 100k corpus is completed with **synthetic near-duplicates**: a real chunk's vector plus Gaussian noise of
standard deviation :data:`NOISE_SIGMA` per dimension, renormalised (cosine to its parent about 0.88, closer to
each other than most real neighbours, which makes the KNN harder, not easier, for quantized vectors), with the
parent's text for FTS5. The output and the README say how many chunks of each size are synthetic. Sizes 1k and
10k are evenly spaced samples of the PostgreSQL chunks (real only); 13.6k is all of PostgreSQL.

Per size and vector layout (:mod:`fieldpack.shared.index_format` ``VECTOR_LAYOUTS``): the index is built by
:func:`builder.index_build.build_index`, then

* vector KNN latency p50/p95 (ms) of :meth:`retrieval.search.Retriever.vector_search`, the query embedding
  computed once beforehand (its own cost reported separately);
* recall@10 of the layout's KNN against exact float32 KNN (numpy brute force over the same vectors, the
  ground truth) and the same for the top-50 candidate list hybrid search uses;
* index bytes (the SQLite file after VACUUM);
* full hybrid :meth:`Retriever.search` p50/p95 (query embedding included, one thread).

Queries: the questions of ``benchmarks/qa/*.jsonl`` and the shared Debian QA set (all splits: recall here is
against exact search, not a relevance judgement, so no dev/unseen split is needed).

Run: ``.venv/bin/python -m benchmarks retrieval_scale --out bench/`` (``--quick``: 1k and 10k only).
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common as C
from benchmarks import retrieval_quality as RQ

log = logging.getLogger(__name__)

FAMILY = "retrieval_scale"
#: Real corpora, in the order their chunks fill the scale corpus.
REAL_CORPORA = ("postgresql", "sqlite", "debian-handbook")
SIZES = (1_000, 10_000, 13_620, 100_000)
QUICK_SIZES = (1_000, 10_000)
#: Per-dimension standard deviation of the noise added to a real unit vector to make a synthetic chunk
#: (384 dimensions: noise norm about 0.53, cosine to the parent about 0.88).
NOISE_SIGMA = 0.027
K = 10
#: Candidate-list length of hybrid search (``DEFAULT_SEARCH.candidates``); recall is also reported at it.
CANDIDATES = 50


# --- cached embeddings ------------------------------------------------------------------------------------------
def corpus_embeddings(name: str, emb: dict[str, Any]) -> tuple[list[Any], np.ndarray]:
    """The chunks of corpus ``name`` (:data:`benchmarks.retrieval_quality.CORPORA`) and their embeddings,
    ``(n, dim) float32`` unit rows, cached under the bench cache keyed by the chunks and the ONNX file.

    Computing them runs the embedder on one thread (about 10 minutes per 1k chunks on this CPU)."""
    from fieldpack.builder.index_build import embed_chunks
    from fieldpack.retrieval.embedder import OnnxEmbedder

    spec = RQ.CORPORA[name]
    chunks = RQ.corpus_chunks(spec, emb)
    key = C.content_key(RQ._docs_signature(spec.docs), Path(emb["tokenizer_path"]), Path(emb["onnx_path"]),
                        f"{RQ.CHUNK_TOKENS}/{RQ.OVERLAP_TOKENS}")

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]), max_tokens=int(emb["max_tokens"]),
                          threads=1) as e:
            np.save(tmp / "embeddings.npy", embed_chunks(chunks, e))
        (tmp / "build.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "chunks": len(chunks)}))

    vecs = np.load(C.cached_dir(f"scale-emb-{name}", key, build) / "embeddings.npy")
    if vecs.shape[0] != len(chunks):
        raise RuntimeError(f"cached embeddings of {name} have {vecs.shape[0]} rows for {len(chunks)} chunks")
    return chunks, vecs.astype(np.float32, copy=False)


# --- the scale corpus ----------------------------------------------------------------------------------------------
def real_corpus(emb: dict[str, Any]) -> tuple[list[Any], np.ndarray, dict[str, int]]:
    """Every real chunk of :data:`REAL_CORPORA` that is installed, with its embedding; chunk counts per corpus."""
    chunks: list[Any] = []
    parts, counts = [], {}
    for name in REAL_CORPORA:
        if not RQ.CORPORA[name].docs.is_dir():
            log.warning("%s is not installed: left out of the scale corpus", RQ.CORPORA[name].docs)
            continue
        c, v = corpus_embeddings(name, emb)
        chunks += c
        parts.append(v)
        counts[name] = len(c)
    return chunks, np.concatenate(parts), counts


def scale_corpus(size: int, chunks: Sequence[Any], vecs: np.ndarray, n_pg: int,
                 seed: int = 0) -> tuple[list[Any], np.ndarray, int]:
    """``size`` chunks and their ``(size, dim) float32`` vectors; how many of them are synthetic.

    Up to ``n_pg``: evenly spaced PostgreSQL chunks (the first ``n_pg`` of ``chunks``). Up to all real chunks:
    a prefix of them. Beyond: every real chunk plus near-duplicates of uniformly drawn real chunks (vector +
    N(0, :data:`NOISE_SIGMA`) per dimension, renormalised; the parent's text, source ``synthetic/<source>``)."""
    import dataclasses

    n_real = len(chunks)
    if size <= n_pg:
        rows = np.linspace(0, n_pg - 1, size).round().astype(int)
        return [chunks[i] for i in rows], vecs[rows], 0
    if size <= n_real:
        return list(chunks[:size]), vecs[:size], 0
    rng = np.random.default_rng(seed)
    parents = rng.integers(0, n_real, size - n_real)
    noisy = vecs[parents] + rng.normal(0.0, NOISE_SIGMA, (len(parents), vecs.shape[1])).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    synth = [dataclasses.replace(chunks[i], source=f"synthetic/{chunks[i].source}") for i in parents]
    return list(chunks) + synth, np.concatenate([vecs, noisy]).astype(np.float32), len(parents)


def questions() -> list[str]:
    """Every question of ``benchmarks/qa/*.jsonl`` and of the shared Debian QA set when present."""
    from fieldpack.device.evaluate.qa import load_qa

    files = sorted(RQ.QA_DIR.glob("*.jsonl")) + ([C.DEBIAN_QA] if C.DEBIAN_QA.is_file() else [])
    return [it.question for f in files for it in load_qa(f).items]


def query_vectors(qs: Sequence[str], emb: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """``(len(qs), dim) float32`` query embeddings (one thread) and the per-question embedding latency (ms)."""
    from fieldpack.retrieval.embedder import OnnxEmbedder

    with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]), max_tokens=int(emb["max_tokens"]),
                      threads=1) as e:
        e.embed([qs[0]])
        out, ms = [], []
        for q in qs:
            t = time.perf_counter()
            out.append(e.embed([q])[0])
            ms.append((time.perf_counter() - t) * 1e3)
    return np.stack(out).astype(np.float32), C.lat(ms)


# --- indexes ------------------------------------------------------------------------------------------------------
def product_index(chunks: Sequence[Any], vecs: np.ndarray, layout: str, key: str) -> tuple[Path, float]:
    """The full bundle index (:func:`builder.index_build.build_index`) in ``layout``, cached; build seconds."""
    from fieldpack.builder import index_build
    from fieldpack.retrieval import binary
    from fieldpack.shared import index_format

    k = C.content_key(key, layout, Path(index_build.__file__), Path(index_format.__file__), Path(binary.__file__))

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        index_build.build_index(list(chunks), vecs, tmp / "index.sqlite", vector_layout=layout)
        (tmp / "build.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))

    folder = C.cached_dir(f"scale-index-{layout}-{len(chunks)}", k, build)
    return folder / "index.sqlite", float(json.loads((folder / "build.json").read_text())["seconds"])


def int8_rows(vecs: np.ndarray) -> np.ndarray:
    """Per-vector symmetric int8: ``round(127 * v / max|v|)`` (cosine is scale-free, so nothing else is kept)."""
    scale = 127.0 / np.maximum(np.abs(vecs).max(axis=1, keepdims=True), 1e-12)
    return np.clip(np.round(vecs * scale), -127, 127).astype(np.int8)


def vec0_only(vecs: np.ndarray, kind: str, key: str) -> Path:
    """A file holding only a sqlite-vec ``vec0`` table of ``vecs`` as ``int8[dim]`` (:func:`int8_rows`) or
    ``bit[dim]`` (``vec_quantize_binary``: the sign of each coordinate), cosine/Hamming; cached."""
    from fieldpack.retrieval import index as idx

    dim = vecs.shape[1]

    def build(tmp: Path) -> None:
        conn = idx.connect(tmp / "vec.sqlite", readonly=False)
        try:
            with conn:
                if kind == "int8":
                    conn.execute(f"CREATE VIRTUAL TABLE v USING vec0(chunk_id INTEGER PRIMARY KEY, "
                                 f"embedding int8[{dim}] distance_metric=cosine)")
                    q8 = int8_rows(vecs)
                    conn.executemany("INSERT INTO v (chunk_id, embedding) VALUES (?, vec_int8(?))",
                                     ((i + 1, q8[i].tobytes()) for i in range(len(q8))))
                else:
                    conn.execute(f"CREATE VIRTUAL TABLE v USING vec0(chunk_id INTEGER PRIMARY KEY, embedding bit[{dim}])")
                    conn.executemany("INSERT INTO v (chunk_id, embedding) VALUES (?, vec_quantize_binary(?))",
                                     ((i + 1, vecs[i].tobytes()) for i in range(len(vecs))))
            conn.execute("VACUUM")
        finally:
            conn.close()

    return C.cached_dir(f"scale-vec0-{kind}-{len(vecs)}", C.content_key(key, kind), build) / "vec.sqlite"


# --- measuring ------------------------------------------------------------------------------------------------------
def exact_topk(vecs: np.ndarray, qv: np.ndarray, n: int) -> np.ndarray:
    """``(len(qv), n)`` chunk ids (row + 1) of exact cosine KNN by numpy (unit rows: dot product)."""
    sims = qv @ vecs.T
    top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
    order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1) + 1


def recall(got: Sequence[Sequence[int]], truth: np.ndarray, at: int) -> float:
    """Mean over queries of ``|got[:at] & truth[:at]| / at``."""
    return float(np.mean([len(set(list(g)[:at]) & set(t[:at].tolist())) / at for g, t in zip(got, truth)]))


def measure(search: Any, qv: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Latency (ms) of ``search(qvec) -> ids`` per query after one warm-up, recall@10 and @50 vs ``truth``."""
    search(qv[0])
    ms, got = [], []
    for q in qv:
        t = time.perf_counter()
        ids = search(q)
        ms.append((time.perf_counter() - t) * 1e3)
        got.append(ids)
    return {"latency_ms": C.lat(ms), "recall@10": recall(got, truth, K), "recall@50": recall(got, truth, CANDIDATES)}


def hybrid(r: Any, e: Any, qs: Sequence[str]) -> dict[str, Any]:
    """Full hybrid ``Retriever.search(q, k=5)`` latency (ms, query embedding included) and, to show where the
    time goes, each part timed on its own: query embedding, vector KNN and FTS5 BM25 of ``CANDIDATES``."""
    r.search(qs[0], k=5)
    parts: dict[str, list[float]] = {"hybrid_ms": [], "embed_ms": [], "vector_ms": [], "bm25_ms": []}
    for q in qs:
        t0 = time.perf_counter()
        r.search(q, k=5)
        t1 = time.perf_counter()
        v = e.embed([q])[0]
        t2 = time.perf_counter()
        r.vector_search(v, CANDIDATES)
        t3 = time.perf_counter()
        r.bm25_search(q, CANDIDATES)
        t4 = time.perf_counter()
        for name, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            parts[name].append(dt * 1e3)
    return {name: C.lat(ms) for name, ms in parts.items()}


def bench_size(size: int, chunks: Sequence[Any], vecs: np.ndarray, synthetic: int, qs: Sequence[str],
               qv: np.ndarray, emb: dict[str, Any], with_hybrid: bool, n_postgres: int = 0,
               pg_items: Sequence[Any] = ()) -> dict[str, Any]:
    """Every layout at one corpus size (see the module docstring); rows keyed by layout. At ``n_postgres``
    chunks (all of PostgreSQL) also page recall@5 / MRR@10 of hybrid search on ``pg_items``, per layout."""
    from fieldpack.retrieval import index as idx
    from fieldpack.retrieval.embedder import OnnxEmbedder
    from fieldpack.retrieval.search import Retriever

    key = C.content_key(str(size), str(synthetic), f"{NOISE_SIGMA}", vecs.tobytes()[:1 << 20], str(vecs.sum()))
    truth = exact_topk(vecs, qv, CANDIDATES)
    rows: dict[str, Any] = {}
    with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]), max_tokens=int(emb["max_tokens"]),
                      threads=1) as e:
        for layout in ("float32", "binary"):
            path, build_s = product_index(chunks, vecs, layout, key)
            with Retriever(path, e) as r:
                row = measure(lambda q: [i for i, _ in r.vector_search(q, CANDIDATES)], qv, truth)
                row.update(index_bytes=path.stat().st_size, build_seconds=build_s, what="full index")
                if layout == "binary":
                    row["memory_bytes"] = r.binary_codes().nbytes
                if with_hybrid:
                    row.update(hybrid(r, e, qs))
                if size == n_postgres and pg_items:
                    row["pg_quality"] = {k: v for k, v in RQ.judge(r, pg_items, "hybrid").items() if k != "page_ranks"}
            rows[layout] = row
            log.info("%d chunks, %s: %s", size, layout, {k: v for k, v in row.items() if k != "latency_ms"})
    for kind in ("int8", "bit"):
        path = vec0_only(vecs, kind, key)
        conn = idx.connect(path, readonly=True)
        try:
            k = CANDIDATES if kind == "int8" else CANDIDATES * 4

            def knn(q: np.ndarray, kind: str = kind, k: int = k) -> list[int]:
                arg = "vec_int8(?)" if kind == "int8" else "vec_quantize_binary(?)"
                blob = int8_rows(q[None])[0].tobytes() if kind == "int8" else q.tobytes()
                return [int(i) for i, in conn.execute(
                    f"SELECT chunk_id FROM v WHERE embedding MATCH {arg} AND k = ? ORDER BY distance", (blob, k))]

            row = measure(knn, qv, truth)
            if kind == "bit":  # recall after exact rescoring of the 4x candidates (numpy, not in the latency)
                got = []
                for q in qv:
                    ids = np.array(knn(q))
                    got.append(ids[np.argsort(-(vecs[ids - 1] @ q))][:CANDIDATES].tolist())
                row["recall@10"], row["recall@50"] = recall(got, truth, K), recall(got, truth, CANDIDATES)
        finally:
            conn.close()
        row.update(index_bytes=path.stat().st_size, what="vec0 table only")
        rows[f"vec0-{kind}"] = row
        log.info("%d chunks, vec0 %s: %s", size, kind, {k: v for k, v in row.items() if k != "latency_ms"})
    return {"chunks": size, "synthetic": synthetic, "rows": rows}


# --- the benchmark family -----------------------------------------------------------------------------------------
LAYOUT_LABELS = {
    "float32": "float32 exact (sqlite-vec vec0 KNN)",
    "binary": "binary 4x-dim SimHash codes, 8x candidates rescored with float16 (fieldpack binary layout)",
    "vec0-int8": "sqlite-vec vec0 int8[384], KNN only",
    "vec0-bit": "sqlite-vec vec0 bit[384] sign codes, k=4x, rescored (KNN time only)",
}


def run(out: Path, *, quick: bool = False) -> dict[str, Any]:
    """``python -m benchmarks retrieval_scale``: every size of :data:`SIZES` (``--quick``: :data:`QUICK_SIZES`);
    writes ``retrieval_scale.json`` and prints the table."""
    emb = RQ.base_export()
    chunks, vecs, counts = real_corpus(emb)
    qs = questions()
    qv, embed_ms = query_vectors(qs, emb)
    doc: dict[str, Any] = {"family": FAMILY, "quick": quick, "real_chunks": counts, "questions": len(qs),
                           "query_embedding_ms": embed_ms, "noise_sigma": NOISE_SIGMA, "k": K,
                           "candidates": CANDIDATES, "sizes": [], "machine": C.machine_info()}
    n_pg = counts.get("postgresql", len(chunks))
    pg_items = [it for it in RQ.load_items(RQ.CORPORA["postgresql"], None) if it.target is not None]
    for size in (QUICK_SIZES if quick else SIZES):
        c, v, synth = scale_corpus(size, chunks, vecs, n_pg)
        doc["sizes"].append(bench_size(size, c, v, synth, qs, qv, emb, size in (n_pg, 100_000) or quick,
                                       n_postgres=n_pg, pg_items=pg_items))
        print("\n".join(table_lines(doc)), flush=True)
    C.write_result(out, FAMILY, doc, None)
    return doc


def table_lines(doc: dict[str, Any]) -> list[str]:
    """Markdown: per size and layout, vector KNN p50/p95 (top-50, query embedding excluded), recall@10/@50 vs
    exact float search, bytes, hybrid p50; ratios to float32 exact measured in the same run."""
    e = doc["query_embedding_ms"]
    lines = [f"{doc['questions']} questions; query embedding (MiniLM int8 ONNX, 1 thread) p50 {e['p50']:.1f} ms, "
             f"p95 {e['p95']:.1f} ms, not in the KNN figures. Real chunks: "
             + ", ".join(f"{k} {v:,}" for k, v in doc["real_chunks"].items()) + ".", "",
             "| chunks (synthetic) | layout | KNN p50 ms | p95 ms | p50 vs float32 | recall@10 | recall@50 | bytes | "
             "bytes vs float32 | hybrid search() p50 / p95 ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in doc["sizes"]:
        base = s["rows"]["float32"]
        for name, r in s["rows"].items():
            h = r.get("hybrid_ms")
            lines.append(
                f"| {s['chunks']:,} ({s['synthetic']:,}) | {name} | {r['latency_ms']['p50']:.1f} | "
                f"{r['latency_ms']['p95']:.1f} | {r['latency_ms']['p50'] / base['latency_ms']['p50']:.2f}x | "
                f"{r['recall@10']:.3f} | {r['recall@50']:.3f} | {r['index_bytes']:,} ({r['what']}) | "
                f"{r['index_bytes'] / base['index_bytes']:.2f}x | "
                + (f"{h['p50']:.1f} / {h['p95']:.1f}" if h else "–") + " |")
    lines.append("")
    for s in doc["sizes"]:
        for name, r in s["rows"].items():
            if "hybrid_ms" in r:
                lines.append(f"* {s['chunks']:,} chunks, {name}: hybrid p50 {r['hybrid_ms']['p50']:.1f} ms; parts "
                             f"timed alone: query embedding {r['embed_ms']['p50']:.1f}, vector KNN "
                             f"{r['vector_ms']['p50']:.1f}, FTS5 BM25 {r['bm25_ms']['p50']:.1f} ms (p50)")
            if "pg_quality" in r:
                qd = r["pg_quality"]
                lines.append(f"* {s['chunks']:,} chunks (PostgreSQL, {qd['n']} answerable questions), {name}: hybrid "
                             f"page recall@5 {qd['page_recall@5']:.2f}, page MRR@10 {qd['page_mrr@10']:.2f}, "
                             f"chunk recall@5 {qd['chunk_recall@5']:.2f}")
            if "memory_bytes" in r:
                lines.append(f"* {s['chunks']:,} chunks, {name}: codes + projection in memory "
                             f"{r['memory_bytes'] / 2**20:.1f} MiB")
    return lines


def summarize(doc: dict[str, Any]) -> list[str]:
    """Markdown for ``summary.md``."""
    return ["## Retrieval at scale (1k / 10k / 13.6k / 100k chunks)", "",
            *(f"* {k}: {v}" for k, v in LAYOUT_LABELS.items()), "", *table_lines(doc), ""]


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embed", nargs="*", metavar="CORPUS", help="only compute the cached embeddings")
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.embed is not None:
        emb = RQ.base_export()
        for name in args.embed or REAL_CORPORA:
            chunks, vecs = corpus_embeddings(name, emb)
            print(name, len(chunks), vecs.shape, flush=True)
        return
    run(args.out, quick=args.quick)


if __name__ == "__main__":
    _main()
