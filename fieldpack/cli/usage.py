"""Turn the CLI library's own exceptions (usage errors, ``--help`` exits, aborts) into fieldpack's one line.

typer up to 0.2x raises the exceptions of the separate ``click`` package; newer typer (0.29+) carries its own
copy as ``typer._click`` and raises those. Matching one package's classes misses the other's, so this module
collects the classes of every copy that is importable and matches against all of them. :func:`fieldpack.cli.main`
is the one caller; every subcommand (also those added later) goes through it.

Exit codes: usage error 2 (as :class:`fieldpack.shared.errors.UsageError`), abort/Ctrl-C 130, ``--help`` 0.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

USAGE_EXIT = 2
#: Exit status after Ctrl-C (128 + SIGINT), as shells report a process that SIGINT ended.
INTERRUPT_EXIT = 130

_interrupt_explained = False


def explain_interrupt() -> None:
    """Record that the running command has already told the user what its Ctrl-C stopped (e.g. the build names
    the stage and says no bundle was written), so :func:`fieldpack.cli.main` does not add its own
    ``interrupted`` line to that message."""
    global _interrupt_explained
    _interrupt_explained = True


def interrupt_explained() -> bool:
    """Whether :func:`explain_interrupt` was called in this process."""
    return _interrupt_explained


@dataclass(frozen=True)
class ClickTypes:
    """Exception classes of every click copy importable here, as tuples ready for ``except``."""

    usage: tuple[type[BaseException], ...]
    click_exception: tuple[type[BaseException], ...]
    exit: tuple[type[BaseException], ...]
    abort: tuple[type[BaseException], ...]
    no_args_is_help: tuple[type[BaseException], ...]


def _exception_modules() -> list[ModuleType]:
    mods = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            continue
    return mods


def click_types() -> ClickTypes:
    """The exception classes to catch, from ``typer._click`` and/or ``click`` (whichever are installed)."""
    mods = _exception_modules()

    def pick(attr: str) -> tuple[type[BaseException], ...]:
        return tuple(getattr(m, attr) for m in mods if hasattr(m, attr))

    return ClickTypes(usage=pick("UsageError"), click_exception=pick("ClickException"), exit=pick("Exit"),
                      abort=pick("Abort"), no_args_is_help=pick("NoArgsIsHelpError"))


def usage_line(exc: BaseException) -> str:
    """One line for a click/typer usage error: ``<command path>: <what>. Fix: <how>``.

    Args:
        exc: a ``UsageError`` of either click copy (has ``format_message()`` and ``ctx``).
    Returns:
        e.g. ``"fieldpack ask: No such option: --bogus. Fix: see `fieldpack ask --help`"`` (no newline).
    """
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) or "fieldpack"
    fmt = getattr(exc, "format_message", None)
    what = " ".join(str(fmt() if callable(fmt) else exc).split()).rstrip(".")
    if what.endswith(("?", "!")):  # "No such command 'asks'. Did you mean 'ask'?": no "?." before the fix
        return f"{path}: {what} Fix: see `{path} --help`"
    return f"{path}: {what}. Fix: see `{path} --help`"


def help_text(exc: BaseException) -> str | None:
    """The help page of the command a ``NoArgsIsHelpError`` (click 8.2+) stands for, or None."""
    ctx = getattr(exc, "ctx", None)
    return ctx.get_help() if ctx is not None else None
