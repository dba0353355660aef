"""Requests admitted by the daemon: where to reply, and the bounded queue with its in-flight registry.

:class:`JobBoard` is the one piece of state the dispatcher thread (admits, cancels) and the worker thread
(takes, finishes) share; one lock guards it. "In flight" means waiting in the queue or being answered.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
import threading
from typing import TYPE_CHECKING, Callable, Literal

from fieldpack.shared import errors, protocol

if TYPE_CHECKING:
    from fieldpack.device.types import AnswerEngine

EngineTask = Callable[["AnswerEngine | None", "errors.FieldpackError | None"], None]
"""Work of an in-process client (the HTTP API): run on the worker thread with the engine, or with the error
when no engine can be loaded. It replies through its own channel and must not raise."""


@dataclass(frozen=True)
class ReplyRoute:
    """Where the replies of one request go.

    Attributes:
        topic: the MQTT v5 Response Topic, or the payload's ``reply_to`` (MQTT 3.1.1 clients).
        correlation: MQTT v5 Correlation Data to echo (opaque bytes), or ``None``.
        request_id: the request's ``id`` to echo in payloads, or ``None`` if it could not be read.
    """

    topic: str
    correlation: bytes | None
    request_id: str | None


@dataclass(eq=False)
class Job:
    """One admitted request: an MQTT request, or a ``task`` of an in-process client sharing the same queue.

    Attributes:
        request: the checked MQTT request (``None`` for a task).
        route: where its replies go (for a task only ``request_id`` matters).
        received_at: ``clock.monotonic()`` when the daemon received it, seconds.
        expires_at: ``received_at`` + the MQTT v5 Message Expiry Interval, or ``None`` (never expires).
        cancel: set to stop the answer between tokens.
        task: run by the worker instead of answering ``request`` (see :data:`EngineTask`).
    """

    request: protocol.Request | None
    route: ReplyRoute
    received_at: float
    expires_at: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    task: EngineTask | None = None

    def expired(self, now: float) -> bool:
        """True when the Message Expiry Interval ran out at monotonic time ``now``."""
        return self.expires_at is not None and now >= self.expires_at


Admission = Literal["queued", "duplicate", "busy"]
CancelOutcome = Literal["dequeued", "signalled", "unknown"]


class JobBoard:
    """A FIFO of at most ``capacity`` waiting jobs plus the one being answered, indexed by request id and by
    correlation data for duplicate detection and cancellation.

    Args:
        capacity: waiting jobs allowed (the running one not counted), >= 1.
        on_change: called (outside the lock) after the waiting jobs or the running one changed: admitted,
            taken, finished, cancelled, drained (the daemon republishes its status: ``queue_depth``, ``busy``).
    """

    def __init__(self, capacity: int, on_change: Callable[[], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"queue capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._on_change = on_change or (lambda: None)
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._by_id: dict[str, Job] = {}
        self._by_correlation: dict[bytes, Job] = {}

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the one being answered)."""
        with self._cond:
            return len(self._waiting)

    @property
    def running(self) -> Job | None:
        """The job being answered, or ``None``."""
        with self._cond:
            return self._running

    def admit(self, job: Job) -> tuple[Admission, int]:
        """Queue ``job`` unless its id or correlation data is in flight (``"duplicate"``) or the queue is full
        (``"busy"``). Returns the outcome and the queue depth after it."""
        with self._cond:
            if self._find(job.route.request_id, job.route.correlation) is not None:
                return "duplicate", len(self._waiting)
            if len(self._waiting) >= self.capacity:
                return "busy", len(self._waiting)
            self._waiting.append(job)
            self._index(job)
            self._cond.notify()
            depth = len(self._waiting)
        self._on_change()
        return "queued", depth

    def take(self, timeout_s: float) -> Job | None:
        """Next waiting job, now marked running; ``None`` after ``timeout_s`` seconds with nothing queued."""
        with self._cond:
            if not self._waiting:
                self._cond.wait(timeout_s)
            if not self._waiting:
                return None
            self._running = job = self._waiting.popleft()
        self._on_change()
        return job

    def finish(self, job: Job) -> None:
        """Forget ``job`` (answered, failed, expired); its id may be used again."""
        with self._cond:
            if self._running is job:
                self._running = None
            self._unindex(job)
        self._on_change()

    def cancel(self, request_id: str, correlation: bytes | None) -> tuple[CancelOutcome, Job | None]:
        """Cancel the job in flight with this correlation data (if given and known) or this request id: a
        waiting one is removed (``"dequeued"``: the caller replies), the running one gets its ``cancel`` event
        set (``"signalled"``: the worker replies)."""
        with self._cond:
            job = self._find(request_id, correlation)
            if job is None:
                return "unknown", None
            if job is self._running:
                job.cancel.set()
                return "signalled", job
            self._waiting.remove(job)
            self._unindex(job)
            job.cancel.set()
        self._on_change()
        return "dequeued", job

    def drain(self) -> list[Job]:
        """Remove and return every waiting job (shutdown)."""
        with self._cond:
            jobs = list(self._waiting)
            self._waiting.clear()
            for job in jobs:
                self._unindex(job)
        if jobs:
            self._on_change()
        return jobs

    def _find(self, request_id: str | None, correlation: bytes | None) -> Job | None:
        if correlation is not None and correlation in self._by_correlation:
            return self._by_correlation[correlation]
        if request_id is not None:
            return self._by_id.get(request_id)
        return None

    def _index(self, job: Job) -> None:
        if job.route.request_id is not None:
            self._by_id[job.route.request_id] = job
        if job.route.correlation is not None:
            self._by_correlation[job.route.correlation] = job

    def _unindex(self, job: Job) -> None:
        if job.route.request_id is not None and self._by_id.get(job.route.request_id) is job:
            del self._by_id[job.route.request_id]
        if job.route.correlation is not None and self._by_correlation.get(job.route.correlation) is job:
            del self._by_correlation[job.route.correlation]
