"""``/metrics`` in the Prometheus text format (prometheus_client), from the counters the MQTT daemon keeps.

The request/answer/error counters are the worker's :class:`~device.mqtt.metrics.MetricsRecorder` ones, so MQTT
and HTTP traffic of one process add up in one place; queue depth and the active bundle are read at scrape
time; time to first token and decode rate are histograms fed by every answer (both transports). HTTP responses
are also counted per route and status code.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from fieldpack.shared import protocol

from fieldpack.device.http.engine import EngineHost

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Time-to-first-token buckets, seconds (a Pi answers in 0.2..10 s).
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
#: Decode-rate buckets, tokens per second.
TPS_BUCKETS = (1, 2, 5, 10, 20, 40, 80, 160, 320, 640)


class _EngineCollector(Collector):
    def __init__(self, host: EngineHost) -> None:
        self._host = host

    def collect(self) -> Iterator[Metric]:
        m = self._host.metrics
        for name in protocol.METRICS_COUNTERS:
            fam = CounterMetricFamily(f"fieldpack_{name}", f"{name} since start (MQTT and HTTP)")
            fam.add_metric([], float(m.value(name)))
            yield fam
        board = self._host.board
        depth = GaugeMetricFamily("fieldpack_queue_depth", "requests waiting for the engine")
        depth.add_metric([], float(board.depth))
        yield depth
        cap = GaugeMetricFamily("fieldpack_queue_capacity", "requests that may wait")
        cap.add_metric([], float(board.capacity))
        yield cap
        busy = GaugeMetricFamily("fieldpack_engine_busy", "1 while the engine is answering")
        busy.add_metric([], 1.0 if board.running is not None else 0.0)
        yield busy
        state = self._host.state()
        info = InfoMetricFamily("fieldpack_bundle", "the active bundle")
        info.add_metric([], {"bundle": state.bundle or "", "model": state.model or "",
                             "loading": str(state.loading).lower()})
        yield info


class PromMetrics:
    """One registry per server: the engine collector, answer histograms and per-route response counters."""

    def __init__(self, host: EngineHost) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(host))
        self.ttft = Histogram("fieldpack_time_to_first_token_seconds", "time to the first answer token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.tps = Histogram("fieldpack_decode_tokens_per_second", "decode rate of an answer",
                             buckets=TPS_BUCKETS, registry=self.registry)
        self.responses = Counter("fieldpack_http_responses", "HTTP responses by route and status",
                                 ["route", "status"], registry=self.registry)
        host.metrics.add_answer_listener(self._on_answer)

    def _on_answer(self, ttft_ms: float, tokens_per_s: float, generated: bool) -> None:
        if generated:
            self.ttft.observe(ttft_ms / 1e3)
            self.tps.observe(tokens_per_s)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)

    def response_hook(self) -> Callable[[str, int], None]:
        return lambda route, status: self.responses.labels(route, str(status)).inc()
