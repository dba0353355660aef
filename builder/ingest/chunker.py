"""Structure-following chunking under a token budget with overlap.

Sections are chunked independently (a chunk never spans two headings or two PDF pages). Within a section the
blocks are packed greedily into chunks of at most ``chunk_tokens`` tokens. A block larger than the budget is
split: a paragraph into list items, then sentences, then word runs; a code block, table or CSV row into lines
(a code fence is never split unless it alone exceeds the budget). When a chunk is full the next one starts
with the trailing units of the previous chunk that fit in ``overlap_tokens`` (never the whole previous chunk),
the sliding-window overlap of common RAG chunkers, at unit granularity so no sentence or line is cut.

Token counts are taken per unit with the caller's ``count_tokens`` and summed; units are joined with
whitespace only, which keeps the sum equal to the joined count for WordPiece/BPE tokenizers that split on
whitespace. Each chunk's ``n_tokens`` is recounted on its final text.

Chunks are bounded in characters too: a unit costs ``max(tokens, ceil(characters / MAX_CHARS_PER_TOKEN))``, so
text the tokenizer sees as one token (a long unbroken string: a hash, a base64 blob, a URL; WordPiece maps a word
over 100 characters to a single ``[UNK]``) is still cut, and no chunk's units hold more than
``chunk_tokens * MAX_CHARS_PER_TOKEN`` characters.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fieldpack.builder.ingest.model import Block, Section

#: Characters one token may stand for when bounding a chunk's length (English WordPiece averages 4-5).
MAX_CHARS_PER_TOKEN = 8

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*+•]|\d{1,3}[.)])[ \t]+", re.MULTILINE)


@dataclass(frozen=True)
class Piece:
    """A chunk before it gets its document fields (source, digest)."""

    section: str
    page: int | None
    line_start: int | None
    line_end: int | None
    text: str
    n_tokens: int


@dataclass(frozen=True)
class _Unit:
    text: str
    line_start: int | None
    line_end: int | None
    n: int  # tokens
    sep: str  # joiner placed before this unit when it follows another in a chunk


def chunk_sections(
    sections: Iterable[Section], *, count_tokens: Callable[[str], int], chunk_tokens: int, overlap_tokens: int
) -> list[Piece]:
    """Chunk ``sections`` in order. See the module docstring for the rules.

    Args:
        sections: from a loader.
        count_tokens: text -> token count in the embedder's tokenizer (no special tokens).
        chunk_tokens: budget per chunk, tokens (> 0).
        overlap_tokens: at most this many tokens repeated from the previous chunk (0 <= overlap < budget).
    """
    def cost(text: str) -> int:  # tokens, or the character bound when that is larger
        return max(count_tokens(text), -(-len(text) // MAX_CHARS_PER_TOKEN))

    pieces: list[Piece] = []
    for section in sections:
        units: list[_Unit] = []
        for block in section.blocks:
            units.extend(_units(block, cost, chunk_tokens))
        for group in _pack(units, chunk_tokens, overlap_tokens):
            text = group[0].text + "".join(u.sep + u.text for u in group[1:])
            starts = [u.line_start for u in group if u.line_start is not None]
            ends = [u.line_end for u in group if u.line_end is not None]
            pieces.append(
                Piece(
                    section=section.path,
                    page=section.page,
                    line_start=min(starts) if starts else None,
                    line_end=max(ends) if ends else None,
                    text=text,
                    n_tokens=count_tokens(text),
                )
            )
    return pieces


def _pack(units: list[_Unit], budget: int, overlap: int) -> list[list[_Unit]]:
    groups: list[list[_Unit]] = []
    cur: list[_Unit] = []
    cur_n = 0
    for u in units:
        if cur and cur_n + u.n > budget:
            groups.append(cur)
            keep: list[_Unit] = []
            kept_n = 0
            for v in reversed(cur[1:]):  # cur[1:]: never carry the whole previous chunk
                if kept_n + v.n > overlap or kept_n + v.n + u.n > budget:
                    break
                keep.insert(0, v)
                kept_n += v.n
            cur, cur_n = keep, kept_n
        cur.append(u)
        cur_n += u.n
    if cur:
        groups.append(cur)
    return groups


def _units(block: Block, count: Callable[[str], int], budget: int) -> list[_Unit]:
    """The block as one unit if it fits, else split by its kind's rules down to units that fit."""
    n = count(block.text)
    if n <= budget:
        return [_Unit(block.text, block.line_start, block.line_end, n, "\n\n")]
    spans: list[tuple[int, int]]
    if block.kind == "para":
        items = _split_at(block.text, [m.start() for m in _LIST_ITEM.finditer(block.text)])
        spans = []
        for a, b in items:  # list items first; an item (or the paragraph) still too big -> sentences
            if len(items) > 1 and count(block.text[a:b]) <= budget:
                spans.append((a, b))
            else:
                cuts = [a + m.end() for m in _SENTENCE_END.finditer(block.text[a:b])]
                spans.extend(sp for sp in _split_at(block.text, [a, *cuts, b]) if a <= sp[0] < b)
    elif block.kind == "row":
        spans = _split_at(block.text, [m.end() for m in re.finditer(r";\s+", block.text)])
    else:  # code, table: whole non-blank lines, indentation kept
        spans = [(m.start(), m.end()) for m in re.finditer(r"[^\n]*\S[^\n]*", block.text)]
    units: list[_Unit] = []
    prev_end: int | None = None
    for start, end in spans:
        text = block.text[start:end]
        gap = block.text[prev_end:start] if prev_end is not None else ""
        if not units:
            sep = "\n\n"
        elif block.kind in ("code", "table"):
            sep = "\n" * max(1, gap.count("\n"))  # keeps blank lines inside code
        else:
            sep = "\n" if "\n" in gap else " "
        ls, le = _line(block, start), _line(block, end - 1)
        tokens = count(text)
        if tokens <= budget:
            units.append(_Unit(text, ls, le, tokens, sep))
        else:
            units.extend(_hard_split(text, ls, le, sep, count, budget))
        prev_end = end
    return units


def _split_at(text: str, cuts: list[int]) -> list[tuple[int, int]]:
    """Spans between cut offsets, each stripped of surrounding whitespace, empty ones dropped."""
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(text))), len(text)]
    spans = []
    for a, b in zip(bounds, bounds[1:]):
        seg = text[a:b]
        lead = len(seg) - len(seg.lstrip())
        trail = len(seg.rstrip())
        if seg.strip():
            spans.append((a + lead, a + trail))
    return spans


def _line(block: Block, offset: int) -> int | None:
    if block.line_start is None:
        return None
    return block.line_start + block.text.count("\n", 0, max(offset, 0))


def _hard_split(
    text: str, ls: int | None, le: int | None, sep: str, count: Callable[[str], int], budget: int
) -> list[_Unit]:
    """Word runs of at most ``budget`` tokens (a single over-long word is cut by characters)."""
    words: list[str] = []
    for w in text.split():
        wn = count(w)
        if wn <= budget:
            words.append(w)
        else:
            step = max(1, len(w) * budget // (wn + 1))
            words.extend(w[i : i + step] for i in range(0, len(w), step))
    units: list[_Unit] = []
    cur: list[str] = []
    cur_n = 0
    for w in words:
        wn = count(w)
        if cur and cur_n + wn > budget:
            units.append(_Unit(" ".join(cur), ls, le, cur_n, sep if not units else " "))
            cur, cur_n = [], 0
        cur.append(w)
        cur_n += wn
    if cur:
        units.append(_Unit(" ".join(cur), ls, le, cur_n, sep if not units else " "))
    return units
