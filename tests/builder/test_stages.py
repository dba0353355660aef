"""Build stages and the build cache: stages run on their own; a docs-only rebuild reuses the model stages (and
does not rewrite their files); a new quant type reruns quantize only; a damaged cache entry is rebuilt; a
recipe replays to the same bytes without the cache."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from fieldpack.builder.stages import Input, Runner, Stage, StageCache, StageInputs, StageRecord
from pydantic import BaseModel

from tests.conftest import DEMO_DOCS, run_cli

MODEL_STAGES = ("embedder", "convert", "parity", "quantize")
DOC_STAGES = ("ingest", "index", "smoke", "split", "quality")
NEW_SECTION = "\n\n## Sludge blanket alarm\n\nWhen the clarifier's sludge blanket alarm sounds, start the " \
              "standby scraper drive and log the blanket depth every fifteen minutes.\n"


# --- the cache on a toy stage (fast) ---------------------------------------------------------------------------
class ToyInputs(StageInputs):
    text: Input
    times: int


class ToyRecord(StageRecord):
    out: Path
    length: int


def _toy(inputs: ToyInputs, out_dir: Path) -> ToyRecord:
    calls.append(inputs.times)
    out = out_dir / "out.txt"
    out.write_text(inputs.text.path.read_text() * inputs.times)
    return ToyRecord(out=out, length=out.stat().st_size)


calls: list[int] = []
TOY = Stage("toy", "1", ToyRecord, _toy)


def _failing(inputs: ToyInputs, out_dir: Path) -> ToyRecord:
    (out_dir / "half.txt").write_text("half")
    raise RuntimeError("stage failed")


def test_cache_key_follows_content_not_location(tmp_path: Path) -> None:
    calls.clear()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("abc")
    b.write_text("abc")
    run = Runner(StageCache(tmp_path / "cache"))
    first = run(TOY, ToyInputs(text=Input.file(a), times=2))
    moved = run(TOY, ToyInputs(text=Input.file(b), times=2))  # same content elsewhere: reused
    assert (first.cached, moved.cached, calls) == (False, True, [2])
    assert moved.out == first.out and moved.out.read_text() == "abcabc" and moved.length == 6
    assert moved.artefact("out.txt").sha256 == first.files["out.txt"].sha256
    b.write_text("abd")
    assert not run(TOY, ToyInputs(text=Input.file(b), times=2)).cached  # content changed: recomputed
    assert not run(TOY, ToyInputs(text=Input.file(a), times=3)).cached  # option changed: recomputed
    assert calls == [2, 2, 3]
    assert [t.cached for t in run.timings] == [False, True, False, False]


def test_damaged_or_missing_artefact_reruns_the_stage(tmp_path: Path) -> None:
    calls.clear()
    src = tmp_path / "a.txt"
    src.write_text("xyz")
    run = Runner(StageCache(tmp_path / "cache"))
    rec = run(TOY, ToyInputs(text=Input.file(src), times=1))
    rec.out.write_text("xyw")  # same size, other bytes
    again = run(TOY, ToyInputs(text=Input.file(src), times=1))
    assert not again.cached and again.out.read_text() == "xyz"
    again.out.unlink()
    assert not run(TOY, ToyInputs(text=Input.file(src), times=1)).cached
    assert run(TOY, ToyInputs(text=Input.file(src), times=1)).cached
    assert calls == [1, 1, 1]


def test_failed_stage_leaves_no_entry(tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("x")
    cache = StageCache(tmp_path / "cache")
    failing = Stage("toy", "1", ToyRecord, _failing)
    with pytest.raises(RuntimeError, match="stage failed"):
        Runner(cache)(failing, ToyInputs(text=Input.file(src), times=1))
    assert list((tmp_path / "cache" / "toy").iterdir()) == []  # no entry, no temp entry, no lock file


def _slow_toy(inputs: ToyInputs, out_dir: Path) -> ToyRecord:
    import os
    import time

    with open(inputs.text.path.with_suffix(".calls"), "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(0.3)
    return _toy(inputs, out_dir)


def _run_slow_toy(src: str, cache: str) -> bool:
    rec = Runner(StageCache(Path(cache)))(Stage("toy", "1", ToyRecord, _slow_toy),
                                          ToyInputs(text=Input.file(Path(src)), times=2))
    return rec.cached


def test_concurrent_builds_compute_a_key_once_and_leave_no_lock_files(tmp_path: Path) -> None:
    """A trial found empty ``.<key>.lock`` files piling up in the cache: the holder now removes its lock file,
    and a waiter that wakes on the removed file locks the path again, so the stage still runs once."""
    from concurrent.futures import ProcessPoolExecutor

    src = tmp_path / "a.txt"
    src.write_text("ab")
    with ProcessPoolExecutor(4) as pool:
        cached = list(pool.map(_run_slow_toy, [str(src)] * 4, [str(tmp_path / "cache")] * 4))
    assert sorted(cached) == [False, True, True, True]
    assert len(src.with_suffix(".calls").read_text().split()) == 1  # computed by one process only
    left = [p.name for p in (tmp_path / "cache" / "toy").iterdir()]
    assert len(left) == 1 and not left[0].startswith(".")  # the entry; no lock or temp files


def test_records_round_trip_through_json() -> None:
    """Every stage record of the real stages is pydantic and JSON-serialisable (NaN figures included)."""
    from fieldpack.builder.llama_eval import EvalFigures
    from fieldpack.builder.stages.quant import QualityRecord

    rec = QualityRecord(figures=EvalFigures(ppl_ref=2.0, ppl_test=float("nan"), delta_ppl=float("nan"),
                                            kld_mean=0.01, kld_p99=0.1, top1_agreement=0.9, tokens_scored=10,
                                            chunks=1, n_ctx=32))
    back = QualityRecord.model_validate_json(rec.model_dump_json())
    assert back.figures.ppl_ref == 2.0 and back.figures.ppl_test != back.figures.ppl_test  # NaN kept
    assert isinstance(back, BaseModel)


# --- real stages on the tiny model -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fieldpack.shared.signing import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d)
    return d


@pytest.fixture(scope="module")
def build(tiny_llama_dir: Path, keys: Path, tmp_path_factory: pytest.TempPathFactory):
    """``build(docs, out, cache, **cfg)`` -> BuildResult through the Python API; and the first, cold build."""
    from fieldpack.builder.config import BuildConfig
    from fieldpack.builder.pipeline import build_bundle

    def run(docs: Path, out: Path, cache: Path | None, **over):
        cfg = BuildConfig.validated(dict(model=str(tiny_llama_dir), docs=docs, name="riverside",
                                         sign=keys / "builder.key", output=out, n_ctx=1024, **over))
        return build_bundle(cfg, cache_dir=cache, use_cache=cache is not None)

    root = tmp_path_factory.mktemp("stages")
    run.cache = root / "cache"
    run.first = run(DEMO_DOCS, root / "first.fpk", run.cache)
    return run


def _cached(result) -> dict[str, bool]:
    return {name: rec.cached for name, rec in result.records.all().items()}


@pytest.mark.slow
def test_each_stage_runs_on_its_own(tiny_llama_dir: Path, build, tmp_path: Path) -> None:
    """convert, parity, eval split, quantize and quality called directly (no runner, no cache) on the tiny
    model; results equal to what the build recorded."""
    from fieldpack.builder.stages.docs import INGEST, IngestInputs
    from fieldpack.builder.stages.model import CONVERT, PARITY, ConvertInputs, ParityInputs
    from fieldpack.builder.stages.quant import QUALITY, QUANTIZE, SPLIT, QualityInputs, QuantizeInputs, SplitInputs

    first = build.first.records
    ckpt = Input.tree(tiny_llama_dir)
    dirs = {n: tmp_path / n for n in ("convert", "parity", "ingest", "split", "quantize", "quality")}
    for d in dirs.values():
        d.mkdir()
    conv = CONVERT.fn(ConvertInputs(checkpoint=ckpt), dirs["convert"])
    assert conv.conversion.sha256 == first.convert.conversion.sha256  # deterministic conversion
    assert PARITY.fn(ParityInputs(checkpoint=ckpt, gguf=conv.gguf()), dirs["parity"]).report.passed
    ing = INGEST.fn(IngestInputs(docs=Input.tree(DEMO_DOCS), tokenizer=first.embedder.input_for(
        first.embedder.export.tokenizer_path), chunk_tokens=200, overlap_tokens=40), dirs["ingest"])
    assert ing.chunks == first.ingest.chunks and (dirs["ingest"] / "chunks.jsonl").is_file()
    chunks = Input.file(dirs["ingest"] / "chunks.jsonl")
    assert chunks.sha256 == first.ingest.artefact("chunks.jsonl").sha256
    split = SPLIT.fn(SplitInputs(chunks=chunks, tokenizer=Input.file(tiny_llama_dir / "tokenizer.json"),
                                 fraction=0.1, max_chunks=64, seed=0, n_ctx_train=conv.conversion.n_ctx_train),
                     dirs["split"])
    assert split.held_out_chunks == first.split.held_out_chunks
    split_in = Input.file(dirs["split"] / "split.json")
    quant = QUANTIZE.fn(QuantizeInputs(source=conv.gguf(), qtype="Q8_0"), dirs["quantize"])
    assert quant.quant.path.parent == dirs["quantize"] and quant.quant.qtype == "Q8_0"
    q = QUALITY.fn(QualityInputs(reference=conv.gguf(), model=quant.model(), split=split_in,
                                 n_ctx=split.n_ctx_eval), dirs["quality"])
    assert q.figures.kld_mean >= 0 and q.figures.tokens_scored > 0
    json.loads(q.model_dump_json())


@pytest.mark.slow
def test_first_build_ran_every_stage(build) -> None:
    assert not any(_cached(build.first).values())
    assert all(not t.cached for t in build.first.stages)


@pytest.mark.slow
def test_docs_only_rebuild_reuses_model_stages(build, tmp_path: Path, keys: Path) -> None:
    from fieldpack.shared.bundle import open_bundle
    from fieldpack.shared.signing import load_public_key

    first = build.first.records
    f16 = first.convert.conversion.path
    before = f16.stat()
    docs = tmp_path / "docs"
    shutil.copytree(DEMO_DOCS, docs)
    target = sorted(docs.glob("*.md"))[0]
    target.write_text(target.read_text(encoding="utf-8") + NEW_SECTION, encoding="utf-8")

    second = build(docs, tmp_path / "second.fpk", build.cache)
    cached = _cached(second)
    assert {s: cached[s] for s in MODEL_STAGES} == dict.fromkeys(MODEL_STAGES, True)
    assert {s: cached[s] for s in DOC_STAGES} == dict.fromkeys(DOC_STAGES, False)
    after = f16.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert second.records.convert.conversion.path == f16
    assert second.records.quantize.quant.sha256 == first.quantize.quant.sha256

    with open_bundle(second.bundle) as b:
        b.verify([load_public_key(keys / "builder.pub")])
        members = {m.name: m.sha256 for m in b.manifest.members}
        assert b.manifest.index.chunks == second.records.ingest.chunks > first.ingest.chunks
        dest = tmp_path / "unpacked"
        b.extract_to(dest)
    index_file = next(p for p in dest.rglob("index.sqlite"))
    assert members["index.sqlite"] == second.records.index.stats.sha256 != first.index.stats.sha256
    import apsw

    conn = apsw.Connection(str(index_file), flags=apsw.SQLITE_OPEN_READONLY)
    hits = conn.execute("SELECT count(*) FROM chunks WHERE text LIKE '%standby scraper drive%'").fetchone()[0]
    assert hits >= 1


@pytest.mark.slow
def test_exclude_leaves_files_out_of_the_index_and_into_the_recipe(build, tmp_path: Path) -> None:
    """``exclude`` drops the matching files from ingest (a new ingest key; the model stages are reused) and is
    recorded in the recipe, so a replay leaves them out too."""
    from fieldpack.shared.bundle import open_bundle

    result = build(DEMO_DOCS, tmp_path / "ex.fpk", build.cache, exclude=["*.csv", "procedures"])
    cached = _cached(result)
    assert cached["convert"] and cached["quantize"] and not cached["ingest"]
    sources = {c.source for c in result.records.ingest.load_chunks()}
    first = {c.source for c in build.first.records.ingest.load_chunks()}
    assert "alarms.csv" in first and any(s.startswith("procedures/") for s in first)
    assert sources == {s for s in first if s != "alarms.csv" and not s.startswith("procedures/")}
    skipped = {r.path: r.reason for r in result.records.ingest.report if r.status == "skipped"}
    assert skipped["alarms.csv"] == "excluded by --exclude '*.csv'"
    with open_bundle(result.bundle) as b:
        assert b.manifest.recipe["build"]["exclude"] == ["*.csv", "procedures"]
        assert b.manifest.index.chunks == len(result.records.ingest.load_chunks()) < build.first.records.ingest.chunks
        manifest = b.manifest
    assert f"{manifest.index.skipped_files} files not indexed (skipped, or left out by --exclude '*.csv', " \
           "'procedures')" in _inspect_text(manifest)
    assert f"{build.first.manifest.index.skipped_files} files skipped" in _inspect_text(build.first.manifest)


def _inspect_text(manifest) -> str:
    """What ``fieldpack inspect`` prints for ``manifest`` (wide console, no wrapping)."""
    import io

    from fieldpack.cli.show import print_manifest
    from rich.console import Console

    console = Console(width=400, record=True, file=io.StringIO())
    print_manifest(manifest, bundle_size=1, signature="-", console=console)
    return console.export_text()


@pytest.mark.slow
def test_new_quant_type_reruns_quantize_but_not_convert(build, tmp_path: Path) -> None:
    third = build(DEMO_DOCS, tmp_path / "q8.fpk", build.cache, quant="Q8_0")
    cached = _cached(third)
    assert cached["convert"] and cached["parity"] and cached["embedder"] and cached["index"]
    assert not cached["quantize"] and not cached["quality"]
    assert third.manifest.model.file_type == "Q8_0"
    assert third.records.quantize.quant.sha256 != build.first.records.quantize.quant.sha256


@pytest.mark.slow
def test_tampered_cache_entry_is_detected_and_rebuilt(build, tmp_path: Path) -> None:
    first = build.first.records
    f16 = first.convert.conversion.path
    data = bytearray(f16.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f16.write_bytes(bytes(data))
    again = build(DEMO_DOCS, tmp_path / "again.fpk", build.cache)
    assert not again.records.convert.cached  # the flipped byte was caught by the recorded sha256
    assert again.records.convert.conversion.sha256 == first.convert.conversion.sha256
    from fieldpack.shared.bundle import hash_file

    assert hash_file(again.records.convert.conversion.path)[1] == first.convert.conversion.sha256
    assert again.records.quantize.cached  # its input (the F16 GGUF's digest) is unchanged


@pytest.mark.slow
def test_cli_says_which_stages_were_cached(build, tmp_path: Path, tiny_llama_dir: Path, keys: Path) -> None:
    r = run_cli("build", "--model", str(tiny_llama_dir), "--docs", str(DEMO_DOCS), "--name", "riverside",
                "--sign", str(keys / "builder.key"), "-o", str(tmp_path / "cli.fpk"), "--n-ctx", "1024",
                "--cache-dir", str(build.cache), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("embedder", "ingest", "convert", "parity", "quantize Q4_K_M", "quality"):
        assert f"✓ {stage} (cached)" in r.stderr, r.stderr
    assert re.search(r"✓ bundle( [\d.]+ s)?\n", r.stderr) and "convert 0.0 (cached)" in r.stdout, r.stdout


@pytest.mark.slow
def test_recipe_replay_without_cache_is_byte_identical(build, tmp_path: Path) -> None:
    """``--recipe`` with ``--no-cache`` recomputes every stage and gives the same member bytes."""
    import tomli_w
    from fieldpack.shared.bundle import open_bundle

    with open_bundle(build.first.bundle) as b:
        m1 = b.manifest
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(tomli_w.dumps(m1.recipe).encode())
    out = tmp_path / "replay.fpk"
    r = run_cli("build", "--recipe", str(recipe), "-o", str(out), "--no-cache", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(cached)" not in r.stderr
    with open_bundle(out) as b:
        m2 = b.manifest
    same = {m.name: m.sha256 for m in m1.members if m.name != "recipe.toml"}
    assert same == {m.name: m.sha256 for m in m2.members if m.name != "recipe.toml"}
    assert {**m2.recipe["build"], "output": ""} == {**m1.recipe["build"], "output": ""}


def test_tree_hash_follows_what_ingest_reads(tmp_path: Path) -> None:
    from fieldpack.builder.stages.base import hash_tree

    a = tmp_path / "a"
    (a / "sub").mkdir(parents=True)
    (a / "sub" / "x.md").write_text("# x\n")
    base = hash_tree(a)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert hash_tree(b) == base  # location does not matter
    (a / ".git").mkdir()
    (a / ".git" / "HEAD").write_text("ref")
    assert hash_tree(a) == base  # ingest does not enter hidden folders
    (a / ".notes.md").write_text("n")
    assert hash_tree(a) != base  # a hidden file is reported (skipped) by ingest
    (b / "sub" / "x.md").rename(b / "sub" / "y.md")
    assert hash_tree(b) != base  # a renamed document changes citations


# --- a GGUF input (builder.stages.gguf) ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_build(tiny_llama_dir: Path, keys: Path, tmp_path_factory: pytest.TempPathFactory):
    """``gguf_build(docs, out, **cfg)`` -> BuildResult from an F16 GGUF of the tiny model, one shared cache."""
    from fieldpack.builder.config import BuildConfig
    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.pipeline import build_bundle

    root = tmp_path_factory.mktemp("gguf-stages")
    gguf = convert_hf_to_gguf(tiny_llama_dir, root / "tiny-f16.gguf").path

    def run(docs: Path, out: Path, **over):
        cfg = BuildConfig.validated(dict(model=str(gguf), docs=docs, name="riverside", sign=keys / "builder.key",
                                         output=out, n_ctx=1024, **over))
        return build_bundle(cfg, cache_dir=root / "cache")

    run.gguf = gguf
    return run


@pytest.mark.slow
def test_docs_only_rebuild_from_a_gguf_reuses_the_gguf_input_stage(gguf_build, tmp_path: Path) -> None:
    from fieldpack.builder.stages.gguf import GgufInputRecord

    first = gguf_build(DEMO_DOCS, tmp_path / "first.fpk")
    rec = first.records
    assert isinstance(rec.convert, GgufInputRecord) and rec.parity is None and rec.quantize is None
    assert (rec.convert.file_type, rec.convert.quantized) == ("F16", False)
    assert rec.convert.conversion.sha256 == Input.file(gguf_build.gguf).sha256
    assert rec.quality.figures is None and rec.quality.ppl > 1.0  # kept as is: PPL only
    m = first.manifest
    assert m.quality.parity == {"status": "not applicable, GGUF input"} and m.model.file_type == "F16"
    assert m.quality.quantization["requantized"] is False and m.recipe["build"]["quant"] == "F16"

    docs = tmp_path / "docs"
    shutil.copytree(DEMO_DOCS, docs)
    target = sorted(docs.glob("*.md"))[0]
    target.write_text(target.read_text(encoding="utf-8") + NEW_SECTION, encoding="utf-8")
    second = gguf_build(docs, tmp_path / "second.fpk")
    cached = _cached(second)
    assert cached["convert"] and cached["embedder"]  # the gguf input stage (and the embedder) reused
    assert not any(cached[s] for s in DOC_STAGES)
    assert second.records.convert.conversion.path == rec.convert.conversion.path  # the same cache entry
    assert [t.name for t in second.stages if t.cached] == ["embedder", "read GGUF"]

    third = gguf_build(docs, tmp_path / "q8.fpk", quant="Q8_0")  # re-quantize on request
    cached = _cached(third)
    assert cached["convert"] and not cached["quantize"] and cached["split"] and not cached["quality"]
    q = third.manifest.quality.quantization
    assert (q["requantized"], q["requantized_from"], q["qtype"]) == (True, "F16", "Q8_0")
    assert q["kld_mean"] >= 0 and third.manifest.model.file_type == "Q8_0"
    assert third.records.quality.figures is not None


@pytest.mark.slow
def test_source_date_epoch_makes_the_bundle_file_reproducible(build, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``SOURCE_DATE_EPOCH`` set, the same inputs and output path give the same ``.fpk`` bytes, and the
    manifest records that time; without it the two files differ only by their creation time."""
    import hashlib
    from datetime import datetime, timezone

    from fieldpack.shared.bundle import open_bundle

    out = tmp_path / "riverside.fpk"

    def sha_of_a_build() -> str:
        build(DEMO_DOCS, out, build.cache)
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        out.unlink()
        return digest

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    first = sha_of_a_build()
    assert sha_of_a_build() == first
    build(DEMO_DOCS, out, build.cache)
    with open_bundle(out) as b:
        assert b.manifest.created_at == datetime(2026, 1, 1, tzinfo=timezone.utc)
    out.unlink()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225601")
    assert sha_of_a_build() != first


@pytest.mark.parametrize("value", ["yesterday", "-5", "1.5", " 17", "\u0661\u0662\u0663", "99999999999999999999"])
def test_a_malformed_source_date_epoch_is_refused_before_any_work(value: str, tiny_llama_dir: Path, keys: Path,
                                                                  tmp_path: Path) -> None:
    r = run_cli("build", "--model", str(tiny_llama_dir), "--docs", str(DEMO_DOCS), "--sign", str(keys / "builder.key"),
                "--name", "riverside", "-o", str(tmp_path / "x.fpk"), env={**os.environ, "SOURCE_DATE_EPOCH": value})
    assert r.returncode == 2 and "SOURCE_DATE_EPOCH" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "x.fpk").exists()
