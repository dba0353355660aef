"""Markdown -> sections of blocks (CommonMark block structure, the parts that matter for chunking).

Headings (ATX ``#``..``######`` and setext ``===``/``---`` underlines) build the section path; fenced code
blocks (``` or ~~~, CommonMark 0.31 §4.5) are one ``code`` block each and headings inside them are ignored;
pipe tables are ``table`` blocks; everything else is blank-line-separated ``para`` blocks. A leading YAML
front matter block (``---`` ... ``---``) is dropped. Heading lines themselves are not block text: the section
path carries them.
"""

from __future__ import annotations

import re

from fieldpack.builder.ingest.model import Block, Section

_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE_OPEN = re.compile(r"^( {0,3})(`{3,}|~{3,})(.*)$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_TABLE_LINE = re.compile(r"^\s*\|")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")


def clean_heading(title: str) -> str:
    """Inline Markdown out of a heading: ``[text](url)`` -> text, code/emphasis markers dropped."""
    title = _LINK.sub(r"\1", title)
    title = re.sub(r"[`*_]{1,3}([^`*_]+)[`*_]{1,3}", r"\1", title)
    return " ".join(title.replace("`", "").split())


class _Builder:
    """Collects sections; a heading of level L replaces levels >= L in the current path."""

    def __init__(self) -> None:
        self.levels: dict[int, str] = {}
        self.sections: list[Section] = [Section(path="")]

    def heading(self, level: int, title: str) -> None:
        self.levels = {lv: t for lv, t in self.levels.items() if lv < level}
        if title:
            self.levels[level] = title
        self.sections.append(Section(path=" > ".join(self.levels[lv] for lv in sorted(self.levels))))

    def block(self, block: Block) -> None:
        if block.text.strip():
            self.sections[-1].blocks.append(block)


def load_markdown(text: str) -> list[Section]:
    """Parse normalised Markdown ``text`` into sections (empty ones dropped), in document order."""
    lines = text.split("\n")
    out = _Builder()
    i, n = _skip_front_matter(lines), len(lines)
    para: list[tuple[int, str]] = []  # (1-based line, text) of the open paragraph

    def flush() -> None:
        if para:
            kind = "table" if all(_TABLE_LINE.match(t) for _, t in para) else "para"
            out.block(Block("\n".join(t for _, t in para), kind, para[0][0], para[-1][0]))
            para.clear()

    while i < n:
        line = lines[i]
        fence = _FENCE_OPEN.match(line)
        if fence and not (fence.group(2)[0] == "`" and "`" in fence.group(3)):
            flush()
            marker = fence.group(2)
            close = re.compile(rf"^ {{0,3}}{re.escape(marker[0])}{{{len(marker)},}}[ \t]*$")
            j = i + 1
            while j < n and not close.match(lines[j]):
                j += 1
            end = min(j, n - 1)  # an unclosed fence runs to the end of the document
            out.block(Block("\n".join(lines[i : end + 1]), "code", i + 1, end + 1))
            i = end + 1
            continue
        atx = _ATX.match(line)
        if atx:
            flush()
            out.heading(len(atx.group(1)), clean_heading(atx.group(2) or ""))
            i += 1
            continue
        if not line.strip():
            flush()
            i += 1
            continue
        setext = _SETEXT.match(line)
        if setext and len(para) == 1 and not _TABLE_LINE.match(para[0][1]):
            title = para[0][1]
            para.clear()
            out.heading(1 if setext.group(1)[0] == "=" else 2, clean_heading(title))
            i += 1
            continue
        para.append((i + 1, line))
        i += 1
    flush()
    return [s for s in out.sections if s.blocks]


def _skip_front_matter(lines: list[str]) -> int:
    if lines and lines[0].strip() == "---":
        for j in range(1, min(len(lines), 200)):
            if lines[j].strip() in ("---", "..."):
                return j + 1
    return 0
