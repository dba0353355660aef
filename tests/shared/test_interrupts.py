"""shared.interrupts: a Ctrl-C / SIGTERM that ctypes swallows inside a native callback (as llama.cpp's log
callback does) is raised again by raise_if_interrupted; outside the block nothing is pending."""

from __future__ import annotations

import ctypes
import os
import signal

import pytest

from fieldpack.shared.interrupts import SIGTERM_EXIT, interrupts_that_stick, raise_if_interrupted

#: the dropped exception is what ctypes reports as "unraisable"; that is the behaviour under test
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))


def _native_call_whose_callback_gets(signum: int) -> None:
    """libc qsort with a Python comparison callback that signals this process: the handler runs inside the
    callback, its exception is printed and dropped by ctypes, and qsort returns normally."""
    libc = ctypes.CDLL(None)
    sent = []

    def cmp(a: ctypes._Pointer, b: ctypes._Pointer) -> int:  # type: ignore[type-arg]
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)
            for _ in range(1000):  # bytecodes: the handler runs here, inside the callback
                pass
        return a[0] - b[0]

    arr = (ctypes.c_int * 8)(5, 3, 8, 1, 9, 2, 7, 4)
    libc.qsort(arr, len(arr), ctypes.sizeof(ctypes.c_int), CMP(cmp))
    assert list(arr) == [1, 2, 3, 4, 5, 7, 8, 9] and sent


def test_a_ctrl_c_swallowed_in_a_callback_is_raised_at_the_next_step() -> None:
    with interrupts_that_stick():
        _native_call_whose_callback_gets(signal.SIGINT)  # returns: the KeyboardInterrupt was lost in ctypes
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
        raise_if_interrupted()  # raised once, then nothing is pending


def test_sigterm_becomes_system_exit_143_and_sticks_too() -> None:
    with interrupts_that_stick():
        _native_call_whose_callback_gets(signal.SIGTERM)
        with pytest.raises(SystemExit) as ex:
            raise_if_interrupted()
    assert ex.value.code == SIGTERM_EXIT
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_ctrl_c_in_plain_python_raises_at_once_and_the_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with interrupts_that_stick():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
    assert signal.getsignal(signal.SIGINT) is before
    raise_if_interrupted()  # nothing left pending after the block


def test_a_signal_the_process_ignores_stays_ignored() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with interrupts_that_stick():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)
            raise_if_interrupted()  # nothing: the signal was ignored
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_in_llamas_log_callback_is_only_recorded() -> None:
    """No "Exception ignored ... Traceback" block on stderr: a signal that lands in llama-cpp-python's log callback
    (named in C_CALLBACKS) is not raised there; the next step raises it."""
    def llama_log_callback() -> None:  # the name of llama-cpp-python's callback
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            pass

    with interrupts_that_stick():
        llama_log_callback()  # returns normally
        with pytest.raises(KeyboardInterrupt):
            raise_if_interrupted()
