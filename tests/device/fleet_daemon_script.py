"""A device for the fleet tests, as its own process: ``MqttDaemon`` + ``FleetAgent`` on a real data dir.

    python -m tests.device.fleet_daemon_script --broker mqtt://127.0.0.1:PORT --username U --password-file F \
        --device-id D --group G --data-dir DIR [--disk-free-bytes N]

The engine is the deterministic fake (no model), but it comes from the data dir's *active slot*: its label is
that slot's ``name@version``, and it is reloaded when the state switches, as the real provider does. Test
markers in a bundle's manifest ``recipe`` make the parts that need a real model fail on purpose:
``{"test_fail": "check"}`` fails the installer's slot check, ``{"test_fail": "health"}`` makes the engine of
that bundle fail to load (so the post-switch smoke question fails). ``--answer-delay`` puts that many seconds
between answer pieces; ``--disk-free-bytes`` replaces the free-disk measurement (a small disk). SIGTERM stops
cleanly; SIGKILL is a power cut.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
import signal
import threading

from fieldpack.shared import errors
from fieldpack.shared.manifest import Manifest, parse_manifest

from fieldpack.device.fleet import FleetAgent
from fieldpack.device.mqtt import BrokerSettings, DaemonConfig, MqttDaemon
from fieldpack.device.resources import ResourceProbe, available_ram_bytes
from fieldpack.device.slots import DataDir, open_data_dir
from tests.device.mqtt_fakes import FakeEngine


class SlotFakeProvider:
    """EngineProvider whose FakeEngine is labelled by the active slot's manifest (reloaded on a switch)."""

    def __init__(self, dd: DataDir, *, delay_s: float = 0.0) -> None:
        self.dd = dd
        self.delay_s = delay_s
        self._key: tuple[str, str] | None = None
        self._engine: FakeEngine | None = None

    def get(self) -> FakeEngine:
        state = self.dd.state()
        info = state.slots.get(state.active) if state.active else None
        if info is None:
            raise errors.NoActiveBundleError(f"no bundle is installed in {self.dd.root}", hint="install one")
        key = (state.active or "", info.manifest_sha256)
        if key != self._key or self._engine is None:
            manifest = self.dd.slot_manifest(state.active or "")
            if manifest.recipe.get("test_fail") == "health":
                self._key, self._engine = None, None
                raise errors.RuntimeLoadError(f"{manifest.label}: model cannot be loaded (test marker)",
                                              hint="rebuild the bundle")
            self._key, self._engine = key, FakeEngine(manifest.label, delay_s=self.delay_s)
        return self._engine

    def close(self) -> None:
        self._engine = None


def fake_check(slot: Path, manifest: Manifest) -> None:
    """The installer's slot check without a model: reads the unpacked manifest, honours the test marker."""
    unpacked = parse_manifest((slot / "manifest.json").read_bytes())
    if unpacked.recipe.get("test_fail") == "check":
        raise errors.SlotCheckError(f"{manifest.label}: smoke question failed (test marker)", hint="rebuild")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--username")
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--disk-free-bytes", type=int)
    parser.add_argument("--answer-delay", type=float, default=0.0, help="seconds between answer pieces")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = BrokerSettings.from_options(args.broker, username=args.username, password_file=args.password_file,
                                           reconnect_min_s=0.1, reconnect_max_s=1.0, keepalive_s=10)
    dd = open_data_dir(args.data_dir)
    probe = ResourceProbe(free_disk=lambda _p: args.disk_free_bytes, available_ram=available_ram_bytes) \
        if args.disk_free_bytes is not None else None
    agent = FleetAgent(args.device_id, args.group, settings, dd, check=fake_check, probe=probe)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    daemon = MqttDaemon(DaemonConfig(args.device_id, groups=(args.group,), data_dir=dd.root),
                        SlotFakeProvider(dd, delay_s=args.answer_delay), settings, plugins=[agent])
    daemon.run(stop)


if __name__ == "__main__":
    main()
