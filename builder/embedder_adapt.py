"""Build-time domain adaptation of the sentence embedder on (query, passage) pairs mined from the documents,
kept only when it beats the base model on held-out pseudo-queries (a gate).

Pairs, no labels needed (:func:`mine_pairs`):

* heading -> section: a chunk's own heading (numbering like ``19.3.1.`` stripped) as the query, the chunk
  text (without its heading path) as the passage;
* title -> page: a page's title (the first heading of its heading paths) -> the page's first body chunk;
* inverse cloze task, ICT (Lee, Chang & Toutanova, "Latent Retrieval for Weakly Supervised Open Domain
  Question Answering", ACL 2019): one sentence of a chunk -> the chunk with that sentence removed.

Training (:func:`adapt_embedder`): sentence-transformers' ``MultipleNegativesRankingLoss`` (in-batch
negatives, softmax over the batch's passages with scale 20; Henderson et al., "Efficient Natural Language
Response Suggestion for Smart Reply", 2017), AdamW, a few hundred steps; batches hold at most one pair per
page so no in-batch negative comes from the positive's own page. CPU-friendly: short sequences while training
(``train_max_tokens``), a capped step count, ``torch.set_num_threads(threads)``.

Gate (:func:`gate_figures`): pages are split by a hash of their path; pairs of held-out pages are never
trained on. Their queries are searched (cosine, exact) among a pool of chunks (the held-out pages' chunks plus
a fixed sample of the others); MRR@10 and recall@5 of the query's own passage for the base and the adapted
model. The adapted model is kept when its MRR@10 beats the base one by at least ``min_gain``; the figures are
recorded either way (:class:`AdaptResult`, into the manifest's ``embedder.adaptation``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fieldpack.shared.errors import EmbedderError, UsageError

log = logging.getLogger(__name__)

_NUMBERING = re.compile(r"^\s*(?:[A-Z]\.)?(?:\d+\.)+\d*\s*")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")
#: ICT anchors shorter than this many words carry too little to be a query.
MIN_SENTENCE_WORDS = 6
#: Passages shorter than this many words (navigation lines, empty sections) are not mined.
MIN_PASSAGE_WORDS = 20


@dataclass(frozen=True)
class Pair:
    """One mined training pair: ``anchor`` (query-like) -> ``positive`` (passage), from page ``source``;
    ``kind`` is ``"heading"``, ``"title"`` or ``"ict"``."""

    anchor: str
    positive: str
    source: str
    kind: str


@dataclass(frozen=True)
class AdaptResult:
    """What :func:`adapt_embedder` did (JSON-ready via :meth:`to_dict`).

    Attributes:
        kept: the adapted model passed the gate; ``model_dir`` holds it.
        model_dir: the adapted sentence-transformers folder, ``None`` when dropped.
        pairs: mined pairs in all, by kind (``{"heading": n, "title": n, "ict": n}``).
        train_pairs, heldout_queries: pairs trained on / held-out pseudo-queries judged by the gate.
        pool: chunks the gate searches among.
        steps, batch_size, train_max_tokens: training size.
        loss_first, loss_last: mean MNRL loss over the first / last ``max(1, steps // 10)`` steps.
        base_mrr, adapted_mrr: gate MRR@10 of the base / adapted model on the held-out queries.
        base_recall5, adapted_recall5: gate recall@5.
        min_gain: the MRR@10 gain the adapted model needed.
        seconds: wall time of mining, training and gating.
    """

    kept: bool
    model_dir: Path | None
    pairs: dict[str, int]
    train_pairs: int
    heldout_queries: int
    pool: int
    steps: int
    batch_size: int
    train_max_tokens: int
    loss_first: float
    loss_last: float
    base_mrr: float
    adapted_mrr: float
    base_recall5: float
    adapted_recall5: float
    min_gain: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_dir"] = str(self.model_dir) if self.model_dir else None
        return d


# --- mining ----------------------------------------------------------------------------------------------------
def heading_query(section: str) -> str:
    """The last heading of a ``" > "``-joined heading path with its numbering dropped
    (``"19.3. Connections > 19.3.1. Connection Settings"`` -> ``"Connection Settings"``)."""
    last = section.split(" > ")[-1] if section else ""
    return _NUMBERING.sub("", last).strip()


def held_out(source: str, holdout: int) -> bool:
    """Whether page ``source`` belongs to the gate's held-out pages: 1 in ``holdout`` pages, chosen by sha256
    of the path (stable across runs and machines)."""
    return int(hashlib.sha256(source.encode()).hexdigest()[:8], 16) % holdout == 0


def mine_pairs(chunks: Sequence[Any], *, seed: int = 0, ict_per_chunk: int = 1) -> list[Pair]:
    """Mine (anchor, positive) pairs from ingested chunks (``builder.ingest.model.Chunk``: ``source``,
    ``section``, ``text``), in chunk order. See the module doc for the three kinds.

    Args:
        chunks: the build's chunks.
        seed: seeds which sentence each ICT pair takes.
        ict_per_chunk: ICT pairs per chunk (0 turns ICT off).
    """
    rng = random.Random(seed)
    out: list[Pair] = []
    titled: set[str] = set()
    for c in chunks:
        text = c.text.strip()
        if len(text.split()) < MIN_PASSAGE_WORDS:
            continue
        head = heading_query(c.section)
        if len(head.split()) >= 2:
            out.append(Pair(head, text, c.source, "heading"))
        if c.section and c.source not in titled:
            titled.add(c.source)
            title = _NUMBERING.sub("", c.section.split(" > ")[0]).strip()
            if title and title != head:
                out.append(Pair(title, text, c.source, "title"))
        sentences = [s for s in _SENTENCE.split(text) if len(s.split()) >= MIN_SENTENCE_WORDS]
        if len(sentences) >= 2:
            for s in rng.sample(sentences, min(ict_per_chunk, len(sentences) - 1)):
                rest = " ".join(x for x in _SENTENCE.split(text) if x != s).strip()
                if len(rest.split()) >= MIN_PASSAGE_WORDS // 2:
                    out.append(Pair(s, rest, c.source, "ict"))
    return out


def page_batches(pairs: Sequence[Pair], batch_size: int, seed: int) -> list[list[Pair]]:
    """Shuffle ``pairs`` into batches of ``batch_size`` where no two pairs share a page (an in-batch negative
    from the positive's own page would often be a false negative). Pairs that cannot be placed without a
    repeat wait for a later batch; a last incomplete batch is dropped (MNRL wants full batches)."""
    rng = random.Random(seed)
    pool = list(pairs)
    rng.shuffle(pool)
    batches: list[list[Pair]] = []
    while len(pool) >= batch_size:
        batch: list[Pair] = []
        seen: set[str] = set()
        rest: list[Pair] = []
        for p in pool:
            if len(batch) < batch_size and p.source not in seen:
                batch.append(p)
                seen.add(p.source)
            else:
                rest.append(p)
        if len(batch) < batch_size:
            break
        batches.append(batch)
        pool = rest
    return batches


# --- gate ------------------------------------------------------------------------------------------------------
def gate_figures(query_vecs: np.ndarray, pool_vecs: np.ndarray, targets: Sequence[int]) -> tuple[float, float]:
    """MRR@10 and recall@5 of exact cosine search.

    Args:
        query_vecs: ``(q, dim)`` float32, unit rows.
        pool_vecs: ``(n, dim)`` float32, unit rows.
        targets: for each query, the row of ``pool_vecs`` that is its passage.

    Returns:
        ``(mrr_at_10, recall_at_5)``, each a mean over the queries in [0, 1].
    """
    sims = query_vecs @ pool_vecs.T  # (q, n)
    own = sims[np.arange(len(targets)), np.asarray(targets)]
    ranks = 1 + (sims > own[:, None]).sum(axis=1)  # 1-based rank of the own passage (ties favour it)
    mrr = float(np.mean(np.where(ranks <= 10, 1.0 / ranks, 0.0)))
    return mrr, float(np.mean(ranks <= 5))


def _encode(model: Any, texts: list[str]) -> np.ndarray:
    return np.asarray(model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                   show_progress_bar=False), dtype=np.float32)


# --- training --------------------------------------------------------------------------------------------------
def warmup_linear_decay(opt: Any, n_steps: int) -> Any:
    """``torch.optim.lr_scheduler.LambdaLR`` over ``opt``: linear warm-up over the first 10 % of ``n_steps``
    (at least one step), then linear decay to 0 at ``n_steps`` (step once per optimizer step)."""
    import torch

    warm = max(1, n_steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (n_steps - s) / max(1, n_steps - warm)))


def adapt_embedder(
    model_dir: Path,
    chunks: Sequence[Any],
    out_dir: Path,
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-5,
    train_max_tokens: int = 128,
    holdout: int = 10,
    max_gate_queries: int = 300,
    gate_pool: int = 2000,
    min_gain: float = 0.01,
    threads: int = 2,
    seed: int = 0,
    device: str = "cpu",
) -> AdaptResult:
    """Fine-tune the sentence-transformers model in ``model_dir`` on pairs mined from ``chunks`` and keep it
    in ``out_dir`` if it passes the gate (module doc).

    Args:
        model_dir: a sentence-transformers folder (the base embedder, e.g. all-MiniLM-L6-v2).
        chunks: the build's chunks (``source``, ``section``, ``text`` and ``embedding_text()``).
        out_dir: where the adapted model is saved (created); left empty when the gate drops it.
        steps: optimizer steps at most (one pass over the batches if there are fewer).
        batch_size: pairs per step (in-batch negatives: ``batch_size - 1`` per query).
        lr: AdamW learning rate, linear decay to 0 after 10 % warm-up.
        train_max_tokens: truncation while training (inference keeps the model's own length).
        holdout: 1 in ``holdout`` pages is held out for the gate.
        max_gate_queries: held-out queries judged at most (a fixed sample).
        gate_pool: chunks searched by the gate at most (held-out pages' chunks first).
        min_gain: MRR@10 gain over the base model needed to keep the adapted one.
        threads: torch CPU threads.
        seed: seeds mining, batching, sampling and torch.
        device: torch device to train on (``"cpu"``; ``"cuda"`` where a GPU is present).

    Raises:
        UsageError: bad sizes, or too few pairs for one batch or no held-out query (documents too small).
        EmbedderError: training produced non-finite losses.
    """
    if steps < 1 or batch_size < 2 or holdout < 2 or not 0 < lr < 1 or train_max_tokens < 8:
        raise UsageError(f"bad adaptation settings (steps {steps}, batch {batch_size}, holdout {holdout}, lr {lr})",
                         hint="steps >= 1, batch_size >= 2, holdout >= 2, 0 < lr < 1")
    import torch
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6 moved the losses
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # pragma: no cover - older sentence-transformers
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    pairs = mine_pairs(chunks, seed=seed)
    kinds = {k: sum(1 for p in pairs if p.kind == k) for k in ("heading", "title", "ict")}
    train = [p for p in pairs if not held_out(p.source, holdout)]
    heldout = [p for p in pairs if held_out(p.source, holdout) and p.kind != "title"]
    batches = page_batches(train, batch_size, seed)
    if not batches or not heldout:
        raise UsageError(f"{len(train)} training pairs and {len(heldout)} held-out queries mined from "
                         f"{len(chunks)} chunks: too few to adapt the embedder",
                         hint="adapt only on a larger document set (or build without embedder adaptation)")
    heldout = random.Random(seed).sample(heldout, min(max_gate_queries, len(heldout)))

    # the gate's pool: every held-out page's chunk passage, then distractors from the other pages
    pool_texts = list(dict.fromkeys(p.positive for p in heldout))
    others = [c.text.strip() for c in chunks if not held_out(c.source, holdout)]
    random.Random(seed + 1).shuffle(others)
    pool_texts += [t for t in others if t not in set(pool_texts)][: max(0, gate_pool - len(pool_texts))]
    row = {t: i for i, t in enumerate(pool_texts)}
    targets = [row[p.positive] for p in heldout]
    queries = [p.anchor for p in heldout]

    model = SentenceTransformer(str(model_dir), device=device)
    infer_len = model.max_seq_length
    base_mrr, base_r5 = gate_figures(_encode(model, queries), _encode(model, pool_texts), targets)

    model.max_seq_length = train_max_tokens
    loss_fn = MultipleNegativesRankingLoss(model)
    n_steps = min(steps, len(batches))
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = warmup_linear_decay(opt, n_steps)
    model.train()
    loss_log: list[float] = []
    for step, batch in enumerate(batches[:n_steps]):
        feats = [model.tokenize([p.anchor for p in batch]), model.tokenize([p.positive for p in batch])]
        loss = loss_fn(feats, torch.empty(0))
        if not torch.isfinite(loss):
            raise EmbedderError(f"embedder adaptation diverged at step {step} (loss {loss.item()})",
                                hint="lower the learning rate, or build without adaptation")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        loss_log.append(float(loss.item()))
        if step % 50 == 0:
            log.info("embedder adaptation: step %d/%d, loss %.4f", step, n_steps, loss_log[-1])
    model.eval()
    model.max_seq_length = infer_len
    adapted_mrr, adapted_r5 = gate_figures(_encode(model, queries), _encode(model, pool_texts), targets)
    kept = adapted_mrr >= base_mrr + min_gain
    tail = max(1, n_steps // 10)
    out_dir = Path(out_dir)
    if kept:
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save(str(out_dir))
        # sentence-transformers >= 6 leaves max_seq_length out of sentence_bert_config.json; the exporter reads
        # it there, so the adapted model keeps the base model's truncation length (else: position limit, 512)
        cfg_path = out_dir / "sentence_bert_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        cfg["max_seq_length"] = int(infer_len)
        cfg_path.write_text(json.dumps(cfg, indent=2))
    log.info("embedder adaptation: gate MRR@10 base %.4f adapted %.4f (need +%.3f) -> %s", base_mrr, adapted_mrr,
             min_gain, "keep adapted" if kept else "keep base")
    return AdaptResult(
        kept=kept, model_dir=out_dir if kept else None, pairs=kinds, train_pairs=len(train),
        heldout_queries=len(heldout), pool=len(pool_texts), steps=n_steps, batch_size=batch_size,
        train_max_tokens=train_max_tokens, loss_first=float(np.mean(loss_log[:tail])),
        loss_last=float(np.mean(loss_log[-tail:])), base_mrr=base_mrr, adapted_mrr=adapted_mrr,
        base_recall5=base_r5, adapted_recall5=adapted_r5, min_gain=min_gain, seconds=time.perf_counter() - t0)
