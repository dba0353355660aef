"""The daemon's admission, queue and expiry logic with no broker: :class:`Admission` decides, a real
:class:`JobBoard` queues, a real :class:`Worker` serves with a fake engine and a clock the test moves, and a
recording stand-in for paho's ``publish`` collects the replies (decoded with the protocol module). The same
paths run against a real Mosquitto in test_mqtt_daemon.py."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fieldpack.device.mqtt.admission import Admission, InboundRequest
from fieldpack.device.mqtt.jobs import JobBoard
from fieldpack.device.mqtt.metrics import MetricsRecorder
from fieldpack.device.mqtt.replies import Replier
from fieldpack.device.mqtt.worker import Worker
from fieldpack.shared import errors, protocol
from tests.device.mqtt_fakes import FakeClock, FakeEngine, FakeProvider

REPLY = "fieldpack-test/replies/req"  # a client's own reply topic (not under the protocol root)


def request(rid: str = "r1", question: str = "What is cavitation?", **extra: Any) -> bytes:
    return json.dumps({"v": protocol.PROTOCOL_VERSION, "id": rid, "question": question, **extra}).encode()


def admission(capacity: int = 2, stopping: bool = False) -> Admission:
    return Admission("dev-1", JobBoard(capacity), max_payload_bytes=protocol.MAX_PAYLOAD_BYTES,
                     max_question_chars=protocol.MAX_QUESTION_CHARS, stopping=lambda: stopping)


def test_good_request_is_queued_with_its_route_and_deadline() -> None:
    a = admission()
    d = a.admit(InboundRequest("t", request(), response_topic=REPLY, correlation=b"c1", expiry_s=30,
                               received_at=100.0))
    assert d.job is not None and d.refusal is None and d.counter is None
    assert (d.route.topic, d.route.correlation, d.route.request_id) == (REPLY, b"c1", "r1")
    assert d.job.expires_at == 130.0 and not d.job.expired(129.9) and d.job.expired(130.0)
    assert a.board.depth == 1


def test_reply_to_in_the_payload_serves_mqtt_311_clients() -> None:
    d = admission().admit(InboundRequest("t", request(reply_to=REPLY)))
    assert d.job is not None and d.route.topic == REPLY and d.job.expires_at is None


def test_bad_payload_is_refused_to_the_salvaged_route_or_dropped() -> None:
    a = admission()
    d = a.admit(InboundRequest("t", b'{"v": 1, "id": "r9", "question": 42, "reply_to": "' + REPLY.encode() + b'"}'))
    assert d.job is None and d.counter == "errors" and d.route.topic == REPLY and d.route.request_id == "r9"
    assert d.refusal.code == protocol.ErrorCode.BAD_SHAPE
    d = a.admit(InboundRequest("t", b"not json"))  # no Response Topic, nothing to salvage
    assert d.job is None and d.route is None and d.refusal is None and d.counter == "errors"
    d = a.admit(InboundRequest("t", request()))  # valid, but nowhere to reply
    assert d.job is None and d.route is None and d.counter == "errors"
    assert a.board.depth == 0


def test_unusable_response_topic_falls_back_to_reply_to() -> None:
    d = admission().admit(InboundRequest("t", request(reply_to=REPLY), response_topic="bad/+/wildcard"))
    assert d.job is not None and d.route.topic == REPLY


def test_shutting_down_duplicate_and_busy_refusals() -> None:
    d = admission(stopping=True).admit(InboundRequest("t", request(), response_topic=REPLY))
    assert d.job is None and d.refusal.code == protocol.ErrorCode.SHUTTING_DOWN and d.counter == "errors"

    a = admission(capacity=2)
    assert a.admit(InboundRequest("t", request("a"), response_topic=REPLY, correlation=b"A")).job is not None
    dup = a.admit(InboundRequest("t", request("a"), response_topic=REPLY, correlation=b"Z"))
    assert dup.refusal.code == protocol.ErrorCode.DUPLICATE_REQUEST and dup.counter == "errors"
    dup = a.admit(InboundRequest("t", request("other"), response_topic=REPLY, correlation=b"A"))
    assert dup.refusal.code == protocol.ErrorCode.DUPLICATE_REQUEST  # same correlation data
    assert a.admit(InboundRequest("t", request("b"), response_topic=REPLY)).job is not None
    busy = a.admit(InboundRequest("t", request("c"), response_topic=REPLY))
    assert busy.job is None and busy.counter == "busy" and busy.refusal.code == protocol.ErrorCode.BUSY
    assert busy.refusal.queue_depth == 2 == busy.depth == a.board.depth


# --- the worker with a recording publisher -----------------------------------------------------------------
@dataclass
class _Info:
    rc: int = mqtt.MQTT_ERR_SUCCESS


@dataclass
class RecordingClient:
    """Stands in for paho's ``Client.publish``: keeps (topic, decoded payload)."""

    published: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, topic: str, payload: bytes, qos: int = 0, properties: Any = None) -> _Info:
        with self.lock:
            self.published.append((topic, json.loads(payload)))
        return _Info()

    def finals(self) -> list[dict[str, Any]]:
        with self.lock:
            return [p for _, p in self.published if p.get("type") == "final"]


@pytest.fixture
def served():
    clock, client = FakeClock(), RecordingClient()
    engine = FakeEngine(n_tokens=3, hold_after=1)  # holds the first answer until released
    board = JobBoard(4)
    replier = Replier(client, "dev-1")
    stopping = threading.Event()
    worker = Worker(device_id="dev-1", provider=FakeProvider(engine), board=board, replier=replier,
                    metrics=MetricsRecorder("dev-1", clock), clock=clock, on_engine=lambda *_: None,
                    stopping=stopping)
    a = Admission("dev-1", board, max_payload_bytes=protocol.MAX_PAYLOAD_BYTES,
                  max_question_chars=protocol.MAX_QUESTION_CHARS, stopping=stopping.is_set)
    replier.start()
    worker.start()
    yield a, clock, client, engine
    engine.release()
    stopping.set()
    worker.join(10)
    replier.close()


def _wait(cond, timeout_s: float = 20.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, "timed out"
        time.sleep(0.01)


def test_a_request_that_expires_while_queued_is_not_answered(served) -> None:
    a, clock, client, engine = served
    first = a.admit(InboundRequest("t", request("first"), response_topic=REPLY, received_at=clock.monotonic()))
    assert first.job is not None
    assert engine.started.wait(10)  # the worker is answering "first" and holds it
    late = a.admit(InboundRequest("t", request("late"), response_topic=REPLY, expiry_s=5,
                                  received_at=clock.monotonic()))
    keep = a.admit(InboundRequest("t", request("keep"), response_topic=REPLY, expiry_s=60,
                                  received_at=clock.monotonic()))
    assert late.job is not None and keep.job is not None
    clock.advance(10)  # "late" expired in the queue, "keep" did not
    engine.release()
    _wait(lambda: len(client.finals()) >= 2)
    time.sleep(0.3)
    ids = [f["id"] for f in client.finals()]
    assert ids == ["first", "keep"], ids
    assert all(f["ok"] for f in client.finals())


def test_an_idle_worker_picks_up_a_bundle_switched_from_outside() -> None:
    """A trial rolled a serving device back by hand (`fieldpack rollback`): its retained status kept naming the
    bundle it had left until the next request. The idle worker now checks every IDLE_REFRESH_S; a repeated
    failure is not re-announced."""
    from fieldpack.device.mqtt.worker import IDLE_REFRESH_S

    clock = FakeClock()
    provider = FakeProvider(FakeEngine("demo@1.1.0"))
    seen: list[tuple[str | None, str | None]] = []
    stopping = threading.Event()
    worker = Worker(device_id="dev-1", provider=provider, board=JobBoard(4), replier=None,
                    metrics=MetricsRecorder("dev-1", clock), clock=clock,
                    on_engine=lambda info, error: seen.append((info.label if info else None, error)),
                    stopping=stopping)
    worker.start()
    try:
        _wait(lambda: seen == [("demo@1.1.0", None)])
        provider.install(FakeEngine("demo@1.0.0"))  # rolled back while idle
        time.sleep(0.5)
        assert seen == [("demo@1.1.0", None)]  # not before the refresh period
        clock.advance(IDLE_REFRESH_S)
        _wait(lambda: seen[-1] == ("demo@1.0.0", None))
        provider.fail = errors.NoActiveBundleError("no bundle is installed in /d", hint="install one")
        clock.advance(IDLE_REFRESH_S)
        _wait(lambda: any(s[1] for s in seen))  # announced once (on a loaded host it may take a while) ...
        for _ in range(2):  # ... and not again
            clock.advance(IDLE_REFRESH_S)
            time.sleep(0.5)
        failures = [s for s in seen if s[1]]
        assert len(failures) == 1 and failures[0][0] is None and "no bundle is installed" in failures[0][1], seen
        # a bundle that fails to load is not reloaded every few seconds while idle (a request still retries it)
        provider.fail = errors.RuntimeLoadError("model.gguf cannot be loaded", hint="reinstall")
        clock.advance(IDLE_REFRESH_S)
        _wait(lambda: "cannot be loaded" in (seen[-1][1] or ""))
        gets = provider.gets
        for _ in range(3):
            clock.advance(IDLE_REFRESH_S)
            time.sleep(0.5)
        assert provider.gets == gets
        # ... until another bundle is active (a new install): then it is loaded while idle
        provider.fail = None
        provider.install(FakeEngine("demo@1.2.0"))
        provider.active_label = lambda: "demo@1.2.0"  # type: ignore[attr-defined]  # the data dir's state
        clock.advance(IDLE_REFRESH_S)
        _wait(lambda: seen[-1] == ("demo@1.2.0", None))
    finally:
        stopping.set()
        worker.join(10)
