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
