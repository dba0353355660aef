"""``--qa-teacher``: RAFT questions written by a teacher model (builder/adapt/teacher.py).

Fast: the reply parser and the screening on hand-written teacher replies (well-formed, fenced, Q:/A: lines,
truncated, prose, unanswerable, ungrounded, duplicates), the options, and the one-line refusals of a teacher
that is not a file, not a GGUF, or an endpoint nobody listens on. Slow: the real request/response path against
llama-cpp-python's own OpenAI-compatible server serving the tiny GGUF (its replies are garbage text, but the
JSON schema we send becomes a llama.cpp grammar, so they parse), the same tiny GGUF in process, the refusal
when every pair is dropped, and a whole ``fieldpack build --adapt raft --qa-teacher URL``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from fieldpack.builder.adapt.teacher import (check_qa_teacher, generate_qa, parse_reply, reply_schema,
                                             screen_pair, teacher_questions)
from fieldpack.shared.errors import AdaptationError
from fieldpack.shared.llama_backend import llama_server_command
from tests.conftest import DEMO_DOCS, run_cli

CHUNK = ("If pump P-3 cavitates, close the discharge valve halfway and check the suction strainer for debris. "
         "The strainer is cleaned every 200 running hours.")


def _chunk(text: str = CHUNK, source: str = "procedures/pumps.md") -> SimpleNamespace:
    return SimpleNamespace(source=source, section="Pumps > Cavitation", text=text)


# --- parser ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply,expected", [
    ('{"pairs": [{"question": "What do I check when P-3 cavitates?", "answer": "The suction strainer."}]}',
     [("What do I check when P-3 cavitates?", "The suction strainer.")]),
    ('Sure! Here you go:\n```json\n[{"question": "How often is the strainer cleaned?", "answer": "200 h"}]\n```',
     [("How often is the strainer cleaned?", "200 h")]),
    ('{"question": "How far is the discharge valve closed?", "answer": "halfway"} trailing words',
     [("How far is the discharge valve closed?", "halfway")]),
    ('{"pairs": [{"question": "What is\ncleaned?", "answer": "the strainer"}]}',  # raw newline in a string
     [("What is\ncleaned?", "the strainer")]),
    (("Q1: What should I check when P-3 cavitates?\nA1: The suction strainer,\nfor debris.\n\n"
      "2. Question: How often is the strainer cleaned?\nAnswer: Every 200 running hours."),
     [("What should I check when P-3 cavitates?", "The suction strainer, for debris."),
      ("How often is the strainer cleaned?", "Every 200 running hours.")]),
    ('{"pairs": []}', []),
    ('{"pairs": [{"question": "Is it ok?"}, "text", {"question": "What is cleaned?", "answer": "the strainer"}]}',
     [("", ""), ("", ""), ("What is cleaned?", "the strainer")]),  # broken items are kept for screening to count
])
def test_parser_reads_json_fences_and_qa_lines(reply: str, expected: list[tuple[str, str]]) -> None:
    assert parse_reply(reply) == expected


@pytest.mark.parametrize("reply", [
    '{"pairs": [{"question": "What do I check when P-3 cav',  # cut at max_tokens
    "The excerpt explains what to do when a pump cavitates.",  # prose
    '{"summary": "pumps"}',  # JSON of another shape
    "Q: What is checked? (no answer line)",
    "",
])
def test_parser_returns_none_for_malformed_replies(reply: str) -> None:
    assert parse_reply(reply) is None


@pytest.mark.parametrize("question,answer,why", [
    ("What do I check when P-3 cavitates?", "The suction strainer.", None),
    ("Strainer?", "The suction strainer.", "malformed"),
    ("What do I check when P-3 cavitates?", "", "malformed"),
    ("What do I check when P-3 cavitates?", "x" * 400, "malformed"),
    ("What is the flow rate of P-3?", "The documents do not answer this question.", "unanswerable"),
    ("What is the flow rate of P-3?", "Not stated in the excerpt.", "unanswerable"),
    ("What is the flow rate of P-3?", "Unknown", "unanswerable"),
    ("What is the flow rate of P-3?", "42 m3/h at 6 bar", "not grounded"),
])
def test_screening_drops_malformed_unanswerable_and_ungrounded(question: str, answer: str, why: str | None) -> None:
    assert screen_pair(question, answer, CHUNK) == why


def test_generation_keeps_counts_dedupes_and_caps() -> None:
    """A scripted teacher (hand-written replies, one per chunk in the order asked): what is kept and why the rest
    is dropped; questions of --qa-train are not repeated; the cap stops the asking."""
    replies = iter([
        ('{"pairs": [{"question": "What do I check when P-3 cavitates?", "answer": "The suction strainer."},'
         ' {"question": "How often is the strainer cleaned?", "answer": "every 200 running hours"}]}'),
        "garbage without structure",
        'Q: What do I check when P-3 cavitates?\nA: the suction strainer',  # duplicate of the first
        '{"pairs": [{"question": "How far do I close the discharge valve?", "answer": "halfway"}]}',
        '{"pairs": [{"question": "What is the motor power of P-3?", "answer": "not stated"}]}',
        '{"pairs": []}',
    ])
    asked: list[tuple[int, int]] = []

    def complete(messages: list[dict[str, str]], schema: dict, max_tokens: int) -> str:
        assert messages[0]["role"] == "system" and CHUNK in messages[1]["content"]
        asked.append((schema["properties"]["pairs"]["maxItems"], max_tokens))
        return next(replies)

    chunks = [_chunk() for _ in range(6)]
    got = generate_qa(complete, chunks, per_chunk=2, max_pairs=50, seed=0, teacher="t.gguf",
                      known_questions=["How far do I close the discharge valve?"])
    assert [p.question for p in got.pairs] == ["What do I check when P-3 cavitates?",
                                               "How often is the strainer cleaned?"]
    assert all(p.source == "procedures/pumps.md" for p in got.pairs)
    assert got.dropped == {"duplicate": 2, "malformed reply": 1, "no question": 1, "unanswerable": 1}
    assert got.chunks_asked == 6 and got.kept == 2 and asked[0][0] == 2 and asked[0][1] > 200
    lines = [json.loads(x) for x in got.to_jsonl().splitlines()]
    assert lines[0] == {"question": "What do I check when P-3 cavitates?", "answer": "The suction strainer.",
                        "source": "procedures/pumps.md"}

    one = '{"pairs": [{"question": "Q%d: what do I check on P-3?", "answer": "the strainer"}]}'
    n = iter(range(100))
    capped = generate_qa(lambda m, s, t: one % next(n), chunks, per_chunk=1, max_pairs=3, seed=0, teacher="t")
    assert capped.kept == 3 and capped.chunks_asked == 3


def test_schema_bounds_the_pairs() -> None:
    s = reply_schema(3)
    assert s["properties"]["pairs"]["maxItems"] == 3 and s["required"] == ["pairs"]


# --- refusals before any work --------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_teachers_are_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(AdaptationError, match="is not a file") as e:
        check_qa_teacher(tmp_path / "missing.gguf")
    assert e.value.hint
    notgguf = tmp_path / "model.gguf"
    notgguf.write_text("not a model")
    with pytest.raises(AdaptationError, match="is not a GGUF"):
        check_qa_teacher(notgguf)
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there: connection refused
    with pytest.raises(AdaptationError, match="is unreachable") as e:
        check_qa_teacher(url)
    assert "start the OpenAI-compatible server" in str(e.value.hint)


def test_silent_endpoint_times_out_in_one_line() -> None:
    """A port that accepts the connection and never answers: the check gives up after its timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        with pytest.raises(AdaptationError, match="did not answer in time"):
            check_qa_teacher(url, timeout=1.0)


def test_the_teacher_reads_calibration_chunks_only() -> None:
    from fieldpack.builder.stages.adapt import calibration_chunks

    chunks = [_chunk(t) for t in ("held out", "calib a", "calib b", "both")]
    got = calibration_chunks(chunks, calib=["calib a", "calib b", "both"], held_out=["held out", "both"])
    assert [c.text for c in got] == ["calib a", "calib b"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fieldpack.shared.signing import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d)
    return d


def _build(model: Path, keys: Path, out: Path, *extra: str, docs: Path = DEMO_DOCS, timeout: int = 900):
    return run_cli("build", "--model", str(model), "--docs", str(docs), "--name", "riverside",
                   "--sign", str(keys / "builder.key"), "-o", str(out), "--n-ctx", "1024", *extra, timeout=timeout)


@pytest.mark.parametrize("teacher,needle", [
    ("UNREACHABLE", "is unreachable"),
    ("NOTGGUF", "is not a GGUF"),
])
def test_cli_refuses_a_bad_teacher_in_one_line(tiny_llama_dir: Path, keys: Path, tmp_path: Path, teacher: str,
                                               needle: str) -> None:
    notgguf = tmp_path / "t.gguf"
    notgguf.write_bytes(b"PK\x03\x04zip")
    spec = f"http://127.0.0.1:{_free_port()}/v1" if teacher == "UNREACHABLE" else str(notgguf)
    out = tmp_path / "b.fpk"
    r = _build(tiny_llama_dir, keys, out, "--adapt", "raft", "--qa-teacher", spec, timeout=300)
    assert r.returncode == 5, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert needle in last and "Fix:" in last and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not out.exists() and "eval split" not in r.stderr  # refused before any stage ran


# --- the real teacher: llama-cpp-python's server, and the GGUF in process --------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(converted) -> Path:
    return converted("llama", "f16").path


@pytest.fixture(scope="module")
def server(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m llama_cpp.server`` serving the tiny GGUF on a free loopback port; yields its ``/v1`` URL."""
    pytest.importorskip("sse_starlette")
    pytest.importorskip("starlette_context")
    pytest.importorskip("pydantic_settings")
    import httpx

    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(llama_server_command(
            sys.executable, "--model", str(tiny_gguf), "--model_alias", "tiny", "--host", "127.0.0.1", "--port",
            str(port), "--n_ctx", "2048", "--n_threads", "1", "--seed", "0"),
            stdout=fh, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "llama_cpp.server did not start: " + log.read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _demo_chunks(n: int = 3) -> list[SimpleNamespace]:
    out = []
    for p in sorted(DEMO_DOCS.rglob("*.md"))[:n]:
        text = p.read_text(encoding="utf-8")
        out.append(SimpleNamespace(source=p.relative_to(DEMO_DOCS).as_posix(), section="", text=text[:600]))
    return out


@pytest.mark.slow
def test_endpoint_teacher_round_trip(server: str) -> None:
    """Requests go through the openai client to the real server; its schema-constrained replies parse; every kept
    pair is screened, has its chunk's document as source, and the model name was resolved from /v1/models."""
    assert check_qa_teacher(server) == "tiny"
    chunks = _demo_chunks()
    got = teacher_questions(server, chunks, per_chunk=1, max_pairs=3, seed=0)
    assert got.teacher == f"{server}#tiny" and got.chunks_asked >= got.kept >= 1
    assert got.dropped.get("malformed reply", 0) < got.chunks_asked  # the JSON path was really exercised
    texts = {c.source: c.text for c in chunks}
    for p in got.pairs:
        assert p.source in texts and screen_pair(p.question, p.answer, texts[p.source]) is None
    with pytest.raises(AdaptationError, match="is not served by"):
        check_qa_teacher(server, "no-such-model")


@pytest.mark.slow
def test_a_refused_request_drops_that_chunk_only(server: str) -> None:
    """A chunk longer than the server's n_ctx (2048) is refused with HTTP 400 in every response format: that
    chunk is counted as refused and the next one is still asked with the JSON schema."""
    from fieldpack.builder.adapt.teacher import EndpointTeacher

    long = _chunk(" ".join(["The strainer of pump P-3 is cleaned every 200 running hours."] * 400))
    teacher = EndpointTeacher(server, "tiny")
    got = generate_qa(teacher, [long, *_demo_chunks(1)], per_chunk=1, max_pairs=2, seed=1, teacher="t")
    assert got.dropped.get("refused (HTTP 400, over its context)") == 1, got.dropped
    assert got.replies == 1 and got.kept == 1 and teacher._format == 0


@pytest.mark.slow
def test_endpoint_with_no_usable_pair_is_refused(server: str) -> None:
    """Chunks in a script the tiny model never writes: every answer is ungrounded, so the build is refused in one
    line naming the teacher, the counts and the fix."""
    chunks = [SimpleNamespace(source="ru.md", section="", text="Насос кавитирует: прикройте напорную задвижку.")] * 2
    with pytest.raises(AdaptationError) as e:
        teacher_questions(server, chunks, per_chunk=1, max_pairs=2, seed=0)
    msg = str(e.value)
    assert "gave no usable question from" in msg and server in msg and "\n" not in msg
    assert "--qa-train" in str(e.value.hint)


@pytest.mark.slow
def test_local_gguf_teacher_is_deterministic(tiny_gguf: Path) -> None:
    chunks = _demo_chunks(2)
    a = teacher_questions(tiny_gguf, chunks, per_chunk=1, max_pairs=2, seed=0, threads=1)
    b = teacher_questions(tiny_gguf, chunks, per_chunk=1, max_pairs=2, seed=0, threads=1)
    assert a.teacher == tiny_gguf.name and a.kept >= 1
    assert a.to_jsonl() == b.to_jsonl()

    from fieldpack.builder.adapt.teacher import GGUFTeacher

    small = GGUFTeacher(tiny_gguf, n_ctx=128, threads=1)  # the prompt does not fit: that chunk is refused
    try:
        got = generate_qa(small, chunks[:1], per_chunk=1, max_pairs=1, seed=0, teacher="t")
    finally:
        small.close()
    assert got.dropped == {"refused (over n_ctx)": 1} and got.kept == 0


@pytest.mark.slow
def test_build_with_an_endpoint_teacher_records_the_pairs(server: str, tiny_llama_dir: Path, keys: Path,
                                                          tmp_path: Path, build_cache: Path) -> None:
    """``fieldpack build --adapt raft --qa-train F --qa-teacher URL`` (through a recipe, since one source per RAFT
    prompt, ``top_k_chunks = 1``, is what keeps the tiny model's long garbage answers within its 512 positions):
    both question sets are used, the teacher's pairs sit in the adapt stage's cache, their sha256 and counts in
    the adaptation row, the recipe keeps the URL (not turned into a path) and replays from the cache."""
    import tomli_w

    from fieldpack.shared.bundle import hash_file, open_bundle

    out = tmp_path / "raft.fpk"
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "When is the shift handover written?", "answer": "at the end of the shift",
                              "source": "shift-handover.txt"}) + "\n")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tomli_w.dumps({"build": {
        "model": str(tiny_llama_dir), "docs": str(DEMO_DOCS), "name": "riverside", "sign": str(keys / "builder.key"),
        "output": str(out), "n_ctx": 1024, "top_k_chunks": 1,
        "adapt": {"method": "raft", "qa_train": str(qa), "qa_teacher": server, "qa_max": 4, "steps": 2, "seq_len": 256, "lora_r": 4,
                  "batch_size": 2}}}))
    r = run_cli("build", "--recipe", str(recipe), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "adapt raft (questions: --qa-train + --qa-teacher)" in r.stderr
    with open_bundle(out) as b:
        m = b.manifest
    (row,) = m.quality.adaptation
    assert row["method"] == "raft" and row["qa_teacher"] == f"{server}#tiny"
    assert 1 <= row["qa_teacher_kept"] <= 4 and row["qa_teacher_chunks"] >= row["qa_teacher_kept"]
    assert row["qa_train_pairs"] == 1 and row["train_sequences"] == 1 + row["qa_teacher_kept"]
    cached = [p for p in build_cache.rglob("teacher_qa.jsonl") if hash_file(p)[1] == row["qa_teacher_sha256"]]
    assert cached, "the teacher's pairs are not in the adapt stage's cache"
    pairs = [json.loads(x) for x in cached[0].read_text().splitlines()]
    assert len(pairs) == row["qa_teacher_kept"] and all((DEMO_DOCS / p["source"]).is_file() for p in pairs)
    assert m.recipe["build"]["adapt"]["qa_teacher"] == server and m.recipe["build"]["adapt"]["qa_max"] == 4

    # the bundle's own recipe replays: the stage key (URL + served model) finds the cached pairs, same model bytes
    replay, again = tmp_path / "replay.toml", tmp_path / "replay.fpk"
    replay.write_text(tomli_w.dumps(m.recipe))
    r = run_cli("build", "--recipe", str(replay), "-o", str(again), timeout=900)
    assert r.returncode == 0 and "--qa-teacher) (cached)" in r.stderr, r.stderr[-3000:]
    with open_bundle(again) as b:
        m2 = b.manifest
    assert m2.quality.adaptation[0]["qa_teacher_sha256"] == row["qa_teacher_sha256"]
    assert {x.name: x.sha256 for x in m2.members}["model.gguf"] == {x.name: x.sha256 for x in m.members}["model.gguf"]


@pytest.mark.slow
def test_build_refuses_a_teacher_with_no_usable_pair(server: str, tiny_llama_dir: Path, keys: Path,
                                                     tmp_path: Path) -> None:
    """Documents in a script the tiny teacher never writes: every pair is ungrounded, so the build stops in the adapt
    stage before any training, with one line and no bundle."""
    docs = tmp_path / "docs"
    docs.mkdir()
    para = ("Насос номер {n} кавитирует при низком уровне в резервуаре. Прикройте напорную задвижку наполовину, "
            "проверьте сетчатый фильтр на всасывании и запишите давление в журнал смены. ")
    for d in range(3):
        (docs / f"nasos-{d}.md").write_text(f"# Насос {d}\n\n" + "\n\n".join(para.format(n=10 * d + i)
                                                                             for i in range(12)), encoding="utf-8")
    out = tmp_path / "b.fpk"
    r = _build(tiny_llama_dir, keys, out, "--adapt", "raft", "--qa-teacher", server, "--qa-max", "2",
               "--adapt-steps", "2", docs=docs)
    assert r.returncode == 5, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "gave no usable question from" in last and "not grounded" in last and "Fix:" in last, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not out.exists()
