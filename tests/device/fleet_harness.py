"""A fleet of device processes (``tests.device.fleet_daemon_script``) on one real Mosquitto, for the fleet tests
and the benchmark. Each device gets its own data dir, initialised with the test key and a first bundle
installed (so a failed rollout has something to keep)."""

from __future__ import annotations

import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from typing import Callable

from fieldpack.shared import fleet_protocol as fp

from fieldpack.device.fleet.pusher import FleetView
from fieldpack.device.install import install_bundle
from fieldpack.device.slots import init_data_dir, open_data_dir
from tests.mqtt_broker import MosquittoBroker

REPO = Path(__file__).resolve().parents[2]


class DeviceFleet:
    """Device processes ``<prefix>-0 .. -(n-1)`` in group ``group``.

    Args:
        broker: the running broker; ``root``: folder for data dirs and logs.
        trust: public key the devices trust; ``first_bundle``: installed in every data dir before start.
    """

    def __init__(self, broker: MosquittoBroker, root: Path, group: str, trust: Path, first_bundle: Path,
                 n: int, *, prefix: str = "dev") -> None:
        self.broker, self.root, self.group = broker, Path(root), group
        self.ids = [f"{prefix}-{i}" for i in range(n)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.extra: dict[str, list[str]] = {}
        for device in self.ids:
            dd = init_data_dir(self.data_dir(device), [trust])
            install_bundle(first_bundle, dd, check=None)

    def data_dir(self, device: str) -> Path:
        return self.root / device / "data"

    def active_label(self, device: str) -> str | None:
        state = open_data_dir(self.data_dir(device)).state()
        info = state.slots.get(state.active) if state.active else None
        return info.label if info else None

    def start(self, device: str, *extra: str) -> None:
        if extra:
            self.extra[device] = list(extra)
        log = open(self.root / device / "daemon.log", "ab")
        self.procs[device] = subprocess.Popen(
            [sys.executable, "-m", "tests.device.fleet_daemon_script", "--broker", self.broker.url(),
             "--username", self.broker.username, "--password-file", str(self.broker.password_file),
             "--device-id", device, "--group", self.group, "--data-dir", str(self.data_dir(device)),
             *self.extra.get(device, [])],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        log.close()

    def start_all(self) -> None:
        for device in self.ids:
            self.start(device)

    def kill(self, device: str) -> None:
        """SIGKILL (a power cut)."""
        proc = self.procs.pop(device)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()

    def log(self, device: str) -> str:
        try:
            return (self.root / device / "daemon.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def logs(self) -> str:
        return "\n".join(f"--- {d}\n{self.log(d)}" for d in self.ids)

    def __enter__(self) -> DeviceFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.05) -> None:
    """Poll ``cond`` until true; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def wait_online(view: FleetView, ids: list[str], timeout_s: float = 30.0) -> None:
    """Wait until every device's retained status says online and its agent published a state."""
    def ready() -> bool:
        with view.changed:
            return all(d in view.statuses and view.statuses[d].online and d in view.states for d in ids)
    wait_until(ready, timeout_s, f"devices {ids} online")


def state_of(view: FleetView, device: str) -> fp.DeviceRollout | None:
    with view.changed:
        return view.states.get(device)
