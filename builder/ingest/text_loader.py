"""Plain text -> sections of paragraphs.

Paragraphs are blank-line separated. A heading is a one-line paragraph that is either underlined
(``====`` -> level 1, ``----`` -> level 2) or written in capitals (letters present, all upper case, at most
80 characters, level 1), the conventions of README/handbook text files.
"""

from __future__ import annotations

import re

from fieldpack.builder.ingest.model import Block, Section

_UNDERLINE = re.compile(r"^\s*(=+|-+)\s*$")
MAX_HEADING_CHARS = 80


def _is_caps_heading(line: str) -> bool:
    letters = [c for c in line if c.isalpha()]
    return (
        0 < len(line.strip()) <= MAX_HEADING_CHARS
        and len(letters) >= 3
        and all(c.isupper() for c in letters)
        and not line.rstrip().endswith((".", ",", ";"))
    )


def load_text(text: str) -> list[Section]:
    """Split normalised plain ``text`` into sections of ``para`` blocks, in document order."""
    lines = text.split("\n")
    levels: dict[int, str] = {}
    sections = [Section(path="")]

    def heading(level: int, title: str) -> None:
        nonlocal levels
        levels = {lv: t for lv, t in levels.items() if lv < level}
        levels[level] = " ".join(title.split())
        sections.append(Section(path=" > ".join(levels[lv] for lv in sorted(levels))))

    para: list[tuple[int, str]] = []

    def flush() -> None:
        if not para:
            return
        if len(para) == 2 and _UNDERLINE.match(para[1][1]) and para[0][1].strip():
            heading(1 if para[1][1].strip()[0] == "=" else 2, para[0][1])
        elif len(para) == 1 and _is_caps_heading(para[0][1]):
            heading(1, para[0][1])
        else:
            sections[-1].blocks.append(Block("\n".join(t for _, t in para), "para", para[0][0], para[-1][0]))
        para.clear()

    for no, line in enumerate(lines, start=1):
        if line.strip():
            para.append((no, line))
        else:
            flush()
    flush()
    return [s for s in sections if s.blocks]
