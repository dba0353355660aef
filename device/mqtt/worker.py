"""The worker thread: owns the answering engine and answers one request at a time.

It is the one engine owner of the process: MQTT requests and the in-process tasks of the HTTP API
(:attr:`Job.task`) wait in the same bounded :class:`JobBoard` and run here in turn.

Between requests (never during one) it calls ``EngineProvider.get()``, which reloads the engine when a new
bundle was installed while serving; when idle it does so every :data:`IDLE_REFRESH_S` too, so that a bundle
switched from outside the daemon (``fieldpack install`` or ``rollback`` on the device) is loaded, and named in the
retained status, within seconds instead of at the next request (a trial's ``fleet status`` showed a rolled-back
device on the bundle it had left). For each job it drops the request if its Message Expiry ran out while
queued (no reply), checks the requested bundle, streams the answer as partial replies and ends with one
final reply; every failure becomes a final error reply and the worker carries on.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
import threading
from typing import Callable

from fieldpack.shared import errors, protocol

from fieldpack.device.mqtt.clock import Clock
from fieldpack.device.mqtt.jobs import Job, JobBoard
from fieldpack.device.mqtt.metrics import MetricsRecorder
from fieldpack.device.mqtt.replies import Replier
from fieldpack.device.types import Answer, AnswerEngine, EngineProvider

log = logging.getLogger(__name__)

#: Seconds between the idle worker's checks of the active bundle (``provider.get()``: one small file read when
#: nothing changed).
IDLE_REFRESH_S = 2.0


@dataclass(frozen=True)
class EngineInfo:
    """What the status message says about the active engine.

    Attributes:
        label: ``"name@version"`` (``AnswerEngine.bundle_label``).
        name, version: the two parts of ``label`` (``version`` ``None`` when the label has no ``@``).
        model: the engine's ``model_label`` attribute when it has one (e.g. the GGUF file name and quant
            type), else ``None``.
        chat: the engine's ``has_chat_template`` (it can run chat messages without retrieval); ``True`` when
            the engine does not say.
        n_ctx: the engine's context length (tokens), or ``None`` when it does not say.
    """

    label: str
    name: str
    version: str | None
    model: str | None
    chat: bool = True
    n_ctx: int | None = None

    @classmethod
    def of(cls, engine: AnswerEngine) -> EngineInfo:
        label = str(engine.bundle_label)
        name, sep, version = label.partition("@")
        model = getattr(engine, "model_label", None)
        n_ctx = getattr(engine, "n_ctx", None)
        return cls(label=label, name=name, version=version if sep else None, model=str(model) if model else None,
                   chat=bool(getattr(engine, "has_chat_template", True)),
                   n_ctx=int(n_ctx) if isinstance(n_ctx, int) else None)


EngineListener = Callable[[EngineInfo | None, str | None], None]
"""Called with ``(info, None)`` when the active engine changed, ``(None, error text)`` when none loads."""


def to_sources(answer: Answer) -> list[protocol.Source]:
    """The answer's hits as wire sources numbered ``[1]..[n]``."""
    return [
        protocol.Source(
            n=i + 1,
            source=hit.source,
            section=hit.section,
            page=hit.page,
            line_start=hit.line_start,
            line_end=hit.line_end,
            citation=hit.citation(),
            text=hit.text,
            score=float(hit.score),
        )
        for i, hit in enumerate(answer.sources)
    ]


class Worker:
    """Answers the jobs of a :class:`JobBoard` one at a time on its own thread.

    Args:
        device_id: put in final replies.
        provider: hands out the engine; called before each request.
        board: where jobs come from.
        replier: publishes MQTT replies; ``None`` when only tasks are served (HTTP without a broker).
        metrics: counters and timings.
        clock: ``monotonic()`` for expiry and queue wait.
        on_engine: told when the engine changes or fails to load (for the status message).
        stopping: set when the daemon shuts down; a job cancelled then is answered ``shutting_down``.
    """

    def __init__(
        self,
        *,
        device_id: str,
        provider: EngineProvider,
        board: JobBoard,
        replier: Replier | None,
        metrics: MetricsRecorder,
        clock: Clock,
        on_engine: EngineListener,
        stopping: threading.Event,
    ) -> None:
        self._device_id = device_id
        self._provider = provider
        self._board = board
        self._replier = replier
        self._metrics = metrics
        self._clock = clock
        self._on_engine = on_engine
        self._stopping = stopping
        self._engine_info: EngineInfo | None = None
        self._engine_error: str | None = None
        self._load_failed = False  # the last get() failed to load a bundle (not: none installed)
        self._failed_label: str | None = None  # the provider's active label when it did
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread (it loads the engine first so the status shows the bundle)."""
        self._thread = threading.Thread(target=self._run, name="fieldpack-mqtt-worker", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to end after ``stopping`` was set; True if it ended."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._engine()
        except errors.FieldpackError:
            pass  # reported through on_engine; requests get the error until a bundle is installed
        checked = self._clock.monotonic()
        while not self._stopping.is_set():
            job = self._board.take(timeout_s=0.2)
            if job is None:
                # after a failed load only once another bundle is active: retrying a broken one every few
                # seconds would reload its model each time (a request still retries it, as before)
                if self._clock.monotonic() - checked >= IDLE_REFRESH_S and (
                        not self._load_failed or self._active_label() != self._failed_label):
                    checked = self._clock.monotonic()
                    try:
                        self._engine()  # a bundle switched by install/rollback: load it now, say so in the status
                    except errors.FieldpackError:
                        pass  # reported through on_engine, as at start
                continue
            checked = self._clock.monotonic()
            try:
                self._serve(job)
            except Exception:  # the worker must survive anything a request brings
                log.exception("request %s failed unexpectedly", job.route.request_id)
                self._metrics.count("errors")
                if self._replier is None or job.request is None:
                    continue
                self._replier.error(
                    job.route,
                    protocol.ErrorBody(
                        code=protocol.ErrorCode.INTERNAL,
                        reason=f"device {self._device_id} failed while answering (see its log)",
                        hint="retry; report the device log if it persists",
                    ),
                    stream=job,
                )
            finally:
                self._board.finish(job)

    def _engine(self) -> tuple[AnswerEngine, EngineInfo]:
        """``provider.get()`` and what it is, telling the listener when the bundle changes or no engine can be had.

        Raises:
            FieldpackError: from the provider (e.g. ``NoActiveBundleError``); other exceptions become
                ``RuntimeLoadError``.
        """
        try:
            engine = self._provider.get()
        except errors.NoActiveBundleError as err:  # cheap to ask again: nothing is loaded
            self._load_failed = False
            self._set_engine(None, str(err))
            raise
        except errors.FieldpackError as err:
            self._load_failed, self._failed_label = True, self._active_label()
            self._set_engine(None, str(err))
            raise
        except Exception as exc:
            self._load_failed, self._failed_label = True, self._active_label()
            log.exception("engine provider failed")
            err = errors.RuntimeLoadError(
                f"the answering engine of device {self._device_id} cannot be loaded ({type(exc).__name__}: {exc})",
                hint="check the installed bundle with `fieldpack status`; reinstall it if needed",
            )
            self._set_engine(None, str(err))
            raise err from exc
        self._load_failed = False
        info = EngineInfo.of(engine)
        if info != self._engine_info or self._engine_error is not None:
            log.info("answering with bundle %s (model %s)", info.label, info.model or "?")
            self._set_engine(info, None)
        return engine, info

    def _active_label(self) -> str | None:
        """The provider's cheap ``active_label()`` (the data dir's state, no load) when it has one, else None."""
        label = getattr(self._provider, "active_label", None)
        try:
            return label() if callable(label) else None
        except Exception:  # noqa: BLE001 - a hint only; get() reports real problems
            return None

    def _set_engine(self, info: EngineInfo | None, error: str | None) -> None:
        if (info, error) == (self._engine_info, self._engine_error) and (info is not None or error is not None):
            return  # nothing new for the status (the idle check repeats the same failure every few seconds)
        self._engine_info, self._engine_error = info, error
        self._on_engine(info, error)

    def _run_task(self, job: Job) -> None:
        assert job.task is not None
        try:
            engine, _ = self._engine()
        except errors.FieldpackError as err:
            job.task(None, err)
            return
        job.task(engine, None)

    def _serve(self, job: Job) -> None:
        if job.task is not None:
            self._run_task(job)
            return
        route, request = job.route, job.request
        assert request is not None and self._replier is not None
        if job.expired(self._clock.monotonic()):
            self._drop_expired(job)
            return
        try:
            engine, info = self._engine()
        except errors.FieldpackError as err:
            if job.expired(self._clock.monotonic()):
                self._drop_expired(job)
                return
            self._replier.error(route, protocol.ErrorBody.from_error(err))
            self._metrics.count("errors")
            return
        if job.expired(self._clock.monotonic()):  # a reload may have taken a while
            self._drop_expired(job)
            return
        if request.bundle is not None and not protocol.bundle_matches(request.bundle, info.label):
            self._replier.error(
                route,
                protocol.ErrorBody(
                    code=protocol.ErrorCode.UNKNOWN_BUNDLE,
                    reason=f"device {self._device_id} has bundle {info.label}, not {request.bundle}",
                    hint="install that bundle on the device, ask another device, or leave `bundle` out",
                ),
            )
            self._metrics.count("errors")
            return

        queue_ms = (self._clock.monotonic() - job.received_at) * 1000.0

        def on_token(piece: str) -> None:
            if request.stream and piece:
                self._replier.partial(job, route, piece)  # a queue append; published on the replies thread

        log.debug("answering request %s (%d chars)", request.id, len(request.question))
        try:
            answer = engine.answer(request.question, on_token=on_token, cancel=job.cancel)
        except errors.FieldpackError as err:
            self._replier.error(route, protocol.ErrorBody.from_error(err), stream=job)
            self._metrics.count("errors")
            return
        if job.cancel.is_set() or answer.finish_reason == "cancelled":
            self._reply_cancelled(job)
            return
        t = answer.timings
        self._replier.final(
            route,
            protocol.Final(
                id=request.id,
                device=self._device_id,
                ok=True,
                answer=answer.text,
                abstained=answer.abstained,
                finish_reason=answer.finish_reason,
                bundle=answer.bundle,
                sources=to_sources(answer),
                timings=protocol.ReplyTimings(queue_ms=round(queue_ms, 3), **t.model_dump()),
                gate=answer.extra.get("gate"),
            ),
            stream=job,
        )
        self._metrics.count("answered")
        self._metrics.observe_answer(
            ttft_ms=t.time_to_first_token_ms,
            tokens_per_s=t.tokens_per_s,
            retrieval_ms=t.retrieval_ms,
            queue_ms=queue_ms,
            total_ms=t.total_ms,
            generated=not answer.abstained and t.completion_tokens > 0,
        )

    def _drop_expired(self, job: Job) -> None:
        log.info("request %s expired while queued; not answered", job.route.request_id)
        self._metrics.count("expired")

    def _reply_cancelled(self, job: Job) -> None:
        if self._stopping.is_set():
            body = protocol.ErrorBody(
                code=protocol.ErrorCode.SHUTTING_DOWN,
                reason=f"device {self._device_id} stopped while answering request {job.route.request_id}",
                hint="send the request again when the device is back online",
            )
            self._metrics.count("errors")
        else:
            body = protocol.ErrorBody(
                code=protocol.ErrorCode.CANCELLED,
                reason=f"request {job.route.request_id} was cancelled on device {self._device_id}",
            )
            self._metrics.count("cancelled")
        self._replier.error(job.route, body, stream=job)
