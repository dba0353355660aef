"""Build-time cross-encoder reranker: trained on pseudo-queries mined from the documents with hard negatives
from the bundle's own first-stage retrieval, exported to ONNX, and kept only when it beats the first stage on
held-out pages' pseudo-queries (a gate).

* Queries and positives: :func:`builder.embedder_adapt.mine_pairs` (heading -> section, title -> page,
  inverse-cloze sentence -> rest of its chunk). Pages are split by :func:`builder.embedder_adapt.held_out`;
  pairs of held-out pages are never trained on.
* Hard negatives: the first-stage ranking of each query (``retrieve``, the bundle's hybrid search), chunks
  of other pages among its top ``depth`` (a page's own other chunks are not negatives).
* Model: a BERT-like encoder (all-MiniLM-L6-v2 by default) reading ``[CLS] query [SEP] passage [SEP]``
  (Nogueira & Cho, "Passage Re-ranking with BERT", 2019) with a fresh one-logit head on its mean-pooled
  states (:func:`cross_encoder`).
* Loss: localized contrastive estimation, LCE (Gao, Dai & Callan, "Rethink Training of BERT Rerankers in
  Multi-Stage Retrieval Pipeline", ECIR 2021): softmax cross-entropy over one positive and ``negatives``
  hard negatives of the same query.
* Export: ``torch.onnx.export`` (dynamo) of ``logits[:, 0]``; parity against torch on the gate's pairs;
  int8 by ``onnxruntime.quantization.quantize_dynamic`` kept when its gate MRR is within ``int8_tolerance`` of
  fp32's.
* Gate: for each held-out query, its first-stage top ``candidates``; page MRR@10 of the query's own page in
  the first-stage order and after :meth:`retrieval.rerank.OnnxReranker.rerank` (weighted RRF, ``weight``).
  Kept when the gain is at least ``min_gain``; figures recorded either way (:class:`RerankResult`).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fieldpack.builder.embedder_adapt import held_out, mine_pairs, warmup_linear_decay
from fieldpack.retrieval.rerank import OnnxReranker, fuse_ranks, passage_text
from fieldpack.retrieval.types import Hit
from fieldpack.shared.atomic import fsync_dir, fsync_file
from fieldpack.shared.errors import EmbedderError, ModelLoadError, UsageError

log = logging.getLogger(__name__)

ONNX_NAME = "reranker.onnx"
TOKENIZER_NAME = "tokenizer.json"
#: ``retrieve(query)`` -> the first-stage hits, best first.
Retrieve = Callable[[str], Sequence[Hit]]


@dataclass(frozen=True)
class RerankExample:
    """One training group: ``query``, its ``positive`` passage and hard ``negatives`` (texts), from page
    ``source``."""

    query: str
    positive: str
    negatives: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class GateQuery:
    """A held-out pseudo-query: the ``query``, its page ``source`` and the first-stage candidate hits."""

    query: str
    source: str
    candidates: tuple[Hit, ...]


@dataclass(frozen=True)
class RerankResult:
    """What :func:`build_reranker` did (JSON-ready via :meth:`to_dict`).

    Attributes:
        kept: the reranker passed the gate; ``onnx_path``/``tokenizer_path`` hold it.
        onnx_path, tokenizer_path: the exported files (``None`` when dropped).
        precision: ``"int8"`` or ``"fp32"``.
        train_groups, gate_queries: training groups / held-out queries judged.
        steps, batch_queries, negatives, train_max_tokens, max_tokens: training and inference sizes.
        loss_first, loss_last: mean LCE loss over the first / last ``max(1, steps // 10)`` steps.
        parity_max_abs: max |logit(torch) - logit(ONNX fp32)| over the gate's pairs.
        first_stage_mrr, reranked_mrr: gate page MRR@10 before / after reranking (the kept precision).
        fp32_mrr, int8_mrr: gate page MRR@10 of each ONNX precision (``int8_mrr`` ``None`` without int8).
        candidates, weight: reranked candidates per query, RRF weight of the cross-encoder list.
        min_gain: the MRR@10 gain needed.
        seconds: wall time of mining, training, export and gating.
    """

    kept: bool
    onnx_path: Path | None
    tokenizer_path: Path | None
    precision: str
    train_groups: int
    gate_queries: int
    steps: int
    batch_queries: int
    negatives: int
    train_max_tokens: int
    max_tokens: int
    loss_first: float
    loss_last: float
    parity_max_abs: float
    first_stage_mrr: float
    reranked_mrr: float
    fp32_mrr: float
    int8_mrr: float | None
    candidates: int
    weight: float
    min_gain: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("onnx_path", "tokenizer_path"):
            d[k] = str(d[k]) if d[k] else None
        return d


# --- mining ----------------------------------------------------------------------------------------------------
def mine_examples(chunks: Sequence[Any], retrieve: Retrieve, *, negatives: int = 3, depth: int = 20,
                  holdout: int = 10, max_train: int = 400, max_gate: int = 100, candidates: int = 20,
                  seed: int = 0) -> tuple[list[RerankExample], list[GateQuery]]:
    """Training groups and gate queries from ``chunks`` (module doc).

    Passages of heading/title pairs are the chunk text alone (its heading path would hold the query
    verbatim); inverse-cloze passages and every negative of an inverse-cloze group carry the heading path
    (:func:`retrieval.rerank.passage_text`), as the device's candidates do.

    Args:
        chunks: the build's chunks (``source``, ``section``, ``text``).
        retrieve: the first stage (the bundle's hybrid search over these chunks).
        negatives: hard negatives per group (groups with fewer are dropped).
        depth: negatives come from the first stage's top ``depth`` hits.
        holdout: 1 in ``holdout`` pages is held out for the gate.
        max_train, max_gate: training groups / gate queries at most (fixed samples; each costs one search).
        candidates: first-stage hits kept per gate query.
        seed: seeds the samples.
    """
    rng = random.Random(seed)
    pairs = mine_pairs(chunks, seed=seed)
    page_chunks: dict[str, list[tuple[str, str]]] = {}
    for c in chunks:
        page_chunks.setdefault(c.source, []).append((c.text, c.section))
    train_pairs = [p for p in pairs if not held_out(p.source, holdout)]
    gate_pairs = [p for p in pairs if held_out(p.source, holdout) and p.kind != "title"]
    train_pairs = rng.sample(train_pairs, min(max_train, len(train_pairs)))
    gate_pairs = rng.sample(gate_pairs, min(max_gate, len(gate_pairs)))
    examples: list[RerankExample] = []
    for p in train_pairs:
        with_section = p.kind == "ict"
        negs = [h for h in retrieve(p.anchor)[:depth] if h.source != p.source]
        if len(negs) < negatives:
            continue
        picked = rng.sample(negs, negatives)
        pos = p.positive
        if with_section:  # the ICT passage is the chunk minus one sentence: find the chunk's heading path
            sec = next((s for text, s in page_chunks.get(p.source, []) if p.anchor in text), "")
            pos = passage_text(sec, p.positive)
        examples.append(RerankExample(
            query=p.anchor, positive=pos, source=p.source,
            negatives=tuple(passage_text(h.section, h.text) if with_section else h.text for h in picked)))
    gate = [GateQuery(p.anchor, p.source, tuple(retrieve(p.anchor)[:candidates])) for p in gate_pairs]
    return examples, gate


# --- gate ------------------------------------------------------------------------------------------------------
def page_mrr(orders: Sequence[Sequence[str]], targets: Sequence[str], *, k: int = 10) -> float:
    """Mean reciprocal rank of each target page in its ranking of chunk sources (distinct pages in order of
    first appearance; 0 past ``k`` or absent)."""
    total = 0.0
    for sources, target in zip(orders, targets):
        pages = list(dict.fromkeys(sources))
        if target in pages[:k]:
            total += 1.0 / (pages.index(target) + 1)
    return total / max(1, len(targets))


def gate_mrr(reranker: OnnxReranker | None, gate: Sequence[GateQuery], *, weight: float) -> float:
    """Page MRR@10 over ``gate``: first-stage order when ``reranker`` is ``None``, else reranked."""
    orders = []
    for g in gate:
        hits = list(g.candidates)
        if reranker is not None:
            hits = reranker.rerank(g.query, hits, n=len(hits), weight=weight)
        orders.append([h.source for h in hits])
    return page_mrr(orders, [g.source for g in gate])


# --- training --------------------------------------------------------------------------------------------------
def cross_encoder(model_dir: Path) -> Any:
    """The encoder in ``model_dir`` (``transformers.AutoModel``, eager attention) with a relevance head: the
    pair's token states mean-pooled over the attention mask, then ``Linear(hidden, 1)`` (weights N(0, 0.02),
    bias 0). Mean pooling, not [CLS]: sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained
    on mean-pooled states and their [CLS] state barely varies with the input (a [CLS] head did not move the LCE
    loss off ln(1 + negatives) in 80 steps; the mean-pooled one did).

    The module's ``forward(input_ids, attention_mask, token_type_ids)`` takes ``(batch, seq) int64`` tensors
    and returns ``(batch,) float32`` logits.
    """
    import torch
    from transformers import AutoModel

    class CrossEncoder(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module, hidden: int) -> None:
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(hidden, 1)
            torch.nn.init.normal_(self.head.weight, std=0.02)
            torch.nn.init.zeros_(self.head.bias)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            states = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state  # (b, seq, hidden)
            m = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
            return self.head(pooled)[:, 0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager", add_pooling_layer=False)
    return CrossEncoder(enc, int(enc.config.hidden_size))


def train_cross_encoder(model_dir: Path, examples: Sequence[RerankExample], *, steps: int, batch_queries: int,
                        lr: float, train_max_tokens: int, threads: int, seed: int, head_lr_scale: float = 20.0,
                        device: str = "cpu") -> tuple[Any, Any, list[float]]:
    """LCE training (module doc) of a one-logit head on the encoder in ``model_dir``.

    Returns:
        ``(model, tokenizer, losses)``: the trained ``AutoModelForSequenceClassification`` in eval mode on the
        CPU, its fast tokenizer and the loss of every step.

    Raises:
        ModelLoadError: ``model_dir`` is not a transformers encoder folder.
        EmbedderError: a non-finite loss.
    """
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
        model = cross_encoder(model_dir)
    except Exception as exc:  # OSError, ValueError, KeyError for unknown model types
        raise ModelLoadError(f"cannot load a cross-encoder from {model_dir}: {exc}",
                             hint="give a BERT-like encoder folder (config.json, weights, tokenizer)") from exc
    model.to(device).train()
    groups = list(examples)
    random.Random(seed).shuffle(groups)
    n_steps = steps  # cycles through the groups when there are fewer than steps * batch_queries
    # the fresh head learns at head_lr_scale x the pretrained encoder's rate (it otherwise sits on a plateau
    # near ln(1 + negatives) for tens of steps)
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr": lr},
                             {"params": model.head.parameters(), "lr": lr * head_lr_scale}])
    sched = warmup_linear_decay(opt, n_steps)
    size = 1 + len(groups[0].negatives)
    losses: list[float] = []
    for step in range(n_steps):
        batch = [groups[(step * batch_queries + i) % len(groups)] for i in range(batch_queries)]
        queries = [g.query for g in batch for _ in range(size)]
        passages = [t for g in batch for t in (g.positive, *g.negatives)]
        feats = tok(queries, passages, truncation="longest_first", max_length=train_max_tokens, padding=True,
                    return_tensors="pt").to(device)
        logits = model(**feats).view(batch_queries, size)
        loss = torch.nn.functional.cross_entropy(logits, torch.zeros(batch_queries, dtype=torch.long,
                                                                     device=device))
        if not torch.isfinite(loss):
            raise EmbedderError(f"reranker training diverged at step {step} (loss {loss.item()})",
                                hint="lower the learning rate, or build without --rerank")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.item()))
        if step % 20 == 0:
            log.info("reranker training: step %d/%d, loss %.4f", step, n_steps, losses[-1])
    return model.to("cpu").eval(), tok, losses


def torch_scores(model: Any, tok: Any, query: str, passages: Sequence[str], *, max_tokens: int) -> np.ndarray:
    """``(len(passages),) float32`` logits of the torch model (the reference for the ONNX parity check)."""
    import torch

    feats = tok([query] * len(passages), list(passages), truncation="longest_first", max_length=max_tokens,
                padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**feats).numpy().astype(np.float32)


def export_onnx(model: Any, tok: Any, out: Path, *, max_tokens: int) -> None:
    """``torch.onnx.export`` (dynamo, dynamic batch and sequence) of :func:`cross_encoder`'s logits into ``out``."""
    import torch

    names = ["input_ids", "attention_mask", "token_type_ids"]
    ex = tok(["a question", "another longer question here"], ["a passage text", "p"], padding=True,
             return_tensors="pt")
    seq = torch.export.Dim("seq", min=2, max=max_tokens)
    bsz = torch.export.Dim("batch", min=1, max=4096)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, tuple(ex[n] for n in names), str(out), input_names=names,
                              output_names=["logits"], dynamic_shapes={n: {0: bsz, 1: seq} for n in names},
                              dynamo=True, external_data=False, verbose=False)
    except Exception as exc:  # torch.export / onnxscript raise a wide range of types
        raise EmbedderError(f"cannot export the reranker to ONNX: {type(exc).__name__}: {exc}",
                            hint="build without --rerank") from exc


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)


def build_reranker(
    model_dir: Path,
    chunks: Sequence[Any],
    retrieve: Retrieve,
    out_dir: Path,
    *,
    steps: int = 150,
    batch_queries: int = 4,
    negatives: int = 3,
    lr: float = 3e-5,
    train_max_tokens: int = 160,
    max_tokens: int = 256,
    max_train: int = 600,
    max_gate: int = 60,
    candidates: int = 20,
    weight: float = 1.0,
    holdout: int = 10,
    min_gain: float = 0.01,
    int8: bool = True,
    int8_tolerance: float = 0.01,
    threads: int = 2,
    seed: int = 0,
    device: str = "cpu",
) -> RerankResult:
    """Mine, train, export and gate a cross-encoder reranker (module doc); on success ``out_dir`` holds
    ``reranker.onnx`` and ``tokenizer.json`` (written atomically), else nothing is written there.

    Args:
        model_dir: the encoder to start from (a sentence-transformers/transformers folder with config.json and
            tokenizer.json; all-MiniLM-L6-v2 by default in the build).
        chunks: the build's chunks; ``retrieve``: the first stage over them.
        steps, batch_queries, negatives, lr, train_max_tokens: training (``batch_queries * (1 + negatives)``
            pairs per step, truncated at ``train_max_tokens``).
        max_tokens: pair length at inference (ONNX).
        max_train, max_gate, candidates, holdout: mining sizes (:func:`mine_examples`).
        weight: RRF weight of the cross-encoder list on the device.
        min_gain: page MRR@10 gain over the first stage needed to keep the reranker.
        int8, int8_tolerance: try int8 and keep it when its gate MRR is within the tolerance of fp32's.
        threads: torch and ONNX Runtime threads. device: torch device to train on.

    Raises:
        UsageError: bad sizes, or too few groups / gate queries (documents too small).
        ModelLoadError, EmbedderError: the model cannot be loaded, trained or exported.
    """
    if steps < 1 or batch_queries < 1 or negatives < 1 or candidates < 2 or train_max_tokens < 16:
        raise UsageError(f"bad reranker settings (steps {steps}, batch {batch_queries}, negatives {negatives}, "
                         f"candidates {candidates})", hint="steps, batch, negatives >= 1; candidates >= 2")
    tok_json = Path(model_dir) / TOKENIZER_NAME
    if not tok_json.is_file():
        raise ModelLoadError(f"{model_dir} has no {TOKENIZER_NAME}", hint="save the tokenizer with transformers")
    t0 = time.perf_counter()
    examples, gate = mine_examples(chunks, retrieve, negatives=negatives, holdout=holdout, max_train=max_train,
                                   max_gate=max_gate, candidates=candidates, seed=seed)
    if len(examples) < batch_queries or not gate:
        raise UsageError(f"{len(examples)} training groups and {len(gate)} gate queries mined from {len(chunks)} "
                         "chunks: too few to train a reranker",
                         hint="train the reranker only on a larger document set (or build without --rerank)")
    log.info("reranker: %d training groups, %d gate queries", len(examples), len(gate))
    model, tok, losses = train_cross_encoder(model_dir, examples, steps=steps, batch_queries=batch_queries, lr=lr,
                                             train_max_tokens=train_max_tokens, threads=threads, seed=seed,
                                             device=device)
    first = gate_mrr(None, gate, weight=weight)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="fieldpack-rerank-") as tmp_s:
        tmp = Path(tmp_s)
        fp32, q8 = tmp / "fp32.onnx", tmp / "int8.onnx"
        export_onnx(model, tok, fp32, max_tokens=max_tokens)
        shutil.copyfile(tok_json, tmp / TOKENIZER_NAME)
        g0 = gate[0]
        texts = [passage_text(h.section, h.text) for h in g0.candidates]
        with OnnxReranker(fp32, tmp / TOKENIZER_NAME, max_tokens=max_tokens, threads=threads) as r:
            parity = float(np.max(np.abs(r.score(g0.query, texts)
                                         - torch_scores(model, tok, g0.query, texts, max_tokens=max_tokens))))
            fp32_mrr = gate_mrr(r, gate, weight=weight)
        int8_mrr = None
        chosen, precision, mrr = fp32, "fp32", fp32_mrr
        if int8:
            _quantize(fp32, q8)
            with OnnxReranker(q8, tmp / TOKENIZER_NAME, max_tokens=max_tokens, threads=threads) as r:
                int8_mrr = gate_mrr(r, gate, weight=weight)
            if int8_mrr >= fp32_mrr - int8_tolerance:
                chosen, precision, mrr = q8, "int8", int8_mrr
        kept = mrr >= first + min_gain
        log.info("reranker gate: page MRR@10 first stage %.4f, reranked %.4f (fp32 %.4f, int8 %s; need +%.3f) "
                 "-> %s", first, mrr, fp32_mrr, "-" if int8_mrr is None else f"{int8_mrr:.4f}", min_gain,
                 "keep" if kept else "drop")
        onnx_out = tok_out = None
        if kept:
            out_dir.mkdir(parents=True, exist_ok=True)
            onnx_out, tok_out = out_dir / ONNX_NAME, out_dir / TOKENIZER_NAME
            for src, dst in ((chosen, onnx_out), (tmp / TOKENIZER_NAME, tok_out)):
                fsync_file(src)
                shutil.move(str(src), str(dst))
            fsync_dir(out_dir)
            (out_dir / "reranker.json").write_text(json.dumps({"max_tokens": max_tokens, "weight": weight,
                                                               "candidates": candidates}))
    tail = max(1, len(losses) // 10)
    return RerankResult(
        kept=kept, onnx_path=onnx_out, tokenizer_path=tok_out, precision=precision, train_groups=len(examples),
        gate_queries=len(gate), steps=len(losses), batch_queries=batch_queries, negatives=negatives,
        train_max_tokens=train_max_tokens, max_tokens=max_tokens, loss_first=float(np.mean(losses[:tail])),
        loss_last=float(np.mean(losses[-tail:])), parity_max_abs=parity, first_stage_mrr=first,
        reranked_mrr=mrr, fp32_mrr=fp32_mrr, int8_mrr=int8_mrr, candidates=candidates, weight=weight,
        min_gain=min_gain, seconds=time.perf_counter() - t0)
