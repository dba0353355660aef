"""Counters and latency summaries of the MQTT daemon, and the ``metrics.json`` file it keeps.

The daemon publishes :class:`shared.protocol.Metrics` (retained) on ``<root>/device/<id>/metrics`` every
``metrics_interval_s`` and, when it has a data dir, writes the same JSON atomically to
``<data_dir>/metrics.json`` (:data:`METRICS_FILENAME`) for ``fieldpack status``. Shape of that file (one
JSON object, keys of ``shared.protocol.Metrics``; read it with ``shared.protocol.decode_metrics``)::

    {"v": 1, "type": "metrics", "device": "fieldbox-7", "ts": 1732871234.5, "uptime_s": 3600.2,
     "requests": 120, "answered": 112, "errors": 3, "busy": 4, "expired": 1, "cancelled": 0,
     "reconnects": 1, "queue_depth": 0,
     "ttft_ms":      {"n": 112, "last": 210.0, "mean": 230.1, "p50": 220.0, "p95": 310.0},
     "tokens_per_s": {...}, "retrieval_ms": {...}, "queue_ms": {...}, "total_ms": {...}}

Summaries cover the last ``window`` answers (default 256); counters run since the daemon started.
"""

from __future__ import annotations

from collections import deque
import logging
import os
from pathlib import Path
import threading
from typing import Literal

from shared import errors, protocol

from device.mqtt.clock import Clock

log = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.json"

Counter = Literal["requests", "answered", "errors", "busy", "expired", "cancelled", "reconnects"]
_COUNTERS: tuple[Counter, ...] = ("requests", "answered", "errors", "busy", "expired", "cancelled", "reconnects")
_SERIES = ("ttft_ms", "tokens_per_s", "retrieval_ms", "queue_ms", "total_ms")


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
        self._counts: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._series: dict[str, deque[float]] = {name: deque(maxlen=window) for name in _SERIES}

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
                self._series["ttft_ms"].append(ttft_ms)
                self._series["tokens_per_s"].append(tokens_per_s)
            self._series["retrieval_ms"].append(retrieval_ms)
            self._series["queue_ms"].append(queue_ms)
            self._series["total_ms"].append(total_ms)

    def value(self, name: Counter) -> int:
        """Current value of one counter."""
        with self._lock:
            return self._counts[name]

    def snapshot(self, *, uptime_s: float, queue_depth: int) -> protocol.Metrics:
        """Everything recorded so far as the wire message."""
        with self._lock:
            counts = dict(self._counts)
            series = {name: protocol.Stats.of(list(values)) for name, values in self._series.items()}
        return protocol.Metrics(
            device=self._device_id,
            ts=self._clock.time(),
            uptime_s=round(uptime_s, 3),
            queue_depth=queue_depth,
            **counts,  # type: ignore[arg-type]
            **series,  # type: ignore[arg-type]
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
