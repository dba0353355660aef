"""Unit tests of the wire protocol (shared.protocol), broker settings, the job board, the reply publisher and
the systemd unit: no broker needed."""

from __future__ import annotations

import json
from pathlib import Path
import re
import shutil
import subprocess
import threading
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fieldpack.shared import errors, protocol

from fieldpack.device.mqtt.client import BrokerSettings, parse_broker_url
from fieldpack.device.mqtt.jobs import Job, JobBoard, ReplyRoute
from fieldpack.device.mqtt.replies import Replier

REPO = Path(__file__).resolve().parents[2]


def _req(**overrides: object) -> bytes:
    body: dict[str, object] = {"v": 1, "type": "request", "id": "r1", "question": "How do I reset pump 3?"}
    body.update(overrides)
    return json.dumps(body).encode()


# --- topics --------------------------------------------------------------------------------------------------
def test_topic_tree_is_versioned_and_round_trips() -> None:
    assert protocol.request_topic("fieldbox-7") == "fieldpack/v1/device/fieldbox-7/request"
    assert protocol.group_subscription("line-3") == "$share/fieldpack-line-3/fieldpack/v1/group/line-3/request"
    cases = {
        protocol.request_topic("a"): ("request", "a"),
        protocol.cancel_topic("a"): ("cancel", "a"),
        protocol.status_topic("a"): ("status", "a"),
        protocol.metrics_topic("a"): ("metrics", "a"),
        protocol.group_request_topic("g"): ("group_request", "g"),
        protocol.group_cancel_topic("g"): ("group_cancel", "g"),
        protocol.reply_topic("c"): ("reply", "c"),
    }
    for topic, expected in cases.items():
        assert protocol.parse_topic(topic) == expected
    assert protocol.parse_topic("fieldpack/v2/device/a/request") is None
    assert protocol.parse_topic("other/a/request") is None


@pytest.mark.parametrize("name", ["", "a/b", "a+", "#", "x" * 65, "-lead", "sp ace"])
def test_names_unfit_for_topics_are_refused(name: str) -> None:
    with pytest.raises(errors.UsageError, match="cannot be used in an MQTT topic"):
        protocol.request_topic(name)


@pytest.mark.parametrize("topic", ["", "a/+/b", "a/#", "$SYS/x"])
def test_reply_topics_with_wildcards_are_refused(topic: str) -> None:
    with pytest.raises(errors.ProtocolError) as info:
        protocol.check_reply_topic(topic)
    assert info.value.code == "bad_shape"


# --- requests ------------------------------------------------------------------------------------------------
def test_decode_request_strips_question_and_keeps_fields() -> None:
    r = protocol.decode_request(_req(question="  pump?  ", bundle="manuals@1.2", reply_to="x/y", stream=False))
    assert (r.id, r.question, r.bundle, r.reply_to, r.stream) == ("r1", "pump?", "manuals@1.2", "x/y", False)


@pytest.mark.parametrize(
    "payload,code",
    [
        (b"\xff\xfe{}", "not_utf8"),
        (b"{not json", "not_json"),
        (b"[1, 2]", "bad_shape"),
        (b'"just a string"', "bad_shape"),
        (_req(v=2), "unsupported_version"),
        (_req(v="1"), "unsupported_version"),
        (_req(v=True), "unsupported_version"),
        (json.dumps({"type": "request", "id": "a", "question": "q"}).encode(), "unsupported_version"),
        (_req(question=7), "bad_shape"),
        (_req(id=""), "bad_shape"),
        (_req(id=5), "bad_shape"),
        (_req(stream="yes"), "bad_shape"),
        (_req(type="cancel"), "bad_shape"),
        (_req(extra_key=1), "bad_shape"),
        (_req(bundle="@1.0"), "bad_shape"),
        (_req(reply_to="replies/#"), "bad_shape"),
        (_req(question="   "), "empty_question"),
        (_req(question="x" * (protocol.MAX_QUESTION_CHARS + 1)), "question_too_long"),
        (_req(question="y" * (protocol.MAX_PAYLOAD_BYTES + 10)), "payload_too_large"),
    ],
)
def test_decode_request_refuses_bad_input_with_its_code(payload: bytes, code: str) -> None:
    with pytest.raises(errors.FieldpackError) as info:
        protocol.decode_request(payload)
    err = info.value
    assert err.code == code
    assert err.hint, "every wire error says how to fix it"
    if code in ("empty_question", "question_too_long"):
        assert isinstance(err, errors.QueryError)
    else:
        assert isinstance(err, errors.ProtocolError)


def test_question_limit_is_configurable() -> None:
    protocol.decode_request(_req(question="x" * 10), max_question_chars=10)
    with pytest.raises(errors.QuestionTooLongError):
        protocol.decode_request(_req(question="x" * 11), max_question_chars=10)


def test_salvage_reply_route_recovers_what_it_can() -> None:
    assert protocol.salvage_reply_route(_req(question=3, reply_to="r/t")) == ("r/t", "r1")
    assert protocol.salvage_reply_route(_req(reply_to="r/#", id=9)) == (None, None)
    assert protocol.salvage_reply_route(b"\xff") == (None, None)
    assert protocol.salvage_reply_route(b"[]") == (None, None)


def test_bundle_references() -> None:
    assert protocol.bundle_matches("manuals", "manuals@1.2.0")
    assert protocol.bundle_matches("manuals@1.2.0", "manuals@1.2.0")
    assert not protocol.bundle_matches("manuals@1.3.0", "manuals@1.2.0")
    assert not protocol.bundle_matches("other", "manuals@1.2.0")
    assert protocol.parse_bundle_ref("m@2") == ("m", "2")


# --- replies -------------------------------------------------------------------------------------------------
def test_final_has_error_exactly_when_not_ok() -> None:
    body = protocol.ErrorBody(code="busy", reason="full", queue_depth=3)
    with pytest.raises(ValueError):
        protocol.Final(id="a", device="d", ok=True, error=body)
    with pytest.raises(ValueError):
        protocol.Final(id="a", device="d", ok=False)
    final = protocol.Final.failure("a", "d", body)
    again = protocol.decode_reply(final.encode())
    assert again == final
    assert json.loads(final.encode())["v"] == protocol.PROTOCOL_VERSION


def test_every_message_carries_the_version() -> None:
    messages = [
        protocol.Request(id="a", question="q"),
        protocol.Cancel(id="a"),
        protocol.Partial(id="a", seq=0, text="x"),
        protocol.Final.failure("a", "d", protocol.ErrorBody(code="x", reason="y")),
        protocol.Status(device="d", online=True),
        protocol.Metrics(device="d", ts=1.0, uptime_s=2.0),
    ]
    for message in messages:
        assert json.loads(message.encode())["v"] == 1, type(message).__name__


def test_error_bodies_map_back_to_the_error_hierarchy() -> None:
    err = protocol.ErrorBody.from_error(errors.EmptyQuestionError("empty", hint="ask"))
    assert (err.code, err.hint) == ("empty_question", "ask")
    assert isinstance(err.to_exception(), errors.EmptyQuestionError)
    not_json = protocol.ErrorBody(code="not_json", reason="r").to_exception()
    assert isinstance(not_json, errors.ProtocolError) and not_json.code == "not_json"
    busy = protocol.ErrorBody(code="busy", reason="full", hint="later").to_exception()
    assert isinstance(busy, errors.DeviceError) and busy.code == "busy"
    assert "Fix: later" in str(busy)


def test_stats_use_nearest_rank_percentiles() -> None:
    s = protocol.Stats.of([float(x) for x in range(1, 101)])
    assert (s.n, s.last, s.mean, s.p50, s.p95) == (100, 100.0, 50.5, 50.0, 95.0)
    assert protocol.Stats.of([]).p50 is None


def _protocol_keys() -> set[str]:
    """Every payload key the protocol defines (field names and aliases of its pydantic records) that is
    specific enough to spot in other code: multi-word keys (``reply_to``, ``queue_depth``, ...). The engine's
    ``AnswerTimings`` fields and ``Answer``'s are also in-process record fields (eval reports read them), so they
    are left out."""
    import dataclasses
    import inspect

    from pydantic import BaseModel

    from fieldpack.device.types import Answer

    keys: set[str] = set()
    timing_fields = set(protocol.AnswerTimings.model_fields) | {f.name for f in dataclasses.fields(Answer)}
    for obj in vars(protocol).values():
        if inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == protocol.__name__:
            for name, info in obj.model_fields.items():
                for key in {name, info.alias or name}:
                    if "_" in key and key not in timing_fields:
                        keys.add(key)
    return keys


def test_protocol_module_is_the_only_place_spelling_topics_and_keys() -> None:
    """No other product module writes the topic root or a protocol payload key as a string literal (checked on
    the AST: string constants, f-string parts included; names and keyword arguments do not count)."""
    import ast

    keys = _protocol_keys()
    assert {"reply_to", "queue_depth", "started_at"} <= keys and len(keys) >= 8, keys
    topic = re.compile(r"^fieldpack/v\d")
    offenders = []
    for folder in ("device", "fieldpack", "shared", "retrieval", "builder"):
        for py in sorted((REPO / folder).rglob("*.py")):
            if py == REPO / "shared" / "protocol.py":
                continue
            for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    if node.value in keys or topic.match(node.value):
                        offenders.append(f"{py.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not offenders, "\n".join(offenders)


def test_the_key_guard_catches_a_spelled_key(tmp_path: Path) -> None:
    """The guard above is not vacuous: a module spelling a protocol key is caught by the same AST walk."""
    import ast

    src = 'def f(msg):\n    return msg["queue_depth"], f"fieldpack/v1/{msg}"\n'
    found = [n.value for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Constant) and isinstance(n.value, str)
             and (n.value in _protocol_keys() or re.match(r"^fieldpack/v\d", n.value))]
    assert found == ["queue_depth", "fieldpack/v1/"]


# --- broker settings -----------------------------------------------------------------------------------------
def test_broker_urls() -> None:
    assert parse_broker_url("mqtt://broker.local:1883") == ("broker.local", 1883, False)
    assert parse_broker_url("mqtts://broker.local") == ("broker.local", None, True)
    assert parse_broker_url("broker.local:1884") == ("broker.local", 1884, False)
    for bad in ("http://x", "mqtt://", "mqtt://u:p@host", "mqtt://host:99999", "mqtt://host/path"):
        with pytest.raises(errors.UsageError):
            parse_broker_url(bad)


def test_settings_from_cli_options(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("hunter2\nignored\n")
    pw.chmod(0o600)
    s = BrokerSettings.from_options("mqtts://b", username="u", password_file=pw)
    assert (s.host, s.port, s.tls, s.username, s.password) == ("b", 8883, True, "u", "hunter2")
    assert "hunter2" not in repr(s)
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert BrokerSettings.from_options("mqtt://b", tls_ca=ca).tls  # a CA turns TLS on
    with pytest.raises(errors.UsageError, match="without --username"):
        BrokerSettings.from_options("mqtt://b", password_file=pw)
    with pytest.raises(errors.InputNotFoundError):
        BrokerSettings.from_options("mqtt://b", username="u", password_file=tmp_path / "missing")
    with pytest.raises(errors.UsageError, match="go together"):
        BrokerSettings.from_options("mqtt://b", tls_cert=ca)
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(errors.UsageError, match="empty"):
        BrokerSettings.from_options("mqtt://b", username="u", password_file=empty)


# --- job board -----------------------------------------------------------------------------------------------
def _job(rid: str, corr: bytes | None = None) -> Job:
    return Job(protocol.Request(id=rid, question="q"), ReplyRoute("t", corr, rid), received_at=0.0)


def test_job_board_bounds_dedupes_and_cancels() -> None:
    board = JobBoard(2)
    a, b, c = _job("a", b"A"), _job("b"), _job("c")
    assert board.admit(a) == ("queued", 1)
    assert board.admit(_job("a2", b"A")) == ("duplicate", 1)  # same correlation data
    assert board.admit(_job("a")) == ("duplicate", 1)  # same id
    assert board.admit(b) == ("queued", 2)
    assert board.admit(c) == ("busy", 2)
    assert board.take(0) is a and board.running is a and board.depth == 1
    assert board.cancel("zzz", None) == ("unknown", None)
    assert board.cancel("b", None) == ("dequeued", b) and b.cancel.is_set()
    assert board.cancel("ignored", b"A") == ("signalled", a) and a.cancel.is_set()
    board.finish(a)
    assert board.running is None and board.admit(_job("a", b"A"))[0] == "queued"  # id free again
    assert board.take(0) is not None and board.take(0.01) is None


def test_job_board_tells_every_change_of_queue_or_running_job() -> None:
    """The daemon republishes its retained status (queue_depth, busy) on each: finishing included."""
    seen: list[tuple[int, bool]] = []
    board = JobBoard(2, on_change=lambda: seen.append((board.depth, board.running is not None)))
    a, b = _job("a"), _job("b")
    board.admit(a)
    board.admit(b)
    board.admit(_job("b"))  # duplicate: nothing changed
    board.take(0)
    board.cancel("b", None)
    board.finish(a)
    assert board.take(0.01) is None and board.drain() == []  # nothing to take or drain: no change
    assert seen == [(1, False), (2, False), (1, True), (0, True), (0, False)]


def test_job_board_take_wakes_on_admit() -> None:
    board = JobBoard(1)
    got: list[Job | None] = []
    t = threading.Thread(target=lambda: got.append(board.take(10)))
    t.start()
    board.admit(_job("x"))
    t.join(10)
    assert got and got[0] is not None and got[0].request.id == "x"


def test_job_expiry() -> None:
    job = Job(protocol.Request(id="x", question="q"), ReplyRoute("t", None, "x"), received_at=100.0, expires_at=105.0)
    assert not job.expired(104.9) and job.expired(105.0)
    assert not _job("y").expired(1e12)


# --- reply publisher -----------------------------------------------------------------------------------------
class _RecordingClient:
    """Stands in for paho's client: records (topic, payload, qos, correlation) of each publish."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, int, bytes | None]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, properties: Any = None, retain: bool = False) -> Any:
        self.sent.append((topic, protocol.decode_reply(payload), qos, getattr(properties, "CorrelationData", None)))
        return SimpleNamespace(rc=mqtt.MQTT_ERR_SUCCESS)


def test_replier_merges_waiting_pieces_and_counts_partials_per_stream() -> None:
    client = _RecordingClient()
    replier = Replier(client, "dev", partial_qos=0)  # type: ignore[arg-type]
    a, b = ReplyRoute("r/a", b"A", "a"), ReplyRoute("r/b", None, "b")
    job_a, job_b = object(), object()
    for piece in ("x", "y", "z"):  # handed over before the thread runs: one merged message
        replier.partial(job_a, a, piece)
    replier.partial(job_b, b, "other")
    replier.partial(job_a, a, "!")
    done = protocol.Final(id="a", device="dev", ok=True, answer="xyz!")
    replier.final(a, done, stream=job_a)
    replier.error(b, protocol.ErrorBody(code="cancelled", reason="r"), stream=job_b)
    replier.start()
    replier.close()
    summary = [(t, type(m).__name__, getattr(m, "seq", None), getattr(m, "text", None), q, c) for t, m, q, c in client.sent]
    assert summary == [
        ("r/a", "Partial", 0, "xyz", 0, b"A"),
        ("r/b", "Partial", 0, "other", 0, None),
        ("r/a", "Partial", 1, "!", 0, b"A"),
        ("r/a", "Final", None, None, 1, b"A"),
        ("r/b", "Final", None, None, 1, None),
    ]
    assert client.sent[3][1].partials == 2 and client.sent[4][1].partials == 1


# --- systemd unit --------------------------------------------------------------------------------------------
def test_systemd_unit_restarts_on_failure_as_its_own_hardened_user(tmp_path: Path) -> None:
    unit = REPO / "scripts" / "fieldpack-serve.service"
    keys: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    assert keys["Restart"] == ["on-failure"] and "2" in keys["RestartPreventExitStatus"][0].split()
    assert keys["User"] == ["fieldpack"] and keys["NoNewPrivileges"] == ["yes"]
    assert keys["ProtectSystem"] == ["strict"] and keys["CapabilityBoundingSet"] == [""]
    assert keys["ExecStart"][0].split()[1:3] == ["serve", "--data-dir"]
    assert "FIELDPACK_MQTT_PASSWORD_FILE=%d/mqtt-password" in keys["Environment"]
    analyze = shutil.which("systemd-analyze")
    if analyze:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text())
        r = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60)
        problems = [l for l in (r.stdout + r.stderr).splitlines() if l.strip() and "is not executable" not in l]
        assert not problems, problems


def test_an_abstained_final_carries_the_gate_and_a_reader_without_it_ignores_it() -> None:
    """``gate`` is a minor addition to version 1: it round-trips, and a final from a device that predates it
    (no key) or one with a key this reader does not know still decodes."""
    import json

    gate = protocol.GateInfo(closest="pumps.md § Pump 3, lines 5-8", closest_cosine=0.12, threshold_cosine=0.42)
    final = protocol.Final(id="a", device="d", ok=True, answer="no", abstained=True, finish_reason="abstained",
                           gate=gate)
    assert protocol.decode_reply(final.encode()) == final
    older = json.loads(final.encode())
    del older["gate"]
    assert protocol.decode_reply(json.dumps(older).encode()).gate is None  # type: ignore[union-attr]
    newer = json.loads(final.encode())
    newer["gate"]["closest_page"] = "pumps.md"
    newer["added_later"] = 1
    assert protocol.decode_reply(json.dumps(newer).encode()).gate == gate  # type: ignore[union-attr]
