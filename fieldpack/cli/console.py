"""The rich consoles the CLI prints through, sized by the stream they write to.

On a terminal rich wraps and fits tables to the window. Piped, redirected, through ssh or into a journal there
is no window: rich would assume 80 columns and cut table cells to ``bar…`` or hard-wrap long lines, exactly where
technicians keep the output. So off a terminal the console is effectively unbounded (no ellipsis, no wrap) and
has no colour codes.
"""

from __future__ import annotations

from rich.console import Console

#: Width (characters) used when the stream is not a terminal: wider than any line fieldpack prints.
UNBOUNDED_WIDTH = 100_000


def console(*, stderr: bool = False) -> Console:
    """A rich console for stdout (or stderr): terminal-sized on a TTY, full width and no soft wrapping otherwise."""
    c = Console(stderr=stderr)
    if c.is_terminal:
        return c
    return Console(stderr=stderr, width=UNBOUNDED_WIDTH, soft_wrap=True, no_color=True, highlight=False)
