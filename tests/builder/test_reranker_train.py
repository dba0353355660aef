"""Build-time cross-encoder reranker on a tiny doc set: RRF fusion and page MRR by hand, mining with hard
negatives from the real first stage (MiniLM int8 + sqlite-vec + FTS5 over the tiny pages), LCE training that
lowers the loss, the ONNX export matching torch, the device reranker reordering candidates, and the gate
keeping a reranker that learned and dropping one that did not."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fieldpack.builder import reranker_train as RT
from fieldpack.builder.embedder_adapt import held_out
from fieldpack.retrieval.rerank import OnnxReranker, fuse_ranks, passage_text
from fieldpack.retrieval.types import Hit
from tests.builder.test_embedder_adapt import tiny_chunks
from tests.retrieval_fixtures import embedder, minilm_int8  # noqa: F401  (fixtures)


def test_fuse_ranks_by_hand() -> None:
    s = np.array([0.0, 1.0, 2.0], dtype=np.float32)  # the cross-encoder reverses the first stage
    assert fuse_ranks(3, s, weight=float("inf")) == [2, 1, 0]
    # weight 1: 0 and 2 both get 1/61 + 1/63 (tie broken by best rank, then id), 1 gets 2/62 (a bit less)
    assert fuse_ranks(3, s, weight=1.0) == [0, 2, 1]
    # weight 2: 2 gets 1/63 + 2/61 = 0.04866 > 1: 3/62 = 0.04839 > 0: 1/61 + 2/63 = 0.04814
    assert fuse_ranks(3, s, weight=2.0) == [2, 1, 0]
    assert fuse_ranks(3, s, weight=0.0) == [0, 1, 2]


def test_page_mrr_by_hand() -> None:
    orders = [["a", "a", "b"], ["c", "b", "c", "a"], ["x"]]
    # "b" is the 2nd distinct page of the first list; "a" the 3rd of the second; "y" absent
    assert RT.page_mrr(orders, ["b", "a", "y"]) == pytest.approx((0.5 + 1 / 3 + 0) / 3)
    assert RT.page_mrr([["a", "b"]], ["b"], k=1) == 0.0


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory: pytest.TempPathFactory, embedder: Any) -> Iterator[Any]:  # noqa: F811
    """The real hybrid search over the tiny pages (40 pages x 2 sections), with every chunk in its candidate lists
    (``candidate_share=1.0``, the setting the reranker expectations below were written against): the default caps
    the lists at a quarter of these 80 chunks, which leaves this first stage's page MRR unchanged (0.825 on the 80
    section-title queries either way) but changes the hard negatives mined from it and so the training run."""
    from dataclasses import replace

    from fieldpack.builder.index_build import build_index, embed_chunks
    from fieldpack.retrieval.search import DEFAULT_SEARCH, Retriever

    chunks = tiny_chunks(40)
    db = tmp_path_factory.mktemp("rerank-index") / "index.sqlite"
    build_index(chunks, embed_chunks(chunks, embedder), db, embedder_name="minilm")
    with Retriever(db, embedder, replace(DEFAULT_SEARCH, candidate_share=1.0)) as r:
        yield chunks, r


def test_mining_uses_other_pages_as_hard_negatives(first_stage: Any) -> None:
    chunks, r = first_stage
    examples, gate = RT.mine_examples(chunks, lambda q: r.search(q, k=20), negatives=3, holdout=5, max_train=40,
                                      max_gate=10, candidates=8)
    assert examples and gate
    page_of = {t: c.source for c in chunks for t in (c.text, passage_text(c.section, c.text))}
    for ex in examples:
        assert len(ex.negatives) == 3 and ex.positive not in ex.negatives
        assert not held_out(ex.source, 5)
        assert all(page_of[n] != ex.source for n in ex.negatives)  # hard negatives come from other pages
    assert all(held_out(g.source, 5) and 0 < len(g.candidates) <= 8 for g in gate)
    with_path = [ex for ex in examples if " > " in ex.positive]
    assert with_path and all(" > " in n for ex in with_path for n in ex.negatives)  # ICT groups carry headings
    assert any(" > " not in ex.positive for ex in examples)  # heading/title positives do not (the query is there)


@pytest.fixture(scope="module")
def minilm_one_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 cut to its first layer (pretrained, ~1/6 of the compute): a random tiny BERT stays
    on the LCE plateau for hundreds of steps, this one learns the tiny pages in ~150."""
    import shutil

    from transformers import AutoModel

    from fieldpack.builder.embedder_export import default_model_dir

    src, out = default_model_dir(), tmp_path_factory.mktemp("minilm-1")
    model = AutoModel.from_pretrained(str(src))
    model.encoder.layer = model.encoder.layer[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(out)
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        shutil.copy(src / name, out / name)
    return out


def _reversed(r: Any) -> Any:
    """A poor first stage: the real hybrid ranking of the top 8, worst first (the own page last)."""
    return lambda q: list(reversed(r.search(q, k=8)))


@pytest.mark.slow
def test_training_export_reorder_and_gate(tmp_path: Path, first_stage: Any, minilm_one_layer: Path) -> None:
    chunks, r = first_stage
    base = minilm_one_layer
    res = RT.build_reranker(base, chunks, _reversed(r), tmp_path / "kept", steps=150, batch_queries=4, lr=5e-4,
                            train_max_tokens=64, max_tokens=64, max_train=320, max_gate=16, candidates=8,
                            weight=float("inf"), holdout=5, min_gain=0.05, int8=True, threads=1)
    assert res.loss_last < res.loss_first * 0.8, res
    assert res.parity_max_abs < 1e-3, res  # ONNX fp32 matches torch
    assert res.kept and res.reranked_mrr >= res.first_stage_mrr + 0.05, res
    assert res.onnx_path is not None and res.onnx_path.is_file() and res.tokenizer_path is not None
    assert res.int8_mrr is not None and res.precision in ("int8", "fp32")

    # the device reranker moves the own page up from the bottom of the reversed candidates
    before, after = [], []
    with OnnxReranker(res.onnx_path, res.tokenizer_path, max_tokens=64, threads=1) as rr:
        for p in range(14, 20):  # pages whose topic words no other page has
            own = chunks[2 * p].source
            q = chunks[2 * p].section.split(" > ")[-1].split(". ", 1)[1]  # "Inspecting the crank shaft"
            hits = _reversed(r)(q)
            out = rr.rerank(q, hits, n=len(hits), weight=float("inf"))
            assert sorted(h.chunk_id for h in out) == sorted(h.chunk_id for h in hits)
            before.append([h.source for h in hits].index(own))
            after.append([h.source for h in out].index(own))
        scores = rr.score(q, [passage_text(h.section, h.text) for h in hits])
        assert scores.shape == (len(hits),) and scores.dtype == np.float32
    assert 2 * sum(after) <= sum(before) and 0 in after, (before, after)

    # an untrained head over the real (good) first stage: the gate drops it and writes nothing
    dropped = RT.build_reranker(base, chunks, lambda q: r.search(q, k=8), tmp_path / "dropped", steps=5, batch_queries=4,
                                lr=1e-12, train_max_tokens=64, max_tokens=64, max_train=40, max_gate=16,
                                candidates=8, weight=float("inf"), holdout=5, min_gain=0.05, int8=False,
                                threads=1)
    assert not dropped.kept and dropped.onnx_path is None and not (tmp_path / "dropped").exists()
    assert dropped.reranked_mrr < dropped.first_stage_mrr + 0.05


def test_too_small_document_set_is_refused(tmp_path: Path) -> None:
    import shutil

    from fieldpack.builder.embedder_export import default_model_dir
    from fieldpack.shared.errors import ModelLoadError, UsageError

    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        RT.build_reranker(tmp_path, tiny_chunks(1), lambda q: [], tmp_path / "out", holdout=5)
    shutil.copy(default_model_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    with pytest.raises(UsageError, match="too few"):
        RT.build_reranker(tmp_path, tiny_chunks(1), lambda q: [], tmp_path / "out", holdout=5)


def test_reranker_refuses_missing_files(tmp_path: Path) -> None:
    from fieldpack.shared.errors import RuntimeLoadError

    with pytest.raises(RuntimeLoadError, match="does not exist"):
        OnnxReranker(tmp_path / "reranker.onnx", tmp_path / "tokenizer.json")

