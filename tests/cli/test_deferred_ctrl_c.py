"""A Ctrl-C during a model load is held until the load returns, then raised (it was lost when it landed in
llama.cpp's log callback: ctypes drops an exception raised in a callback)."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path

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



class _StreamsThenInterrupted:
    """A runtime whose answer streams one token, then meets Ctrl-C (as llama.cpp's decode loop does)."""

    def __enter__(self) -> "_StreamsThenInterrupted":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def answer(self, question: str, **kw: object) -> None:
        kw["on_token"]("Backwash is")  # type: ignore[operator]
        raise KeyboardInterrupt


def test_ctrl_c_that_ends_a_command_says_interrupted(monkeypatch: pytest.MonkeyPatch,
                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """typer 0.29+ turns KeyboardInterrupt into Exit(130), returned as a value under standalone_mode=False: the
    CLI exited 130 with an empty stderr (a new-user trial). The cut answer line is ended before the message."""
    from fieldpack import cli
    from fieldpack.cli import device as device_cli

    monkeypatch.setattr(device_cli, "_check_options_before_loading", lambda *a, **k: None)  # no data dir here
    monkeypatch.setattr(device_cli, "_runtime", lambda *a: _StreamsThenInterrupted())
    with pytest.raises(SystemExit) as exc:
        cli.main(["ask", "pump 3 alarm?"])
    out, err = capfd.readouterr()
    assert exc.value.code == 130
    assert out == "Backwash is\n"
    assert err.strip() == "interrupted"


@pytest.mark.parametrize("finished, where", [(False, "while"), (True, "after")])
def test_a_stopped_plan_says_whether_its_last_step_had_finished(finished: bool, where: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    """A signal that lands just after a step finished (its cache entry kept) stops the plan *after* that step; a
    CI run said "while" and then found the step in the cache."""
    from fieldpack import cli
    from fieldpack.builder.compress import plan as plan_mod

    def make_plan(*args: object, on_step, on_done, **kw: object) -> None:  # noqa: ANN001
        on_step("measuring none/F16: PPL/KLD on held-out text, decode speed")
        if finished:
            on_done("measuring none/F16: PPL/KLD on held-out text, decode speed")
        raise KeyboardInterrupt

    monkeypatch.setattr(plan_mod, "make_plan", make_plan)
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "--model", str(tmp_path), "--docs", str(tmp_path), "--device-ram", "4GiB", "--min-tokens-per-s", "1",
                  "--cache-dir", str(tmp_path / "c")])
    err = capfd.readouterr().err
    assert exc.value.code == 130
    assert f"plan stopped {where} measuring none/F16" in err and "kept in the build cache" in err, err
