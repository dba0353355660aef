"""Run an MQTT daemon with the fake engine as its own process, for the Last Will test (which kills it).

    python -m tests.device.mqtt_daemon_script --broker mqtt://127.0.0.1:PORT --device-id D \
        --username U --password-file F

SIGTERM stops it cleanly (offline status published); SIGKILL leaves the Last Will to the broker.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
import signal
import threading

from fieldpack.device.mqtt import BrokerSettings, DaemonConfig, MqttDaemon
from tests.device.mqtt_fakes import FakeEngine, FakeProvider


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--username")
    parser.add_argument("--password-file", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = BrokerSettings.from_options(args.broker, username=args.username, password_file=args.password_file)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    daemon = MqttDaemon(DaemonConfig(args.device_id), FakeProvider(FakeEngine()), settings)
    daemon.run(stop)


if __name__ == "__main__":
    main()
