"""Fleet pieces without a broker: wire payloads, chunk sizing, chunk frames, the on-disk chunk store, option
parsing and the token bucket."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
import threading

import pytest

from fieldpack.shared import errors, fleet_protocol as fp

from fieldpack.device.fleet.pusher import TokenBucket, parse_rate, parse_share
from fieldpack.device.fleet.staging import ChunkStore


def _record(**kw: object) -> fp.DesiredBundle:
    fields: dict[str, object] = dict(rollout="abc123", group="north", name="pg-ops", version="1.1.0",
                                     sha256="a" * 64, size=1000, chunk_size=300, chunks=4, manifest="{}",
                                     manifest_sig="c2ln")
    fields.update(kw)
    return fp.DesiredBundle(**fields)  # type: ignore[arg-type]


def test_desired_record_round_trips_and_checks_its_chunk_count() -> None:
    rec = _record(targets=["a", "b"])
    back = fp.decode_desired(rec.encode())
    assert back == rec and back.label == "pg-ops@1.1.0" and back.chunk_len(3) == 100
    assert back.targets_device("a") and not back.targets_device("c") and _record().targets_device("c")
    bad = json.loads(rec.encode())
    bad["chunks"] = 5
    with pytest.raises(errors.ProtocolError, match="5 chunks"):
        fp.decode_desired(json.dumps(bad).encode())
    bad["v"] = 2
    with pytest.raises(errors.ProtocolError) as e:
        fp.decode_desired(json.dumps(bad).encode())
    assert e.value.code == "unsupported_version"
    with pytest.raises(errors.ProtocolError) as e:  # a device state is not a desired record
        fp.decode_desired(fp.DeviceRollout(device="d").encode())
    assert e.value.code == "bad_shape"


def test_device_state_and_chunk_request_round_trip() -> None:
    state = fp.DeviceRollout(device="d1", group="g", phase="rolled_back", reason="health check failed")
    assert fp.decode_device_state(state.encode()) == state and state.finished and state.failed
    assert not fp.DeviceRollout(device="d", phase="downloading").finished
    req = fp.ChunkRequest(rollout="r", device="d1", indices=[0, 5])
    assert fp.decode_chunk_request(req.encode()) == req
    with pytest.raises(errors.ProtocolError):
        fp.decode_chunk_request(json.dumps({"v": 1, "type": "chunk_request", "rollout": "r", "device": "d",
                                            "indices": []}).encode())


def test_chunk_size_stays_well_under_the_broker_packet_limit() -> None:
    assert fp.chunk_size_for(None) == fp.DEFAULT_CHUNK_BYTES
    assert fp.chunk_size_for(65536) == 16384
    assert fp.chunk_size_for(256 * 2**20) == fp.DEFAULT_CHUNK_BYTES
    with pytest.raises(errors.UsageError, match="maximum packet size"):
        fp.chunk_size_for(8000)


def test_chunk_frame_round_trip_and_damage() -> None:
    data = bytes(range(256)) * 4
    header = fp.ChunkHeader(rollout="r", index=2, offset=2048, size=len(data),
                            sha256=hashlib.sha256(data).hexdigest())
    frame = fp.encode_chunk(header, data)
    back, view = fp.decode_chunk(frame)
    assert back == header and bytes(view) == data and len(frame) - len(data) < 300
    with pytest.raises(errors.ProtocolError, match="FPC1"):
        fp.decode_chunk(b"XXXX" + frame[4:])
    with pytest.raises(errors.ProtocolError, match="carries"):
        fp.decode_chunk(frame[:-1])
    with pytest.raises(errors.ProtocolError, match="truncated"):
        fp.decode_chunk(frame[:20])


def _chunks(blob: bytes, size: int) -> list[bytes]:
    return [blob[i : i + size] for i in range(0, len(blob), size)]


def test_chunk_store_stages_out_of_order_and_resumes_after_reopen(tmp_path: Path) -> None:
    blob = hashlib.sha256(b"x").digest() * 40  # 1280 bytes, 5 chunks of 300 (last 80)
    parts = _chunks(blob, 300)
    store = ChunkStore(tmp_path / "s", len(blob), 300)
    assert store.missing() == [0, 1, 2, 3, 4]
    assert store.put(3, parts[3], hashlib.sha256(parts[3]).hexdigest())
    assert store.put(0, parts[0], hashlib.sha256(parts[0]).hexdigest())
    assert not store.put(0, parts[0], hashlib.sha256(parts[0]).hexdigest())  # a duplicate is ignored
    with pytest.raises(errors.IntegrityError, match="hashes to"):
        store.put(1, b"\x00" + parts[1][1:], hashlib.sha256(parts[1]).hexdigest())
    with pytest.raises(errors.IntegrityError, match="bytes"):
        store.put(4, parts[4] + b"!", hashlib.sha256(parts[4]).hexdigest())
    store.close()  # a restart
    store = ChunkStore(tmp_path / "s", len(blob), 300)
    assert store.have == {0, 3} and store.missing(limit=2) == [1, 2]
    for i in store.missing():
        store.put(i, parts[i], hashlib.sha256(parts[i]).hexdigest())
    assert store.complete and store.file_sha256() == hashlib.sha256(blob).hexdigest()
    store.discard()
    assert not (tmp_path / "s").exists()


def test_chunk_store_drops_logged_chunks_whose_data_did_not_reach_disk(tmp_path: Path) -> None:
    blob = bytes(range(200)) * 3
    parts = _chunks(blob, 200)
    store = ChunkStore(tmp_path / "s", len(blob), 200)
    for i, part in enumerate(parts):
        store.put(i, part, hashlib.sha256(part).hexdigest())
    store.close()
    with open(tmp_path / "s" / "bundle.part", "r+b") as fh:  # a power cut lost chunk 1's data, kept its log line
        fh.seek(250)
        fh.write(b"\xff")
    store = ChunkStore(tmp_path / "s", len(blob), 200)
    assert store.have == {0, 2} and store.missing() == [1]
    assert len((tmp_path / "s" / "chunks.log").read_text().splitlines()) == 2
    store.close()


def test_share_and_rate_options() -> None:
    assert parse_share("10%") == pytest.approx(0.1) and parse_share("0.5") == 0.5
    assert parse_rate("2MiB/s") == 2 * 2**20 and parse_rate("500KiB/s") == 500 * 1024 and parse_rate("1000") == 1000
    for bad in ("0%", "150%", "ten"):
        with pytest.raises(errors.UsageError):
            parse_share(bad)
    with pytest.raises(errors.UsageError, match="--canary 'abc' is not a share") as e:
        parse_share("abc", "--canary")
    assert "--canary 10%" in (e.value.hint or "")
    with pytest.raises(errors.UsageError, match="--wave '25' is not a share between 0 and 100%") as e:
        parse_share("25", "--wave")
    assert e.value.hint == "write e.g. --wave 25%"  # what a bare 25 most likely meant


def test_a_damaged_bundle_is_refused_before_anything_is_sent(tmp_path, keys) -> None:  # noqa: ANN001
    """A trial's bundle with one flipped byte went in full (531 MiB) to two canaries before they refused it."""
    from fieldpack.device.fleet.pusher import Rollout
    from fieldpack.device.mqtt.client import BrokerSettings
    from tests.shared.factories import make_bundle

    good = make_bundle(tmp_path / "ok.fpk", keys, name="pg-ops", version="1.1.0", seed=7, model_bytes=200_000)
    bad = tmp_path / "flipped.fpk"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the model member's data
    bad.write_bytes(bytes(data))
    settings = BrokerSettings(host="127.0.0.1", port=9)  # never contacted
    Rollout(good, "line-3", settings)
    with pytest.raises(errors.IntegrityError, match="does not match its sha256"):
        Rollout(bad, "line-3", settings)
    for bad in ("fast", "-1MiB/s"):
        with pytest.raises(errors.UsageError):
            parse_rate(bad)


def test_token_bucket_lets_a_burst_through_then_paces() -> None:
    bucket = TokenBucket(1000.0)
    stop = threading.Event()
    bucket.take(1000, stop)  # the one-second burst is there at once
    assert bucket._tokens == pytest.approx(0.0, abs=5)
    unlimited = TokenBucket(None)
    unlimited.take(10**9, stop)  # returns at once
    stop.set()
    bucket.take(10**6, stop)  # a stop ends the wait


def test_fleet_protocol_module_is_the_only_place_spelling_fleet_topics_and_keys() -> None:
    """No other product module writes a fleet topic piece or a multi-word fleet payload key as a string literal
    (AST string constants, f-string parts included; docstrings do not count)."""
    import ast
    import inspect

    from pydantic import BaseModel

    repo = Path(__file__).resolve().parents[2]
    keys = {name for obj in vars(fp).values()
            if inspect.isclass(obj) and issubclass(obj, BaseModel) and obj.__module__ == fp.__name__
            for name in obj.model_fields if "_" in name}
    assert {"manifest_sig", "chunk_size", "target_sha256", "health_timeout_s"} <= keys
    offenders = []
    for folder in ("device", "fieldpack", "shared"):
        for py in sorted((repo / folder).rglob("*.py")):
            if py == repo / "shared" / "fleet_protocol.py":
                continue
            tree = ast.parse(py.read_text(encoding="utf-8"))
            docs = {id(n.body[0].value) for n in ast.walk(tree)
                    if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                    and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                    if node.value in keys or "/fleet/" in node.value or node.value.startswith("fleet/"):
                        offenders.append(f"{py.relative_to(repo)}:{node.lineno}: {node.value!r}")
    assert not offenders, "\n".join(offenders)


def test_a_refused_broker_port_is_named_at_once() -> None:
    """A trial's `fleet push` to a refused port waited 10 s for `did not accept the connection`."""
    import socket
    import time

    from fieldpack.device.mqtt.client import BrokerSettings, probe_broker
    from tests.conftest import run_cli

    with socket.socket() as s:  # a port nothing listens on: bind, never listen
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(errors.DeviceError, match=f"refused the connection: nothing listens on port {port}"):
            probe_broker(BrokerSettings(host="127.0.0.1", port=port))
        assert time.monotonic() - t0 < 3
        r = run_cli("fleet", "status", "--broker", f"mqtt://127.0.0.1:{port}", "--group", "g", timeout=60)
    assert r.returncode == 6 and "refused the connection" in r.stderr and "\n" not in r.stderr.strip(), r.stderr
