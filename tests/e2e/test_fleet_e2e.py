"""A real fleet rollout: `fieldpack serve` processes (real runtime, llama.cpp, ONNX embedder, sqlite-vec) in a
group, `fieldpack fleet push` of a real built bundle, the real slot check and the real post-switch smoke
question; then `fleet status` and an answer from the new bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path
import signal
import subprocess
import sys

import pytest

from fieldpack.device.fleet.pusher import FleetView
from fieldpack.device.mqtt import Requester
from tests.conftest import REPO, run_cli
from tests.device.fleet_harness import wait_online
from tests.mqtt_broker import MosquittoBroker, have_mosquitto

pytestmark = [
    pytest.mark.mqtt,
    pytest.mark.slow,
    pytest.mark.skipif(not have_mosquitto(), reason="needs mosquitto and mosquitto_passwd (apt install mosquitto)"),
]


def test_fleet_push_of_a_real_bundle_to_serving_devices(tmp_path: Path, e2e_keys: Path, bundle_v1: Path,
                                                        bundle_v2: Path) -> None:
    group, ids = "e2e", ["box-a", "box-b"]
    with MosquittoBroker(tmp_path / "mq") as broker:
        login = ["--broker", broker.url(), "--username", broker.username, "--password-file",
                 str(broker.password_file)]
        procs = []
        try:
            for device in ids:
                d = tmp_path / device
                assert run_cli("device", "init", "--data-dir", str(d), "--trust",
                               str(e2e_keys / "builder.pub")).returncode == 0
                r = run_cli("install", str(bundle_v1), "--data-dir", str(d))
                assert r.returncode == 0, r.stderr
                log = open(tmp_path / f"{device}.log", "wb")
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "fieldpack", "serve", *login, "--device-id", device, "--group", group,
                     "--data-dir", str(d), "--threads", "1"],
                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")))
            view = FleetView(broker.settings(), group)
            view.connect()
            try:
                wait_online(view, ids, timeout_s=120)
            finally:
                view.close()
            r = run_cli("fleet", "push", str(bundle_v2), *login, "--group", group, "--canary", "50%",
                        "--health-timeout", "300", timeout=900)
            logs = "\n".join((tmp_path / f"{d}.log").read_text(errors="replace")[-2000:] for d in ids)
            assert r.returncode == 0, r.stderr + logs
            r = run_cli("fleet", "status", *login, "--group", group, "--json", timeout=60)
            status = json.loads(r.stdout)
            assert {d["device"]: (d["phase"], d["active"]) for d in status["devices"]} == {
                d: ("healthy", "riverside@1.1.0") for d in ids}
            with Requester(broker.settings()) as asker:
                final = asker.ask("How do I restart the pump?", device="box-b", timeout_s=300)
            assert final.ok and final.bundle == "riverside@1.1.0"
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
