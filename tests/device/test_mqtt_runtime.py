"""The MQTT daemon with the real engine: a real bundle (tiny model trained on demo/docs, built and installed by
the end-to-end fixtures of tests/e2e), real llama.cpp, real Mosquitto. Slow: builds the bundles on first run
(cached on disk afterwards)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator
import uuid

import pytest

from fieldpack.shared import protocol

from tests.mqtt_broker import MosquittoBroker, have_mosquitto

pytestmark = [
    pytest.mark.slow,
    pytest.mark.mqtt,
    pytest.mark.skipif(not have_mosquitto(), reason="needs mosquitto and mosquitto_passwd (apt install mosquitto)"),
]

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python")
runtime = pytest.importorskip("fieldpack.device.runtime", reason="needs device.runtime")
from tests.conftest import run_cli  # noqa: E402  (bundle fixtures: bundle_v1, bundle_v2, device_dir in tests/conftest.py)

QUESTION = "The connection pool is exhausted. What should I do?"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with MosquittoBroker(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


def test_real_engine_answers_over_mqtt_and_picks_up_a_new_bundle(
    broker: MosquittoBroker, device_dir: Path, bundle_v2: Path
) -> None:
    from fieldpack.device.mqtt import DaemonConfig, MqttDaemon, Requester
    from fieldpack.device.provider import ActiveBundleProvider
    from fieldpack.device.slots import open_data_dir

    dev = f"real-{uuid.uuid4().hex[:8]}"
    dd = open_data_dir(device_dir)
    daemon = MqttDaemon(DaemonConfig(dev, data_dir=dd.root), ActiveBundleProvider(dd), broker.settings())
    daemon.start()
    try:
        assert daemon.wait_ready(60)
        with Requester(broker.settings()) as requester:
            pending = requester.submit(QUESTION, device=dev)
            final = pending.wait(600)
            assert final is not None and final.ok, final
            assert final.bundle == "riverside@1.0.0"
            assert final.timings is not None and final.timings.retrieval_ms > 0
            # the question is answered by demo/docs/database.md: the reply must carry it, streamed in order
            assert not final.abstained, final
            assert final.sources and all(source.citation for source in final.sources)
            assert any(source.source == "database.md" for source in final.sources), final.sources
            assert pending.streamed_text == final.answer and final.partials == len(pending.partials) >= 1
            assert final.timings.completion_tokens > 0

            r = run_cli("install", str(bundle_v2), "--data-dir", str(device_dir))  # while the daemon serves
            assert r.returncode == 0, r.stderr
            final = requester.ask(QUESTION, device=dev, timeout_s=600)
            assert final.ok and final.bundle == "riverside@1.1.0"  # picked up between requests, no restart
            states = {s.status.device: s.status for s in requester.device_states()}
            assert states[dev].bundle == "riverside@1.1.0" and states[dev].online
    finally:
        daemon.stop()
    metrics = protocol.decode_metrics((dd.root / "metrics.json").read_bytes())
    assert metrics.answered == 2 and metrics.errors == 0
