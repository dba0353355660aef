"""The operator assistant: an interactive, offline, grounded chat loop (``fieldpack chat``).

Tokens stream as they are generated; each answer is followed by its numbered sources. A short history is kept
and sent with the next question while the token budget allows (oldest turns dropped first, see
:mod:`device.prompt`). Commands: ``/sources`` (show the last answer's sources in full), ``/clear`` (forget the
history), ``/help``, ``/quit`` (or Ctrl-D, or Ctrl-C at the prompt). Ctrl-C while an answer streams stops that
answer (the runtime's ``cancel`` event, checked before each token) and returns to the prompt; the stopped answer
stays in the history, marked with "…", so that a follow-up still knows the topic. Any other line starting with
``/`` is answered as an unknown command, never sent to the model as a question. On a terminal, lines are edited with readline (arrows, Ctrl-R) and the
history is kept across sessions in a file (:func:`enable_line_editing`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from fieldpack.device.interrupts import sigint_calls
from fieldpack.device.prompt import Turn
from fieldpack.device.types import Answer, answer_notices
from fieldpack.shared.errors import QueryError

HELP = "commands: /sources  show the last answer's sources in full · /clear  forget history · /quit  leave"
PROMPT = "you> "

#: Most past turns offered to the prompt builder (it may keep fewer to fit n_ctx).
MAX_HISTORY = 4
#: Lines kept in the readline history file.
HISTORY_LINES = 1000
COMMANDS = ("/sources", "/clear", "/help", "/quit", "/exit", "/q")

log = logging.getLogger(__name__)


def enable_line_editing(history_file: Path | None) -> Callable[[], None]:
    """Turn on readline line editing for :func:`input` and load ``history_file`` (if given and readable).

    Returns a function that saves the history (call it when the chat ends). Where readline is unavailable
    (some minimal Python builds) editing stays off and the returned function does nothing."""
    try:
        import readline
    except ImportError:  # pragma: no cover - CPython on Linux ships it
        return lambda: None
    readline.set_history_length(HISTORY_LINES)
    readline.parse_and_bind("tab: complete")
    readline.set_completer(lambda text, state: ([c for c in COMMANDS if c.startswith(text)] + [None])[state])
    if history_file is not None:
        try:
            readline.read_history_file(history_file)
        except OSError:
            pass

    def save() -> None:
        if history_file is None:
            return
        try:
            history_file.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(history_file)
        except OSError as exc:
            log.warning("could not save the chat history to %s: %s", history_file, exc)

    return save


def _heading(c: Console, title: str) -> None:
    """A source's heading: a rule across a terminal; off a terminal (an unbounded width) the title alone."""
    if c.is_terminal:
        c.rule(escape(title))
    else:
        c.print(f"── {title} ──", markup=False, highlight=False)


def run_chat(engine, *, read_line: Callable[[str], str] = input, console: Console | None = None,
             max_tokens: int | None = None) -> int:
    """Run the loop until /quit or end of input. ``engine`` is a :class:`device.runtime.Runtime`; ``console``
    is where everything is printed (the CLI passes its own, full width when piped; default: a plain rich one);
    ``max_tokens``: the answer length cap (tokens; ``None``: the bundle's).

    Returns the number of questions answered.
    """
    c = console or Console()
    c.print(f"[bold]fieldpack chat[/] — {engine.bundle_label}, offline. {HELP}")
    history: list[Turn] = []
    last: Answer | None = None
    answered = 0
    interrupted = False  # the last prompt ended with Ctrl-C
    while True:
        try:
            line = read_line(PROMPT)
        except EOFError:
            c.print("")
            break
        except KeyboardInterrupt:  # at the prompt: drops the line typed; a second one in a row leaves (as psql)
            if interrupted:
                c.print("")
                break
            interrupted = True
            c.print("\n[dim](Ctrl-C again, Ctrl-D or /quit to leave)[/]", highlight=False)
            continue
        interrupted = False
        q = line.strip()
        if not q:
            continue
        if q in ("/quit", "/exit", "/q"):
            break
        if q == "/help":
            c.print(HELP)
            continue
        if q == "/clear":
            history.clear()
            c.print("[dim]history cleared[/]")
            continue
        if q.startswith("/") and q.split()[0] not in COMMANDS:
            c.print(f"unknown command {q.split()[0]}; {HELP}", markup=False, highlight=False)
            continue
        if q == "/sources":
            if last is None:
                c.print("[dim]no sources yet[/]")
            elif not last.sources:
                c.print("[dim]the last answer has no sources (the documents do not answer it)[/]")
            for i, h in enumerate(last.sources if last else [], start=1):
                _heading(c, f"[{i}] {h.citation()}")
                full = getattr(engine, "full_text", None)  # the stored chunk, not the copy shortened for the prompt
                c.print(full(h) if full else h.text, markup=False, highlight=False)
            continue
        c.print("[bold]assistant>[/] ", end="")
        cancel = threading.Event()
        try:
            with sigint_calls(cancel.set):
                last = engine.answer(q, history=history[-MAX_HISTORY:], cancel=cancel, max_tokens=max_tokens,
                                     on_token=lambda t: c.print(t, end="", markup=False, highlight=False))
        except QueryError as exc:
            c.print(f"\n[red]{exc}[/]")
            continue
        if last.finish_reason == "cancelled":
            c.print(" " + escape("[stopped]"), style="dim", highlight=False)
            if last.text.strip():  # keep the topic: a follow-up after a stopped answer still searches with it
                history.append(Turn(question=q, answer=last.text.rstrip() + " …",
                                    search_query=last.extra.get("retrieval_query")))
            continue
        c.print("")
        answered += 1
        for notice in answer_notices(last, "`fieldpack chat --max-tokens N`"):
            c.print("[dim]" + escape(notice) + "[/]", highlight=False)
        if last.sources:
            c.print("[dim]sources: " + escape("  ".join(f"[{i}] {h.citation()}" for i, h in enumerate(last.sources, 1)))
                    + "[/]", highlight=False)
        if not last.abstained:
            history.append(Turn(question=q, answer=last.text, search_query=last.extra.get("retrieval_query")))
    c.print("[dim]bye[/]")
    return answered
