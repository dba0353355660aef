"""Ctrl-C for the device's interactive commands: while a block runs, SIGINT calls a function instead of raising
KeyboardInterrupt (``fieldpack chat`` cancels the streaming answer; ``ask``/``chat`` hold it across a model load,
where llama.cpp's log callback would swallow the KeyboardInterrupt)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def sigint_calls(fn: Callable[[], None]) -> Iterator[None]:
    """While the block runs, SIGINT calls ``fn()`` (in the main thread, between bytecodes) instead of raising
    KeyboardInterrupt; the previous handler is restored on exit. Outside the main thread (where Python cannot
    install signal handlers) the block runs with Ctrl-C's usual behaviour."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda _sig, _frame: fn())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
