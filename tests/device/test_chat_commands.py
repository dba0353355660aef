"""`fieldpack chat`: unknown /commands are answered as such (never sent to the model); readline history file."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from fieldpack.device.chat import enable_line_editing, run_chat


class NeverAsked:
    """An engine that must not be asked: every line of these tests is a command."""

    bundle_label = "demo@1.0.0"

    def answer(self, *a: object, **k: object) -> None:
        raise AssertionError("a command line reached the model")


@pytest.mark.parametrize("line", ["/foo", "/sourcez", "/quit-now", "/ help"])
def test_unknown_commands_are_answered(line: str) -> None:
    lines = iter([line, "/help", "/clear", "/sources", "/quit"])
    out = io.StringIO()
    n = run_chat(NeverAsked(), read_line=lambda _p: next(lines), console=Console(file=out, width=200))
    text = out.getvalue()
    assert n == 0
    assert f"unknown command {line.split()[0]}" in text and "/sources" in text and "no sources yet" in text


def test_history_file_is_loaded_and_saved(tmp_path: Path) -> None:
    import readline

    hist = tmp_path / "sub" / "chat_history"
    save = enable_line_editing(hist)
    readline.clear_history()
    readline.add_history("What is cavitation?")
    save()
    assert "What is cavitation?" in hist.read_text()
    readline.clear_history()
    enable_line_editing(hist)
    assert readline.get_history_item(readline.get_current_history_length()) == "What is cavitation?"


class Streams:
    """An engine that streams numbered tokens and, like :meth:`device.runtime.Runtime.answer`, checks ``cancel``
    before each one; the test's Ctrl-C is a real SIGINT to this process after the second token."""

    bundle_label = "demo@1.0.0"

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    def answer(self, q: str, *, history: list, cancel, on_token, max_tokens=None) -> object:  # noqa: ANN001
        import os
        import signal

        from fieldpack.device.types import Answer, Timings

        self.asked.append((q, len(history)))
        text, finish = "", "stop"
        for i in range(50):
            if cancel.is_set():
                finish = "cancelled"
                break
            on_token(f" t{i}")
            text += f" t{i}"
            if q == "long" and i == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the answer streams
        return Answer(question=q, text=text, sources=[], abstained=False, timings=Timings(), bundle=self.bundle_label,
                      finish_reason=finish)


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on() -> None:
    import signal

    before = signal.getsignal(signal.SIGINT)
    engine = Streams()
    lines = iter(["long", "short", "/quit"])
    out = io.StringIO()
    n = run_chat(engine, read_line=lambda _p: next(lines), console=Console(file=out, width=200))
    text = out.getvalue()
    stopped = text.split("[stopped]")[0]
    assert "[stopped]" in text and stopped.endswith(" t0 t1 "), stopped[-40:]  # the handler runs before t2
    # the stopped answer stays in the history, so a follow-up keeps its topic (a new-user trial: "What if it stays
    # high?" after a stopped answer was refused)
    assert n == 1 and engine.asked == [("long", 0), ("short", 1)]
    assert " t49" in text and "bye" in text
    assert signal.getsignal(signal.SIGINT) is before  # Ctrl-C at the prompt leaves the chat as before


def test_ctrl_c_at_the_prompt_drops_the_line_and_a_second_one_leaves() -> None:
    """A trial's operator lost the conversation to one Ctrl-C at an empty prompt; now the first only says how to
    leave, a second in a row leaves (as psql), and anything typed between resets the count."""
    engine = Streams()
    events = iter(["ctrl-c", "short", "ctrl-c", "ctrl-c", "never asked"])

    def read(_prompt: str) -> str:
        e = next(events)
        if e == "ctrl-c":
            raise KeyboardInterrupt
        return e

    out = io.StringIO()
    n = run_chat(engine, read_line=read, console=Console(file=out, width=200))
    text = out.getvalue()
    assert n == 1 and engine.asked == [("short", 0)]
    assert text.count("(Ctrl-C again, Ctrl-D or /quit to leave)") == 2 and text.rstrip().endswith("bye")


class EndsAtOnce:
    """An engine whose model emits EOS first: an empty answer with sources, as a new-user trial got."""

    bundle_label = "demo@1.0.0"

    def answer(self, q: str, **_: object) -> object:
        from fieldpack.device.types import Answer, Timings
        from fieldpack.retrieval.types import Hit

        hit = Hit(chunk_id=1, source="database.md", section="Maintenance", page=None, line_start=3, line_end=4,
                  text="Run VACUUM ANALYZE.", score=0.9)
        return Answer(question=q, text="", sources=[hit], abstained=False, bundle=self.bundle_label,
                      timings=Timings(completion_tokens=1), finish_reason="stop")


def test_an_empty_answer_says_so_in_chat_and_ask() -> None:
    from fieldpack.cli.show import print_answer
    from fieldpack.device.types import empty_notice

    lines = iter(["Why is the disk full?", "/quit"])
    out = io.StringIO()
    assert run_chat(EndsAtOnce(), read_line=lambda _p: next(lines), console=Console(file=out, width=200)) == 1
    assert "[the model ended without an answer; the sources below may still answer it]" in out.getvalue()

    ans = EndsAtOnce().answer("Why is the disk full?")
    out = io.StringIO()
    print_answer(ans, console=Console(file=out, width=200))  # type: ignore[arg-type]
    text = out.getvalue()
    assert text.index("the model ended without an answer") < text.index("Sources")
    for other in (dict(text="Run VACUUM."), dict(finish_reason="length"), dict(abstained=True),
                  dict(finish_reason="cancelled")):
        assert empty_notice(type(ans)(**{**ans.__dict__, **other})) is None  # type: ignore[arg-type]
