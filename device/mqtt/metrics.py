"""Counters and latency summaries of the MQTT daemon, and the ``metrics.json`` file it keeps.

The daemon publishes :class:`shared.protocol.Metrics` (retained) on the device's metrics topic every
``metrics_interval_s`` and, when it has a data dir, writes the same JSON atomically to
``<data_dir>/metrics.json`` (:data:`METRICS_FILENAME`) for ``fieldpack status``: one JSON object whose keys
and an example are given by ``shared.protocol.Metrics``; read it with ``shared.protocol.decode_metrics``.
Summaries cover the last ``window`` answers (default 256); counters run since the daemon started.
"""

from __future__ import annotations

from collections import deque
import logging
import os
from pathlib import Path
import threading
from typing import Callable

from fieldpack.shared import errors, protocol

from fieldpack.device.mqtt.clock import Clock

log = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.json"

Counter = protocol.MetricsCounter


class MetricsRecorder:
    """Thread-safe counters plus rolling windows of per-answer figures.

    Args:
        device_id: put in every snapshot.
        clock: gives the snapshot timestamp (``clock.time()``, Unix seconds).
        window: number of most recent answers the summaries cover.
    """

    def __init__(self, device_id: str, clock: Clock, *, window: int = 256) -> None:
        self._device_id = device_id
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(protocol.METRICS_COUNTERS, 0)
        self._ttft_ms: deque[float] = deque(maxlen=window)
        self._tokens_per_s: deque[float] = deque(maxlen=window)
        self._retrieval_ms: deque[float] = deque(maxlen=window)
        self._queue_ms: deque[float] = deque(maxlen=window)
        self._total_ms: deque[float] = deque(maxlen=window)
        self._listeners: list[Callable[[float, float, bool], None]] = []

    def add_answer_listener(self, listener: Callable[[float, float, bool], None]) -> None:
        """Also call ``listener(ttft_ms, tokens_per_s, generated)`` on every :meth:`observe_answer` (the
        Prometheus histograms of the HTTP API)."""
        self._listeners.append(listener)

    def count(self, name: Counter, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        with self._lock:
            self._counts[name] += n

    def observe_answer(
        self, *, ttft_ms: float, tokens_per_s: float, retrieval_ms: float, queue_ms: float, total_ms: float,
        generated: bool,
    ) -> None:
        """Record one answered request (milliseconds; tokens per second). ``generated`` False (abstained, no
        generation ran) keeps the answer out of the time-to-first-token and tokens/s summaries."""
        with self._lock:
            if generated:
                self._ttft_ms.append(ttft_ms)
                self._tokens_per_s.append(tokens_per_s)
            self._retrieval_ms.append(retrieval_ms)
            self._queue_ms.append(queue_ms)
            self._total_ms.append(total_ms)
        for listener in self._listeners:
            listener(ttft_ms, tokens_per_s, generated)

    def value(self, name: Counter) -> int:
        """Current value of one counter."""
        with self._lock:
            return self._counts[name]

    def snapshot(self, *, uptime_s: float, queue_depth: int) -> protocol.Metrics:
        """Everything recorded so far as the wire message."""
        with self._lock:
            return protocol.Metrics(
                device=self._device_id,
                ts=self._clock.time(),
                uptime_s=round(uptime_s, 3),
                queue_depth=queue_depth,
                ttft_ms=protocol.Stats.of(list(self._ttft_ms)),
                tokens_per_s=protocol.Stats.of(list(self._tokens_per_s)),
                retrieval_ms=protocol.Stats.of(list(self._retrieval_ms)),
                queue_ms=protocol.Stats.of(list(self._queue_ms)),
                total_ms=protocol.Stats.of(list(self._total_ms)),
                **self._counts,  # type: ignore[arg-type]
            )


def write_metrics_file(data_dir: Path, metrics: protocol.Metrics) -> Path:
    """Write ``metrics`` to ``<data_dir>/metrics.json`` atomically (temp file in the same folder, fsync,
    rename, fsync of the folder) and return the path.

    Raises:
        OutputNotWritableError: the folder is missing or not writable.
    """
    path = Path(data_dir) / METRICS_FILENAME
    tmp = path.with_name(f".{METRICS_FILENAME}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(metrics.encode())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise errors.OutputNotWritableError(
            f"cannot write metrics to {path} ({exc})", hint="give a writable --data-dir"
        ) from exc
    return path
