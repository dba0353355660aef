"""Text normalisation both sides apply, so a document and a question that look the same compare the same.

:func:`normalize_for_search` runs on every document's extracted text (builder ingest, before chunking) and on
every question (device runtime, MQTT request parsing, retrieval queries). It changes only characters that carry
no meaning of their own for search, so the stored chunk text still reads as the source did:

* compatibility forms that break keyword search (Unicode's NFKC mapping, applied only to these blocks):
  Latin ligatures of Alphabetic Presentation Forms U+FB00-FB06 (``ﬁ`` -> ``fi``, ``ﬂ`` -> ``fl``, PDF text layers
  use them) and Halfwidth and Fullwidth Forms U+FF01-FF5E (``Ｐｕｍｐ`` -> ``Pump``). Other compatibility
  characters (``m²``, ``½``) stay: NFKC would change what they say;
* space separators (U+00A0, U+2000-U+200A, U+202F, U+205F, U+3000) -> a plain space;
* invisible characters that split words for a tokenizer: soft hyphen U+00AD, zero-width space/joiners
  U+200B-U+200D, word joiner U+2060, BOM/ZWNBSP U+FEFF -> removed;
* C0 and C1 control characters (U+0000-U+001F except TAB/LF, U+007F-U+009F; CR, VT, FF too) -> a space, so a
  NUL never reaches SQLite, an FTS5 expression or a tokenizer, and lines (LF) stay where they were;
* then Unicode NFC.
"""

from __future__ import annotations

import unicodedata

_KEEP_CONTROLS = {"\t", "\n"}


def _table() -> dict[int, str]:
    t: dict[int, str] = {}
    for o in list(range(0x00, 0x20)) + list(range(0x7F, 0xA0)):
        if chr(o) not in _KEEP_CONTROLS:
            t[o] = " "
    for o in [0x00A0, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000]:
        t[o] = " "
    for o in (0x00AD, 0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF):
        t[o] = ""
    for o in [*range(0xFB00, 0xFB07), *range(0xFF01, 0xFF5F)]:
        t[o] = unicodedata.normalize("NFKC", chr(o))
    return t


_TABLE = _table()


def is_control(ch: str) -> bool:
    """True for a C0/C1 control character other than TAB and LF (what :func:`normalize_for_search` removes)."""
    o = ord(ch)
    return (o < 0x20 or 0x7F <= o <= 0x9F) and ch not in _KEEP_CONTROLS


def count_controls(text: str) -> int:
    """Number of characters of ``text`` that :func:`is_control` flags."""
    return sum(1 for ch in text if is_control(ch))


def normalize_for_search(text: str) -> str:
    """``text`` with search-relevant compatibility forms folded, controls and invisible characters removed, NFC.

    Same length in lines (LF kept); not whitespace-collapsed (callers that want one line do ``" ".join(s.split())``).
    """
    return unicodedata.normalize("NFC", text.translate(_TABLE))


def clean_question(question: str) -> str:
    """A question as every boundary (CLI, MQTT, HTTP, retrieval) takes it: :func:`normalize_for_search`, then
    whitespace collapsed to single spaces and stripped. May return ``""`` (the caller refuses an empty question)."""
    return " ".join(normalize_for_search(question).split())
