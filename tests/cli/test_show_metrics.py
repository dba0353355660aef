"""`fieldpack status` shows the MQTT daemon's metrics.json in words (a trial saw "v 1, type metrics, ts 1796...")."""

from __future__ import annotations

from fieldpack.cli.show import metrics_lines
from fieldpack.shared import protocol


def test_metrics_in_words() -> None:
    m = protocol.Metrics(device="fieldbox-7", ts=1000.0, uptime_s=3 * 3600.0, requests=12, answered=10, errors=1,
                         busy=1, queue_depth=2, ttft_ms=protocol.Stats.of([200.0, 220.0, 400.0]),
                         tokens_per_s=protocol.Stats.of([38.0, 40.0, 41.0])).model_dump(mode="json")
    lines = metrics_lines(m, now=1042.0)
    assert lines[0] == "daemon fieldbox-7: written 42 s ago, up 3.0 h"
    assert lines[1] == "  12 requests, 10 answered, 1 errors, 1 busy, 0 expired, 0 cancelled, 0 reconnects, 2 queued"
    assert lines[2] == "  last 3 answers: first token p50 220 / p95 400 ms, decode p50 40 / p95 41 tok/s"
    assert not any("type" in ln or "'v'" in ln or "1000.0" in ln for ln in lines)


def test_metrics_before_any_answer() -> None:
    m = protocol.Metrics(device="fieldbox-7", ts=0.0, uptime_s=5.0).model_dump(mode="json")
    assert metrics_lines(m, now=10.0) == ["daemon fieldbox-7: never written, up 5 s",
                                          "  0 requests, 0 answered, 0 errors, 0 busy, 0 expired, 0 cancelled, "
                                          "0 reconnects, 0 queued"]


def test_a_file_that_is_no_metrics_message_is_shown_as_it_is() -> None:
    assert metrics_lines({"x": 1}) == ["daemon metrics: {'x': 1}"]
