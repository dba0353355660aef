"""The main job, as its users run it: build on the host, verify, install on the device, ask, chat, roll back.
Real llama.cpp, real ONNX Runtime, real sqlite-vec, the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

QUESTION = "The connection pool is exhausted. What should I do?"


def test_inspect_and_verify(bundle_v1: Path, e2e_keys: Path) -> None:
    r = run_cli("inspect", str(bundle_v1), "--trust", str(e2e_keys / "builder.pub"))
    assert r.returncode == 0, r.stderr
    assert "riverside@1.0.0" in r.stdout and "Q4_K_M" in r.stdout and "valid" in r.stdout
    r = run_cli("inspect", str(bundle_v1), "--json")
    m = json.loads(r.stdout)
    assert m["model"]["architecture"] == "llama"
    assert m["quality"]["parity"]["passed"] is True
    assert m["quality"]["quantization"]["kld_mean"] >= 0
    assert any(t.startswith("Q4_K") for t in m["model"]["tensor_types"])
    assert m["runtime"]["memory"]["total_bytes"] > m["runtime"]["memory"]["weights_bytes"] > 0
    r = run_cli("verify", str(bundle_v1), "--trust", str(e2e_keys / "builder.pub"))
    assert r.returncode == 0 and r.stdout.startswith("OK riverside@1.0.0"), r.stderr


def test_ask_cites_the_right_document(device_dir: Path) -> None:
    r = run_cli("ask", QUESTION, "--data-dir", str(device_dir), "--json")
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)
    assert not a["abstained"]
    assert a["sources"][0]["source"] == "database.md"
    assert a["sources"][0]["section"].endswith("Connection pool exhausted")
    assert a["answer"].strip()
    t = a["timings"]
    assert t["retrieval_ms"] > 0 and t["prompt_tokens"] > 0 and t["completion_tokens"] > 0


def test_off_topic_question_abstains(device_dir: Path) -> None:
    r = run_cli("ask", "Who won the football world cup in 1954?", "--data-dir", str(device_dir), "--json")
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)
    assert a["abstained"] is True and a["sources"] == []
    assert "cannot answer" in a["answer"]
    plain = run_cli("ask", "Who won the football world cup in 1954?", "--data-dir", str(device_dir))
    assert plain.returncode == 0 and "cannot answer" in plain.stdout, plain.stderr
    assert "abstained without running the model" in plain.stdout and "tok/s" not in plain.stdout  # no 0.0 tok/s


def test_bad_questions_get_one_line_errors(device_dir: Path, tmp_path: Path) -> None:
    r = run_cli("ask", "   ", "--data-dir", str(device_dir))
    assert r.returncode == 7 and r.stderr.count("\n") == 1 and "empty" in r.stderr
    r = run_cli("ask", "pump " * 3000, "--data-dir", str(device_dir))
    assert r.returncode == 7 and "question" in r.stderr
    r = run_cli("ask", QUESTION, "--data-dir", str(tmp_path / "nowhere"))
    assert r.returncode == 6 and "fieldpack device init" in r.stderr


def test_streamed_equals_non_streamed(device_dir: Path) -> None:
    """Streaming pieces concatenate to exactly the non-streamed completion of the same prompt (llama.cpp,
    greedy), including multi-byte characters and stop strings split across tokens."""
    from fieldpack.device.runtime import Runtime
    from fieldpack.device.slots import open_data_dir

    with Runtime(open_data_dir(device_dir).active_slot_path()) as rt:
        for q in (QUESTION, "Pump 3 pressure alarm: what are the next steps? — ü ß 水"):
            pieces: list[str] = []
            ans = rt.answer(q, on_token=pieces.append)
            assert "".join(pieces) == ans.text
            from fieldpack.device.prompt import fit_prompt

            built = fit_prompt(q, ans.sources, [], render=rt.render_prompt, tokenize=rt.tokenize_prompt,
                               budget_tokens=rt.n_ctx - rt.manifest.runtime.max_tokens)
            plain = rt.llama.create_completion(built.tokens, max_tokens=rt.manifest.runtime.max_tokens,
                                               temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                               stop=list(rt.manifest.runtime.stop))
            assert plain["choices"][0]["text"] == ans.text


def test_stop_string_split_across_tokens(device_dir: Path) -> None:
    """A stop string that spans a token boundary ends the streamed answer exactly where the non-streamed one
    ends, and never leaks a prefix of itself into the stream."""
    from fieldpack.device.runtime import Runtime
    from fieldpack.device.slots import open_data_dir

    with Runtime(open_data_dir(device_dir).active_slot_path()) as rt:
        full = rt.answer(QUESTION)
        toks = rt.llama.tokenize(full.text.encode(), add_bos=False, special=False)
        assert len(toks) >= 6, full.text
        # a stop string made of the tail of token 3 and the head of token 4 (or whole tokens if 1 char long)
        t3 = rt.llama.detokenize([toks[3]]).decode(errors="ignore")
        t4 = rt.llama.detokenize([toks[4]]).decode(errors="ignore")
        stop = (t3[-2:] + t4[:2]).strip() or (t3 + t4)
        assume_at = full.text.find(stop)
        assert assume_at > 0
        pieces: list[str] = []
        ans = rt.answer(QUESTION, on_token=pieces.append, extra_stop=[stop])
        assert "".join(pieces) == ans.text == full.text[:assume_at]
        assert stop not in ans.text


def test_upgrade_status_and_rollback(device_dir: Path, bundle_v2: Path) -> None:
    r = run_cli("install", str(bundle_v2), "--data-dir", str(device_dir))
    assert r.returncode == 0, r.stderr
    st = json.loads(run_cli("status", "--data-dir", str(device_dir), "--json").stdout)
    assert "riverside@1.1.0" in json.dumps(st["active"]) and "riverside@1.0.0" in json.dumps(st["previous"])
    r = run_cli("rollback", "--data-dir", str(device_dir))
    assert r.returncode == 0, r.stderr
    st = json.loads(run_cli("status", "--data-dir", str(device_dir), "--json").stdout)
    assert "riverside@1.0.0" in json.dumps(st["active"])
    r = run_cli("ask", QUESTION, "--data-dir", str(device_dir), "--json")
    assert json.loads(r.stdout)["bundle"] == "riverside@1.0.0"


def test_chat_through_a_pseudo_terminal(device_dir: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "fieldpack", "chat", "--data-dir", str(device_dir)], cwd=str(REPO),
                          env=dict(os.environ, COLUMNS="120", TERM="dumb"), encoding="utf-8", timeout=180)
    try:
        child.expect("fieldpack chat")
        child.expect("you> ")
        child.sendline(QUESTION)
        child.expect("sources: ")
        child.expect(r"database\.md")
        child.expect("you> ")
        child.sendline("/sources")
        child.expect("max_connections")
        child.expect("you> ")
        child.sendline("/clear")
        child.expect("history cleared")
        child.sendline("/quit")
        child.expect("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
