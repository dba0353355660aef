"""The MQTT daemon against a real Mosquitto (plain listener with a password file, TLS listener with a test CA),
with a deterministic fake engine. Each test uses its own device id, so one broker serves the module."""

from __future__ import annotations

import json
import logging
from pathlib import Path
import signal
import socket
import subprocess
import sys
import threading
from typing import Any, Callable, Iterator
import uuid

import pytest

from fieldpack.shared import errors, protocol

from fieldpack.device.mqtt import DaemonConfig, MqttDaemon, Requester
from fieldpack.device.mqtt.client import BrokerSettings
from fieldpack.device.mqtt.metrics import METRICS_FILENAME
from tests.device.mqtt_fakes import FakeClock, FakeEngine, FakeProvider, fake_tokens
from tests.device.mqtt_probe import Probe, wait_for
from tests.mqtt_broker import MosquittoBroker, have_mosquitto, make_tls_files

pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.skipif(not have_mosquitto(), reason="needs mosquitto and mosquitto_passwd (apt install mosquitto)"),
]

Serve = Callable[..., MqttDaemon]


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


def _make_serve(broker: MosquittoBroker, tmp_path: Path) -> tuple[Serve, list[MqttDaemon]]:
    daemons: list[MqttDaemon] = []

    def serve(
        engine: FakeEngine | None = None,
        *,
        provider: FakeProvider | None = None,
        device_id: str | None = None,
        settings: BrokerSettings | None = None,
        clock: FakeClock | None = None,
        ready: bool = True,
        **config: Any,
    ) -> MqttDaemon:
        config.setdefault("data_dir", tmp_path)
        daemon = MqttDaemon(
            DaemonConfig(device_id or _uid("box"), **config),
            provider or FakeProvider(engine or FakeEngine()),
            settings or broker.settings(),
            clock=clock,
        )
        daemons.append(daemon)
        daemon.start()
        if ready:
            assert daemon.wait_ready(10), broker.log_tail()
        return daemon

    return serve, daemons


@pytest.fixture
def serve(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Serve]:
    fn, daemons = _make_serve(broker, tmp_path)
    yield fn
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def requester(broker: MosquittoBroker) -> Iterator[Requester]:
    with Requester(broker.settings()) as r:
        yield r


@pytest.fixture
def probe(broker: MosquittoBroker) -> Iterator[Probe]:
    p = Probe(broker.settings())
    p.subscribe(f"probe-replies/{p.client_id}")
    yield p
    p.close()


def _request(rid: str = "r1", **fields: Any) -> bytes:
    body: dict[str, Any] = {"v": 1, "type": "request", "id": rid, "question": "How do I reset pump 3?"}
    body.update(fields)
    return json.dumps(body).encode()


# --- request / response --------------------------------------------------------------------------------------
def test_reply_goes_to_response_topic_with_correlation_data(serve: Serve, probe: Probe) -> None:
    daemon = serve(FakeEngine(n_tokens=4))
    reply_to = f"probe-replies/{probe.client_id}"
    correlation = b"\x00\x01\xfe binary ok"
    probe.publish(protocol.request_topic(daemon.config.device_id), _request("q-1"), response_topic=reply_to,
                  correlation=correlation)
    final, raw = probe.final()
    assert final.ok and final.id == "q-1" and final.device == daemon.config.device_id
    assert raw.topic == reply_to
    assert raw.properties.CorrelationData == correlation
    assert raw.properties.ContentType == protocol.CONTENT_TYPE
    assert final.answer == "".join(fake_tokens("How do I reset pump 3?", 4))
    assert final.sources[0].n == 1 and final.sources[0].citation == "pumps.md § Pump 3 > Alarms, lines 10-24"
    assert final.timings is not None and final.timings.completion_tokens == 4
    assert final.bundle == "demo@1.0.0" and final.finish_reason == "stop"


def test_stream_arrives_in_order_and_complete(serve: Serve, requester: Requester) -> None:
    daemon = serve(FakeEngine(n_tokens=12, delay_s=0.02))
    pending = requester.submit("Explain the pump alarm", device=daemon.config.device_id)
    final = pending.wait(20)
    assert final is not None and final.ok
    seqs = [p.seq for p in pending.partials]
    assert seqs == list(range(len(seqs))) and len(seqs) >= 2  # arrival order == seq order, no gaps, streamed
    assert final.partials == len(seqs)
    assert pending.streamed_text == final.answer == "".join(fake_tokens("Explain the pump alarm", 12))


def test_pieces_produced_faster_than_sent_are_merged_not_lost(serve: Serve, requester: Requester) -> None:
    daemon = serve(FakeEngine(n_tokens=300))  # no delay: pieces pile up behind the publisher
    pending = requester.submit("burst of tokens", device=daemon.config.device_id)
    final = pending.wait(20)
    assert final is not None and final.ok
    assert [p.seq for p in pending.partials] == list(range(final.partials))
    assert pending.streamed_text == final.answer and len(final.answer or "") > 0


def test_stream_false_sends_only_the_final(serve: Serve, requester: Requester) -> None:
    daemon = serve(FakeEngine(n_tokens=8))
    pending = requester.submit("q", device=daemon.config.device_id, stream=False)
    final = pending.wait(10)
    assert final is not None and final.ok and final.partials == 0 and pending.partials == []
    assert final.answer == "".join(fake_tokens("q", 8))


def test_mqtt311_client_uses_reply_to_and_id_in_payload(serve: Serve, broker: MosquittoBroker) -> None:
    daemon = serve(FakeEngine(n_tokens=3))
    old = Probe(broker.settings(), v311=True)
    try:
        reply_to = f"legacy/{old.client_id}/replies"
        old.subscribe(reply_to)
        old.publish(protocol.request_topic(daemon.config.device_id), _request("legacy-1", reply_to=reply_to))
        final, raw = old.final()
        assert final.ok and final.id == "legacy-1" and raw.topic == reply_to
        # a bad request from a 3.1.1 client still gets its error on the reply_to it managed to send
        old.publish(protocol.request_topic(daemon.config.device_id), _request("legacy-2", question=5, reply_to=reply_to))
        final, _ = old.final()
        assert not final.ok and final.id == "legacy-2" and final.error is not None
        assert final.error.code == "bad_shape"
    finally:
        old.close()


# --- bad input -------------------------------------------------------------------------------------------------
BAD_REQUESTS: list[tuple[str, bytes, str]] = [
    ("not utf-8", b"\xff\xfe\xfd", "not_utf8"),
    ("not json", b"{oops", "not_json"),
    ("json array", b"[1, 2, 3]", "bad_shape"),
    ("question not a string", _request(question=["a"]), "bad_shape"),
    ("missing question", json.dumps({"v": 1, "type": "request", "id": "x"}).encode(), "bad_shape"),
    ("unknown key", _request(priority="high"), "bad_shape"),
    ("unknown version", _request(v=7), "unsupported_version"),
    ("empty question", _request(question=" \n "), "empty_question"),
    ("question too long", _request(question="x" * 201), "question_too_long"),
    ("payload too large", _request(question="y" * 5000), "payload_too_large"),
    ("bundle not on device", _request(bundle="other-manuals"), "unknown_bundle"),
    ("bundle version not on device", _request(bundle="demo@9.9.9"), "unknown_bundle"),
    ("engine refuses question", _request(question="!query long"), "question_too_long"),
    ("engine crashes", _request(question="!crash now"), "internal"),
]


@pytest.mark.parametrize("payload,code", [(p, c) for _, p, c in BAD_REQUESTS], ids=[n for n, _, _ in BAD_REQUESTS])
def test_bad_request_gets_an_error_reply_and_the_daemon_keeps_serving(
    serve: Serve, probe: Probe, payload: bytes, code: str
) -> None:
    daemon = serve(FakeEngine(n_tokens=3), max_question_chars=200, max_payload_bytes=4096)
    topic = protocol.request_topic(daemon.config.device_id)
    reply_to = f"probe-replies/{probe.client_id}"
    probe.publish(topic, payload, response_topic=reply_to, correlation=b"bad-1")
    final, raw = probe.final()
    assert not final.ok and final.error is not None
    assert final.error.code == code, final.error
    assert final.error.reason
    assert raw.properties.CorrelationData == b"bad-1"
    probe.publish(topic, _request("good-1"), response_topic=reply_to, correlation=b"good-1")
    final, _ = probe.final()
    assert final.ok and final.id == "good-1"
    assert daemon.metrics.value("errors") == 1 and daemon.metrics.value("answered") == 1


def test_request_with_nowhere_to_reply_is_logged_and_dropped(
    serve: Serve, probe: Probe, broker: MosquittoBroker, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = serve(FakeEngine(n_tokens=3))
    topic = protocol.request_topic(daemon.config.device_id)
    watcher = Probe(broker.settings())
    try:
        watcher.subscribe("#")
        with caplog.at_level(logging.WARNING, logger="fieldpack.device.mqtt.daemon"):
            probe.publish(topic, _request("lost-1"))  # valid, but neither Response Topic nor reply_to
            probe.publish(topic, b"not json either")
            probe.publish(topic, _request("found-1"), response_topic=f"probe-replies/{probe.client_id}")
            final, _ = probe.final()
        assert final.ok and final.id == "found-1"
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("cannot reply" in w or "nowhere to reply" in w for w in warnings) == 2, warnings
        assert daemon.metrics.value("errors") == 2
        # the daemon published nothing for the two unroutable requests: all it sent was status, metrics
        # and the replies of "found-1"
        published: list[str | None] = []
        while True:  # up to the final reply of "found-1", in the broker's order
            m = watcher.next()
            kind = protocol.parse_topic(m.topic)
            if kind is None or kind[0] not in ("status", "metrics", "request"):
                reply = protocol.decode_reply(m.payload)
                published.append(reply.id)
                if isinstance(reply, protocol.Final):
                    break
        assert published and set(published) == {"found-1"}
    finally:
        watcher.close()


def test_duplicate_correlation_in_flight_is_refused(serve: Serve, probe: Probe) -> None:
    engine = FakeEngine(n_tokens=3, hold_after=1)
    daemon = serve(engine)
    topic = protocol.request_topic(daemon.config.device_id)
    reply_to = f"probe-replies/{probe.client_id}"
    probe.publish(topic, _request("first"), response_topic=reply_to, correlation=b"same")
    assert engine.started.wait(10)
    probe.publish(topic, _request("second"), response_topic=reply_to, correlation=b"same")
    final, _ = probe.final()
    assert final.id == "second" and final.error is not None and final.error.code == "duplicate_request"
    engine.release()
    final, _ = probe.final()
    assert final.ok and final.id == "first"
    probe.publish(topic, _request("third"), response_topic=reply_to, correlation=b"same")  # free again
    final, _ = probe.final()
    assert final.ok and final.id == "third"


# --- queue, expiry, cancel -----------------------------------------------------------------------------------
def test_full_queue_answers_busy_at_once_with_depth(serve: Serve, requester: Requester) -> None:
    engine = FakeEngine(n_tokens=3, hold_after=1)
    daemon = serve(engine, queue_size=2)
    dev = daemon.config.device_id
    running = requester.submit("a", device=dev)
    assert engine.started.wait(10)
    queued = [requester.submit(q, device=dev) for q in ("b", "c")]
    wait_for(lambda: daemon.status().queue_depth == 2, what="two queued")
    refused = requester.submit("d", device=dev).wait(10)  # the engine is still held: this reply came at once
    assert refused is not None and refused.error is not None
    assert refused.error.code == "busy" and refused.error.queue_depth == 2
    assert "2 requests queued" in refused.error.reason
    engine.release()
    for p in [running, *queued]:
        final = p.wait(10)
        assert final is not None and final.ok
    assert engine.calls == ["a", "b", "c"]
    assert daemon.metrics.value("busy") == 1


def test_burst_never_drops_silently(serve: Serve, requester: Requester) -> None:
    daemon = serve(FakeEngine(n_tokens=3, delay_s=0.002), queue_size=4)
    pendings = [requester.submit(f"q{i}", device=daemon.config.device_id) for i in range(40)]
    finals = [p.wait(20) for p in pendings]
    assert all(f is not None for f in finals), "a request got no reply"
    answered = sum(f.ok for f in finals if f)
    busy = sum(1 for f in finals if f and f.error and f.error.code == "busy")
    assert answered + busy == 40 and answered >= 5 and busy >= 1


def test_request_expired_while_queued_is_not_answered(serve: Serve, requester: Requester) -> None:
    clock = FakeClock()
    engine = FakeEngine(n_tokens=3, hold_after=1)
    daemon = serve(engine, clock=clock)
    dev = daemon.config.device_id
    first = requester.submit("first", device=dev)
    assert engine.started.wait(10)
    doomed = requester.submit("doomed", device=dev, expiry_s=30)
    last = requester.submit("last", device=dev)
    wait_for(lambda: daemon.status().queue_depth == 2, what="two queued")
    clock.advance(31)  # the doomed request's Message Expiry runs out while it waits
    engine.release()
    assert (f := first.wait(10)) is not None and f.ok
    assert (f := last.wait(10)) is not None and f.ok
    # replies of one device to one topic keep their order: had "doomed" been answered, it came before "last"
    assert doomed.final is None and doomed.partials == []
    assert engine.calls == ["first", "last"]
    assert daemon.metrics.value("expired") == 1


def test_unexpired_request_with_expiry_is_answered(serve: Serve, requester: Requester) -> None:
    daemon = serve(FakeEngine(n_tokens=2))
    final = requester.ask("q", device=daemon.config.device_id, expiry_s=60, timeout_s=10)
    assert final.ok


def test_cancel_queued_and_running_requests(serve: Serve, requester: Requester) -> None:
    engine = FakeEngine(n_tokens=10, hold_after=3)
    daemon = serve(engine)
    dev = daemon.config.device_id
    running = requester.submit("running", device=dev)
    queued = requester.submit("queued", device=dev)
    held_text = "".join(fake_tokens("running", 10)[:3])
    wait_for(lambda: running.streamed_text == held_text and daemon.status().queue_depth == 1, what="3 pieces, 1 queued")
    requester.cancel(queued.id, device=dev)
    final = queued.wait(10)
    assert final is not None and final.error is not None and final.error.code == "cancelled"
    assert running.final is None  # still held: the queued one was cancelled without touching it
    requester.cancel(running.id, device=dev)
    final = running.wait(10)
    assert final is not None and final.error is not None and final.error.code == "cancelled"
    assert final.partials == len(running.partials) >= 1 and running.streamed_text == held_text
    assert engine.calls == ["running"]
    engine.release()
    assert requester.ask("after", device=dev, timeout_s=10).ok
    assert daemon.metrics.value("cancelled") == 2


# --- groups ----------------------------------------------------------------------------------------------------
def test_two_devices_share_a_group(serve: Serve, requester: Requester) -> None:
    group = _uid("line")
    engines = [FakeEngine(n_tokens=3, delay_s=0.01), FakeEngine(n_tokens=3, delay_s=0.01)]
    daemons = [serve(e, groups=(group,)) for e in engines]
    pendings = [requester.submit(f"q{i}", group=group) for i in range(8)]
    finals = [p.wait(20) for p in pendings]
    assert all(f is not None and f.ok for f in finals)
    assert {f.device for f in finals if f} == {d.config.device_id for d in daemons}  # both took work
    answered = sorted(engines[0].calls + engines[1].calls)
    assert answered == sorted(f"q{i}" for i in range(8))  # each request answered exactly once


def test_group_cancel_reaches_the_device_holding_the_request(serve: Serve, requester: Requester) -> None:
    group = _uid("line")
    engine = FakeEngine(n_tokens=5, hold_after=1)
    serve(engine, groups=(group,))
    pending = requester.submit("long one", group=group)
    assert engine.started.wait(10)
    requester.cancel(pending.id, group=group)
    final = pending.wait(10)
    assert final is not None and final.error is not None and final.error.code == "cancelled"


# --- bundles ---------------------------------------------------------------------------------------------------
def test_bundle_installed_while_serving_is_used_from_the_next_request(serve: Serve, requester: Requester) -> None:
    old = FakeEngine("demo@1.0.0", n_tokens=3, hold_after=1)
    provider = FakeProvider(old)
    daemon = serve(provider=provider)
    dev = daemon.config.device_id
    first = requester.submit("first", device=dev)
    assert old.started.wait(10)
    provider.install(FakeEngine("demo@2.0.0", n_tokens=3))  # installed mid-answer
    second = requester.submit("second", device=dev, bundle="demo@2.0.0")
    old.release()
    assert (f := first.wait(10)) is not None and f.ok and f.bundle == "demo@1.0.0"  # not swapped mid-answer
    assert (f := second.wait(10)) is not None and f.ok and f.bundle == "demo@2.0.0"
    wait_for(
        lambda: any(s.status.device == dev and s.status.bundle_version == "2.0.0" for s in requester.device_states()),
        what="status showing the new bundle",
    )


def test_no_active_bundle_is_an_error_reply_until_one_is_installed(serve: Serve, requester: Requester) -> None:
    provider = FakeProvider(FakeEngine(n_tokens=2))
    provider.fail = errors.NoActiveBundleError("no bundle is installed in /data", hint="run `fieldpack install`")
    daemon = serve(provider=provider)
    dev = daemon.config.device_id
    final = requester.ask("q", device=dev, timeout_s=10)
    assert final.error is not None and final.error.code == "no_active_bundle"
    assert isinstance(final.error.to_exception(), errors.NoActiveBundleError)
    states = {s.status.device: s.status for s in requester.device_states()}
    assert states[dev].online and states[dev].bundle is None and "no bundle" in (states[dev].error or "")
    provider.fail = None
    assert requester.ask("q", device=dev, timeout_s=10).ok


# --- status, metrics ----------------------------------------------------------------------------------------
def test_retained_status_and_metrics(serve: Serve, requester: Requester, tmp_path: Path) -> None:
    daemon = serve(FakeEngine(n_tokens=5), groups=("line-9",), metrics_interval_s=0.25, queue_size=3)
    dev = daemon.config.device_id
    assert requester.ask("q", device=dev, timeout_s=10).ok

    def metrics_seen() -> protocol.Metrics | None:
        states = {s.status.device: s for s in requester.device_states()}
        m = states[dev].metrics if dev in states else None
        return m if m is not None and m.answered == 1 else None

    wait_for(metrics_seen, what="retained metrics with one answer")
    state = {s.status.device: s for s in requester.device_states()}[dev]
    s = state.status
    assert (s.online, s.bundle, s.bundle_name, s.bundle_version, s.model) == (
        True, "demo@1.0.0", "demo", "1.0.0", "tiny-q4_k_m.gguf"
    )
    assert (s.queue_depth, s.queue_max, s.groups) == (0, 3, ["line-9"]) and s.uptime_s is not None
    m = state.metrics
    assert m is not None and m.requests == 1 and m.ttft_ms.n == 1 and m.tokens_per_s.n == 1
    assert m.retrieval_ms.last == 1.5
    written = protocol.decode_metrics((tmp_path / METRICS_FILENAME).read_bytes())
    assert written.device == dev and written.answered == 1


def test_retained_status_is_idle_again_after_an_answer(serve: Serve, requester: Requester) -> None:
    """A dashboard reading the retained status of a device that finished answering sees busy=false."""
    engine = FakeEngine(n_tokens=4, hold_after=1)
    dev = serve(engine).config.device_id

    def retained() -> protocol.Status | None:
        states = requester.device_states(device=dev, settle_s=0.1)
        return states[0].status if states else None

    pending = requester.submit("a", device=dev)
    assert engine.started.wait(10)
    wait_for(lambda: (s := retained()) is not None and s.busy, what="retained status busy while answering")
    engine.release()
    final = pending.wait(10)
    assert final is not None and final.ok
    wait_for(lambda: (s := retained()) is not None and not s.busy and s.queue_depth == 0,
             what="retained status idle after the answer")


def test_clean_stop_refuses_queue_and_publishes_offline(serve: Serve, requester: Requester, probe: Probe) -> None:
    engine = FakeEngine(n_tokens=4, hold_after=1)
    daemon = serve(engine)
    dev = daemon.config.device_id
    probe.subscribe(protocol.status_topic(dev))
    assert probe.status(dev).online
    running = requester.submit("a", device=dev)
    assert engine.started.wait(10)
    queued = requester.submit("b", device=dev)
    wait_for(lambda: daemon.status().queue_depth == 1, what="one queued")
    daemon.stop()
    for p in (running, queued):
        final = p.wait(10)
        assert final is not None and final.error is not None and final.error.code == "shutting_down"
    status = probe.status(dev)
    while status.online:  # skip queue-depth updates published before the stop
        status = probe.status(dev)
    assert status.uptime_s is not None  # published by the daemon itself, not the Last Will


# --- connection life ---------------------------------------------------------------------------------------
def test_tcp_nodelay_on_plain_and_tls_sockets(serve: Serve, broker: MosquittoBroker) -> None:
    for settings in (broker.settings(), broker.settings(tls=True)):
        daemon = serve(settings=settings)
        sock = daemon.client.socket()
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_tls_with_client_certificate_and_password(serve: Serve, broker: MosquittoBroker) -> None:
    daemon = serve(settings=broker.settings(tls=True, client_cert=True))
    with Requester(broker.settings(tls=True)) as r:
        assert r.ask("over tls", device=daemon.config.device_id, timeout_s=10).ok


def test_wrong_ca_and_wrong_password_are_refused_clearly(broker: MosquittoBroker, tmp_path: Path) -> None:
    other_ca = make_tls_files(tmp_path / "other", common_name="someone else's CA").ca_cert
    with pytest.raises(errors.UsageError, match="TLS handshake"):
        Requester(broker.settings(tls=True, ca_file=other_ca)).connect()
    with pytest.raises(errors.UsageError, match="refused the connection"):
        Requester(broker.settings(password="wrong")).connect()
    with pytest.raises(errors.DeviceError, match="cannot reach broker"):
        Requester(broker.settings(port=1)).connect()


def test_daemon_with_wrong_password_stops_with_usage_error(broker: MosquittoBroker, tmp_path: Path) -> None:
    daemon = MqttDaemon(DaemonConfig(_uid("box")), FakeProvider(FakeEngine()), broker.settings(password="wrong"))
    stop = threading.Event()
    guard = threading.Timer(30, stop.set)  # never hang the suite if the refusal were not seen
    guard.start()
    try:
        with pytest.raises(errors.UsageError, match="Bad user name or password|Not authorized"):
            daemon.run(stop)
    finally:
        guard.cancel()
    assert not stop.is_set()


def test_second_daemon_with_same_device_id_stops_and_first_keeps_serving(
    serve: Serve, requester: Requester
) -> None:
    dev = _uid("twin")
    first = serve(FakeEngine(n_tokens=2), device_id=dev)
    second = serve(FakeEngine(n_tokens=2), device_id=dev)
    assert first.client_id != second.client_id  # unique client ids: no session takeover between them
    wait_for(lambda: second.fatal_error is not None, what="the later daemon to notice its twin")
    assert isinstance(second.fatal_error, errors.UsageError) and "own --device-id" in str(second.fatal_error)
    assert first.fatal_error is None
    final = requester.ask("q", device=dev, timeout_s=10)
    assert final.ok
    wait_for(
        lambda: {s.status.device: s.status for s in requester.device_states()}[dev].instance == first.instance,
        what="the retained status to name the first daemon",
    )


def test_long_generation_does_not_starve_keepalive(serve: Serve, broker: MosquittoBroker, probe: Probe) -> None:
    """Keep-alive 1 s (the broker drops a client silent for 1.5 s) while the engine burns 3 s of CPU in Python
    before its first token: the network thread keeps pinging, so no disconnect and no Last Will."""
    engine = FakeEngine(n_tokens=3, busy_cpu_s=3.0)
    daemon = serve(engine, settings=broker.settings(keepalive_s=1))
    dev = daemon.config.device_id
    probe.subscribe(protocol.status_topic(dev))
    assert probe.status(dev).online
    with Requester(broker.settings()) as r:
        assert r.ask("slow", device=dev, timeout_s=120).ok
    assert daemon.metrics.value("reconnects") == 0
    statuses = []
    while not probe.inbox.empty():
        m = probe.inbox.get()
        if m.topic == protocol.status_topic(dev):
            statuses.append(protocol.decode_status(m.payload))
    assert all(s.online for s in statuses), "the Last Will fired during the long generation"


def test_broker_restart_mid_answer_then_next_request_is_answered(tmp_path: Path) -> None:
    with MosquittoBroker(tmp_path / "broker") as broker:
        serve, daemons = _make_serve(broker, tmp_path)
        try:
            engine = FakeEngine(n_tokens=6, hold_after=2)
            daemon = serve(engine)
            dev = daemon.config.device_id
            with Requester(broker.settings()) as r:
                pending = r.submit("before restart", device=dev)
                held_text = "".join(fake_tokens("before restart", 6)[:2])
                wait_for(lambda: pending.streamed_text == held_text, what="the first pieces")
                broker.restart()  # retained status and sessions are gone (no persistence)
                engine.release()
                wait_for(lambda: daemon.metrics.value("reconnects") >= 1, timeout_s=30, what="daemon reconnect")
                assert daemon.wait_ready(30)
            with Requester(broker.settings()) as r:
                final = r.ask("after restart", device=dev, timeout_s=30)
                assert final.ok and final.id is not None
                states = {s.status.device: s.status for s in r.device_states()}
                assert states[dev].online  # status restored after the reconnect
        finally:
            for d in daemons:
                d.stop()


# --- Last Will -------------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[2]


def _spawn_daemon(broker: MosquittoBroker, dev: str, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.device.mqtt_daemon_script", "--broker", broker.url(), "--device-id", dev,
             "--username", broker.username, "--password-file", str(broker.password_file)],
            cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
        )


def _next_status(probe: Probe, dev: str, *, online: bool, proc: subprocess.Popen[bytes], log_path: Path) -> protocol.Status:
    while True:
        try:
            status = probe.status(dev, timeout_s=60)
        except AssertionError:
            raise AssertionError(f"no status online={online}; daemon rc={proc.poll()} log:\n{log_path.read_text()}")
        if status.online == online:
            return status


def test_killed_daemon_is_marked_offline_by_its_last_will(broker: MosquittoBroker, tmp_path: Path) -> None:
    dev = _uid("doomed")
    probe = Probe(broker.settings())
    log_path = tmp_path / "daemon.log"
    proc = _spawn_daemon(broker, dev, log_path)
    try:
        probe.subscribe(protocol.status_topic(dev))
        online = _next_status(probe, dev, online=True, proc=proc, log_path=log_path)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        will = _next_status(probe, dev, online=False, proc=proc, log_path=log_path)
        assert will.instance == online.instance and will.uptime_s is None  # the Will, not a clean goodbye
        late = Probe(broker.settings())  # a client arriving later sees the retained offline status
        try:
            late.subscribe(protocol.status_topic(dev))
            retained = late.status(dev)
            assert not retained.online and retained.instance == online.instance
        finally:
            late.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        probe.close()


def test_sigterm_stops_cleanly_with_offline_status(broker: MosquittoBroker, tmp_path: Path) -> None:
    dev = _uid("polite")
    probe = Probe(broker.settings())
    log_path = tmp_path / "daemon.log"
    proc = _spawn_daemon(broker, dev, log_path)
    try:
        probe.subscribe(protocol.status_topic(dev))
        _next_status(probe, dev, online=True, proc=proc, log_path=log_path)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()
        goodbye = _next_status(probe, dev, online=False, proc=proc, log_path=log_path)
        assert goodbye.uptime_s is not None  # published by the daemon itself on its way out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        probe.close()
