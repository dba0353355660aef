"""`fieldpack mqtt ask` fails fast for an offline or never-seen device; `mqtt status` does not show an offline
device's queue/uptime as live; `mqtt forget` clears a decommissioned device. Real Mosquitto, installed command."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.cli.conftest import assert_one_line_error, run_cli
from tests.mqtt_broker import MosquittoBroker, have_mosquitto

pytestmark = [pytest.mark.mqtt, pytest.mark.skipif(not have_mosquitto(), reason="needs mosquitto")]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


def _login(b: MosquittoBroker) -> list[str]:
    return ["--broker", b.url(), "--username", b.username, "--password-file", str(b.password_file)]


def _stopped_device(broker: MosquittoBroker, tmp_path: Path) -> str:
    """A daemon that served, then stopped cleanly: its retained status says offline, with its bundle."""
    from fieldpack.device.mqtt import DaemonConfig, MqttDaemon
    from tests.device.mqtt_fakes import FakeEngine, FakeProvider

    device_id = f"gone-{uuid.uuid4().hex[:8]}"
    d = MqttDaemon(DaemonConfig(device_id, data_dir=tmp_path), FakeProvider(FakeEngine(label="pumps@2.1.0")),
                   broker.settings())
    d.start()
    assert d.wait_ready(10)
    r = run_cli("mqtt", "ask", "warm up", "--device", device_id, *_login(broker))  # loads the engine: bundle known
    assert r.returncode == 0, r.stderr
    d.stop()
    return device_id


def test_never_seen_device_fails_fast(broker: MosquittoBroker) -> None:
    r = run_cli("mqtt", "ask", "q", "--device", f"nobody-{uuid.uuid4().hex[:6]}", "--timeout", "600", *_login(broker))
    assert_one_line_error(r, 6, "never published a status", "--wait")


def test_unknown_or_offline_group_fails_fast(broker: MosquittoBroker, tmp_path: Path) -> None:
    """A group request used to wait the whole --timeout (120 s) when no device serves the group."""
    r = run_cli("mqtt", "ask", "q", "--group", f"nogroup-{uuid.uuid4().hex[:6]}", "--timeout", "600",
                *_login(broker), timeout=60)
    assert_one_line_error(r, 6, "no device on", "serves group", "--wait")
    from fieldpack.device.mqtt import DaemonConfig, MqttDaemon
    from tests.device.mqtt_fakes import FakeEngine, FakeProvider

    group = f"line-{uuid.uuid4().hex[:6]}"
    d = MqttDaemon(DaemonConfig(f"member-{uuid.uuid4().hex[:6]}", groups=(group,), data_dir=tmp_path),
                   FakeProvider(FakeEngine(label="pumps@2.1.0")), broker.settings())
    d.start()
    try:
        assert d.wait_ready(10)
        r = run_cli("mqtt", "ask", "warm up", "--group", group, *_login(broker), timeout=120)
        assert r.returncode == 0, r.stderr  # a live member answers
    finally:
        d.stop()
    r = run_cli("mqtt", "ask", "q", "--group", group, "--timeout", "600", *_login(broker), timeout=60)
    assert_one_line_error(r, 6, f"every device of group {group} is offline", "--wait")


def test_offline_device_fails_fast_and_status_is_not_live(broker: MosquittoBroker, tmp_path: Path) -> None:
    device_id = _stopped_device(broker, tmp_path)
    r = run_cli("mqtt", "ask", "q", "--device", device_id, "--timeout", "600", *_login(broker))
    line = assert_one_line_error(r, 6, f"device {device_id} is offline", "last status 20", "--wait")
    assert "pumps@2.1.0" in line
    r = run_cli("mqtt", "ask", "q", "--device", device_id, "--timeout", "1", "--wait", *_login(broker))
    assert_one_line_error(r, 6, "no reply")  # --wait sends anyway and waits for the timeout
    r = run_cli("mqtt", "status", *_login(broker))
    (row,) = [ln for ln in r.stdout.splitlines() if device_id in ln]
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[1] == "NO" and cells[5] == "-" and cells[6] == "-", row  # queue, uptime not shown as live


def test_forget_a_decommissioned_device(broker: MosquittoBroker, tmp_path: Path) -> None:
    device_id = _stopped_device(broker, tmp_path)
    r = run_cli("mqtt", "forget", device_id, *_login(broker))
    assert r.returncode == 0 and f"forgot {device_id}" in r.stdout, r.stderr
    rows = json.loads(run_cli("mqtt", "status", "--json", *_login(broker)).stdout)
    assert device_id not in {x["status"]["device"] for x in rows}
    assert_one_line_error(run_cli("mqtt", "forget", device_id, *_login(broker)), 2, "no retained status")


@pytest.mark.slow
def test_killed_daemon_leaves_a_will_that_says_what_it_ran(broker: MosquittoBroker, device_dir: Path) -> None:
    """`fieldpack serve` killed with SIGKILL: the broker publishes the Last Will, which carries the bundle."""
    import signal
    import subprocess
    import time

    from tests.cli.conftest import fieldpack_exe

    device_id = f"killed-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([fieldpack_exe(), "serve", "--device-id", device_id, "--data-dir", str(device_dir),
                             *_login(broker)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait for its online status
            rows = json.loads(run_cli("mqtt", "status", "--json", *_login(broker)).stdout)
            if any(r["status"]["device"] == device_id and r["status"]["online"] for r in rows):
                break
            time.sleep(1)
        else:
            pytest.fail("the daemon never came online: " + (proc.stderr.read() if proc.poll() is not None else ""))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 60  # the broker publishes the LWT once it sees the connection drop
    while True:
        rows = {r["status"]["device"]: r["status"] for r in json.loads(run_cli("mqtt", "status", "--json",
                                                                              *_login(broker)).stdout)}
        will = rows[device_id]
        if not will["online"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert will["online"] is False and will["bundle"] == "riverside@1.0.0" and will["ts"] is not None
    r = run_cli("mqtt", "ask", "q", "--device", device_id, *_login(broker))
    assert_one_line_error(r, 6, "is offline", "was running riverside@1.0.0")


@pytest.mark.parametrize("question", ["", "  \x01\x7f "], ids=["empty", "blank"])
def test_empty_question_is_refused_locally(broker: MosquittoBroker, tmp_path: Path, question: str) -> None:
    """As `fieldpack ask ""`: exit 7 and the fix before anything is sent (not the device's wire error)."""
    from fieldpack.device.mqtt import DaemonConfig, MqttDaemon
    from tests.device.mqtt_fakes import FakeEngine, FakeProvider

    device_id = f"asked-{uuid.uuid4().hex[:8]}"
    d = MqttDaemon(DaemonConfig(device_id, data_dir=tmp_path), FakeProvider(FakeEngine()), broker.settings())
    d.start()
    try:
        assert d.wait_ready(10)
        r = run_cli("mqtt", "ask", question, "--device", device_id, *_login(broker))
        requests = d.metrics.value("requests")
    finally:
        d.stop()
    line = assert_one_line_error(r, 7)
    assert line == ('error: the question is empty. Fix: ask in words, e.g. fieldpack mqtt ask "pump 3 alarm?" '
                    f"--device {device_id}")
    assert requests == 0  # the device never saw it
