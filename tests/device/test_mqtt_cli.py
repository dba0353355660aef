"""``fieldpack serve`` / ``fieldpack mqtt ask`` / ``fieldpack mqtt status`` against a real Mosquitto."""

from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import subprocess
import sys
from typing import Iterator
import uuid

import pytest
import typer
from typer.testing import CliRunner

from fieldpack.shared import errors, protocol

from fieldpack.device.mqtt import DaemonConfig, MqttDaemon
from fieldpack.cli.mqtt import register
from tests.device.mqtt_fakes import FakeEngine, FakeProvider, fake_tokens
from tests.device.mqtt_probe import Probe
from tests.mqtt_broker import MosquittoBroker, have_mosquitto

pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.skipif(not have_mosquitto(), reason="needs mosquitto and mosquitto_passwd (apt install mosquitto)"),
]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


@pytest.fixture
def daemon(broker: MosquittoBroker, tmp_path: Path) -> Iterator[MqttDaemon]:
    d = MqttDaemon(
        DaemonConfig(f"cli-{uuid.uuid4().hex[:8]}", groups=("cli-group",), data_dir=tmp_path, metrics_interval_s=0.25),
        FakeProvider(FakeEngine(n_tokens=5)),
        broker.settings(),
    )
    d.start()
    assert d.wait_ready(10)
    yield d
    d.stop()


@pytest.fixture
def cli() -> typer.Typer:
    root = typer.Typer()

    @root.callback()
    def _root() -> None:  # a group, as fieldpack's root app is
        pass

    register(root)
    return root


def _login(broker: MosquittoBroker, *, tls: bool = False) -> list[str]:
    args = ["--broker", broker.url(tls=tls), "--username", broker.username, "--password-file", str(broker.password_file)]
    return args + (["--tls-ca", str(broker.tls.ca_cert)] if tls else [])


def test_ask_streams_the_answer_and_prints_citations(cli: typer.Typer, broker: MosquittoBroker, daemon: MqttDaemon) -> None:
    result = CliRunner().invoke(
        cli, ["mqtt", "ask", "Where is valve V3?", "--device", daemon.config.device_id, *_login(broker, tls=True)]
    )
    assert result.exit_code == 0, result.output
    assert "".join(fake_tokens("Where is valve V3?", 5)) in result.output
    assert "[1] pumps.md § Pump 3 > Alarms, lines 10-24" in result.output


def test_ask_says_an_abstention_and_a_cut_answer(cli: typer.Typer, broker: MosquittoBroker, daemon: MqttDaemon) -> None:
    """An abstention printed "first token 0 ms, 0.0 tok/s" (a new-user trial); an answer cut at the bundle's
    max_tokens said nothing."""
    dev = daemon.config.device_id
    result = CliRunner().invoke(cli, ["mqtt", "ask", "!abstain please", "--device", dev, *_login(broker)])
    assert result.exit_code == 0, result.output
    assert "abstained without running the model" in result.output and "first token" not in result.output
    # the wire's gate record: what was closest, as `fieldpack ask` says it
    assert "[closest passage: pumps.md § Pump 3 > Alarms, lines 10-24, cosine 0.310; this bundle answers from " \
           "0.420." in result.output, result.output
    result = CliRunner().invoke(cli, ["mqtt", "ask", "!long please", "--device", dev, *_login(broker)])
    assert result.exit_code == 0 and "[cut at 5 tokens: the answer goes on]" in result.output, result.output


def test_ask_json_and_group(cli: typer.Typer, broker: MosquittoBroker, daemon: MqttDaemon) -> None:
    result = CliRunner().invoke(cli, ["mqtt", "ask", "q", "--group", "cli-group", "--json", *_login(broker)])
    assert result.exit_code == 0, result.output
    final = protocol.decode_reply(result.stdout.encode())
    assert isinstance(final, protocol.Final) and final.ok and final.device == daemon.config.device_id


def test_ask_error_reply_becomes_the_matching_error(cli: typer.Typer, broker: MosquittoBroker, daemon: MqttDaemon) -> None:
    result = CliRunner().invoke(
        cli, ["mqtt", "ask", "q", "--device", daemon.config.device_id, "--bundle", "nope", *_login(broker)]
    )
    assert isinstance(result.exception, errors.DeviceError) and result.exception.code == "unknown_bundle"
    result = CliRunner().invoke(cli, ["mqtt", "ask", "   ", "--device", daemon.config.device_id, *_login(broker)])
    assert isinstance(result.exception, errors.EmptyQuestionError)
    result = CliRunner().invoke(cli, ["mqtt", "ask", "q", *_login(broker)])
    assert isinstance(result.exception, errors.UsageError)


def test_status_lists_devices(cli: typer.Typer, broker: MosquittoBroker, daemon: MqttDaemon) -> None:
    result = CliRunner().invoke(cli, ["mqtt", "status", "--json", *_login(broker)])
    assert result.exit_code == 0, result.output
    rows = {r["status"]["device"]: r for r in json.loads(result.stdout)}
    mine = rows[daemon.config.device_id]["status"]
    assert mine["online"] and mine["bundle"] == "demo@1.0.0"
    result = CliRunner().invoke(cli, ["mqtt", "status", *_login(broker)], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and daemon.config.device_id in result.output


def test_serve_runs_the_real_provider_and_stops_on_sigterm(broker: MosquittoBroker, tmp_path: Path) -> None:
    """`fieldpack serve` as a process on a data dir with no bundle yet: it serves, answers `no_active_bundle`
    (exit 6 from `fieldpack mqtt ask`), shows the reason in its status, and stops cleanly on SIGTERM."""
    from fieldpack.device.slots import init_data_dir
    from fieldpack.shared.signing import generate_keypair

    _, pub = generate_keypair(tmp_path / "keys")
    data_dir = init_data_dir(tmp_path / "data", [pub]).root
    dev = f"serve-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, FIELDPACK_BROKER=broker.url(), FIELDPACK_MQTT_USERNAME=broker.username,
               FIELDPACK_MQTT_PASSWORD_FILE=str(broker.password_file))
    log_path = tmp_path / "serve.log"
    probe = Probe(broker.settings())
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fieldpack", "serve", "--device-id", dev, "--data-dir", str(data_dir)],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    try:
        probe.subscribe(protocol.status_topic(dev))
        status = probe.status(dev, timeout_s=60)
        while status.error is None:  # the first status may come before the provider was asked
            status = probe.status(dev, timeout_s=60)
        assert status.online and status.bundle is None and "no bundle is installed" in status.error
        ask = subprocess.run(
            [sys.executable, "-m", "fieldpack", "mqtt", "ask", "q", "--device", dev, "--timeout", "60"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
        assert ask.returncode == errors.NoActiveBundleError.exit_code, ask.stderr
        assert ask.stderr.startswith("error: no bundle is installed") and "Fix:" in ask.stderr
        assert len(ask.stderr.strip().splitlines()) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()
        assert (data_dir / "metrics.json").is_file()
        assert protocol.decode_metrics((data_dir / "metrics.json").read_bytes()).errors == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        probe.close()


def test_serve_refuses_bad_options_with_usage_errors(broker: MosquittoBroker, tmp_path: Path) -> None:
    root = typer.Typer()

    @root.callback()
    def _root() -> None:
        pass

    register(root)
    result = CliRunner().invoke(root, ["serve", "--broker", "http://x", "--device-id", "a", "--data-dir", str(tmp_path)])
    assert isinstance(result.exception, errors.UsageError) and "scheme" in str(result.exception)
    result = CliRunner().invoke(
        root, ["serve", "--broker", broker.url(), "--device-id", "a/b", "--data-dir", str(tmp_path)]
    )
    assert isinstance(result.exception, errors.UsageError) and "MQTT topic" in str(result.exception)
    result = CliRunner().invoke(root, ["serve", "--broker", broker.url(), "--device-id", "a", "--data-dir", str(tmp_path)])
    assert isinstance(result.exception, errors.NotInitializedError)
