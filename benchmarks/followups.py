"""Follow-up questions in a conversation: retrieval of the message alone (before) against
:func:`fieldpack.retrieval.followup.search_in_context` (the device's rule), same run, on the PostgreSQL 15 index.

Three kinds of second turns, per split (``dev``: the rule's thresholds were chosen there; ``unseen``: the report):

* **follow-ups** (``benchmarks/qa/followups/postgresql-15.jsonl``, kind ``answerable``): a second question that
  needs the first for its topic ("Does it need a restart?"). Figures: the relevance gate passes (k=5) and the right
  page is in the top 5 (what the model needs), page recall@5 and MRR@10 over the top 10.
* **asides** (kind ``offtopic``): a second message the documents do not answer ("Nearest pharmacy?"): share the
  gate refuses.
* **self-contained questions**: every answerable question of ``benchmarks/qa/postgresql-15.jsonl`` in the split,
  asked after another, unrelated question of the same split (seeded): the rule must leave them alone. Figures as
  for follow-ups.

Run: ``.venv/bin/python -m benchmarks.followups [--split unseen|dev]`` (the PostgreSQL index is the bench
cache's, built by ``benchmarks.retrieval_quality --prepare postgresql`` on first use: about 3 min).
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import retrieval_quality as RQ

FOLLOWUPS = RQ.QA_DIR / "followups" / "postgresql-15.jsonl"
K_GATE, K_RANK = 5, 10


@dataclass(frozen=True)
class Turn2:
    """A second turn: the kind, the previous question, the message, and which pages answer it (``None``: none)."""

    kind: str
    previous: str
    message: str
    relevant: Callable[[str], bool] | None


def second_turns(split: str, *, seed: int = 7) -> list[Turn2]:
    """Follow-ups and asides of the follow-up set, then the QA set's self-contained questions each put after a
    different question of the split (chosen with ``random.Random(seed)``)."""
    rows = [json.loads(line) for line in FOLLOWUPS.read_text(encoding="utf-8").splitlines() if line.strip()]
    out = []
    for r in rows:
        if r["split"] != split:
            continue
        pages = [r["expected_source"], *r["also_ok"]] if r["expected_source"] else []
        out.append(Turn2("follow-up" if r["kind"] == "answerable" else "aside", r["first"], r["followup"],
                         (lambda p, pages=pages: any(p == o or p.endswith("/" + o) for o in pages)) if pages else None))
    items = [i for i in RQ.load_items(RQ.CORPORA["postgresql"], split) if i.target is not None]
    rnd = random.Random(seed)
    for n, it in enumerate(items):
        prev = items[(n + 1 + rnd.randrange(len(items) - 1)) % len(items)]
        out.append(Turn2("self-contained", prev.question, it.question, it.page_matches))
    return out


def judge(turns: Sequence[Turn2], search: Callable[[str], list[Any]], policy: str, min_similarity: float,
          unknown_terms: Callable[[str], Sequence[str]]) -> dict[str, dict[str, float]]:
    """Per kind: ``n``, ``gate`` (share passed), and for answerable kinds ``answered_right`` (gate passed and the
    page in the top 5), ``page_recall@5``, ``page_mrr@10``. ``policy``: ``"alone"`` or ``"in context"``."""
    from fieldpack.device.evaluate import metrics as M
    from fieldpack.retrieval.followup import search_in_context
    from fieldpack.retrieval.search import is_relevant

    acc: dict[str, dict[str, float]] = {}
    for t in turns:
        if policy == "alone":
            hits, query = search(t.message), t.message
        else:
            hits, query = search_in_context(search, t.message, t.previous, min_similarity=min_similarity,
                                            unknown_terms=unknown_terms)
        passed = is_relevant(hits[:K_GATE], min_similarity=min_similarity, query=query)
        a = acc.setdefault(t.kind, {"n": 0, "gate": 0, "answered_right": 0, "page_recall@5": 0, "page_mrr@10": 0})
        a["n"] += 1
        a["gate"] += passed
        if t.relevant is not None:
            rank = M.first_relevant_rank([t.relevant(p) for p in M.page_ranking([h.source for h in hits])])
            a["page_recall@5"] += bool(rank and rank <= 5)
            a["page_mrr@10"] += 1 / rank if rank and rank <= 10 else 0
            a["answered_right"] += bool(passed and rank and rank <= 5)
    return {k: {m: (v if m == "n" else v / a["n"]) for m, v in a.items()} for k, a in acc.items()}


def run(split: str) -> dict[str, Any]:
    """Both policies on ``split``: ``{policy: {kind: figures}}``."""
    from fieldpack.retrieval.embedder import OnnxEmbedder
    from fieldpack.retrieval.search import DEFAULT_MIN_SIMILARITY, Retriever

    spec = RQ.CORPORA["postgresql"]
    emb = RQ.base_export()
    index = RQ.corpus_index(spec, emb, RQ.corpus_chunks(spec, emb), "base")
    turns = second_turns(split)
    with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]), max_tokens=int(emb["max_tokens"]),
                      threads=1) as raw, Retriever(index, RQ.CachedEmbedder(raw)) as r:
        return {policy: judge(turns, lambda q: r.search(q, k=K_RANK), policy, DEFAULT_MIN_SIMILARITY,
                              r.unknown_terms)
                for policy in ("alone", "in context")}


def table_lines(split: str, doc: dict[str, Any]) -> list[str]:
    """Markdown: one row per kind and policy."""
    lines = [f"PostgreSQL 15, {split} part", "", "| second turn | n | retrieval | gate passes | answered from the "
             "right page | page recall@5 | page MRR@10 |", "|---|---|---|---|---|---|---|"]
    for kind in ("follow-up", "aside", "self-contained"):
        for policy, per_kind in doc.items():
            f = per_kind.get(kind)
            if f is None:
                continue
            right = "" if kind == "aside" else f"{f['answered_right']:.2f} | {f['page_recall@5']:.2f} | {f['page_mrr@10']:.2f}"
            lines.append(f"| {kind} | {f['n']} | {policy} | {f['gate']:.2f} | {right or '- | - | -'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="unseen", choices=["dev", "unseen"])
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args(argv)
    doc = run(a.split)
    print("\n".join(table_lines(a.split, doc)))
    if a.json:
        a.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
