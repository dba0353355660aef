"""Build-time embedder adaptation on a tiny synthetic doc set: pair mining, page-disjoint batches, the gate's
figures by hand, training that lowers the loss, the gate keeping a model that learned and dropping one that did
not, and the kept model's ONNX export matching torch (cosine >= 0.999)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from fieldpack.builder import embedder_adapt as A
from fieldpack.builder.ingest.model import Chunk
from tests.builder.test_embedder import _tiny_st_checkpoint

_WORDS = ("pump valve filter chlorine sensor relay breaker motor bearing gasket flange turbine boiler chiller "
          "compressor damper actuator inverter transformer conveyor hopper silo auger blower heater cooler "
          "nozzle piston crank shaft coupling impeller manifold regulator thermostat gauge meter probe "
          "cable fuse switch panel socket battery charger lamp siren beacon camera router modem antenna").split()


def tiny_chunks(pages: int = 40, seed: int = 0) -> list[Chunk]:
    """``pages`` pages of two sections each; every page has its own two topic words in its title, headings
    and sentences, so a model can learn to tie a heading or a sentence to its own page's passages."""
    rng = random.Random(seed)
    out = []
    for p in range(pages):
        a, b = _WORDS[(2 * p) % len(_WORDS)], _WORDS[(2 * p + 1) % len(_WORDS)]
        title = f"{p + 1}. Servicing the {a} {b} unit {p}"
        for s, verb in enumerate(("Inspecting", "Replacing")):
            section = f"{title} > {p + 1}.{s + 1}. {verb} the {a} {b}"
            sentences = [f"The {a} {b} {rng.choice(['needs', 'gets', 'wants'])} {verb.lower()} when the "
                         f"{rng.choice(_WORDS)} reading on line {p} drifts for {i + 2} hours straight."
                         for i in range(4)]
            out.append(Chunk(source=f"page{p:02d}.html", section=section, page=None, line_start=1, line_end=4,
                             text=" ".join(sentences), n_tokens=80, doc_sha256="0" * 64))
    return out


def test_heading_query_and_mining() -> None:
    assert A.heading_query("19.3. Connections > 19.3.1. Connection Settings") == "Connection Settings"
    assert A.heading_query("") == ""
    chunks = tiny_chunks(3)
    pairs = A.mine_pairs(chunks)
    kinds = {k: [p for p in pairs if p.kind == k] for k in ("heading", "title", "ict")}
    assert len(kinds["heading"]) == 6 and len(kinds["title"]) == 3 and len(kinds["ict"]) == 6
    assert kinds["heading"][0].anchor == "Inspecting the pump valve"
    assert kinds["title"][0].anchor == "Servicing the pump valve unit 0"
    ict = kinds["ict"][0]
    assert ict.anchor in chunks[0].text and ict.anchor not in ict.positive  # the sentence is cut out (ICT)
    assert [p for p in A.mine_pairs(chunks, ict_per_chunk=0) if p.kind == "ict"] == []


def test_batches_never_repeat_a_page() -> None:
    pairs = A.mine_pairs(tiny_chunks(12))
    batches = A.page_batches(pairs, 8, seed=1)
    assert batches and all(len(b) == 8 and len({p.source for p in b}) == 8 for b in batches)
    assert len({id(p) for b in batches for p in b}) == sum(len(b) for b in batches)  # no pair twice


def test_gate_figures_by_hand() -> None:
    pool = np.eye(4, dtype=np.float32)
    q = np.array([[1, 0, 0, 0], [0.6, 0.8, 0, 0], [0, 0, 0.6, 0.8]], dtype=np.float32)
    # query 0: own row 0 at rank 1; query 1: own row 0 (0.6) behind row 1 (0.8): rank 2; query 2: own row 2
    # (0.6) behind row 3 (0.8): rank 2
    mrr, r5 = A.gate_figures(q, pool, [0, 0, 2])
    assert mrr == pytest.approx((1 + 0.5 + 0.5) / 3) and r5 == 1.0
    mrr1, _ = A.gate_figures(q[:1], pool, [3])  # own row has similarity 0, behind 1 row with 1.0, ties favour it
    assert mrr1 == pytest.approx(0.5)


@pytest.mark.slow
def test_adaptation_lowers_loss_gate_keeps_and_onnx_matches(tmp_path: Path) -> None:
    from fieldpack.builder.embedder_export import EXPORT_PARITY_MIN_COSINE, export_embedder

    base = _tiny_st_checkpoint(tmp_path / "tiny", pooling="mean")
    chunks = tiny_chunks(40)
    res = A.adapt_embedder(base, chunks, tmp_path / "adapted", steps=60, batch_size=8, lr=1e-3, holdout=5,
                           min_gain=0.01, threads=1)
    assert res.loss_last < res.loss_first * 0.8, res
    assert res.heldout_queries > 0 and res.train_pairs > 0 and res.steps > 10
    assert res.kept and res.adapted_mrr >= res.base_mrr + 0.01 and res.model_dir is not None
    exp = export_embedder(res.model_dir, tmp_path / "onnx", int8=False)
    assert exp.parity_min_cosine >= EXPORT_PARITY_MIN_COSINE
    assert exp.max_tokens == 64  # the base checkpoint's max_seq_length survives the save

    dropped = A.adapt_embedder(base, chunks, tmp_path / "nolearn", steps=5, batch_size=8, lr=1e-12, holdout=5,
                               min_gain=0.01, threads=1)
    assert not dropped.kept and dropped.model_dir is None and not (tmp_path / "nolearn").exists()
    assert abs(dropped.adapted_mrr - dropped.base_mrr) < 0.01


def test_too_small_document_set_is_refused(tmp_path: Path) -> None:
    from fieldpack.shared.errors import UsageError

    with pytest.raises(UsageError, match="too few"):
        A.adapt_embedder(tmp_path, tiny_chunks(1), tmp_path / "out", batch_size=8, holdout=5)


def test_adapt_record_round_trips_and_reaches_the_manifest_figures(tmp_path: Path) -> None:
    """The adapt stage's record is JSON like every stage record; the manifest figures drop the local path."""
    from fieldpack.builder.stages.embedder import EmbedderAdaptRecord

    res = A.AdaptResult(kept=True, model_dir=tmp_path / "m", pairs={"heading": 3, "title": 1, "ict": 2},
                        train_pairs=5, heldout_queries=1, pool=4, steps=2, batch_size=2, train_max_tokens=64,
                        loss_first=1.5, loss_last=0.5, base_mrr=0.2, adapted_mrr=0.4, base_recall5=0.5,
                        adapted_recall5=1.0, min_gain=0.01, seconds=1.0)
    back = EmbedderAdaptRecord.model_validate_json(EmbedderAdaptRecord(result=res).model_dump_json())
    assert back.result == res
    d = res.to_dict()
    assert d["model_dir"] == str(tmp_path / "m") and d["adapted_mrr"] == 0.4
