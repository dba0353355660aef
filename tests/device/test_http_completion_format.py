"""The HTTP API on a bundle of a base model (no chat template: prompt format ``completion``, like the demo's
Gemma 3 270M): ``/v1/completions`` is the raw continuation (its leading space kept), the grounded answer after
"Answer:" is not, and ``"grounding": false`` is refused with a 400 that names the fix. Real tiny model, llama.cpp,
ONNX Runtime and sqlite-vec behind uvicorn on loopback; the bundle is built once and cached."""

from __future__ import annotations

import fcntl
import shutil
import json
from pathlib import Path
import threading
from typing import Any, Iterator

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
pytest.importorskip("fastapi", reason="needs the device extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx")

from tests.builder.test_build_cli import _with_template  # noqa: E402
from tests.conftest import DEMO_DOCS, run_cli  # noqa: E402
from tests.device.http_fixtures import install_device, running_server  # noqa: E402

PROMPT = "The chlorine dosing pump"
QUESTION = "The connection pool is exhausted. What should I do?"


@pytest.fixture(scope="module")
def completion_bundle(e2e_dir: Path, e2e_keys: Path, tiny_llama_dir: Path) -> Path:
    """The tiny Llama without its chat template, built as the signed bundle ``base@1.0.0`` (cached)."""
    out = e2e_dir / "base-1.0.0-completion.fpk"
    with open(e2e_dir / f".{out.name}.lock", "w") as lock:  # parallel sessions wait for one build
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.exists():
            model = _with_template(tiny_llama_dir, e2e_dir / "base-model.tmp", None)
            try:
                r = run_cli("build", "--model", str(model), "--docs", str(DEMO_DOCS), "--name", "base", "--version",
                            "1.0.0", "--sign", str(e2e_keys / "builder.key"), "-o", str(out), "--n-ctx", "1024",
                            "--max-tokens", "32")
                assert r.returncode == 0, r.stderr[-3000:]
            finally:
                shutil.rmtree(model, ignore_errors=True)
    assert json.loads(run_cli("inspect", str(out), "--json").stdout)["runtime"]["prompt_format"] == "completion"
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, e2e_keys: Path,
           completion_bundle: Path) -> Iterator[tuple[Any, Any]]:
    data_dir = install_device(tmp_path_factory.mktemp("base-device"), e2e_keys, completion_bundle)
    with running_server(data_dir, queue_size=4) as pair:
        yield pair


def _raw_llama_continuation(host: Any, prompt: str, max_tokens: int) -> str:
    """What llama.cpp itself continues ``prompt`` with (greedy, same engine and tokens), run on the worker."""
    from fieldpack.device.http.engine import submit

    done, out = threading.Event(), {}

    def task(engine: Any, err: Any) -> None:
        try:
            tokens = engine.tokenize_prompt(prompt)
            out["text"] = engine.llama.create_completion(tokens, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                                         top_p=1.0, min_p=0.0, repeat_penalty=1.0)["choices"][0]["text"]
        finally:
            done.set()

    assert submit(host, task) is not None
    assert done.wait(300), "the worker never ran the reference task"
    return out["text"]


def test_completions_keep_the_leading_space_json_and_stream(served: tuple[Any, Any]) -> None:
    server, host = served
    expected = _raw_llama_continuation(host, PROMPT, 6)
    assert expected[:1].isspace(), f"pick a prompt the tiny model continues with a space, got {expected!r}"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6}, timeout=300)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    pieces = []
    with httpx.stream("POST", server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "stream": True},
                      timeout=300) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                pieces += [c["text"] for c in json.loads(line[6:])["choices"]]
    assert pieces[0][:1].isspace() and "".join(pieces) == expected  # the first SSE chunk keeps its space too


def test_grounded_answer_after_answer_colon_has_no_leading_space(served: tuple[Any, Any]) -> None:
    server, _ = served
    r = httpx.post(server.url + "/v1/ask", json={"question": QUESTION}, timeout=300).json()
    assert not r["abstained"] and r["answer"] and not r["answer"][:1].isspace()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_grounding_off_is_a_400_naming_completions(served: tuple[Any, Any], stream: bool) -> None:
    server, _ = served
    body = {"messages": [{"role": "user", "content": "Say hi"}], "grounding": False, "stream": stream}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["code"], err["param"]) == ("invalid_request_error", "no_chat_template", "grounding")
    assert err["message"] == ('bundle base@1.0.0 has no chat template (prompt format completion), so "grounding": '
                              "false is unavailable. Fix: send the text to /v1/completions for a raw continuation, "
                              "or build the bundle from a checkpoint with a chat template")


def test_a_completion_bundle_stops_at_its_instruction_line(tmp_path: Path, e2e_keys: Path, completion_bundle: Path) -> None:
    """A new bundle records the template's instruction line among its stop strings; the runtime adds it where an
    older manifest lacks it."""
    from fieldpack.device.runtime import Runtime, stop_strings
    from fieldpack.device.slots import open_data_dir
    from fieldpack.shared.prompt_format import template_echo_stops

    device_dir = install_device(tmp_path / "dev", e2e_keys, completion_bundle)
    with Runtime(open_data_dir(device_dir).active_slot_path()) as rt:
        spec = rt.manifest.runtime
        echo = template_echo_stops(spec.completion_template or "")
        assert spec.prompt_format == "completion" and echo and all(s in spec.stop for s in echo)
        assert rt._stop == list(spec.stop)  # nothing doubled
    older = spec.model_copy(update={"stop": [s for s in spec.stop if s not in echo]})
    assert stop_strings(older) == [*older.stop, *echo]
    assert stop_strings(spec.model_copy(update={"prompt_format": "chat"})) == list(spec.stop)
