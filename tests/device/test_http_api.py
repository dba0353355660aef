"""The HTTP API against a running server (uvicorn on loopback) with the real engine: the tiny model's bundle
built from demo/docs (tests/conftest.py fixtures), real llama.cpp, ONNX Runtime and sqlite-vec, and the official
``openai`` client. Slow on the first run (the bundle is built once and cached)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import time
from typing import Iterator

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
pytest.importorskip("fastapi", reason="needs the device extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")
httpx = pytest.importorskip("httpx")

from tests.conftest import DEMO_DOCS  # noqa: E402
from tests.device.http_fixtures import engine_held, install_device, running_server  # noqa: E402

QUESTION = "The connection pool is exhausted. What should I do?"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, e2e_keys: Path, bundle_v1: Path) -> Path:
    return install_device(tmp_path_factory.mktemp("http-device"), e2e_keys, bundle_v1)


@pytest.fixture(scope="module")
def served(data_dir: Path) -> Iterator[tuple[object, object]]:
    with running_server(data_dir, queue_size=8) as pair:
        yield pair


@pytest.fixture(scope="module")
def client(served: tuple[object, object]) -> "openai.OpenAI":
    server, _ = served
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=300)


def _wait_idle(host: object) -> None:
    deadline = time.monotonic() + 120
    while host.board.running is not None or host.board.depth:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the engine never became idle"
        time.sleep(0.05)


def test_models_and_health(client: "openai.OpenAI", served: tuple[object, object]) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["riverside"]
    server, _ = served
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["bundle"] == "riverside@1.0.0"


def test_chat_grounded_json_and_stream_agree(client: "openai.OpenAI") -> None:
    messages = [{"role": "user", "content": QUESTION}]
    full = client.chat.completions.create(model="riverside", messages=messages, max_tokens=24)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    extra = full.model_extra or {}
    sources = extra["sources"]
    assert sources and sources[0]["n"] == 1 and sources[0]["document"].endswith(".md")
    assert "database.md" in {s["document"] for s in sources}  # the pool-exhausted section is retrieved
    assert extra["fieldpack"]["grounded"] is True
    assert full.usage.prompt_tokens > 0 and full.usage.completion_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    stream = client.chat.completions.create(model="riverside", messages=messages, max_tokens=24, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finish, usage, streamed_sources = [], None, None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
                streamed_sources = (chunk.model_extra or {}).get("sources")
    assert len(pieces) > 1  # really streamed, token by token
    assert "".join(pieces) == choice.message.content  # greedy: same answer both ways
    assert finish == choice.finish_reason and usage is not None
    assert usage.completion_tokens == full.usage.completion_tokens
    assert [s["id"] for s in streamed_sources] == [s["id"] for s in sources]


def test_chat_grounding_off_and_length_finish(client: "openai.OpenAI") -> None:
    r = client.chat.completions.create(model="riverside", messages=[{"role": "user", "content": "Tell me about pumps"}],
                                       max_tokens=3, extra_body={"grounding": False})
    extra = r.model_extra or {}
    assert "sources" not in extra and extra["fieldpack"]["grounded"] is False
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens <= 3


def test_completions_json_and_stream(client: "openai.OpenAI") -> None:
    r = client.completions.create(model="riverside", prompt="The chlorine dosing pump", max_tokens=6)
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.prompt_tokens > 0
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="riverside", prompt="The chlorine dosing pump", max_tokens=6, stream=True) if c.choices)
    assert text == r.choices[0].text


def test_embeddings_are_the_bundle_embedder(client: "openai.OpenAI") -> None:
    import base64

    import numpy as np

    r = client.embeddings.create(model="riverside", input=["raw water pump", "raw water pump", "historian database"])
    vecs = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-3)
    assert np.allclose(vecs[0], vecs[1]) and not np.allclose(vecs[0], vecs[2])
    assert r.usage.prompt_tokens > 0
    b64 = client.embeddings.create(model="riverside", input="raw water pump", encoding_format="base64")
    raw = b64.data[0].embedding  # asked for explicitly, the client hands the base64 text through
    single = np.frombuffer(base64.b64decode(raw), dtype="<f4")
    as_float = client.embeddings.create(model="riverside", input="raw water pump").data[0].embedding
    assert np.array_equal(single, np.array(as_float, dtype=np.float32))  # same vector in both encodings
    assert float(single @ vecs[0]) > 0.95  # alone vs in a padded int8 batch: near, not bit-equal


def test_ask_and_source(served: tuple[object, object]) -> None:
    server, _ = served
    r = httpx.post(server.url + "/v1/ask", json={"question": QUESTION}, timeout=300)
    assert r.status_code == 200
    body = r.json()
    assert body["sources"] and set(body["timings"]) >= {"retrieval_ms", "time_to_first_token_ms", "tokens_per_s"}
    first = body["sources"][0]
    assert {"document", "section", "line_start", "line_end", "score", "citation"} <= set(first)
    passage = httpx.get(f"{server.url}/v1/sources/{first['id']}", timeout=300).json()
    assert passage["document"] == first["document"] and passage["text"].startswith(first["text"].rstrip(" …")[:40])
    missing = httpx.get(f"{server.url}/v1/sources/999999", timeout=300)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"

    off = httpx.post(server.url + "/v1/ask", json={"question": "zzzz qqqq xylophone"}, timeout=300).json()
    assert off["abstained"] is True and off["sources"] == []  # the documents do not answer this
    gate = off["gate"]  # what was closest, and how far from answering: other words or another question
    assert 0 < gate["closest_cosine"] < gate["threshold_cosine"], gate
    assert gate["closest"].split(" ")[0] in {f.relative_to(DEMO_DOCS).as_posix() for f in DEMO_DOCS.rglob("*.*")}, gate


def test_metrics_parse_and_count(served: tuple[object, object]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    server, host = served
    _wait_idle(host)
    before = host.metrics.value("requests")  # type: ignore[attr-defined]
    assert httpx.post(server.url + "/v1/ask", json={"question": QUESTION}, timeout=300).status_code == 200
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {s.name: s.value for f in families.values() for s in f.samples if not s.labels}
    assert value["fieldpack_requests_total"] == before + 1
    assert value["fieldpack_queue_capacity"] == 8 and value["fieldpack_queue_depth"] == 0
    assert families["fieldpack_time_to_first_token_seconds"].type == "histogram"
    counts = [s.value for s in families["fieldpack_time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert counts and counts[0] >= 1
    info = [s for s in families["fieldpack_bundle_info"].samples if s.name == "fieldpack_bundle_info"]
    assert info[0].labels["bundle"] == "riverside@1.0.0"


def test_full_queue_is_503_with_retry_after(served: tuple[object, object]) -> None:
    server, host = served
    _wait_idle(host)
    with engine_held(host, fill_queue=True):
        r = httpx.post(server.url + "/v1/ask", json={"question": QUESTION}, timeout=60)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "busy"
    _wait_idle(host)
    assert httpx.post(server.url + "/v1/ask", json={"question": QUESTION}, timeout=300).status_code == 200


def test_fifty_clients_queue_of_eight(served: tuple[object, object]) -> None:
    server, host = served
    _wait_idle(host)
    answered0, busy0 = host.metrics.value("answered"), host.metrics.value("busy")  # type: ignore[attr-defined]

    def one(i: int) -> tuple[int, dict]:
        r = httpx.post(server.url + "/v1/chat/completions", timeout=600, json={
            "model": "riverside", "max_tokens": 48, "messages": [{"role": "user", "content": f"{QUESTION} ({i})"}]})
        return r.status_code, r.json()

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    codes = [c for c, _ in results]
    assert set(codes) <= {200, 503}, codes
    for code, body in results:
        if code == 200:
            assert body["choices"][0]["message"]["content"] is not None
        else:
            assert body["error"]["code"] == "busy"
    ok, refused = codes.count(200), codes.count(503)
    assert ok + refused == 50 and ok >= 9  # the running one and the 8 queued are always answered
    assert host.metrics.value("answered") - answered0 == ok  # type: ignore[attr-defined]
    assert host.metrics.value("busy") - busy0 == refused  # type: ignore[attr-defined]
    print(f"50 clients, queue 8: {ok} answered, {refused} refused with 503")
    assert httpx.get(server.url + "/health").status_code == 200


def test_disconnect_mid_stream_frees_the_engine(served: tuple[object, object]) -> None:
    server, host = served
    _wait_idle(host)
    cancelled0 = host.metrics.value("cancelled")  # type: ignore[attr-defined]
    # queued: the client leaves while its request waits -> dequeued, never generated
    with engine_held(host):
        with httpx.Client(timeout=60) as c, c.stream("POST", server.url + "/v1/ask",
                                                     json={"question": QUESTION, "stream": True}) as r:
            assert r.status_code == 200
            while host.board.depth == 0:  # type: ignore[attr-defined]
                time.sleep(0.02)
        while host.board.depth:  # withdrawn from the queue once the server notices the disconnect
            time.sleep(0.02)
    deadline = time.monotonic() + 30  # counted just after the withdrawal
    while host.metrics.value("cancelled") - cancelled0 < 1:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the withdrawn request was not counted as cancelled"
        time.sleep(0.02)
    assert host.metrics.value("cancelled") - cancelled0 == 1  # type: ignore[attr-defined]
    # (the tiny model's whole answer streams in milliseconds, so whether the running one below is cut or ends
    # first is a race; tests/device/test_http_serve.py stops a real model's long answer)
    # running: leave after the first token of a long generation
    with httpx.Client(timeout=300) as c, c.stream("POST", server.url + "/v1/completions", json={
            "model": "riverside", "prompt": "The", "max_tokens": 400, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    _wait_idle(host)  # either way the engine is free for the next request
    r = httpx.post(server.url + "/v1/ask", json={"question": QUESTION}, timeout=300)
    assert r.status_code == 200 and r.json()["answer"]


@pytest.mark.parametrize("body,status,code", [
    (b"{not json", 400, "invalid_json"),
    (b'{"messages": "hello"}', 400, "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}', 400, "invalid_value"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', 400, "invalid_value"),
    (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}', 404, "model_not_found"),
    (b'{"messages": [{"role": "user", "content": "' + b"a" * 400_000 + b'"}]}', 413, "payload_too_large"),
    (b'{"messages": [{"role": "user", "content": "' + b"why " * 1500 + b'"}], "stream": true}', 400,
     "question_too_long"),
    (b'{"messages": [{"role": "user", "content": "   "}]}', 400, "empty_question"),
])
def test_bad_requests_get_openai_error_bodies(served: tuple[object, object], body: bytes, status: int,
                                              code: str) -> None:
    server, _ = served
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error"
    if code == "empty_question":  # the list is not empty, its last message's content is
        assert err["message"].startswith("the last message's content is empty") and err["param"] == "messages"
    assert ".str" not in err["message"] and "list[" not in err["message"], err["message"]


def test_a_refused_request_is_counted_once(served: tuple[object, object]) -> None:
    """413 from the guard is one `refused` response, not also an `unmatched` one (a trial saw both)."""
    from prometheus_client.parser import text_string_to_metric_families

    server, _ = served

    def counts() -> dict[tuple[str, str], float]:
        text = httpx.get(server.url + "/metrics").text
        return {(s.labels["route"], s.labels["status"]): s.value for f in text_string_to_metric_families(text)
                for s in f.samples if s.name == "fieldpack_http_responses_total"}

    before = counts()
    r = httpx.post(server.url + "/v1/ask", content=b"x" * 400_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    after = counts()
    changed = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    assert changed.pop(("/metrics", "200"), None) is not None  # the first scrape
    assert changed == {("refused", "413"): 1.0}, changed


def test_huge_chunked_body_is_413(served: tuple[object, object]) -> None:
    server, _ = served

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"a" * 10_000
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_openai_client_sees_unknown_model_as_not_found(client: "openai.OpenAI") -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_api_key_is_required_when_set(data_dir: Path) -> None:
    key = "k" * 32
    with running_server(data_dir, queue_size=2, api_key=key) as (server, _):
        assert httpx.get(server.url + "/health").status_code == 200  # open: the page polls it
        assert httpx.get(server.url + "/").status_code == 200
        r = httpx.get(server.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        good = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        assert [m.id for m in good.models.list().data] == ["riverside"]


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 999_999}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 999_999,
                              "grounding": False}),
    ("/v1/ask", {"question": QUESTION, "max_tokens": 999_999}),
    ("/v1/completions", {"prompt": "The chlorine dosing pump", "max_tokens": 999_999}),
])
def test_max_tokens_beyond_the_context_names_the_field(served: tuple[object, object], path: str,
                                                       body: dict[str, object]) -> None:
    """A cap the context cannot hold is refused in the API's own words (it had the CLI's "--max-tokens" and no
    param; /v1/completions cut it to the context without a word), with the largest value that fits."""
    server, _ = served
    r = httpx.post(server.url + path, json=body, timeout=300)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "max_tokens_too_large" and err["param"] == "max_tokens", err
    assert err["message"].startswith("max_tokens 999999 ") and "--max-tokens" not in err["message"], err
    allowed = int(err["message"].split("Fix: send max_tokens ")[1].split()[0])
    ok = httpx.post(server.url + path, json=dict(body, max_tokens=allowed), timeout=300)
    if ok.status_code == 400:  # the first bound is the context's alone; the second counts the prompt (and the
        second = ok.json()["error"]  # grounded answer's best source, whole)
        assert second["code"] == "max_tokens_too_large" and second["param"] == "max_tokens", second
        allowed = int(second["message"].split("Fix: send max_tokens ")[1].split()[0])
        ok = httpx.post(server.url + path, json=dict(body, max_tokens=allowed), timeout=300)
    assert ok.status_code == 200, ok.text  # the value the fix names is accepted ...
    over = httpx.post(server.url + path, json=dict(body, max_tokens=allowed + 1), timeout=300)
    assert over.json()["error"]["code"] == "max_tokens_too_large", over.text  # ... and is the largest


def test_ask_reports_a_followup_search_and_takes_it_back_in_history(served: tuple[object, object]) -> None:
    """/v1/ask: a follow-up's joined search comes back as retrieval_query; sent back with the history (as the page
    does), the next follow-up is searched with the whole topic."""
    server, _ = served
    first = "What does alarm A-202 mean?"
    r = httpx.post(server.url + "/v1/ask", json={"question": "What should I do about it?", "max_tokens": 8,
                                                 "history": [{"question": first, "answer": "Chlorine gas."}]},
                   timeout=300).json()
    assert r["retrieval_query"] == f"{first} What should I do about it?"
    r2 = httpx.post(server.url + "/v1/ask", json={"question": "And after that?", "max_tokens": 8, "history": [
        {"question": first, "answer": "Chlorine gas."},
        {"question": "What should I do about it?", "answer": r["answer"], "retrieval_query": r["retrieval_query"]}]},
        timeout=300).json()
    assert r2["retrieval_query"] == f"{first} What should I do about it? And after that?"
    alone = httpx.post(server.url + "/v1/ask", json={"question": QUESTION, "max_tokens": 8}, timeout=300).json()
    assert "retrieval_query" not in alone



@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 99_999}),
    ("/v1/ask", {"question": QUESTION, "max_tokens": 99_999}),
    ("/v1/completions", {"prompt": "The chlorine dosing pump", "max_tokens": 99_999}),
])
def test_a_streamed_request_beyond_the_context_gets_a_400(served: tuple[object, object], path: str,
                                                         body: dict[str, object]) -> None:
    """Checked against the loaded context before queueing, so a stream gets a status code (it was 200, then an
    error event; a new-user trial)."""
    server, _ = served
    with httpx.stream("POST", server.url + path, json=dict(body, stream=True), timeout=300) as r:
        r.read()
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "max_tokens_too_large" and r.json()["error"]["param"] == "max_tokens"



def test_a_body_without_content_type_is_told_to_send_json(served: tuple[object, object]) -> None:
    """curl -d without -H 'Content-Type: application/json' (form-encoded): it got "body: Input should be a valid
    dictionary or object to extract fields from" (a new-user trial)."""
    server, _ = served
    r = httpx.post(server.url + "/v1/ask", content=b'{"question": "hi"}',
                   headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_json" and "Content-Type: application/json" in err["message"], err


def test_chat_completions_rebuild_the_followup_chain_from_the_messages(served: tuple[object, object]) -> None:
    """OpenAI-style messages carry no retrieval_query: the server rebuilds the chain from the earlier user
    messages, so a third-turn follow-up keeps the topic of the first (it was searched with the second alone)."""
    server, _ = served
    first = "What does alarm A-202 mean?"
    messages = [{"role": "user", "content": first}, {"role": "assistant", "content": "Chlorine gas."},
                {"role": "user", "content": "What should I do about it?"},
                {"role": "assistant", "content": "Leave the room."}, {"role": "user", "content": "And after that?"}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 8},
                   timeout=300).json()
    assert r["fieldpack"]["retrieval_query"] == f"{first} What should I do about it? And after that?", r["fieldpack"]
