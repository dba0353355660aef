"""Retrieval quality on held-out technician questions: chunk- and page-level recall and MRR per mode, base vs
domain-adapted embedder, on the unseen part of each development QA set; p50 latency and index bytes.

Corpora (Debian HTML documentation packages) and QA sets:

* ``postgresql`` — ``postgresql-doc-15`` (``/usr/share/doc/postgresql-doc-15/html``), QA
  ``benchmarks/qa/postgresql-15.jsonl``;
* ``sqlite`` — ``sqlite3-doc`` (``/usr/share/doc/sqlite3``, sub-folders included), QA
  ``benchmarks/qa/sqlite3.jsonl``;
* ``debian-handbook`` — ``debian-handbook`` with the shared QA set (the set the older defaults were tuned on;
  reported whole, it has no split).

Each development set records its split per item (``"split": "dev"`` or ``"unseen"``); parameters are chosen on
the dev parts only and the unseen parts are what the table reports. Ingest and embeddings are cached under the
bench cache (``$FIELDPACK_BENCH_CACHE``) keyed by the documents and the embedder file, so a rerun only searches.

Run: ``.venv/bin/python -m benchmarks.retrieval_quality [--split unseen|dev] [--corpus NAME ...]
[--chunk-tokens N --overlap-tokens M] [--exclude GLOB ...]`` (``--exclude`` as ``fieldpack build``'s: the
matching pages are left out of the index; the vectors of the other chunks are reused from the full index).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common as C

log = logging.getLogger(__name__)

QA_DIR = Path(__file__).resolve().parent / "qa"
CHUNK_TOKENS, OVERLAP_TOKENS = 200, 40
EXCLUDE: tuple[str, ...] = ()  # --exclude patterns (builder.ingest.exclude), set by _main
K = 10
MODES = ("vector", "bm25", "hybrid")


@dataclass(frozen=True)
class CorpusSpec:
    """A document set: its name, installed folder and QA file."""

    name: str
    docs: Path
    qa: Path


CORPORA: dict[str, CorpusSpec] = {
    "postgresql": CorpusSpec("postgresql", C.POSTGRES_DOCS, QA_DIR / "postgresql-15.jsonl"),
    "sqlite": CorpusSpec("sqlite", Path("/usr/share/doc/sqlite3"), QA_DIR / "sqlite3.jsonl"),
    "debian-handbook": CorpusSpec("debian-handbook", C.DEBIAN_HANDBOOK, C.DEBIAN_QA),
}


# --- cached artifacts -------------------------------------------------------------------------------------------
def load_export(folder: Path) -> dict[str, Any]:
    """An ONNX embedder export folder (``export.json`` beside ``embedder.onnx`` and ``tokenizer.json``) as the
    export dict, paths made absolute."""
    d = json.loads((Path(folder) / "export.json").read_text())
    d["onnx_path"] = str(Path(folder) / Path(d["onnx_path"]).name)
    d["tokenizer_path"] = str(Path(folder) / Path(d["tokenizer_path"]).name)
    return d


def base_export() -> dict[str, Any]:
    """The base MiniLM int8 export: ``$FIELDPACK_BENCH_EMBEDDER`` (a folder, so cached indexes stay valid
    across edits of the export code, whose dynamo export is not byte-stable) or a fresh cached export."""
    env = os.environ.get("FIELDPACK_BENCH_EMBEDDER")
    return load_export(Path(env)) if env else C.embedder_export("int8")


def _docs_signature(docs: Path) -> str:
    files = sorted(p for p in docs.rglob("*.html") if p.is_file())
    return C.content_key(str(docs), *(f"{p.relative_to(docs)}:{p.stat().st_size}" for p in files))


def corpus_chunks(spec: CorpusSpec, emb: dict[str, Any]) -> list[Any]:
    """The build's chunks of ``spec.docs`` (200/40 tokens, the build defaults), cached as a pickle."""
    from fieldpack.builder.ingest import ingest
    from fieldpack.retrieval.embedder import load_tokenizer

    key = C.content_key(_docs_signature(spec.docs), Path(emb["tokenizer_path"]), f"{CHUNK_TOKENS}/{OVERLAP_TOKENS}")

    def build(tmp: Path) -> None:
        tok = load_tokenizer(Path(emb["tokenizer_path"]), max_tokens=None)
        res = ingest(spec.docs, count_tokens=lambda t: len(tok.encode(t, add_special_tokens=False).ids),
                     chunk_tokens=CHUNK_TOKENS, overlap_tokens=OVERLAP_TOKENS)
        (tmp / "chunks.pkl").write_bytes(pickle.dumps(list(res.chunks)))

    folder = C.cached_dir(f"chunks-{spec.name}", key, build)
    chunks = pickle.loads((folder / "chunks.pkl").read_bytes())
    return [c for c in chunks if not _excluded(c.source)]


def _excluded(source: str) -> bool:
    from fieldpack.builder.ingest.exclude import Excludes

    return bool(EXCLUDE) and Excludes.parse(EXCLUDE).match(source) is not None


def corpus_index(spec: CorpusSpec, emb: dict[str, Any], chunks: Sequence[Any], label: str) -> Path:
    """``index.sqlite`` of ``chunks`` embedded with ``emb`` (an ``EmbedderExport.to_dict()``), cached."""
    from fieldpack.builder.index_build import build_index, embed_chunks
    from fieldpack.retrieval.embedder import OnnxEmbedder
    from fieldpack.shared import index_format

    key = C.content_key(_docs_signature(spec.docs), Path(emb["onnx_path"]), Path(emb["tokenizer_path"]),
                        f"{CHUNK_TOKENS}/{OVERLAP_TOKENS}", str(index_format.INDEX_FORMAT),
                        Path(index_format.__file__), *(("exclude", *EXCLUDE) if EXCLUDE else ()))

    def build(tmp: Path) -> None:
        t0 = time.perf_counter()
        if EXCLUDE:  # the kept chunks' vectors, from the full index (built once)
            vecs = _kept_vectors(spec, emb, label, chunks)
        else:
            with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]),
                              max_tokens=int(emb["max_tokens"]), threads=C.bench_threads()) as e:
                vecs = embed_chunks(list(chunks), e)
        np.save(tmp / "embeddings.npy", vecs)
        build_index(list(chunks), vecs, tmp / "index.sqlite", embedder_name=str(emb["name"]))
        (tmp / "build.json").write_text(json.dumps({"seconds": time.perf_counter() - t0, "chunks": len(chunks)}))

    return C.cached_dir(f"index-{spec.name}-{label}", key, build) / "index.sqlite"


def _kept_vectors(spec: CorpusSpec, emb: dict[str, Any], label: str, kept: Sequence[Any]) -> np.ndarray:
    """Rows of the full index's ``embeddings.npy`` for the ``kept`` chunks (float32, shape (len(kept), dim))."""
    global EXCLUDE
    saved, EXCLUDE = EXCLUDE, ()
    try:
        full = corpus_chunks(spec, emb)
        vecs = np.load(corpus_index(spec, emb, full, label).parent / "embeddings.npy")
    finally:
        EXCLUDE = saved
    row = {(c.source, c.line_start, c.line_end, c.text): i for i, c in enumerate(full)}
    return vecs[[row[(c.source, c.line_start, c.line_end, c.text)] for c in kept]]


# --- judging ------------------------------------------------------------------------------------------------------
class CachedEmbedder:
    """An :class:`OnnxEmbedder` that remembers query vectors, so a sweep over ranking settings embeds each
    question once (latency is measured with a plain embedder, never this one)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.dimension = inner.dimension
        self._memo: dict[str, np.ndarray] = {}

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        missing = [t for t in texts if t not in self._memo]
        if missing:
            for t, v in zip(missing, self.inner.embed(missing, batch_size=batch_size)):
                self._memo[t] = v
        return np.stack([self._memo[t] for t in texts])


def judge(retriever: Any, items: Sequence[Any], mode: str, *, k: int = K) -> dict[str, Any]:
    """Chunk- and page-level figures of one mode over the answerable ``items`` (QAItem), as ``fieldpack eval``
    computes them: chunk recall@5 (expected document among the top-5 chunks), page recall@1/5 and page MRR@10
    over the page ranking (distinct sources in order; ``also_ok`` pages count), and per item the ranks."""
    from fieldpack.device.evaluate import metrics as M

    chunk_ranks, page_ranks = [], []
    for it in items:
        if it.target is None:
            continue
        hits = retriever.search(it.question, k=k, mode=mode)
        chunk_ranks.append(M.first_relevant_rank([it.target.source_matches(h.source) for h in hits]))
        pages = M.page_ranking([h.source for h in hits])
        page_ranks.append(M.first_relevant_rank([it.page_matches(p) for p in pages]))
    n = len(chunk_ranks)

    def rec(ranks: list[int | None], c: int) -> float:
        return sum(1 for r in ranks if r is not None and r <= c) / n

    return {"n": n, "chunk_recall@5": rec(chunk_ranks, 5), "page_recall@1": rec(page_ranks, 1),
            "page_recall@5": rec(page_ranks, 5),
            "page_mrr@10": sum(1.0 / r for r in page_ranks if r is not None and r <= 10) / n,
            "page_ranks": page_ranks}


def abstention(retriever: Any, items: Sequence[Any], *, k: int = 5) -> dict[str, Any]:
    """The relevance gate (:func:`retrieval.search.is_relevant`, default threshold) on hybrid top-``k``:
    share of unanswerable items refused and of answerable ones passed."""
    from fieldpack.retrieval.search import is_relevant

    unans = [it for it in items if it.unanswerable]
    ans = [it for it in items if not it.unanswerable]
    refused = sum(not is_relevant(retriever.search(it.question, k=k), query=it.question) for it in unans)
    passed = sum(is_relevant(retriever.search(it.question, k=k), query=it.question) for it in ans)
    return {"unanswerable": len(unans), "refused": refused, "answerable": len(ans), "passed": passed}


def load_items(spec: CorpusSpec, split: str | None) -> list[Any]:
    """The QA items of ``spec`` in ``split`` (``None``: all; the Debian set has no split and is used whole)."""
    from fieldpack.device.evaluate.qa import load_qa

    qa = load_qa(spec.qa)
    if split is None or all(i.split is None for i in qa.items):
        return list(qa.items)
    return list(qa.only_split(split).items)


#: The ranking before issue 13 (equal RRF, equal BM25 columns, 20 candidates, chunk ranking), for comparison.
OLD_DEFAULTS = dict(vector_weight=1.0, bm25_weight=1.0, bm25_columns=(1.0, 1.0, 1.0), candidates=20, page_decay=None)


def latency(index: Path, emb: dict[str, Any], items: Sequence[Any], *, repeats: int = 3,
            config: Any = None) -> dict[str, Any]:
    """Hybrid retrieval wall time per question (ms; query embedding included, one thread; ``config``: a
    SearchConfig, default ranking when ``None``): p50/p95 over ``repeats`` passes after one warm-up question."""
    from fieldpack.retrieval.embedder import OnnxEmbedder
    from fieldpack.retrieval.search import Retriever

    with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]), max_tokens=int(emb["max_tokens"]),
                      threads=1) as e, Retriever(index, e, config) as r:
        r.search(items[0].question, k=5)
        ms = []
        for _ in range(repeats):
            for it in items:
                t = time.perf_counter()
                r.search(it.question, k=5)
                ms.append((time.perf_counter() - t) * 1e3)
    return C.lat(ms)


def run_table(corpora: Sequence[str], split: str, embedders: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per corpus and embedder: the old ranking (hybrid) and the default ranking per mode on ``split``;
    abstention of the default; p50 latency and index bytes. ``embedders``: label -> export dict."""
    from fieldpack.retrieval.embedder import OnnxEmbedder
    from fieldpack.retrieval.search import Retriever, SearchConfig

    base = next(iter(embedders.values()))
    out: dict[str, Any] = {"split": split, "corpora": {}}
    for name in corpora:
        spec = CORPORA[name]
        items = load_items(spec, split)
        chunks = corpus_chunks(spec, base)
        rows = []
        for label, emb in embedders.items():
            index = corpus_index(spec, emb, chunks, label)
            with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]),
                              max_tokens=int(emb["max_tokens"]), threads=1) as raw:
                e = CachedEmbedder(raw)
                with Retriever(index, e, SearchConfig(**OLD_DEFAULTS)) as r:
                    m = judge(r, items, "hybrid")
                    rows.append({"embedder": label, "ranking": "old (equal RRF, chunks)", "mode": "hybrid", **m})
                with Retriever(index, e) as r:
                    for mode in MODES:
                        rows.append({"embedder": label, "ranking": "default", "mode": mode, **judge(r, items, mode)})
                    gate = abstention(r, items)
            rows[-1]["abstention"] = gate
            answerable = [i for i in items if not i.unanswerable]
            rows[-1]["latency_ms"] = latency(index, emb, answerable)
            rows[-1]["latency_old_ms"] = latency(index, emb, answerable, config=SearchConfig(**OLD_DEFAULTS))
            rows[-1]["index_bytes"] = index.stat().st_size
        out["corpora"][name] = {"chunks": len(chunks), "questions": len(items), "rows": rows}
    return out


def table_lines(doc: dict[str, Any]) -> list[str]:
    """The issue's table as markdown lines: per corpus, embedder x ranking x mode -> chunk recall@5, page
    recall@5, page MRR@10; then latency (with its ratio to the former ranking, same run), index bytes, gate."""
    lines: list[str] = []
    for name, c in doc["corpora"].items():
        lines += ["", f"{name} ({doc['split']} part, {c['questions']} questions, {c['chunks']} chunks)", "",
                  "| embedder | ranking | mode | recall@5 (chunks) | page recall@5 | page MRR@10 |",
                  "|---|---|---|---|---|---|"]
        for r in c["rows"]:
            lines.append(f"| {r['embedder']} | {r['ranking']} | {r['mode']} | {r['chunk_recall@5']:.2f} | "
                         f"{r['page_recall@5']:.2f} | {r['page_mrr@10']:.2f} |")
        lines.append("")
        for r in c["rows"]:
            if "latency_ms" in r:
                a = r["abstention"]
                ratio = r["latency_ms"]["p50"] / r["latency_old_ms"]["p50"]
                lines.append(f"{r['embedder']}: hybrid p50 {r['latency_ms']['p50']:.1f} ms (p95 "
                             f"{r['latency_ms']['p95']:.1f}), {ratio:.2f}x the former ranking's p50 "
                             f"({r['latency_old_ms']['p50']:.1f} ms, same run), index {r['index_bytes']:,} bytes; "
                             f"gate refused {a['refused']}/{a['unanswerable']} unanswerable, passed "
                             f"{a['passed']}/{a['answerable']} answerable")
    return lines


def print_table(doc: dict[str, Any]) -> None:
    """Print :func:`table_lines`."""
    print("\n".join(table_lines(doc)))


# --- the benchmark family -----------------------------------------------------------------------------------------
FAMILY = "retrieval_quality"


def run(out: Path, *, quick: bool = False) -> dict[str, Any]:
    """``python -m benchmarks retrieval_quality``: the unseen parts of every corpus (``--quick``: the Debian
    handbook only, 2k chunks) with the base embedder; writes ``retrieval_quality.json``."""
    corpora = ["debian-handbook"] if quick else list(CORPORA)
    doc = run_table(corpora, "unseen", {"base": base_export()})
    doc.update(family=FAMILY, quick=quick, machine=C.machine_info())
    C.write_result(out, FAMILY, doc, None)
    return doc


def summarize(doc: dict[str, Any]) -> list[str]:
    """Markdown for ``summary.md``."""
    return ["## Retrieval quality on held-out questions", *table_lines(doc), ""]


def _set_chunking(chunk_tokens: int, overlap_tokens: int) -> None:
    """Chunk every corpus with this budget and overlap (embedder tokens) instead of the build's defaults; the
    cached chunks and indexes are keyed by both, so each setting is built once."""
    global CHUNK_TOKENS, OVERLAP_TOKENS
    if chunk_tokens < 1 or not 0 <= overlap_tokens < chunk_tokens:
        raise SystemExit(f"--chunk-tokens {chunk_tokens} / --overlap-tokens {overlap_tokens}: use a budget >= 1 "
                         "and 0 <= overlap < budget")
    CHUNK_TOKENS, OVERLAP_TOKENS = chunk_tokens, overlap_tokens


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", nargs="*", default=None, help="only build the cached indexes of these corpora")
    ap.add_argument("--split", default="unseen", choices=["dev", "unseen"], help="part of each set to judge")
    ap.add_argument("--corpus", action="append", choices=list(CORPORA), help="corpora (default: all)")
    ap.add_argument("--adapted", action="append", default=[], metavar="LABEL=DIR",
                    help="an adapted embedder's ONNX export folder (export.json inside) to compare with the base")
    ap.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS,
                    help=f"chunk budget in embedder tokens (default {CHUNK_TOKENS}, the build's)")
    ap.add_argument("--overlap-tokens", type=int, default=OVERLAP_TOKENS,
                    help=f"chunk overlap in embedder tokens (default {OVERLAP_TOKENS}, the build's)")
    ap.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                    help="leave these pages out of the index, as `fieldpack build --exclude` (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    global EXCLUDE
    EXCLUDE = tuple(args.exclude)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _set_chunking(args.chunk_tokens, args.overlap_tokens)
    emb = base_export()
    if args.prepare is not None:
        for name in args.prepare or list(CORPORA):
            spec = CORPORA[name]
            chunks = corpus_chunks(spec, emb)
            log.info("%s: %d chunks", name, len(chunks))
            print(corpus_index(spec, emb, chunks, "base"), flush=True)
        return
    embedders = {"base": emb}
    for spec_s in args.adapted:
        label, _, folder = spec_s.partition("=")
        embedders[label] = load_export(Path(folder))
    doc = run_table(args.corpus or list(CORPORA), args.split, embedders)
    print_table(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    _main()
