"""The engine host the HTTP API submits work to: the one worker thread that owns the engine.

Two hosts share one shape (:class:`EngineHost`):

* :class:`LocalEngineHost` -- HTTP alone: a :class:`~device.mqtt.jobs.JobBoard` and a
  :class:`~device.mqtt.worker.Worker` without an MQTT replier.
* :class:`MqttEngineHost` -- HTTP beside MQTT: the daemon's own board, worker and metrics, so one engine answers
  both, in one bounded queue, with one set of counters.

HTTP work enters the queue as a :class:`~device.mqtt.jobs.Job` carrying a ``task`` that runs on the worker
thread; a full queue refuses it at once (the API turns that into 503 + Retry-After).
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
import threading
import uuid
from typing import Protocol

from fieldpack.shared import errors

from fieldpack.device.mqtt.clock import Clock, SystemClock
from fieldpack.device.mqtt.daemon import MqttDaemon
from fieldpack.device.mqtt.jobs import EngineTask, Job, JobBoard, ReplyRoute
from fieldpack.device.mqtt.metrics import MetricsRecorder
from fieldpack.device.mqtt.worker import EngineInfo, Worker
from fieldpack.device.types import EngineProvider

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineState:
    """What ``/health`` and ``/v1/models`` report.

    Attributes:
        bundle: ``"name@version"`` of the loaded bundle, or ``None``.
        model: the engine's model label (``"<source> <arch> <file type>"``), or ``None``.
        loading: a bundle is being loaded or switched (``/health`` answers 503).
        error: why no engine can be had (e.g. nothing installed), or ``None``.
        chat: the loaded bundle has a chat template (``"grounding": false`` can run); ``True`` when unknown.
        stopping: the daemon is shutting down: a cancelled answer is then the shutdown's, not the client's.
        n_ctx: the loaded engine's context length (tokens), or ``None`` (none loaded, or it does not say).
        mqtt_connected: beside the MQTT daemon, whether it is connected to the broker now; ``None`` for HTTP alone.
    """

    bundle: str | None
    model: str | None
    loading: bool
    error: str | None
    chat: bool = True
    stopping: bool = False
    n_ctx: int | None = None
    mqtt_connected: bool | None = None


class EngineHost(Protocol):
    """The worker the HTTP API shares: its queue, its counters and the state of its engine."""

    @property
    def board(self) -> JobBoard: ...

    @property
    def metrics(self) -> MetricsRecorder: ...

    @property
    def clock(self) -> Clock: ...

    def state(self) -> EngineState: ...


def submit(host: EngineHost, task: EngineTask) -> Job | None:
    """Queue ``task`` on ``host``'s worker; the job (its ``cancel`` event stops generation), or ``None`` when
    the queue is full."""
    job = Job(request=None, route=ReplyRoute("http", None, f"http-{uuid.uuid4().hex}"),
              received_at=host.clock.monotonic(), task=task)
    outcome, _ = host.board.admit(job)
    return job if outcome == "queued" else None


def withdraw(host: EngineHost, job: Job) -> None:
    """The client went away: drop ``job`` from the queue, or stop its generation before the next token."""
    job.cancel.set()
    host.board.cancel(job.route.request_id or "", None)


def _loading(provider: EngineProvider) -> bool:
    return bool(getattr(provider, "loading", False))


class LocalEngineHost:
    """HTTP without a broker: one worker thread over a bounded queue.

    Args:
        provider: hands out the active bundle's engine (reloads after an install); closed by :meth:`stop`.
        queue_size: requests that may wait while one is answered (>= 1); one more is refused.
        device_id: the name in the metrics.
    """

    def __init__(self, provider: EngineProvider, *, queue_size: int = 8, device_id: str = "http",
                 clock: Clock | None = None) -> None:
        if queue_size < 1:
            raise errors.UsageError(f"queue size {queue_size} is below 1", hint="use --queue-size 1 or more")
        self._provider = provider
        self._clock = clock or SystemClock()
        self._board = JobBoard(queue_size)
        self._metrics = MetricsRecorder(device_id, self._clock)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._info: EngineInfo | None = None
        self._error: str | None = None
        self._worker = Worker(device_id=device_id, provider=provider, board=self._board, replier=None,
                              metrics=self._metrics, clock=self._clock, on_engine=self._engine_changed,
                              stopping=self._stopping)
        self._started = False

    @property
    def board(self) -> JobBoard:
        return self._board

    @property
    def metrics(self) -> MetricsRecorder:
        return self._metrics

    @property
    def clock(self) -> Clock:
        return self._clock

    def _engine_changed(self, info: EngineInfo | None, error: str | None) -> None:
        with self._lock:
            self._info, self._error = info, error

    def state(self) -> EngineState:
        with self._lock:
            info, error = self._info, self._error
        loading = _loading(self._provider) or (info is None and error is None)
        return EngineState(bundle=info.label if info else None, model=info.model if info else None,
                           loading=loading, error=error, chat=info.chat if info else True,
                           stopping=self._stopping.is_set(), n_ctx=info.n_ctx if info else None)

    def start(self) -> None:
        """Start the worker (it loads the engine first)."""
        self._started = True
        self._worker.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Refuse what waits, cancel what runs, join the worker, close the provider. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for job in self._board.drain():
            if job.task is not None:
                job.task(None, errors.ShuttingDownError("the device is shutting down",
                                                        hint="send the request again when it is back"))
        running = self._board.running
        if running is not None:
            running.cancel.set()
        if self._started and not self._worker.join(timeout_s):
            log.warning("worker still answering after %.0f s; leaving it", timeout_s)
        try:
            self._provider.close()
        except Exception:
            log.exception("engine provider failed to close")


class MqttEngineHost:
    """HTTP beside MQTT: the daemon's worker, queue and counters (start and stop the daemon yourself)."""

    def __init__(self, daemon: MqttDaemon, provider: EngineProvider) -> None:
        self._daemon = daemon
        self._provider = provider

    @property
    def board(self) -> JobBoard:
        return self._daemon.board

    @property
    def metrics(self) -> MetricsRecorder:
        return self._daemon.metrics

    @property
    def clock(self) -> Clock:
        return self._daemon.clock

    def state(self) -> EngineState:
        status = self._daemon.status()
        loading = _loading(self._provider) or (status.bundle is None and status.error is None)
        info = self._daemon.engine_info
        return EngineState(bundle=status.bundle, model=status.model, loading=loading, error=status.error,
                           chat=info.chat if info else True, stopping=self._daemon.stopping,
                           n_ctx=info.n_ctx if info else None, mqtt_connected=self._daemon.connected)
