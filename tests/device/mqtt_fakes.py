"""Test doubles for the MQTT daemon tests: a deterministic AnswerEngine, a provider that can swap bundles or
fail, and a clock the test moves. Test-only: product code never imports this module."""

from __future__ import annotations

import threading
import time
from typing import Callable

from fieldpack.shared import errors
from fieldpack.shared.protocol import GateInfo

from fieldpack.device.types import Answer, Timings
from fieldpack.retrieval.types import Hit


class FakeClock:
    """``monotonic()`` is the real monotonic clock plus an offset the test adds with :meth:`advance`;
    ``time()`` likewise. Lets a test expire a queued request without sleeping."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += seconds

    def monotonic(self) -> float:
        with self._lock:
            return time.monotonic() + self._offset

    def time(self) -> float:
        with self._lock:
            return time.time() + self._offset


def fake_tokens(question: str, n_tokens: int) -> list[str]:
    """The pieces a :class:`FakeEngine` streams for ``question``: deterministic, ``n_tokens`` long."""
    words = question.split() or ["?"]
    return ["Answer:"] + [f" {words[i % len(words)]}#{i}" for i in range(n_tokens - 2)] + [" [1]"]


class FakeEngine:
    """Deterministic :class:`device.types.AnswerEngine`.

    Streams :func:`fake_tokens` with ``delay_s`` seconds between pieces, checks ``cancel`` between pieces and
    while held. ``hold_after``: after that many pieces it waits until :meth:`release` (``None``: never holds).
    ``busy_cpu_s``: burn this much CPU in pure Python before the first piece (holds the GIL in slices, as a
    slow prompt evaluation would). A question starting with ``!crash`` raises ``RuntimeError``, ``!query``
    raises ``QuestionTooLongError`` from inside the engine; ``!abstain`` abstains (no sources, no generation),
    ``!long`` ends with ``finish_reason="length"``.

    Attributes:
        started: set when an answer begins; ``calls`` lists the questions answered.
    """

    def __init__(
        self,
        label: str = "demo@1.0.0",
        *,
        n_tokens: int = 6,
        delay_s: float = 0.0,
        hold_after: int | None = None,
        busy_cpu_s: float = 0.0,
        model_label: str = "tiny-q4_k_m.gguf",
    ) -> None:
        self._label = label
        self.n_tokens = n_tokens
        self.delay_s = delay_s
        self.hold_after = hold_after
        self.busy_cpu_s = busy_cpu_s
        self.model_label = model_label
        self.started = threading.Event()
        self._released = threading.Event()
        self.calls: list[str] = []
        self.closed = False

    @property
    def bundle_label(self) -> str:
        return self._label

    def release(self) -> None:
        """Let the held answer go on; later answers no longer hold (until then every answer holds)."""
        self._released.set()

    def answer(
        self,
        question: str,
        *,
        on_token: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Answer:
        self.calls.append(question)
        self.started.set()
        if question.startswith("!crash"):
            raise RuntimeError("fake engine crashed")
        if question.startswith("!query"):
            raise errors.QuestionTooLongError("question is 9999 tokens, more than fit", hint="ask less")
        t0 = time.perf_counter()
        if question.startswith("!abstain"):
            return Answer(question=question.strip(), text="The documents do not answer this.", sources=[],
                          abstained=True, timings=Timings(retrieval_ms=1.5, total_ms=1.5), bundle=self._label,
                          finish_reason="abstained", extra={"gate": GateInfo(
                              closest="pumps.md § Pump 3 > Alarms, lines 10-24", closest_cosine=0.31,
                              threshold_cosine=0.42)})
        if self.busy_cpu_s:
            end = time.process_time() + self.busy_cpu_s
            x = 0
            while time.process_time() < end:
                x += 1
        pieces = fake_tokens(question, self.n_tokens)
        sent: list[str] = []
        first_ms = 0.0
        for i, piece in enumerate(pieces):
            if self.hold_after is not None and i == self.hold_after:
                while not self._released.wait(0.01):
                    if cancel is not None and cancel.is_set():
                        break
            if cancel is not None and cancel.is_set():
                return self._answer(question, sent, "cancelled", t0, first_ms)
            if on_token is not None:
                on_token(piece)
            if i == 0:
                first_ms = (time.perf_counter() - t0) * 1000
            sent.append(piece)
            if self.delay_s:
                time.sleep(self.delay_s)
        return self._answer(question, sent, "length" if question.startswith("!long") else "stop", t0, first_ms)

    def _answer(self, question: str, pieces: list[str], finish: str, t0: float, first_ms: float) -> Answer:
        total_ms = (time.perf_counter() - t0) * 1000
        hit = Hit(
            chunk_id=1, source="pumps.md", section="Pump 3 > Alarms", page=None, line_start=10, line_end=24,
            text="If pump 3 alarms, close valve V3 first.", score=0.032, vector_rank=1, bm25_rank=1,
        )
        return Answer(
            question=question.strip(),
            text="".join(pieces),
            sources=[hit],
            abstained=False,
            timings=Timings(
                retrieval_ms=1.5, prompt_tokens=42, prompt_eval_ms=3.0, time_to_first_token_ms=first_ms,
                completion_tokens=len(pieces), decode_ms=total_ms,
                tokens_per_s=len(pieces) / max(total_ms / 1000, 1e-6), total_ms=total_ms,
            ),
            bundle=self._label,
            finish_reason=finish,
        )

    def close(self) -> None:
        self.closed = True


class FakeProvider:
    """:class:`device.types.EngineProvider` over a :class:`FakeEngine`; :meth:`install` swaps the engine the
    next ``get()`` returns (as a bundle installed while serving), ``fail`` makes ``get()`` raise."""

    def __init__(self, engine: FakeEngine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self.fail: errors.FieldpackError | None = None
        self.gets = 0
        self.closed = False

    @property
    def engine(self) -> FakeEngine:
        return self._engine

    def install(self, engine: FakeEngine) -> None:
        with self._lock:
            self._engine = engine

    def get(self) -> FakeEngine:
        with self._lock:
            self.gets += 1
            if self.fail is not None:
                raise self.fail
            return self._engine

    def close(self) -> None:
        self.closed = True
        self._engine.close()
