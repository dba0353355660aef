"""RAFT fine-tuning on the real model (Gemma 3 270M) over the PostgreSQL 15 documentation: the unadapted base model
against the RAFT-tuned one, both converted by our converter and quantized to Q4_K_M as a bundle ships them,
answering the *unseen* questions of ``benchmarks/qa/postgresql-15.jsonl`` (never trained or tuned on).

``python -m benchmarks.raft --out DIR [--index PG_INDEX.sqlite --embedder EXPORT_DIR] [--steps 178 | --epochs 2]
[--k-train 4] [--lr 5e-4] [--raft-hard N] [--raft-paired] [--abstain-share 0.2] [--valid N] [--skip-base]``

``--valid N`` chooses a recipe without the unseen questions: N answerable *dev* questions are held out of training
and the run scores on them (and the dev unanswerable ones) instead.

Training (:func:`fieldpack.builder.adapt.adapt_model`, what ``fieldpack build --adapt raft`` runs): the questions
of ``--qa-train`` (default ``benchmarks/qa/postgresql-15.raft-train.jsonl``: the 36 answerable *dev* questions of
the QA set with written answers, and 60 more on other pages; pairs whose page an unseen question targets are left
out), each as the bundle's own prompt (the format the build decides from the model: completion for this base
model; the device renders the same) over ``--k-train`` sources: the oracle chunk among random distractor chunks of
other pages, 20% without the oracle answered with the abstention phrase; the answer cites the oracle as ``[n]``
and ends with EOS (EOT for chat formats). Loss on the answer tokens only. Measured figures: README, "Domain
adaptation".

Evaluation, greedy decoding with llama.cpp on each Q4_K_M GGUF (the device's decoding: EOS/EOT stop, ``--max-tokens``),
prompts rendered exactly as the device renders them, answers scored with ``fieldpack eval``'s own functions
(:func:`~fieldpack.device.evaluate.run.cited_numbers`, :func:`~fieldpack.device.evaluate.run.declines`,
:func:`~fieldpack.device.evaluate.metrics.contains_all`), on three kinds of prompt per unseen question:

* ``oracle``: the oracle chunk of the expected page among ``k-1`` random distractors (RAFT's test setting):
  citation precision (the answer cites the oracle's number), answer_contains (every expected fact in the answer),
  answers ended by EOS/EOT rather than by ``--max-tokens``, false abstention;
* ``retrieved``: the device's own top-``k`` hybrid retrieval from the PostgreSQL index (``--index``): the same
  figures where the expected page may or may not be among the sources;
* ``no-oracle``: ``k`` distractors only, and the unanswerable questions: the right answer is the abstention.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import POSTGRES_DOCS, REPO

log = logging.getLogger("benchmarks.raft")

QA_FILE = REPO / "benchmarks" / "qa" / "postgresql-15.jsonl"
TRAIN_FILE = REPO / "benchmarks" / "qa" / "postgresql-15.raft-train.jsonl"


def unseen_items(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(answerable, unanswerable) rows of the QA file's ``unseen`` split."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if r.get("split") == "unseen"]
    return [r for r in rows if not r.get("unanswerable")], [r for r in rows if r.get("unanswerable")]


def disjoint_pairs(train_pairs: list[Any], answerable: list[dict[str, Any]]) -> list[Any]:
    """The training pairs that neither repeat an unseen question nor target a page an unseen question targets
    (expected or ``also_ok``): the evaluation pages' text is never an answer the model was trained to give.

    Exits when a training question *is* an unseen question (a broken training file)."""
    unseen_q = {r["question"] for r in answerable}
    if any(p.question in unseen_q for p in train_pairs):
        sys.exit(f"{TRAIN_FILE.name}: holds an unseen question; the evaluation would not be on unseen questions")
    unseen_pages = {p for r in answerable for p in [r["expected_source"], *r.get("also_ok", [])]}
    kept = [p for p in train_pairs if p.source not in unseen_pages]
    log.info("training pairs: %d of %d kept (%d target a page of an unseen question)", len(kept), len(train_pairs),
             len(train_pairs) - len(kept))
    return kept


def validation_split(qa_file: Path, pairs: list[Any], n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                                     list[Any]]:
    """Hold out ``n`` training pairs that are answerable *dev* questions of the QA file (seeded): returns (those
    QA rows, the dev unanswerable rows, the remaining training pairs). Exits when fewer than ``n`` exist."""
    rows = [json.loads(line) for line in qa_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    dev = {r["question"]: r for r in rows if r.get("split") == "dev" and not r.get("unanswerable")}
    candidates = [p for p in pairs if p.question in dev]
    if len(candidates) < n:
        sys.exit(f"--valid {n}: only {len(candidates)} training questions are answerable dev questions")
    held = random.Random(0).sample(candidates, n)
    held_q = {p.question for p in held}
    unanswerable = [r for r in rows if r.get("split") == "dev" and r.get("unanswerable")]
    log.info("validation: %d dev questions held out of training, %d dev unanswerable", n, len(unanswerable))
    return [dev[p.question] for p in held], unanswerable, [p for p in pairs if p.question not in held_q]


def to_gguf(model_dir: Path, work: Path, name: str, threads: int) -> Path:
    """Our converter (F16) then llama.cpp's quantizer (Q4_K_M): what a bundle ships."""
    from fieldpack.builder.convert.writer import convert_hf_to_gguf
    from fieldpack.builder.quantize import quantize_gguf

    f16 = work / f"{name}-f16.gguf"
    q = work / f"{name}-Q4_K_M.gguf"
    if not q.exists():
        convert_hf_to_gguf(model_dir, f16, outtype="f16")
        quantize_gguf(f16, q, "Q4_K_M", nthread=threads)
        f16.unlink()
    return q


def prompts(answerable: list[dict[str, Any]], unanswerable: list[dict[str, Any]], chunks: list[Any],
            retrieved: dict[str, list[Any]], *, k: int, seed: int) -> list[dict[str, Any]]:
    """The evaluation prompts' sources (see the module docstring), seeded."""
    from fieldpack.builder.adapt.data import QAPair, as_source, pick_oracle

    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for r in answerable:
        pages = {r["expected_source"], *r.get("also_ok", [])}
        oracle = pick_oracle(QAPair(r["question"], " ".join(r["answer_contains"]), r["expected_source"]), chunks)
        others = [j for j, c in enumerate(chunks) if c.source not in pages]
        picked = rng.sample(others, k - 1) + [oracle]
        rng.shuffle(picked)
        base = {"id": r["id"], "question": r["question"], "facts": r["answer_contains"], "pages": sorted(pages)}
        out.append({**base, "kind": "oracle", "sources": [as_source(chunks[j], j) for j in picked]})
        out.append({**base, "kind": "retrieved", "sources": retrieved[r["question"]]})
        out.append({**base, "kind": "no-oracle", "sources": [as_source(chunks[j], j) for j in rng.sample(others, k)]})
    for r in unanswerable:
        out.append({"id": r["id"], "question": r["question"], "facts": [], "pages": [], "kind": "no-oracle",
                    "sources": [as_source(chunks[j], j) for j in rng.sample(range(len(chunks)), k)]})
    return out


def prompt_tokens(llm: Any, text: str, bos_text: str) -> list[int]:
    """A rendered prompt's token ids as the device feeds them: special tokens parsed, and BOS added unless the
    prompt format already writes it (``bos_text``: the format's BOS string, ``""`` when it writes none)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=not (bos_text and text.startswith(bos_text)), special=True)


def answer_all(gguf: Path, items: list[dict[str, Any]], render: Any, *, max_tokens: int, threads: int,
               bos_text: str, stop: list[str]) -> list[dict[str, Any]]:
    """Greedy answers (the device's decoding) for every prompt, scored as ``fieldpack eval`` scores them.

    Generated without the format's stop strings so that ``finish`` tells an EOS/EOT (``stop``) from
    ``--max-tokens`` (``length``); the answer scored is the text cut at the first stop string, as the device
    (which passes them to llama.cpp) would show it."""
    from fieldpack.device.evaluate import metrics as M
    from fieldpack.device.evaluate.run import cited_numbers, declines
    from fieldpack.device.runtime import load_llama

    llm = load_llama(gguf, n_ctx=2048, threads=threads)
    rows = []
    for it in items:
        text = render(it["question"], it["sources"], [])
        toks = prompt_tokens(llm, text, bos_text)
        t0 = time.perf_counter()
        out = llm.create_completion(toks, max_tokens=max_tokens, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                    repeat_penalty=1.0)
        raw = out["choices"][0]["text"]
        cut = min([raw.find(st) for st in stop if st in raw] or [len(raw)])
        ans = raw[:cut].strip()
        cited = cited_numbers(ans, len(it["sources"]))
        good = [n for n in cited if it["sources"][n - 1].source in it["pages"]]
        rows.append({"id": it["id"], "kind": it["kind"], "text": ans, "finish": out["choices"][0]["finish_reason"],
                     "stopped_by_string": cut < len(raw),
                     "cited": cited, "cited_expected": bool(good), "abstained": declines(ans),
                     "context_has_expected": any(s.source in it["pages"] for s in it["sources"]),
                     "contains_all": M.contains_all(ans, it["facts"]) if it["facts"] else None,
                     "seconds": round(time.perf_counter() - t0, 2)})
    llm.close()
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per prompt kind: the rates the issue asks for (see the module docstring)."""
    def rate(flags: list[bool]) -> float | None:
        return round(sum(flags) / len(flags), 3) if flags else None

    out: dict[str, dict[str, Any]] = {}
    for kind in ("oracle", "retrieved", "no-oracle"):
        rs = [r for r in rows if r["kind"] == kind]
        if kind == "no-oracle":
            out[kind] = {"n": len(rs), "abstention": rate([r["abstained"] for r in rs]),
                         "ended_eos": rate([r["finish"] == "stop" for r in rs]),
                         "ended_eos_or_stop_string": rate([r["finish"] == "stop" or r["stopped_by_string"]
                                                           for r in rs])}
            continue
        answered = [r for r in rs if not r["abstained"]]
        with_ctx = [r for r in rs if r["context_has_expected"]]
        out[kind] = {"n": len(rs), "citation_precision": rate([r["cited_expected"] for r in answered]),
                     "answers_with_citation": rate([bool(r["cited"]) for r in answered]),
                     "answer_contains": rate([bool(r["contains_all"]) for r in rs]),
                     "answer_contains_when_in_context": rate([bool(r["contains_all"]) for r in with_ctx]),
                     "ended_eos": rate([r["finish"] == "stop" for r in rs]),
                     "ended_eos_or_stop_string": rate([r["finish"] == "stop" or r["stopped_by_string"] for r in rs]),
                     "false_abstention": rate([r["abstained"] for r in rs]),
                     "context_has_expected": rate([r["context_has_expected"] for r in rs])}
    return out


def retrieve_all(questions: list[str], index: Path, embedder: Path, k: int) -> dict[str, list[Any]]:
    """The device's top-``k`` hybrid hits per question (its default search settings)."""
    from benchmarks.retrieval_quality import load_export
    from fieldpack.retrieval.embedder import OnnxEmbedder
    from fieldpack.retrieval.search import Retriever

    emb = load_export(embedder)
    with OnnxEmbedder(Path(emb["onnx_path"]), Path(emb["tokenizer_path"]), max_tokens=int(emb["max_tokens"]),
                      threads=1) as e, Retriever(index, e) as r:
        return {q: r.search(q, k=k, mode="hybrid") for q in questions}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, default=None, help="Gemma 3 270M HF checkpoint (default: the tests' cache)")
    p.add_argument("--qa-train", type=Path, default=TRAIN_FILE)
    p.add_argument("--index", type=Path, default=None, help="index.sqlite of the PostgreSQL docs (200/40 chunks; "
                   "default: the retrieval benchmark's cached index with the base MiniLM)")
    p.add_argument("--embedder", type=Path, default=None, help="its ONNX embedder export folder (with --index)")
    p.add_argument("--steps", type=int, default=178)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--k-train", type=int, default=4)
    p.add_argument("--k-eval", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N unseen questions (smoke run)")
    p.add_argument("--abstain-share", type=float, default=0.2, help="share of questions with a no-oracle example")
    p.add_argument("--raft-hard", type=int, default=0, help="hard distractors per prompt (adapt option raft_hard)")
    p.add_argument("--raft-paired", action="store_true", help="abstaining questions keep their oracle example too")
    p.add_argument("--epochs", type=float, default=None, help="steps = epochs x examples (overrides --steps)")
    p.add_argument("--valid", type=int, default=0, help="hold out N answerable dev questions of the training file "
                   "(seeded) and evaluate on them (plus the dev unanswerable ones) instead of the unseen questions: "
                   "how a recipe is chosen without looking at the unseen questions")
    p.add_argument("--skip-base", action="store_true", help="do not answer with the base model (a second recipe)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.adapt import find_model
    from benchmarks.common import minilm_dir
    from benchmarks.retrieval_quality import CORPORA, corpus_chunks
    from fieldpack.builder.adapt import adapt_model
    from fieldpack.builder.adapt.data import eval_blocks, raft_examples, read_qa_file, texts_sha256
    from fieldpack.builder.adapt.options import AdaptOptions
    from fieldpack.builder.compress.structured import save_checkpoint
    from fieldpack.builder.prompt_plan import plan_prompt_for_gguf
    from fieldpack.shared.atomic import atomic_write_text

    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    model_dir = a.model or find_model()
    answerable, unanswerable = unseen_items(QA_FILE)
    pairs = read_qa_file(a.qa_train, POSTGRES_DOCS)
    pairs = disjoint_pairs(pairs, answerable)
    if a.valid:
        answerable, unanswerable, pairs = validation_split(QA_FILE, pairs, a.valid)
    chunks = corpus_chunks(CORPORA["postgresql"], {"tokenizer_path": str(minilm_dir() / "tokenizer.json")})
    if a.index is None:
        from benchmarks.retrieval_quality import base_export, corpus_index

        emb = base_export()
        a.index = corpus_index(CORPORA["postgresql"], emb, corpus_chunks(CORPORA["postgresql"], emb), "base")
        a.embedder = Path(emb["onnx_path"]).parent
    log.info("%d training questions, %d unseen answerable + %d unanswerable, %d chunks", len(pairs),
             len(answerable), len(unanswerable), len(chunks))

    base_gguf = to_gguf(model_dir, a.out, "base", a.threads)
    plan = plan_prompt_for_gguf(base_gguf, None)
    render = plan.renderer()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stop_id = tok.convert_tokens_to_ids("<end_of_turn>") if plan.prompt_format != "completion" else tok.eos_token_id
    examples, n_abstain = raft_examples(pairs, chunks, render, tok, stop_id=stop_id, k=a.k_train,
                                        abstain_share=a.abstain_share, seed=0, max_len=1536, hard=a.raft_hard,
                                        paired=a.raft_paired)
    if a.epochs is not None:
        a.steps = max(1, round(a.epochs * len(examples)))
    log.info("RAFT: %d examples (%d abstain), %d-%d tokens, prompt format %s, stop id %d", len(examples), n_abstain,
             min(len(e.input_ids) for e in examples), max(len(e.input_ids) for e in examples), plan.prompt_format,
             stop_id)

    raft_dir = a.out / "raft-hf"
    t_train = 0.0
    train_row: dict[str, Any] = {}
    if not (a.out / "raft-Q4_K_M.gguf").exists():
        held_texts = [c.text for c in chunks if c.source in {r["expected_source"] for r in answerable}][:12]
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        opts = AdaptOptions(method="raft", qa_train=a.qa_train, steps=a.steps, batch_size=1, seq_len=768, lr=a.lr,
                            lora_r=a.lora_r, threads=a.threads, max_epochs=10)
        t0 = time.perf_counter()
        merged, rep = adapt_model(model, tok, examples, eval_blocks(held_texts, tok, 256)[:2], opts, seed=0,
                                  method="raft", train_sha256=texts_sha256([q.question for q in pairs]),
                                  held_out_sha256=texts_sha256(held_texts), n_abstain=n_abstain)
        t_train = time.perf_counter() - t0
        train_row = rep.row()
        save_checkpoint(merged, model_dir, raft_dir, dtype=torch.float32)
        del merged, model
    raft_gguf = to_gguf(raft_dir, a.out, "raft", a.threads)

    answerable = answerable[:a.limit] if a.limit else answerable
    retrieved = retrieve_all([r["question"] for r in answerable], a.index, a.embedder, a.k_eval)
    items = prompts(answerable, unanswerable, chunks, retrieved, k=a.k_eval, seed=1)
    res: dict[str, Any] = {"train": train_row, "train_seconds": round(t_train, 1), "examples": len(examples),
                           "args": {k: str(v) for k, v in vars(a).items()}}
    for name, gguf in (() if a.skip_base else (("base", base_gguf),)) + (("raft", raft_gguf),):
        rows = answer_all(gguf, items, render, max_tokens=a.max_tokens, threads=a.threads, bos_text=plan.bos_token,
                          stop=list(plan.extra_stop))
        res[name] = {"summary": summarize(rows), "rows": rows}
        print(name, json.dumps(res[name]["summary"]), flush=True)
    atomic_write_text(a.out / "raft.json", json.dumps(res, indent=2, default=str) + "\n")
    print(json.dumps({k: res[k]["summary"] for k in ("base", "raft") if k in res}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
