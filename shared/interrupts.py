"""Ctrl-C and SIGTERM that a long native call cannot lose: :func:`interrupts_that_stick` and
:func:`raise_if_interrupted`.

Python runs a signal handler at the next bytecode the main thread executes. During a llama.cpp model load or
decode that bytecode is often inside a ctypes callback (llama-cpp-python's log callback), and an exception raised
there is printed and dropped by ctypes, to a stderr that llama-cpp-python points at /dev/null while it loads. So
a Ctrl-C could vanish: `fieldpack plan` (one model load after another) ran on for 11 minutes after one (a new-user
trial). Inside :func:`interrupts_that_stick` the handler also remembers the signal, and
:func:`raise_if_interrupted`, called by the long loop between its steps, raises it again there, in plain Python.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

#: Exit status of a process stopped by SIGTERM (128 + 15), as the shell reports it.
SIGTERM_EXIT = 143

_pending: int | None = None  # the signal received inside interrupts_that_stick and not yet seen by the loop

#: Python functions C code calls back (llama-cpp-python's log callback, run throughout model loads): an exception
#: raised in one is printed by ctypes as an "Exception ignored ... Traceback" block and dropped, so a signal that
#: lands in one (or in a function it calls) is only recorded, for :func:`raise_if_interrupted`.
C_CALLBACKS = frozenset({"llama_log_callback"})


def _in_c_callback(frame: FrameType | None) -> bool:
    while frame is not None:
        if frame.f_code.co_name in C_CALLBACKS:
            return True
        frame = frame.f_back
    return False


def _raise_for(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise SystemExit(SIGTERM_EXIT)
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise what a SIGINT (KeyboardInterrupt) or SIGTERM (``SystemExit(143)``) received inside
    :func:`interrupts_that_stick` should have raised, if it has not reached Python code yet; otherwise nothing.
    Cheap: call it between the steps of a long loop."""
    global _pending
    if _pending is not None:
        signum, _pending = _pending, None
        _raise_for(signum)


@contextmanager
def interrupts_that_stick() -> Iterator[None]:
    """While the block runs, SIGINT raises KeyboardInterrupt and SIGTERM raises ``SystemExit(143)`` (so ``finally``
    blocks clean up on ``kill`` too), and both are remembered for :func:`raise_if_interrupted` in case ctypes
    dropped the exception. The previous handlers are restored on exit. A signal the process ignores (``SIG_IGN``)
    stays ignored. Outside the main thread (where Python cannot install signal handlers) the block runs with the
    usual behaviour."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        global _pending
        _pending = signum
        if not _in_c_callback(frame):
            _raise_for(signum)

    _pending = None
    # a signal the process was started with ignored (a background job's SIGINT, nohup) stays ignored, as Python
    # itself leaves it at startup
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _pending = None
