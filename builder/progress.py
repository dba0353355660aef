"""Progress of long builder loops, reported to whoever listens (the CLI's progress bar), without threading a
callback through every stage signature.

A loop calls :func:`report` with counts (``done`` of ``total`` items, e.g. chunks embedded); the CLI installs a
sink with :func:`progress_sink` around the build. With no sink, :func:`report` does nothing. The sink lives in a
:class:`contextvars.ContextVar`, so concurrent builds in one process (tests) do not see each other's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

#: ``sink(done, total, unit)``: ``done`` of ``total`` items (ints, ``done <= total``), ``unit`` e.g. ``"chunks"``.
ProgressSink = Callable[[int, int, str], None]

_SINK: contextvars.ContextVar[ProgressSink | None] = contextvars.ContextVar("fieldpack_progress_sink", default=None)


def report(done: int, total: int, unit: str) -> None:
    """Tell the current sink (if any) that ``done`` of ``total`` ``unit`` are finished."""
    sink = _SINK.get()
    if sink is not None:
        sink(done, total, unit)


#: Unit prefix of an evaluation pass inside a stage (held-out PPL before/after training): shown on the bar and
#: named by an interrupt, but not the count a finished stage is summarised by (its training steps).
EVALUATION_UNIT = "held-out blocks: "


def report_evaluation(done: int, total: int, what: str) -> None:
    """:func:`report` for an evaluation pass: ``done`` of ``total`` held-out blocks of ``what`` (e.g.
    ``"PPL before training"``)."""
    report(done, total, EVALUATION_UNIT + what)


def is_evaluation(unit: str) -> bool:
    """Whether a reported ``unit`` is an evaluation pass's (:func:`report_evaluation`)."""
    return unit.startswith(EVALUATION_UNIT)


@contextlib.contextmanager
def progress_sink(sink: ProgressSink) -> Iterator[None]:
    """Install ``sink`` for the duration of the ``with`` block."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)
