"""Repair spurious spaces inside words in a PDF's extracted text layer.

A PDF places glyph runs, not words. Justified lines are drawn as runs with kerning offsets between them
(``[(con) -300 (figuration)] TJ``), ligature glyphs (``ﬁ``) are often their own run, and headings are drawn
letter-spaced (``T h i s``). Text extractors (pypdf included) turn every such gap into a space, so the text layer
reads ``con figuration`` or ``T r o u b l e s h o o t i n g``: keyword search for ``configuration`` finds
nothing, and the embedder sees fragments.

The repair uses the document's own words as its lexicon, since a justification gap falls on different words from
line to line, so a word split on one line appears whole on another:

* **Fragment join**: two to four adjacent alphabetic tokens ``a b`` (single spaces, all but the first
  lower-case; longest first) become ``ab`` when ``ab`` occurs whole elsewhere in the document and one fragment
  is almost never a word on its own there (outside this very split, fewer than 1/:data:`RARE_FRAGMENT_RATIO` as
  often as ``ab``): ``con figuration``, ``fl ag`` and ``the re`` join; ``in to``, ``file system``, ``set up`` and
  ``error description`` stay, whatever the document spells whole, since each of their parts is a word there.
  Words shorter than :data:`MIN_JOINED_CHARS` are never made.
* **Letter-spaced runs**: :data:`MIN_LETTER_RUN` or more single letters separated by single spaces are joined and,
  where the lexicon allows, split again into its words by dynamic programming (``T h i s p u m p`` -> ``This
  pump``; fewest words, then most frequent); with no segmentation the run is joined as one token.

This is a lexicon heuristic (no language model, no dictionary file): it never changes text that is not split
across single spaces, and its changes are counted so the ingest report can say how many it made.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache

MIN_JOINED_CHARS = 4
MIN_LETTER_RUN = 4
RARE_FRAGMENT_RATIO = 10
_MAX_SEGMENT_WORD = 30
_WORD = re.compile(r"[^\W\d_]+")
_ALPHA = re.compile(r"[^\W\d_]+")
_LEAD = re.compile(r"([\"'(\[]*)([^\W\d_]+)")
_TRAIL = re.compile(r"([^\W\d_]+)([.,;:!?)\]\"']*)")
_SPACES = re.compile(r"(\s+)")
_MAX_FRAGMENTS = 4
_LETTER_RUN = re.compile(rf"(?<!\S)((?:[^\W\d_] ){{{MIN_LETTER_RUN - 1},}}[^\W\d_])(?!\S)")


@dataclass
class SpacingRepair:
    """Counts of what :func:`repair_spacing` changed: ``joined`` fragment pairs, ``letter_runs`` rebuilt."""

    joined: int = 0
    letter_runs: int = 0

    @property
    def total(self) -> int:
        """All repairs made."""
        return self.joined + self.letter_runs


class Lexicon:
    """A document's own words: lower-cased alphabetic word counts, and phrase counts on demand.

    Args:
        texts: the document's pages (all of them, so a word whole on one page repairs its split form on another).
    """

    def __init__(self, texts: Iterable[str]) -> None:
        tokens = _WORD.findall("\n".join(texts).lower())
        self.words: Counter[str] = Counter(tokens)
        self._ngrams: Counter[tuple[str, ...]] = Counter()
        for n in range(2, _MAX_FRAGMENTS + 1):
            self._ngrams.update(zip(*(tokens[i:] for i in range(n))))

    def __getitem__(self, word: str) -> int:
        return self.words[word]

    def phrase_count(self, parts: list[str]) -> int:
        """How often the words ``parts`` (2 to :data:`_MAX_FRAGMENTS`) occur in a row in the document, any case."""
        return self._ngrams[tuple(p.lower() for p in parts)]


def _core(words: list[str]) -> tuple[str, list[str], str] | None:
    """(leading punctuation, alphabetic fragments, trailing punctuation) of ``words``, or None."""
    head = _LEAD.fullmatch(words[0])
    tail = _TRAIL.fullmatch(words[-1])
    if head is None or tail is None or not all(_ALPHA.fullmatch(w) for w in words[1:-1]):
        return None
    return head.group(1), [head.group(2), *words[1:-1], tail.group(1)], tail.group(2)


def _should_join(parts: list[str], lexicon: Lexicon) -> bool:
    if not all(p[0].islower() for p in parts[1:]) or sum(map(len, parts)) < MIN_JOINED_CHARS:
        return False
    whole = lexicon["".join(parts).lower()]
    if whole == 0:
        return False
    split = lexicon.phrase_count(parts)  # a fragment's uses inside this very split do not make it a word
    # some fragment must be (almost) never a word on its own: "con", "fi", "re" are not; "error" and
    # "description" both are, so "error description" stays even where "errordescription" is an identifier
    return min(lexicon[p.lower()] - split for p in parts) * RARE_FRAGMENT_RATIO < whole


def _segment(letters: str, lexicon: Lexicon) -> list[str] | None:
    """``letters`` split into lexicon words (fewest words, then highest summed log-free count), or None."""
    low = letters.lower()
    n = len(low)

    @cache
    def best(i: int) -> tuple[int, int, tuple[int, ...]] | None:
        if i == n:
            return (0, 0, ())
        found: tuple[int, int, tuple[int, ...]] | None = None
        for j in range(i + 1, min(n, i + _MAX_SEGMENT_WORD) + 1):
            count = lexicon[low[i:j]]
            if count == 0 or (j - i == 1 and low[i:j] not in ("a", "i")):
                continue
            rest = best(j)
            if rest is None:
                continue
            cand = (rest[0] + 1, rest[1] - count, (j, *rest[2]))
            if found is None or cand[:2] < found[:2]:
                found = cand
        return found

    result = best(0)
    if result is None:
        return None
    cuts, start, words = result[2], 0, []
    for end in cuts:
        words.append(letters[start:end])
        start = end
    return words


def repair_spacing(text: str, lexicon: Lexicon) -> tuple[str, SpacingRepair]:
    """``text`` with spurious intra-word spaces removed, and what was changed.

    Args:
        text: one page's extracted text (lines kept; only single spaces between letters are touched).
        lexicon: :class:`Lexicon` of the whole document (every page), so a word whole on one page repairs
            its split form on another.

    Returns:
        (repaired text, counts). Never raises.
    """
    counts = SpacingRepair()

    def letters(m: re.Match[str]) -> str:
        counts.letter_runs += 1
        joined = m.group(1).replace(" ", "")
        words = _segment(joined, lexicon)
        return " ".join(words) if words else joined

    text = _LETTER_RUN.sub(letters, text)

    pieces = _SPACES.split(text)  # words at even indexes, the whitespace between them at odd ones
    out: list[str] = []
    i = 0
    while i < len(pieces):
        for k in range(_MAX_FRAGMENTS, 1, -1):
            words, gaps = pieces[i : i + 2 * k - 1 : 2], pieces[i + 1 : i + 2 * k - 1 : 2]
            core = _core(words) if len(words) == k and all(g == " " for g in gaps) else None
            if core is not None and _should_join(core[1], lexicon):
                out.append(core[0] + "".join(core[1]) + core[2])
                counts.joined += k - 1
                i += 2 * k - 1
                break
        else:
            out.append(pieces[i])
            i += 1
    return "".join(out), counts
