"""A Ctrl-C during a model load is held until the load returns, then raised (it was lost when it landed in
llama.cpp's log callback: ctypes drops an exception raised in a callback)."""

from __future__ import annotations

import ctypes
import os
import signal

import pytest

from fieldpack.cli.device import load_with_deferred_ctrl_c


class Model:
    closed = False

    def close(self) -> None:
        self.closed = True


def test_ctrl_c_in_a_callback_during_the_load_is_raised_after_it() -> None:
    before = signal.getsignal(signal.SIGINT)
    model = Model()

    @ctypes.CFUNCTYPE(None)
    def log_callback() -> None:  # as llama.cpp calls llama-cpp-python's logger while it loads
        os.kill(os.getpid(), signal.SIGINT)

    def load() -> Model:
        log_callback()
        return model

    with pytest.raises(KeyboardInterrupt):
        load_with_deferred_ctrl_c(load)
    assert model.closed and signal.getsignal(signal.SIGINT) is before
    assert load_with_deferred_ctrl_c(lambda: "loaded") == "loaded"  # no Ctrl-C: the load's result

