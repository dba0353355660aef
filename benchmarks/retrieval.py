"""Retrieval: fieldpack's index (sqlite-vec + FTS5; vector, BM25, hybrid RRF) vs LangChain's Chroma vector store
with sentence-transformers embeddings. Same MiniLM-L6 model, same chunks, same questions, same threads.

Per corpus (Debian Administrator's Handbook with the shared QA set; PostgreSQL 15 docs at 10% and 100% of
its files, ~1k and ~12k chunks; 5% with ``--quick``):

* ingest once with fieldpack's ingest (200-token chunks, 40 overlap: the build defaults); both systems index
  exactly these chunks' ``embedding_text()`` (section path + text);
* build time: fieldpack = ONNX embed (int8 if it passed the export gate, as bundles ship) + ``build_index``;
  Chroma = ``Chroma.add_texts`` (sentence-transformers on torch, fp32, + HNSW insert, persisted);
* serving, each system in its own fresh process (so memory is its own): load time, per-query latency p50/p95
  (query embedding included), RSS delta (peak RSS minus RSS at process start), recall@1/5 and MRR@10 of the
  expected document.

Questions: the shared QA's answerable items for the handbook (expected document = ``expected_source``); for
the PostgreSQL docs, synthetic known-item queries (the heading of a sampled chunk, expected document = that
chunk's file), labelled as such.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common as C

log = logging.getLogger(__name__)

FAMILY = "retrieval"
MODES = ("vector", "bm25", "hybrid")
K = 10
CHUNK_TOKENS, OVERLAP_TOKENS = 200, 40


# --- queries ---------------------------------------------------------------------------------------------------
def debian_queries() -> list[dict[str, str]]:
    """The shared QA set's answerable questions: ``{"q", "target"}`` with the expected document."""
    from fieldpack.device.evaluate.qa import load_qa

    qa = load_qa(C.DEBIAN_QA)
    return [{"q": i.question, "target": i.target.source} for i in qa.items if i.target is not None]


def title_queries(chunks: list[Any], n: int, seed: int = 0) -> list[dict[str, str]]:
    """Synthetic known-item queries: the last heading of ``n`` sampled chunks (>= 3 words, no duplicate
    heading), expected document = the chunk's file."""
    seen: set[str] = set()
    pool = []
    for c in chunks:
        title = c.section.split(" > ")[-1].strip() if c.section else ""
        title = title.split(". ", 1)[1] if title[:1].isdigit() and ". " in title else title  # "9.3. Foo" -> "Foo"
        if len(title.split()) >= 3 and title.lower() not in seen:
            seen.add(title.lower())
            pool.append({"q": title, "target": c.source})
    random.Random(seed).shuffle(pool)
    return pool[:n]


# --- building -------------------------------------------------------------------------------------------------
def build_fieldpack(chunks: list[Any], emb: dict[str, Any], out: Path, threads: int) -> dict[str, Any]:
    """Embed with the ONNX embedder and write the sqlite-vec + FTS5 index; seconds and bytes."""
    from fieldpack.builder.index_build import build_index, embed_chunks
    from fieldpack.retrieval.embedder import OnnxEmbedder

    t0 = time.perf_counter()
    with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]), max_tokens=int(emb["max_tokens"]),
                      threads=threads) as e:
        vecs = embed_chunks(chunks, e)
        t_emb = time.perf_counter() - t0
        stats = build_index(chunks, vecs, out, embedder_name=emb["name"])
    total = time.perf_counter() - t0
    return {"seconds": total, "embed_seconds": t_emb, "index_seconds": total - t_emb, "bytes": stats.size_bytes}


class _STEmbeddings:
    """LangChain ``Embeddings`` over a sentence-transformers model (torch, CPU), unit-normalised."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(model_dir), device="cpu")

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                 show_progress_bar=False).tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def _langchain_embeddings(model_dir: Path, threads: int) -> Any:
    from langchain_core.embeddings import Embeddings

    class STEmbeddings(_STEmbeddings, Embeddings):
        pass

    return STEmbeddings(model_dir, threads)


def _chroma(path: Path, embeddings: Any) -> Any:
    import chromadb
    from chromadb.config import Settings
    from langchain_chroma import Chroma

    client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
    return Chroma(collection_name="bench", embedding_function=embeddings, client=client,
                  collection_metadata={"hnsw:space": "cosine"})


def build_chroma(chunks: list[Any], out: Path, threads: int) -> dict[str, Any]:
    """Index the same chunks in a persisted Chroma collection through LangChain; seconds and bytes on disk."""
    t0 = time.perf_counter()
    store = _chroma(out, _langchain_embeddings(C.minilm_dir(), threads))
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    batch = 1000
    for i in range(0, len(chunks), batch):
        part = chunks[i:i + batch]
        store.add_texts([c.embedding_text() for c in part],
                        metadatas=[{"source": c.source, "section": c.section} for c in part],
                        ids=[str(i + j + 1) for j in range(len(part))])
    seconds = time.perf_counter() - t1
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return {"seconds": seconds, "model_load_seconds": t_load, "bytes": size}


# --- serving (runs in a fresh process per system) ------------------------------------------------------------
def serve(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one system's store, run every query in every mode; latencies (ms), ranks, load time, memory.

    ``spec``: ``{"system": "fieldpack"|"chroma", "store", "queries": [{"q", "target"}], "k", "threads",
    "embedder": export dict (fieldpack)}``.
    """
    from fieldpack.device.evaluate.qa import Target

    rss0 = C.rss_bytes()
    t0 = time.perf_counter()
    k, threads = int(spec["k"]), int(spec["threads"])
    embed_ms: list[float] = []  # chroma only: the query-embedding share of each search
    if spec["system"] == "fieldpack":
        from fieldpack.retrieval.embedder import OnnxEmbedder
        from fieldpack.retrieval.search import Retriever

        emb = spec["embedder"]
        embedder = OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]),
                                max_tokens=int(emb["max_tokens"]), threads=threads)
        retriever = Retriever(Path(spec["store"]), embedder)
        modes = list(MODES)

        def search(q: str, mode: str) -> list[str]:
            return [h.source for h in retriever.search(q, k=k, mode=mode)]
    else:
        store = _chroma(Path(spec["store"]), _langchain_embeddings(C.minilm_dir(), threads))
        modes = ["vector"]

        def search(q: str, mode: str) -> list[str]:
            # what similarity_search does, in two timed steps: query embedding, then the HNSW search
            t = time.perf_counter()
            vec = store.embeddings.embed_query(q)
            embed_ms.append((time.perf_counter() - t) * 1e3)
            return [d.metadata["source"] for d in store.similarity_search_by_vector(vec, k=k)]
    load_s = time.perf_counter() - t0
    rss_loaded = C.rss_bytes()
    queries = spec["queries"]
    for mode in modes:  # warm-up
        search(queries[0]["q"], mode)
    embed_ms.clear()
    out: dict[str, Any] = {"load_seconds": load_s, "modes": {}}
    for mode in modes:
        ms, ranks = [], []
        for item in queries:
            t = time.perf_counter()
            sources = search(item["q"], mode)
            ms.append((time.perf_counter() - t) * 1e3)
            target = Target(item["target"])
            ranks.append(next((i + 1 for i, s in enumerate(sources) if target.source_matches(s)), None))
        out["modes"][mode] = {"latency_ms": ms, "ranks": ranks}
        if embed_ms:
            out["modes"][mode]["embed_ms"] = list(embed_ms)
    # VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, so a child would report the parent's peak
    peak = C.peak_rss_bytes()
    out.update(rss_start=rss0, rss_loaded=rss_loaded, rss_end=C.rss_bytes(), rss_peak=peak, rss_delta=peak - rss0)
    return out


def _serve_in_subprocess(spec: dict[str, Any], work: Path) -> dict[str, Any]:
    spec_path = work / f"serve-{spec['system']}.json"
    spec_path.write_text(json.dumps(spec))
    r = subprocess.run([sys.executable, "-m", "benchmarks.retrieval", "--serve", str(spec_path)],
                       cwd=C.REPO, capture_output=True, text=True, timeout=3600,
                       env=dict(os.environ, TOKENIZERS_PARALLELISM="false", ANONYMIZED_TELEMETRY="False"))
    if r.returncode != 0:
        raise RuntimeError(f"serving {spec['system']} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _quality(ranks: list[int | None]) -> dict[str, float | None]:
    from fieldpack.device.evaluate import metrics as M

    n = len(ranks)
    return {"n": n, "recall@1": M.rate(r is not None and r <= 1 for r in ranks),
            "recall@5": M.rate(r is not None and r <= 5 for r in ranks),
            "mrr@10": (sum(1.0 / r for r in ranks if r) / n) if n else None}


# --- the family ---------------------------------------------------------------------------------------------
def run(out: Path, *, quick: bool = False) -> dict[str, Any]:
    """Run the retrieval benchmark; writes ``retrieval.json`` and ``retrieval.png`` into ``out``."""
    import shutil
    import tempfile

    from fieldpack.builder.ingest import ingest
    from fieldpack.retrieval.embedder import OnnxEmbedder

    threads = C.bench_threads()
    info = C.machine_info()
    emb = C.embedder_export("int8")
    corpora = [C.stage_corpus("debian-handbook", C.DEBIAN_HANDBOOK)]
    fractions = (0.05,) if quick else (0.1, 1.0)
    corpora += [C.stage_corpus(f"postgresql-{round(f * 100)}pct", C.POSTGRES_DOCS, fraction=f) for f in fractions]
    n_synth = 30 if quick else 100
    results = []
    with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]), max_tokens=int(emb["max_tokens"]),
                      threads=threads) as counter:
        count_tokens = counter.count_tokens
        for corpus in corpora:
            log.info("retrieval: %s (%d files)", corpus.name, corpus.files)
            t0 = time.perf_counter()
            ing = ingest(corpus.docs, count_tokens=count_tokens, chunk_tokens=CHUNK_TOKENS,
                         overlap_tokens=OVERLAP_TOKENS)
            ingest_s = time.perf_counter() - t0
            chunks = ing.chunks
            if corpus.name == "debian-handbook":
                queries, qkind = debian_queries(), "shared QA (answerable items)"
            else:
                queries, qkind = title_queries(chunks, n_synth), "synthetic title queries"
            work = Path(tempfile.mkdtemp(prefix=f"bench-{corpus.name}-", dir=C.cache_root()))
            try:
                ours_build = build_fieldpack(chunks, emb, work / "index.sqlite", threads)
                chroma_build = build_chroma(chunks, work / "chroma", threads)
                base = {"queries": queries, "k": K, "threads": threads, "embedder": emb}
                ours = _serve_in_subprocess(dict(base, system="fieldpack", store=str(work / "index.sqlite")), work)
                chroma = _serve_in_subprocess(dict(base, system="chroma", store=str(work / "chroma")), work)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            row: dict[str, Any] = {
                "corpus": corpus.name, "files": corpus.files, "total_files": corpus.total_files,
                "corpus_bytes": corpus.bytes, "chunks": len(chunks), "ingest_seconds": ingest_s,
                "queries": len(queries), "query_kind": qkind,
                "fieldpack": {"build": ours_build, "load_seconds": ours["load_seconds"],
                              "rss_delta_bytes": ours["rss_delta"], "rss_peak_bytes": ours["rss_peak"], "modes": {}},
                "chroma": {"build": chroma_build, "load_seconds": chroma["load_seconds"],
                           "rss_delta_bytes": chroma["rss_delta"], "rss_peak_bytes": chroma["rss_peak"], "modes": {}},
            }
            for sysname, res in (("fieldpack", ours), ("chroma", chroma)):
                row[sysname]["rss_loaded_delta_bytes"] = res["rss_loaded"] - res["rss_start"]
                for mode, m in res["modes"].items():
                    row[sysname]["modes"][mode] = {"latency_ms": C.lat(m["latency_ms"]), **_quality(m["ranks"])}
                    if "embed_ms" in m:
                        row[sysname]["modes"][mode]["embed_latency_ms"] = C.lat(m["embed_ms"])
            cv = row["chroma"]["modes"]["vector"]
            fv = row["fieldpack"]["modes"]
            row["ratios"] = {
                "build_time_chroma_over_fieldpack": chroma_build["seconds"] / ours_build["seconds"],
                "rss_chroma_over_fieldpack": chroma["rss_delta"] / max(1, ours["rss_delta"]),
                "disk_chroma_over_fieldpack": chroma_build["bytes"] / max(1, ours_build["bytes"]),
                **{f"p50_chroma_over_fieldpack_{m}": cv["latency_ms"]["p50"] / fv[m]["latency_ms"]["p50"]
                   for m in fv},
                **{f"p95_chroma_over_fieldpack_{m}": cv["latency_ms"]["p95"] / fv[m]["latency_ms"]["p95"]
                   for m in fv},
            }
            log.info("retrieval %s: %d chunks, fieldpack build %.1fs vs chroma %.1fs", corpus.name, len(chunks),
                     ours_build["seconds"], chroma_build["seconds"])
            results.append(row)
    doc = {"family": FAMILY, "quick": quick, "machine": info, "threads": threads, "k": K,
           "chunk_tokens": CHUNK_TOKENS, "overlap_tokens": OVERLAP_TOKENS,
           "embedder": {"fieldpack": f"{emb['name']} ONNX {emb['precision']}",
                        "chroma": "sentence-transformers all-MiniLM-L6-v2 (torch fp32)"},
           "corpora": results}
    C.write_result(out, FAMILY, doc, lambda fig: draw(fig, doc), figsize=(12, 7))
    return doc


def draw(fig: Any, doc: dict[str, Any]) -> None:
    """2 x 2: build time vs chunks, query latency p50/p95 vs chunks, serving RSS, recall@5."""
    rows = doc["corpora"]
    xs = [r["chunks"] for r in rows]
    (a, b), (c, d) = fig.subplots(2, 2)
    a.plot(xs, [r["fieldpack"]["build"]["seconds"] for r in rows], "o-", label="fieldpack (ONNX + sqlite-vec/FTS5)")
    a.plot(xs, [r["chroma"]["build"]["seconds"] for r in rows], "s-", label="LangChain Chroma (ST torch)")
    a.set(xlabel="chunks", ylabel="build s", title="index build time")
    for m, style in zip(MODES, ("o-", "^-", "d-")):
        b.plot(xs, [r["fieldpack"]["modes"][m]["latency_ms"]["p50"] for r in rows], style, label=f"fieldpack {m} p50")
    b.plot(xs, [r["chroma"]["modes"]["vector"]["latency_ms"]["p50"] for r in rows], "s-", label="chroma p50")
    b.plot(xs, [r["fieldpack"]["modes"]["hybrid"]["latency_ms"]["p95"] for r in rows], "d--", label="fieldpack hybrid p95")
    b.plot(xs, [r["chroma"]["modes"]["vector"]["latency_ms"]["p95"] for r in rows], "s--", label="chroma p95")
    b.set(xlabel="chunks", ylabel="ms per query", title="query latency (embedding included)")
    names = [r["corpus"] for r in rows]
    width = 0.38
    c.bar([i - width / 2 for i in range(len(rows))], [r["fieldpack"]["rss_delta_bytes"] / 2**20 for r in rows],
          width, label="fieldpack")
    c.bar([i + width / 2 for i in range(len(rows))], [r["chroma"]["rss_delta_bytes"] / 2**20 for r in rows],
          width, label="chroma")
    c.set_xticks(range(len(rows)), names, fontsize=7)
    c.set(ylabel="MiB", title="serving process RSS delta (peak)")
    series = [(f"fieldpack {m}", "fieldpack", m) for m in MODES] + [("chroma vector", "chroma", "vector")]
    w = 0.8 / len(series)
    for j, (lab, s, m) in enumerate(series):
        d.bar([i + (j - (len(series) - 1) / 2) * w for i in range(len(rows))],
              [r[s]["modes"][m]["recall@5"] or 0 for r in rows], w, label=lab)
    d.set_xticks(range(len(rows)), names, fontsize=7)
    d.set(ylabel="recall@5", ylim=(0, 1), title="recall@5 of the expected document")
    for ax in (a, b, c, d):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def summarize(doc: dict[str, Any]) -> list[str]:
    """Markdown lines for summary.md."""
    lines = [f"## Retrieval (k={doc['k']}, {doc['threads']} threads; fieldpack: {doc['embedder']['fieldpack']}; "
             f"baseline: LangChain Chroma + {doc['embedder']['chroma']})", ""]
    rows = []
    for r in doc["corpora"]:
        f, c = r["fieldpack"], r["chroma"]
        rows.append([f"{r['corpus']} ({r['files']}/{r['total_files']} files)", r["chunks"], r["query_kind"],
                     f"{C.fmt(f['build']['seconds'])} / {C.fmt(c['build']['seconds'])}",
                     f"{C.fmt(f['rss_delta_bytes'] / 2**20)} / {C.fmt(c['rss_delta_bytes'] / 2**20)}",
                     *[f"{C.fmt(f['modes'][m]['latency_ms']['p50'])} / {C.fmt(f['modes'][m]['latency_ms']['p95'])}"
                       for m in MODES],
                     f"{C.fmt(c['modes']['vector']['latency_ms']['p50'])} / {C.fmt(c['modes']['vector']['latency_ms']['p95'])}",
                     C.fmt((c['modes']['vector'].get('embed_latency_ms') or {}).get('p50')),
                     *[f"{C.fmt(f['modes'][m]['recall@5'])} / {C.fmt(f['modes'][m]['mrr@10'])}" for m in MODES],
                     f"{C.fmt(c['modes']['vector']['recall@5'])} / {C.fmt(c['modes']['vector']['mrr@10'])}"])
    lines += C.md_table(["corpus", "chunks", "queries", "build s (fp / chroma)", "RSS MiB (fp / chroma)",
                         "vector p50/p95 ms", "bm25 p50/p95 ms", "hybrid p50/p95 ms", "chroma p50/p95 ms",
                         "chroma embed p50 ms",
                         "vector R@5/MRR", "bm25 R@5/MRR", "hybrid R@5/MRR", "chroma R@5/MRR"], rows)
    lines.append("")
    rrows = [[r["corpus"], r["ratios"]["build_time_chroma_over_fieldpack"], r["ratios"]["rss_chroma_over_fieldpack"],
              r["ratios"]["disk_chroma_over_fieldpack"], r["ratios"]["p50_chroma_over_fieldpack_vector"],
              r["ratios"]["p50_chroma_over_fieldpack_hybrid"]] for r in doc["corpora"]]
    lines += C.md_table(["corpus", "build time ×", "RSS ×", "disk ×", "p50 × (vs vector)", "p50 × (vs hybrid)"], rrows)
    lines += ["", "Ratios are Chroma / fieldpack (above 1: fieldpack is cheaper).", ""]
    return lines


def _main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.retrieval")
    p.add_argument("--serve", type=Path, help="internal: serve one system from a spec file and print JSON")
    p.add_argument("--out", type=Path, default=Path("bench"))
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.serve:
        print(json.dumps(serve(json.loads(a.serve.read_text()))))
        return
    from benchmarks.__main__ import main

    main(["retrieval", "--out", str(a.out)] + (["--quick"] if a.quick else []))


if __name__ == "__main__":
    _main()
