"""Fleet rollout over MQTT: transfer throughput versus copying the file, and time to reach a fleet. Not a test:
prints figures, writes JSON.

1. Throughput: one device agent (``device.fleet.FleetAgent``, in this process, on its own data dir) fetches a
   ``--size-mib`` bundle in chunks over loopback Mosquitto; the transfer time runs from its first
   ``downloading`` report to ``verifying`` (every chunk hashed, written at its offset, logged, fsynced).
   Baseline in the same run: copying the same file with ``shutil.copyfile`` + fsync (median of 3). Printed as
   MiB/s each and their ratio.
2. Fleet: ``--devices`` agents (lightweight simulated devices: real agents, chunk staging and A/B install on
   their own data dirs, health check stubbed, no daemon, no model) in one group, one pusher, one broker;
   time from the push to every device ``healthy`` (all in one wave), and the per-device finish times.

The broker is a Mosquitto started here on free loopback ports (needs the ``mosquitto`` package).

    .venv/bin/python benchmarks/fleet_bench.py [--size-mib 64] [--devices 50] [--fleet-size-mib 2] \
        [--out bench/fleet_bench.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fieldpack.device.fleet import FleetAgent, Rollout  # noqa: E402
from fieldpack.device.install import install_bundle  # noqa: E402
from fieldpack.device.slots import init_data_dir  # noqa: E402
from fieldpack.shared import fleet_protocol as fp  # noqa: E402

MIB = 2**20


class TimedAgent(FleetAgent):
    """A FleetAgent that notes when it first reported each phase (``time.monotonic()``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.first: dict[str, float] = {}

    def _report(self, phase: fp.DevicePhase, record: Any, **kw: Any) -> None:  # type: ignore[override]
        if record is not None and record.targets_device(self.device_id):
            self.first.setdefault(phase, time.monotonic())
        super()._report(phase, record, **kw)


def _agents(broker: Any, root: Path, group: str, n: int, keys: Any, first: Path) -> list[TimedAgent]:
    agents = []
    for i in range(n):
        dd = init_data_dir(root / f"dev-{i}", [keys.public])
        install_bundle(first, dd, check=None)
        agent = TimedAgent(f"dev-{i}", group, broker.settings(), dd, check=None, health=lambda r, m: None)
        agent.start()
        agents.append(agent)
    return agents


def copy_baseline(src: Path, dst: Path) -> float:
    """Seconds to copy ``src`` to ``dst`` and fsync it (median of 3)."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        shutil.copyfile(src, dst)
        with open(dst, "rb+") as fh:
            os.fsync(fh.fileno())
        times.append(time.perf_counter() - t0)
        dst.unlink()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-mib", type=int, default=64, help="bundle size for the throughput run")
    p.add_argument("--devices", type=int, default=50, help="simulated devices in the fleet run")
    p.add_argument("--fleet-size-mib", type=float, default=2.0, help="bundle size for the fleet run")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "fleet_bench.json")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from tests.mqtt_broker import MosquittoBroker  # test helper: real Mosquitto on free loopback ports
    from tests.shared.factories import make_bundle, make_keys

    doc: dict[str, Any] = {"loadavg_1m": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp_name:
        tmp = Path(tmp_name)
        keys = make_keys(tmp / "keys")
        first = make_bundle(tmp / "v1.fpk", keys, name="bench", version="1.0.0", seed=1)
        big = make_bundle(tmp / "big.fpk", keys, name="bench", version="2.0.0", seed=2, model_bytes=a.size_mib * MIB)
        small = make_bundle(tmp / "small.fpk", keys, name="bench", version="3.0.0", seed=3,
                            model_bytes=int(a.fleet_size_mib * MIB))
        with MosquittoBroker(tmp / "mq") as broker:
            # 1. throughput, one device
            copy_s = copy_baseline(big, tmp / "copy.fpk")
            [agent] = _agents(broker, tmp / "one", "one", 1, keys, first)
            try:
                result = Rollout(big, "one", broker.settings(), canary=1.0).run(members=["dev-0"])
            finally:
                agent.stop()
            assert result.outcome == "done", result.states
            transfer_s = agent.first["verifying"] - agent.first["downloading"]
            size = big.stat().st_size
            doc["throughput"] = {
                "bundle_bytes": size, "copy_s": copy_s, "copy_mib_s": size / MIB / copy_s,
                "mqtt_transfer_s": transfer_s, "mqtt_mib_s": size / MIB / transfer_s,
                "ratio_mqtt_to_copy": copy_s / transfer_s, "push_total_s": result.seconds,
                "chunk_bytes": fp.DEFAULT_CHUNK_BYTES,
            }
            # 2. a fleet
            agents = _agents(broker, tmp / "fleet", "fleet", a.devices, keys, first)
            try:
                t0 = time.monotonic()
                result = Rollout(small, "fleet", broker.settings(), canary=1.0).run(
                    members=[x.device_id for x in agents])
            finally:
                for x in agents:
                    x.stop(2)
            healthy = [x.first["healthy"] - t0 for x in agents if "healthy" in x.first]
            doc["fleet"] = {
                "devices": a.devices, "bundle_bytes": small.stat().st_size, "outcome": result.outcome,
                "healthy": len(healthy), "time_to_all_healthy_s": max(healthy) if healthy else None,
                "first_healthy_s": min(healthy) if healthy else None,
                "median_healthy_s": statistics.median(healthy) if healthy else None,
                "bytes_sent": result.bytes_sent, "mib_s_aggregate": result.bytes_sent / MIB / result.seconds,
                "max_sends_per_chunk": max(result.sends.values()) if result.sends else 0,
            }
    t, f = doc["throughput"], doc["fleet"]
    print(f"throughput: {t['bundle_bytes'] / MIB:.0f} MiB bundle, copy {t['copy_mib_s']:.0f} MiB/s, "
          f"MQTT chunks {t['mqtt_mib_s']:.1f} MiB/s -> {t['ratio_mqtt_to_copy']:.3f} of copy speed "
          f"(push incl. install {t['push_total_s']:.1f} s)")
    print(f"fleet: {f['healthy']}/{f['devices']} devices healthy with a {f['bundle_bytes'] / MIB:.1f} MiB bundle in "
          f"{f['time_to_all_healthy_s']:.1f} s (first {f['first_healthy_s']:.1f} s, median "
          f"{f['median_healthy_s']:.1f} s); {f['mib_s_aggregate']:.1f} MiB/s aggregate")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
