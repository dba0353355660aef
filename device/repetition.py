"""Stop an answer that has started to repeat itself: :func:`repeating_tail` and :class:`LoopGuard`.

Small base models decode greedily into loops ("Yes, it is. The tool is not designed to run in this manner. The
tool is not designed to run in this manner. ..."); a new-user trial on the Valgrind manual got such an answer on
4 of 10 questions with Gemma 3 270M, each run to the 256-token cap, whose notice then invited asking for *more*.
llama.cpp's repetition penalty would change every answer's tokens (the device decodes greedily, as the quality
figures were measured); stopping at the third copy of a block changes only the answers that loop. The check is
the shortest period of the text's tail, on characters, after each streamed piece.
"""

from __future__ import annotations

#: A block must end the text this many times in a row to count as a loop.
REPEATS = 3
#: Shortest and longest block (characters): shorter ones are table rules and ellipses, not loops.
MIN_PERIOD_CHARS = 8
MAX_PERIOD_CHARS = 400


def repeating_tail(text: str, *, repeats: int = REPEATS, min_period: int = MIN_PERIOD_CHARS,
                   max_period: int = MAX_PERIOD_CHARS) -> int | None:
    """The length ``p`` (characters) of the shortest block, ``min_period <= p <= max_period``, that ends ``text``
    ``repeats`` times in a row (``text[-p:] == text[-2p:-p] == ...``), or ``None``. Blocks made of whitespace
    and punctuation only do not count. Cost: O(``max_period`` * ``repeats``) slices."""
    n = len(text)
    for p in range(min_period, min(max_period, n // repeats) + 1):
        block = text[n - p:]
        if all(text[n - (i + 1) * p:n - i * p] == block for i in range(1, repeats)) and \
                any(ch.isalnum() for ch in block):
            return p
    return None


def _end_of_first_copy(text: str, period: int) -> int:
    """Where to cut ``text``, which ends in :data:`REPEATS` copies of a ``period``-character block: after the
    first copy of the whole periodic run, moved on to the next sentence or line end within one more period. The
    run is found back to where the periodicity starts, and the detected block may be a rotation of the repeated
    sentence; cutting at its end left "... in the memory.\nThe error detection system" (a new-user trial)."""
    n = len(text)
    start = n - REPEATS * period
    while start > 0 and text[start - 1] == text[start - 1 + period]:
        start -= 1
    first_end = start + period
    for j in range(first_end, min(first_end + period, n) + 1):
        if text[j - 1] in ".!?\n":
            return j
    return first_end


class LoopGuard:
    """Accumulates streamed answer pieces and says when the answer loops.

    ``feed(piece)`` returns True once the text ends in :data:`REPEATS` copies of one block; :meth:`text` is then
    the answer up to the first copy of the repeating run, completed to its sentence or line end (the copies
    removed, trailing space stripped).
    """

    def __init__(self) -> None:
        self._text = ""
        self._cut: int | None = None

    def feed(self, piece: str) -> bool:
        """Add ``piece``; True when the answer now loops (feed nothing more after that)."""
        self._text += piece
        p = repeating_tail(self._text)
        if p is None:
            return False
        self._cut = _end_of_first_copy(self._text, p)
        return True

    @property
    def looped(self) -> bool:
        """Whether :meth:`feed` found a loop."""
        return self._cut is not None

    def text(self) -> str:
        """The answer so far, without the repeated copies once :attr:`looped`."""
        return self._text if self._cut is None else self._text[:self._cut].rstrip()
