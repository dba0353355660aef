"""``fieldpack serve --http``: the bind rules through the installed CLI, the daemon as a process, and HTTP
beside MQTT in one process with one engine (one queue, one set of counters; real Mosquitto)."""

from __future__ import annotations

import os
from pathlib import Path
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import REPO, run_cli
from tests.mqtt_broker import MosquittoBroker, free_port, have_mosquitto

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi", reason="needs the device extra (fastapi, uvicorn)")

QUESTION = "The connection pool is exhausted. What should I do?"


@pytest.mark.parametrize("args,needle", [
    (["--http", "0.0.0.0:8099"], "--api-key-file"),
    (["--http", "192.0.2.7:8099"], "--insecure-no-auth"),
    (["--http", "127.0.0.1:notaport"], "HOST:PORT"),
    ([], "--http HOST:PORT"),
    (["--broker", "mqtt://127.0.0.1:1"], "--device-id"),
])
def test_serve_refuses_unsafe_or_incomplete_options(tmp_path: Path, args: list[str], needle: str) -> None:
    r = run_cli("serve", *args, "--data-dir", str(tmp_path / "dd"), timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_a_port_in_use_is_one_line(tmp_path: Path, e2e_keys: Path) -> None:
    """Not uvicorn's "[Errno 98]" log line plus ours: one line that says the port is taken, exit 2."""
    import socket

    r = run_cli("device", "init", "--data-dir", str(tmp_path / "dd"), "--trust", str(e2e_keys / "builder.pub"))
    assert r.returncode == 0, r.stderr
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = run_cli("serve", "--http", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "dd"), timeout=120)
    assert r.returncode == 2, r.stderr
    errs = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert errs == [f"error: HTTP port {port} on 127.0.0.1 is already in use. Fix: stop the program that holds it, "
                    "or pick another port: --http 127.0.0.1:PORT"], r.stderr


def test_short_api_key_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("short\n")
    r = run_cli("serve", "--http", "0.0.0.0:8099", "--api-key-file", str(key), "--data-dir", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "shorter than 16" in r.stderr


def test_without_a_bundle_health_is_503_and_requests_get_503(tmp_path: Path, e2e_keys: Path) -> None:
    from tests.device.http_fixtures import running_server

    r = run_cli("device", "init", "--data-dir", str(tmp_path / "dd"), "--trust", str(e2e_keys / "builder.pub"))
    assert r.returncode == 0, r.stderr
    with running_server(tmp_path / "dd") as (server, _):
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert "fieldpack install" in health.json()["error"]
        assert httpx.get(server.url + "/v1/models").json()["data"] == []
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_active_bundle" and "Retry-After" in r.headers


def _serve_until_healthy(data_dir: Path) -> tuple[subprocess.Popen, int]:
    """`fieldpack serve --http` on a free port as a process (stderr piped), once /health says 200."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fieldpack", "serve", "--http", f"127.0.0.1:{port}",
                             "--data-dir", str(data_dir)], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read() if proc.stderr else "serve exited")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the daemon never became healthy")
        time.sleep(0.2)


@pytest.mark.slow
def test_serve_process_answers_and_stops_on_sigterm(tmp_path: Path, e2e_keys: Path, bundle_v1: Path) -> None:
    from tests.device.http_fixtures import install_device

    proc, port = _serve_until_healthy(install_device(tmp_path / "dev", e2e_keys, bundle_v1))
    try:
        url = f"http://127.0.0.1:{port}"
        r = httpx.post(url + "/v1/ask", json={"question": QUESTION}, timeout=300)
        assert r.status_code == 200 and r.json()["bundle"] == "riverside@1.0.0"
        assert "<title>fieldpack assistant</title>" in httpx.get(url + "/").text
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    err = proc.stderr.read() if proc.stderr else ""
    assert rc == 0, err
    # the operator sees where it serves without -v (the daemon's own logger was named "device" before the
    # namespace move and no longer matched, so serve printed nothing when ready)
    assert f"serving HTTP on http://127.0.0.1:{port}/" in err, err[-2000:]
    assert f"HTTP on http://127.0.0.1:{port} stopped" in err, err[-2000:]  # and that it stopped (as MQTT says)


@pytest.mark.slow
@pytest.mark.mqtt
@pytest.mark.skipif(not have_mosquitto(), reason="needs mosquitto (apt install mosquitto)")
def test_http_beside_mqtt_shares_one_engine(tmp_path: Path, e2e_keys: Path, bundle_v1: Path) -> None:
    from fieldpack.device.http.engine import MqttEngineHost
    from fieldpack.device.http.server import HttpConfig, HttpServer
    from fieldpack.device.mqtt import DaemonConfig, MqttDaemon, Requester
    from fieldpack.device.provider import ActiveBundleProvider
    from fieldpack.device.slots import open_data_dir
    from prometheus_client.parser import text_string_to_metric_families

    from tests.device.http_fixtures import engine_held, install_device

    data_dir = install_device(tmp_path / "dev", e2e_keys, bundle_v1)
    dev = f"both-{uuid.uuid4().hex[:8]}"
    with MosquittoBroker(tmp_path / "mosquitto") as broker:
        provider = ActiveBundleProvider(open_data_dir(data_dir))
        daemon = MqttDaemon(DaemonConfig(dev, queue_size=4), provider, broker.settings())
        host = MqttEngineHost(daemon, provider)
        server = HttpServer(host, HttpConfig(port=0))
        daemon.start()
        server.start_in_thread()
        try:
            assert daemon.wait_ready(60)
            with Requester(broker.settings()) as requester:
                with engine_held(host):  # the worker is busy: an MQTT request waits in the queue HTTP sees
                    pending = requester.submit(QUESTION, device=dev)
                    deadline = time.monotonic() + 60
                    while httpx.get(server.url + "/health").json()["queue"]["waiting"] != 1:
                        assert time.monotonic() < deadline, "the MQTT request never showed in the shared queue"
                        time.sleep(0.05)
                final = pending.wait(300)
                assert final is not None and final.ok and final.bundle == "riverside@1.0.0"
            r = httpx.post(server.url + "/v1/ask", json={"question": QUESTION}, timeout=300)
            assert r.status_code == 200 and r.json()["answer"] == final.answer  # same engine, greedy
            families = text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
            value = {s.name: s.value for f in families for s in f.samples if not s.labels}
            assert value["fieldpack_requests_total"] == 2 and value["fieldpack_answered_total"] == 2
            assert value["fieldpack_queue_capacity"] == 4
            assert httpx.get(server.url + "/health").json()["mqtt"] == "connected"
            broker.stop()  # HTTP still answers; /health says the broker link is down (a trial read "ok" only)
            deadline = time.monotonic() + 30
            while (health := httpx.get(server.url + "/health")).json().get("mqtt") != "disconnected":
                assert time.monotonic() < deadline, health.json()
                time.sleep(0.1)
            assert health.status_code == 200 and health.json()["status"] == "ok"
        finally:
            server.stop()
            daemon.stop()


@pytest.mark.slow
def test_sigterm_during_a_stream_ends_it_with_shutting_down(tmp_path: Path, e2e_keys: Path,
                                                          gemma_demo_bundle: Path) -> None:
    """Stopping the daemon mid-answer: the stream gets a shutting_down error event and [DONE], and stderr has no
    traceback (uvicorn used to cancel the stream at its 5 s graceful-shutdown timeout: a cut transfer and a
    CancelledError traceback; a new-user trial). The engine stops first, then HTTP. The real Gemma counts on for
    all 490 tokens (about 10 s here); the tiny Llama's whole answer took 6 ms, so it could end before the signal
    did (a CI failure)."""
    import json

    from tests.device.http_fixtures import install_device

    proc, port = _serve_until_healthy(install_device(tmp_path / "dev", e2e_keys, gemma_demo_bundle))
    events: list[str] = []
    try:
        url = f"http://127.0.0.1:{port}"
        body = {"prompt": "1, 2, 3, 4,", "max_tokens": 490, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 1:  # mid-answer
                    proc.send_signal(signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    err = proc.stderr.read() if proc.stderr else ""
    assert rc == 0 and "Traceback" not in err and "CancelledError" not in err, err[-3000:]
    assert events[-1] == "[DONE]", events[-3:]
    last = json.loads(events[-2])
    assert last["error"]["code"] == "shutting_down", last
    assert len(events) < 400, len(events)  # cut short: the whole answer is 490 tokens, one event each


@pytest.mark.slow
def test_a_client_that_leaves_mid_stream_stops_the_real_models_answer(tmp_path: Path, e2e_keys: Path,
                                                                      gemma_demo_bundle: Path) -> None:
    """A client that closes the stream after the first token frees the engine: the answer (490 counting tokens,
    about 10 s here) stops early, is counted cancelled, not answered, and the log says after how many tokens."""
    import re

    from prometheus_client.parser import text_string_to_metric_families

    from tests.device.http_fixtures import install_device

    proc, port = _serve_until_healthy(install_device(tmp_path / "dev", e2e_keys, gemma_demo_bundle))
    url = f"http://127.0.0.1:{port}"

    def metric(name: str) -> float:
        families = text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text)
        return next(s.value for f in families for s in f.samples if s.name == name and not s.labels)

    try:
        body = {"prompt": "1, 2, 3, 4,", "max_tokens": 490, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # leave: the connection closes
        deadline = time.monotonic() + 120
        while metric("fieldpack_engine_busy") or not metric("fieldpack_cancelled_total"):
            assert time.monotonic() < deadline, "the engine kept answering a client that left"
            time.sleep(0.1)
        assert metric("fieldpack_answered_total") == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    err = proc.stderr.read() if proc.stderr else ""
    stopped = re.search(r"request \S+ stopped after (\d+) answer tokens", err)
    assert stopped and int(stopped[1]) < 400, err[-3000:]
