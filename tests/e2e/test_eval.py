"""``fieldpack eval`` end to end on the real tiny bundle: real unpack + hash check, real ONNX embedder, real
sqlite-vec/FTS5 retrieval, real llama.cpp answers; CLI in a subprocess as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import run_cli

pytestmark = pytest.mark.slow

QA_LINES = [
    {"id": "pool", "question": "The SCADA screens say connection pool exhausted. What should I do?",
     "expected_source": "database.md#Connection pool exhausted",
     "answer_contains": ["historian-reports"]},
    {"id": "pump3", "question": "Pump 3 discharge pressure alarm is sounding: what are the first checks?",
     "expected_source": "procedures/pumps.md", "expected_section": "Pump 3 pressure alarm",
     "answer_contains": ["V-31"]},
    {"id": "backwash", "question": "When is a sand filter backwashed?", "expected_source": "filters.html"},
    {"id": "handover", "question": "How long must a shift handover last?", "expected_source": "shift-handover.txt"},
    {"id": "football", "question": "Who won the football world cup in 1954?", "unanswerable": True},
]


@pytest.fixture()
def qa_file(tmp_path: Path) -> Path:
    p = tmp_path / "qa.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in QA_LINES) + "\n", encoding="utf-8")
    return p


def test_eval_bundle_and_installed_slot_side_by_side(bundle_v1: Path, e2e_keys: Path, device_dir: Path,
                                                     qa_file: Path, tmp_path: Path) -> None:
    out_json, out_html = tmp_path / "eval.json", tmp_path / "eval.html"
    r = run_cli("eval", str(bundle_v1), str(device_dir), "--qa", str(qa_file), "--k", "5",
                "--trust", str(e2e_keys / "builder.pub"), "--json", str(out_json), "--html", str(out_html),
                "--max-tokens", "24")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "retrieval" in r.stdout and "hybrid" in r.stdout and "riverside@1.0.0" in r.stdout
    doc = json.loads(out_json.read_text())
    assert doc["qa"]["questions"] == 5 and doc["qa"]["unanswerable"] == 1
    fpk, slot = doc["bundles"]
    assert fpk["label"] == slot["label"] == "riverside@1.0.0"
    assert "signature by" in fpk["opened"] and "data dir" in slot["opened"]

    for b in (fpk, slot):
        pool = next(q for q in b["questions"] if q["id"] == "pool")
        assert pool["retrieval"]["hybrid"]["rank"] == 1  # the section-level target, first hit
        for mode in ("vector", "bm25", "hybrid"):
            m = b["retrieval"][mode]
            assert m["n"] == 4 and set(m) >= {"recall@1", "recall@5", "mrr", "ndcg@5", "latency_ms"}
            ranks = [q["retrieval"][mode]["rank"] for q in b["questions"] if not q["unanswerable"]]
            assert m["recall@5"] == sum(1 for x in ranks if x) / 4
            assert m["mrr"] == pytest.approx(sum(1 / x for x in ranks if x) / 4)
            assert m["latency_ms"]["p50"] > 0 and m["latency_ms"]["p95"] >= m["latency_ms"]["p50"]
        assert b["retrieval"]["hybrid"]["recall@5"] >= 0.75
        assert b["retrieval"]["hybrid"]["section"]["n"] == 2

        g = b["generation"]
        assert g["unanswerable"] == 1 and g["abstention_accuracy"] == 1.0  # off-topic -> relevance gate
        football = next(q for q in b["questions"] if q["id"] == "football")
        assert football["answer"]["gate_abstained"] is True
        # the gate measured without generating refuses exactly what the answers' gate refused
        for q in b["questions"]:
            assert q["gate"]["passes"] is (not q["answer"]["gate_abstained"]), q
        assert b["gate"]["refused_unanswerable"] == 1.0 and b["gate"]["min_similarity"] == b["info"]["min_similarity"]
        assert 0.0 <= g["false_abstention_rate"] <= 1.0
        if g["answered"]:
            assert g["citation_precision"] is not None and 0.0 <= g["citation_precision"] <= 1.0
            assert g["latency_ms"]["time_to_first_token"]["p50"] > 0
            assert g["latency_ms"]["total"]["p95"] >= g["latency_ms"]["total"]["p50"]

    # the same bundle gives the same rankings whether read from the .fpk or from the installed slot
    for qa, qb in zip(fpk["questions"], slot["questions"]):
        for mode in ("vector", "bm25", "hybrid"):
            assert qa["retrieval"][mode].get("rank") == qb["retrieval"][mode].get("rank")
            assert qa["retrieval"][mode]["top"] == qb["retrieval"][mode]["top"]

    html = out_html.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("data:image/png;base64,") >= 3
    assert "riverside@1.0.0 · hybrid" in html and "<script" not in html


def test_eval_retrieval_only_to_stdout_json(bundle_v1: Path, qa_file: Path) -> None:
    r = run_cli("eval", str(bundle_v1), "--qa", str(qa_file), "--no-generate", "--json", "-", "--modes", "bm25")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    b = doc["bundles"][0]
    assert b["generation"] is None and list(b["retrieval"]) == ["bm25"]
    assert "signature not checked" in b["opened"]
    assert all(q["answer"] is None for q in b["questions"])
    # a trial's retrieval-only eval hid that the device would refuse 2 of 13 answerable questions: the gate's
    # refusals are measured without a model run
    g = b["gate"]
    assert g["unanswerable"] == 1 and g["refused_unanswerable"] == 1.0 and g["answerable"] == 4
    assert next(q for q in b["questions"] if q["id"] == "football")["gate"]["passes"] is False
    assert all(isinstance(q["gate"]["best_similarity"], float) for q in b["questions"])
    r = run_cli("eval", str(bundle_v1), "--qa", str(qa_file), "--no-generate", "--modes", "hybrid")
    assert r.returncode == 0 and "relevance gate (cosine >= " in r.stdout and "1 of 1 unanswerable" in r.stdout, \
        r.stdout


def test_eval_bad_inputs_are_one_line_errors(bundle_v1: Path, qa_file: Path, tmp_path: Path) -> None:
    r = run_cli("eval", str(bundle_v1), "--qa", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.jsonl does not exist" in r.stderr

    bad = tmp_path / "bad.jsonl"
    bad.write_text(qa_file.read_text() + '{"question": "unterminated"\n', encoding="utf-8")
    r = run_cli("eval", str(bundle_v1), "--qa", str(bad))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "line 6" in r.stderr and "Fix:" in r.stderr

    r = run_cli("eval", str(tmp_path / "gone.fpk"), "--qa", str(qa_file))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "gone.fpk does not exist" in r.stderr

    broken = tmp_path / "broken.fpk"
    broken.write_bytes(bundle_v1.read_bytes()[:4096])
    r = run_cli("eval", str(broken), "--qa", str(qa_file), "--no-generate")
    assert r.returncode == 4 and r.stderr.count("\n") == 1, r.stderr

    r = run_cli("eval", str(bundle_v1), "--qa", str(qa_file), "--html", str(tmp_path / "no" / "dir" / "r.html"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_eval_works_without_torch_or_builder(bundle_v1: Path, qa_file: Path, tmp_path: Path) -> None:
    """The device extra alone suffices: with torch, transformers, sentence-transformers, onnx, gguf and builder
    made unimportable, eval still loads the bundle, retrieves, generates and writes its reports."""
    import subprocess
    import sys

    from tests.e2e.conftest import REPO

    out = tmp_path / "r.json"
    code = f"""
import importlib.abc, sys
BLOCKED = {{"torch", "transformers", "sentence_transformers", "onnx", "gguf", "builder"}}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked on the device: {{name}}")
        return None
sys.meta_path.insert(0, Block())
from fieldpack.cli import main
main(["eval", {str(bundle_v1)!r}, "--qa", {str(qa_file)!r}, "--json", {str(out)!r}, "--max-tokens", "8",
      "--html", {str(tmp_path / "r.html")!r}])
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["bundles"][0]["generation"]["n"] == 5
    assert (tmp_path / "r.html").stat().st_size > 1000
