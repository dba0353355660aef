"""Output piped into a file (ssh, a journal, `| cat`) is full width: no ellipsis, no hard wrap."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.cli.conftest import run_cli
from tests.mqtt_broker import MosquittoBroker, have_mosquitto


def test_console_off_a_terminal_is_unbounded() -> None:
    """The one console factory: a 300-character line and a wide table come out whole when not on a TTY."""
    import io

    from rich.table import Table

    from fieldpack.cli.console import console

    c = console()
    assert not c.is_terminal  # pytest captures stdout
    c.file = io.StringIO()
    long = "x" * 300
    c.print(long)
    t = Table("device", "bundle")
    t.add_row("pumping-station-north-" + "y" * 80, "riverside-ops@1.0.0")
    c.print(t)
    out = c.file.getvalue()
    assert long + "\n" in out and "y" * 80 in out and "…" not in out
    assert "\x1b[" not in out  # no colour codes in files


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    if not have_mosquitto():
        pytest.skip("needs mosquitto and mosquitto_passwd (apt install mosquitto)")
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


@pytest.mark.mqtt
def test_mqtt_status_piped_keeps_every_column_whole(broker: MosquittoBroker, tmp_path: Path) -> None:
    from fieldpack.device.mqtt import DaemonConfig, MqttDaemon
    from tests.device.mqtt_fakes import FakeEngine, FakeProvider

    device_id = f"pumping-station-north-bar-1-{uuid.uuid4().hex}"
    label = "riverside-operations-handbook@2024.11.30-rc1"
    d = MqttDaemon(DaemonConfig(device_id, data_dir=tmp_path, metrics_interval_s=0.25),
                   FakeProvider(FakeEngine(label=label)), broker.settings())
    d.start()
    try:
        assert d.wait_ready(10)
        r = run_cli("mqtt", "status", "--broker", broker.url(), "--username", broker.username,
                    "--password-file", str(broker.password_file))
    finally:
        d.stop()
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if device_id in ln]
    assert len(rows) == 1, r.stdout  # not wrapped over several lines
    assert label in rows[0] and "…" not in r.stdout


def test_log_lines_off_a_terminal_are_whole() -> None:
    """A warning longer than 80 columns reaches a piped stderr as one line."""
    import subprocess
    import sys

    code = ("import logging; from fieldpack.cli import configure_logging; configure_logging(logging.INFO); "
            "logging.getLogger('fieldpack.x').warning('w' * 300)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stderr.splitlines() == ["WARNING fieldpack.x: " + "w" * 300]


@pytest.mark.slow
def test_chat_piped_is_full_width(device_dir: Path) -> None:
    """`printf 'QUESTION\\n/sources\\n/quit\\n' | fieldpack chat | cat`: the banner, the sources line and the
    /sources headings each stay on one line (no wrap at 80 columns), with no rule drawn across the unbounded width."""
    from fieldpack.device.chat import HELP

    r = run_cli("chat", "--data-dir", str(device_dir),
                stdin="The connection pool is exhausted. What should I do?\n/sources\n/quit\n", timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"fieldpack chat — riverside@1.0.0, offline. {HELP}"  # 110 characters, one line
    sources = [line for line in lines if "sources: [1] " in line]
    headings = [line[line.index("── ["):] for line in lines if "── [" in line]  # after a "you> " prompt
    assert len(sources) == 1 and headings
    for heading in headings:  # "── [n] <citation> ──", each citation whole and also in the sources line
        assert heading.endswith(" ──") and heading[3:-3] in sources[0]
    assert max(map(len, lines)) < 2000 and "\x1b[" not in r.stdout


def test_inspect_piped_shows_whole_hashes(bundle_v1: Path) -> None:
    """`fieldpack inspect B | cat`: each member's sha256 whole (64 hex digits), not cut to 16 with "…"."""
    import re

    r = run_cli("inspect", str(bundle_v1))
    assert r.returncode == 0, r.stderr
    assert "…" not in r.stdout and len(re.findall(r"\b[0-9a-f]{64}\b", r.stdout)) >= 4, r.stdout[-1500:]
