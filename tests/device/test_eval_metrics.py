"""Eval metrics on hand-made rankings with known answers; QA parsing and relevance; aggregation; reports."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from fieldpack.device.evaluate import metrics as M
from fieldpack.device.evaluate.qa import Target, load_qa
from fieldpack.device.evaluate.run import (
    EvalReport,
    BundleEval,
    QuestionResult,
    aggregate_generation,
    aggregate_retrieval,
    cited_numbers,
    declines,
)
from fieldpack.shared.errors import FieldpackError, InputNotFoundError, UsageError


# --- ranking metrics ----------------------------------------------------------------------------------------
def test_perfect_ranking() -> None:
    rel = [True, False, False]
    assert M.reciprocal_rank(rel) == 1.0
    assert M.recall_at_k(rel, 1) == 1.0
    assert M.ndcg_at_k(rel, 10, n_relevant=1) == 1.0


def test_miss_scores_zero() -> None:
    rel = [False] * 10
    assert M.reciprocal_rank(rel) == 0.0
    assert M.recall_at_k(rel, 10) == 0.0
    assert M.ndcg_at_k(rel, 10, n_relevant=1) == 0.0
    assert M.first_relevant_rank(rel) is None
    assert M.reciprocal_rank([]) == 0.0


def test_relevant_at_rank_two() -> None:
    rel = [False, True, False]
    assert M.reciprocal_rank(rel) == 0.5
    assert M.ndcg_at_k(rel, 10, n_relevant=1) == pytest.approx(1 / math.log2(3))
    assert M.recall_at_k(rel, 1) == 0.0 and M.recall_at_k(rel, 2) == 1.0


def test_cutoff_excludes_items_below_k() -> None:
    rel = [False] * 5 + [True]
    assert M.recall_at_k(rel, 5) == 0.0 and M.recall_at_k(rel, 6) == 1.0
    assert M.ndcg_at_k(rel, 5, n_relevant=1) == 0.0
    assert M.ndcg_at_k(rel, 6, n_relevant=1) == pytest.approx(1 / math.log2(7))


def test_ndcg_several_relevant() -> None:
    # gains at ranks 1 and 3, two relevant in all: DCG = 1 + 1/log2(4) = 1.5, IDCG = 1 + 1/log2(3)
    rel = [True, False, True]
    assert M.dcg_at_k(rel, 3) == pytest.approx(1.5)
    assert M.ndcg_at_k(rel, 3) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    # three relevant exist but only two retrieved: the ideal list has three
    ideal3 = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert M.ndcg_at_k(rel, 3, n_relevant=3) == pytest.approx(1.5 / ideal3)
    assert M.recall_at_k(rel, 3, n_relevant=3) == pytest.approx(2 / 3)


def test_first_relevant_only_collapses_repeats() -> None:
    assert M.first_relevant_only([False, True, True, False, True]) == [False, True, False, False, False]
    rel = M.first_relevant_only([True, True])
    assert M.ndcg_at_k(rel, 10, n_relevant=1) == 1.0


def test_bad_cutoffs_raise_usage_errors() -> None:
    with pytest.raises(UsageError, match="k=0"):
        M.recall_at_k([True], 0)
    with pytest.raises(UsageError):
        M.ndcg_at_k([True], -1)
    with pytest.raises(UsageError, match="more relevant"):
        M.recall_at_k([True, True], 2, n_relevant=1)


def test_recall_curve() -> None:
    assert M.recall_curve([1, 3, None, 2], 3) == [0.25, 0.5, 0.75]
    assert M.recall_curve([], 3) == []


# --- percentiles and means ----------------------------------------------------------------------------------
def test_percentiles_match_linear_interpolation() -> None:
    xs = [10.0, 1.0, 4.0, 2.0, 3.0]
    assert M.percentile(xs, 50) == 3.0
    assert M.percentile(xs, 0) == 1.0 and M.percentile(xs, 100) == 10.0
    # sorted 1,2,3,4,10; pos = 4*0.95 = 3.8 -> 4 + 0.8*(10-4)
    assert M.percentile(xs, 95) == pytest.approx(8.8)
    assert M.percentile([7.0], 95) == 7.0
    assert M.percentile([], 50) is None
    np = pytest.importorskip("numpy")
    sample = [0.3, 5.0, 2.2, 9.1, 4.4, 4.4, 12.0, 0.0]
    for q in (5, 50, 90, 95, 99):
        assert M.percentile(sample, q) == pytest.approx(float(np.percentile(sample, q)))
    with pytest.raises(UsageError):
        M.percentile(xs, 101)


def test_mean_and_rate_of_empty_are_none() -> None:
    assert M.mean([]) is None and M.rate([]) is None
    assert M.rate([True, False, True, True]) == 0.75


def test_contains_is_case_and_whitespace_insensitive() -> None:
    ans = "Run  APT-FILE\n update first, then apt-file search."
    assert M.contains_all(ans, ["apt-file update", "apt-file   search"])
    assert not M.contains_all(ans, ["apt-file update", "dpkg -S"])
    assert M.contains_share(ans, ["apt-file update", "dpkg -S"]) == 0.5
    assert M.contains_share(ans, []) is None


# --- relevance and QA parsing -------------------------------------------------------------------------------
def test_target_matching() -> None:
    t = Target.parse("database.md#Connection pool exhausted")
    assert t.source == "database.md" and t.section == "Connection pool exhausted"
    assert t.matches("database.md", "Database > Connection pool exhausted")
    assert t.matches("docs/database.md", "connection  POOL exhausted > Steps")
    assert not t.matches("database.md", "Database > Backups")
    assert not t.matches("other-database.md", "Connection pool exhausted")
    assert t.document().matches("database.md", "Database > Backups")
    sec = Target.parse("apt.html", section="6.1.6. Caching Proxy")
    assert sec.matches("apt.html", "6. APT > 6.1. Filling in > 6.1.6. Caching Proxy for Debian Packages")
    assert not sec.matches("apt.html", "6. APT > 6.1. Filling in")
    assert Target.parse("./a/b.md").source == "a/b.md"


def _write(p: Path, *lines: str) -> Path:
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_load_qa_reads_the_shared_format(tmp_path: Path) -> None:
    qa = load_qa(_write(tmp_path / "qa.jsonl",
                        '{"id": "a", "question": "Pool exhausted?", "expected_source": "database.md", '
                        '"expected_section": "Connection pool exhausted", "answer_contains": ["restart"]}',
                        "",
                        '{"id": "b", "question": "Who won in 1954?", "unanswerable": true}'))
    assert [i.id for i in qa.items] == ["a", "b"]
    assert str(qa.items[0].target) == "database.md"  # expected_source alone is the primary target
    assert str(qa.items[0].section_target) == "database.md#Connection pool exhausted"
    assert qa.items[0].answer_contains == ("restart",)
    assert qa.items[1].target is None and qa.unanswerable == [qa.items[1]]
    assert len(qa.sha256) == 64
    frag = load_qa(_write(tmp_path / "frag.jsonl", '{"question": "q", "expected_source": "db.md#Backups"}'))
    assert str(frag.items[0].target) == str(frag.items[0].section_target) == "db.md#Backups"
    plain = load_qa(_write(tmp_path / "plain.jsonl", '{"question": "q", "expected_source": "db.md"}'))
    assert plain.items[0].section_target is None


def test_the_shared_debian_qa_set_loads() -> None:
    path = Path(__file__).resolve().parents[3] / "shared" / "qa" / "debian-handbook.jsonl"  # ../shared
    if not path.exists():
        pytest.skip("shared QA set not present on this machine")
    qa = load_qa(path)
    assert len(qa.items) == 46 and len(qa.unanswerable) == 6


@pytest.mark.parametrize("line,needle", [
    ('{"question": "x", "expected_source": "a.md"', "line 2: not valid JSON"),
    ('["not", "an", "object"]', "line 2: expected a JSON object"),
    ('{"expected_source": "a.md"}', 'line 2: missing or empty "question"'),
    ('{"question": "x"}', "line 2: answerable item without a document path"),
    ('{"question": "x", "unanswerable": true, "expected_source": "a.md"}', "line 2: an unanswerable item"),
    ('{"question": "x", "expected_source": "a.md", "answer_contains": [1]}', "line 2: \"answer_contains\""),
    ('{"id": "one", "question": "y", "expected_source": "b.md"}', "line 2: id 'one' already used on line 1"),
])
def test_malformed_lines_name_their_line(tmp_path: Path, line: str, needle: str) -> None:
    p = _write(tmp_path / "qa.jsonl", '{"id": "one", "question": "ok?", "expected_source": "a.md"}', line)
    with pytest.raises(UsageError) as ei:
        load_qa(p)
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg and "Fix:" in msg


def test_missing_and_empty_qa_files(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="does not exist"):
        load_qa(tmp_path / "nope.jsonl")
    with pytest.raises(UsageError, match="no questions"):
        load_qa(_write(tmp_path / "empty.jsonl", "", "   "))


# --- answers ------------------------------------------------------------------------------------------------
def test_cited_numbers() -> None:
    assert cited_numbers("Close valve [2]. Then [1, 3] and [2][9].", 3) == [2, 1, 3]
    assert cited_numbers("no markers", 3) == []
    assert cited_numbers("[0] [4]", 3) == []


def test_declines() -> None:
    from fieldpack.device.prompt import ABSTAIN_TEXT

    assert declines(ABSTAIN_TEXT)
    assert declines("The documents do not answer this question.")
    assert not declines("Restart the pool with `systemctl restart pgbouncer` [1].")


# --- aggregation --------------------------------------------------------------------------------------------
def _q(qid: str, ranks: dict[str, int | None], *, unanswerable: bool = False, section: bool = False,
       answer: dict | None = None) -> QuestionResult:
    q = QuestionResult(id=qid, question=qid, unanswerable=unanswerable, target=None if unanswerable else "a.md",
                       has_section=section, answer=answer)
    for mode, r in ranks.items():
        row = {"latency_ms": 2.0, "n_hits": 10, "top": []}
        if not unanswerable:
            row.update(rank=r, doc_rank=r)
        if section:
            row["section_rank"] = None if r is None else r + 1  # the section's chunk comes one lower
        q.retrieval[mode] = row
    return q


def _timings(total: float) -> dict:
    return {"retrieval_ms": 3.0, "time_to_first_token_ms": 20.0, "prompt_eval_ms": 15.0, "total_ms": total,
            "tokens_per_s": 50.0, "completion_tokens": 10}


def test_aggregate_retrieval_known_values() -> None:
    qs = [_q("a", {"hybrid": 1}), _q("b", {"hybrid": 2}, section=True), _q("c", {"hybrid": None}),
          _q("d", {"hybrid": 7}), _q("u", {"hybrid": None}, unanswerable=True)]
    r = aggregate_retrieval(qs, "hybrid", 10)
    assert r["n"] == 4
    assert r["recall@1"] == 0.25 and r["recall@5"] == 0.5 and r["recall@10"] == 0.75
    assert r["mrr"] == pytest.approx((1 + 0.5 + 0 + 1 / 7) / 4)
    assert r["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 0 + 1 / math.log2(8)) / 4)
    assert r["section"]["n"] == 1 and r["section"]["mrr"] == pytest.approx(1 / 3)
    assert r["section"]["document_level"]["mrr"] == 0.5
    assert r["latency_ms"]["n"] == 5 and r["latency_ms"]["p50"] == 2.0
    assert r["recall_curve"][0] == 0.25 and r["recall_curve"][-1] == 0.75
    small = aggregate_retrieval(qs, "hybrid", 3)
    assert "recall@10" not in small and "ndcg@3" in small and small["recall@3"] == 0.5


def test_aggregate_generation_known_values() -> None:
    def ans(*, abstained=False, gate=False, cited=(), expected=False, ctx=True, contains=None, total=100.0):
        a = {"text": "x", "abstained": abstained, "gate_abstained": gate, "cited": list(cited),
             "cited_expected": expected, "cited_relevant": 1 if expected else 0, "context_has_expected": ctx,
             "timings": _timings(total)}
        if contains is not None:
            a.update(contains_all=contains, contains_share=1.0 if contains else 0.5)
        return a

    qs = [_q("a", {}, answer=ans(cited=[1], expected=True, contains=True, total=100)),
          _q("b", {}, answer=ans(cited=[2], expected=False, contains=False, total=200)),
          _q("c", {}, answer=ans(cited=[], ctx=False, total=300)),
          _q("d", {}, answer=ans(abstained=True, gate=True, ctx=False)),
          _q("u1", {}, unanswerable=True, answer=ans(abstained=True, gate=True)),
          _q("u2", {}, unanswerable=True, answer=ans(abstained=True, gate=False, total=400)),
          _q("u3", {}, unanswerable=True, answer=ans(abstained=False, gate=False, total=500))]
    for q in qs[4:]:
        for key in ("cited_expected", "cited_relevant", "context_has_expected"):
            q.answer.pop(key)
    g = aggregate_generation(qs)
    assert g["answerable"] == 4 and g["answered"] == 3 and g["unanswerable"] == 3
    assert g["citation_precision"] == pytest.approx(1 / 3)
    assert g["cited_marker_precision"] == 0.5
    assert g["context_recall"] == pytest.approx(2 / 3)
    assert g["abstention_accuracy"] == pytest.approx(2 / 3)
    assert g["gate_abstention_accuracy"] == pytest.approx(1 / 3)
    assert g["false_abstention_rate"] == 0.25
    assert g["answer_contains_rate"] == 0.5 and g["answer_contains_share"] == 0.75
    # latency of generated answers only (gate abstentions have no first token)
    assert g["latency_ms"]["total"]["n"] == 5 and g["latency_ms"]["total"]["p50"] == 300.0


def test_aggregate_gate_known_values() -> None:
    from fieldpack.device.evaluate.run import aggregate_gate

    qs = [_q("a", {}), _q("b", {}), _q("c", {}), _q("u1", {}, unanswerable=True), _q("u2", {}, unanswerable=True)]
    for q, passes in zip(qs, (True, False, True, False, True)):
        q.gate = {"passes": passes, "best_similarity": 0.5 if passes else 0.3}
    g = aggregate_gate(qs, 0.42)
    assert g["answerable"] == 3 and g["unanswerable"] == 2 and g["min_similarity"] == 0.42
    assert g["refused_answerable"] == pytest.approx(1 / 3) and g["refused_answerable_ids"] == ["b"]
    assert g["refused_unanswerable"] == 0.5
    assert aggregate_gate([], None)["refused_answerable"] is None


# --- reports ------------------------------------------------------------------------------------------------
def _report() -> EvalReport:
    qs = [_q("a", {"vector": 1, "hybrid": 2}, answer=None), _q("b", {"vector": None, "hybrid": 1}, answer=None)]
    b = BundleEval(label="demo@1.0.0", path="demo.fpk", opened="test", info={"model": "tiny", "chunks": 3},
                   retrieval={m: aggregate_retrieval(qs, m, 10) for m in ("vector", "hybrid")}, generation=None,
                   questions=qs, seconds=1.0)
    return EvalReport(qa_path="qa.jsonl", qa_sha256="0" * 64, n_questions=2, n_unanswerable=0,
                      options={"k": 10, "modes": ["vector", "hybrid"], "generate": False}, bundles=[b, b])


def test_json_report_round_trips(tmp_path: Path) -> None:
    from fieldpack.device.evaluate.report import write_json

    doc = json.loads(write_json(_report(), tmp_path / "r.json").read_text())
    assert doc["report_version"] == 1
    assert doc["bundles"][0]["retrieval"]["hybrid"]["mrr"] == 0.75
    assert doc["bundles"][0]["retrieval"]["vector"]["recall@1"] == 0.5


def test_html_report_is_self_contained_with_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from fieldpack.device.evaluate.report import write_html

    path = tmp_path / "r.html"
    assert write_html(_report(), path) is True
    text = path.read_text()
    assert text.count("data:image/png;base64,") >= 3
    assert "demo@1.0.0 · hybrid" in text and "0.750" in text and "page mrr" in text
    assert "http://" not in text and "https://" not in text and "<script" not in text


def test_html_report_without_matplotlib_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fieldpack.device.evaluate.report import MATPLOTLIB_MISSING, write_html

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    path = tmp_path / "r.html"
    assert write_html(_report(), path) is False
    text = path.read_text()
    assert "data:image/png" not in text and "matplotlib is not installed" in text
    assert MATPLOTLIB_MISSING.split(":")[0] in text


def test_errors_are_one_line_fieldpack_errors(tmp_path: Path) -> None:
    from fieldpack.device.evaluate.run import EvalOptions, evaluate

    qa = _write(tmp_path / "qa.jsonl", '{"question": "q?", "expected_source": "a.md"}')
    with pytest.raises(InputNotFoundError, match="nope.fpk does not exist"):
        evaluate([tmp_path / "nope.fpk"], qa, EvalOptions(generate=False))
    with pytest.raises(UsageError, match="unknown retrieval mode"):
        EvalOptions(modes=("dense",))
    with pytest.raises(UsageError):
        EvalOptions(k=0)
    empty_dir = tmp_path / "folder"
    empty_dir.mkdir()
    with pytest.raises(FieldpackError, match="neither an installed slot"):
        evaluate([empty_dir], qa, EvalOptions(generate=False))


# --- page level and also_ok ---------------------------------------------------------------------------------
def test_page_ranking_keeps_first_appearance() -> None:
    assert M.page_ranking(["a", "b", "a", "c", "b"]) == ["a", "b", "c"]
    assert M.page_ranking([]) == []


def test_page_metrics_by_hand(tmp_path: Path) -> None:
    """Chunk list a, a, b, c, b, d: pages a, b, c, d. Expected page c (chunk rank 4, page rank 3); also_ok d
    does not change the first relevant rank; an item whose also_ok page b leads raises its page rank to 2."""
    qa = load_qa(_write(tmp_path / "qa.jsonl",
                        '{"id": "x", "question": "q", "expected_source": "c.html", "also_ok": ["d.html"]}',
                        '{"id": "y", "question": "q", "expected_source": "c.html", "also_ok": "sub/b.html"}',
                        '{"id": "z", "question": "q", "expected_source": "e.html"}'))
    x, y, z = qa.items
    chunks = ["a.html", "a.html", "sub/b.html", "c.html", "sub/b.html", "d.html"]
    pages = M.page_ranking(chunks)
    assert M.first_relevant_rank([x.target.source_matches(s) for s in chunks]) == 4  # chunk level: target only
    assert M.first_relevant_rank([x.page_matches(p) for p in pages]) == 3
    assert M.first_relevant_rank([y.page_matches(p) for p in pages]) == 2
    assert M.first_relevant_rank([z.page_matches(p) for p in pages]) is None
    assert x.also_ok == ("d.html",) and y.also_ok == ("sub/b.html",)
    # page recall@2 / MRR over x, y, z: x at 3 (miss, 1/3), y at 2 (hit, 1/2), z absent (miss, 0)
    qs = []
    for qid, chunk_rank, page_rank in (("x", 4, 3), ("y", None, 2), ("z", None, None)):
        q = _q(qid, {"hybrid": chunk_rank})
        q.retrieval["hybrid"]["page_rank"] = page_rank
        qs.append(q)
    r = aggregate_retrieval(qs, "hybrid", 10)
    assert r["page"]["recall@1"] == 0.0 and r["page"]["recall@5"] == pytest.approx(2 / 3)
    assert r["page"]["mrr"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert r["recall@5"] == pytest.approx(1 / 3)  # chunk level: only x's target, at 4


def test_split_selects_items_and_rejects_bad_values(tmp_path: Path) -> None:
    p = _write(tmp_path / "qa.jsonl",
               '{"id": "a", "question": "q", "expected_source": "a.md", "split": "dev"}',
               '{"id": "b", "question": "q", "expected_source": "b.md", "split": "unseen"}',
               '{"id": "c", "question": "q", "unanswerable": true, "split": "unseen"}')
    qa = load_qa(p)
    assert [i.id for i in qa.only_split("unseen").items] == ["b", "c"]
    assert [i.id for i in qa.only_split("dev").items] == ["a"]
    assert qa.only_split(None) is qa
    with pytest.raises(UsageError, match="split"):
        qa.only_split("test")
    with pytest.raises(UsageError, match="line 1"):
        load_qa(_write(tmp_path / "bad.jsonl", '{"question": "q", "expected_source": "a.md", "split": "train"}'))
    with pytest.raises(UsageError, match="also_ok"):
        load_qa(_write(tmp_path / "bad2.jsonl", '{"question": "q", "expected_source": "a.md", "also_ok": [1]}'))
    assert not qa.items[2].page_matches("a.md")  # unanswerable: nothing is relevant
