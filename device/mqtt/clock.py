"""The clock the MQTT daemon reads, injected so tests can move time (request expiry, uptime)."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Two readings, both in seconds: ``monotonic()`` for durations and deadlines, ``time()`` (Unix epoch,
    the device's wall clock, possibly wrong on an offline device) only for timestamps shown to people."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    """The real clock: :func:`time.monotonic` and :func:`time.time`."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()
