"""HTML -> sections of blocks, with the standard library's ``html.parser``.

``h1``-``h6`` build the section path; block-level elements (p, div, li, tr, ...) end a paragraph; ``pre``
content is one ``code`` block with its whitespace kept; ``script``, ``style``, ``nav``, ``head``, ``template``,
``noscript``, ``svg`` and elements marked as navigation (``role="navigation"`` or a class such as ``docnav``,
``navbar``, ``breadcrumb``, ``toc``) are dropped with everything inside them, as are permalink anchors (class
``headerlink``, ``permalink``, ...; a trailing pilcrow is cut from a heading too). Line numbers are those of the normalised
HTML source where the block's text starts and ends.
"""

from __future__ import annotations

from html.parser import HTMLParser

from fieldpack.builder.ingest.model import Block, Section

_DROP = {"script", "style", "nav", "head", "title", "template", "noscript", "svg", "iframe", "object", "button", "select"}
_NAV_CLASSES = {"docnav", "nav", "navbar", "navigation", "breadcrumb", "breadcrumbs", "skip-link", "menu", "toc"}
#: Permalink anchors beside headings (Sphinx ``headerlink``, the Apache manual's ``permalink``, ...): their text is a
#: pilcrow, which leaked into section names and citations ("Log Rotation ¶", a new-user trial).
_ANCHOR_CLASSES = {"headerlink", "permalink", "anchor-link", "heading-anchor", "header-anchor"}
#: Symbols a heading's text may still end with when a generator marks its permalink another way.
_PERMALINK_MARKS = "¶🔗"
_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_BLOCK = {
    "address", "article", "aside", "blockquote", "body", "br", "caption", "dd", "details", "dialog", "div", "dl",
    "dt", "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "html", "li", "main", "ol", "p",
    "section", "summary", "table", "tbody", "tfoot", "thead", "tr", "ul",
}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track", "wbr"}
_CELL = {"td", "th"}


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[Section] = [Section(path="")]
        self.levels: dict[int, str] = {}
        self.drop_stack: list[str] = []  # open dropped elements (tag names), innermost last
        self.heading: tuple[int, list[str]] | None = None  # (level, text parts) while inside h1..h6
        self.pre_depth = 0
        self.buf: list[str] = []  # text of the open block
        self.start: int | None = None  # line of its first non-space character
        self.end: int | None = None  # line of its last non-space character

    # --- structure -----------------------------------------------------------------------------------------
    def _dropped(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in _DROP:
            return True
        a = dict(attrs)
        if (a.get("role") or "").lower() == "navigation":
            return True
        return bool(set((a.get("class") or "").lower().split()) & (_NAV_CLASSES | _ANCHOR_CLASSES))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.drop_stack:
            if tag not in _VOID:
                self.drop_stack.append(tag)
            return
        if self._dropped(tag, attrs):
            if tag not in _VOID:
                self.drop_stack.append(tag)
            return
        if tag in _HEADINGS:
            self.flush()
            self.heading = (_HEADINGS[tag], [])
        elif tag == "pre":
            self.flush()
            self.pre_depth += 1
        elif tag in _CELL:
            self.buf.append(" ")
        elif tag in _BLOCK and not self.pre_depth:
            self.flush()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self.drop_stack and tag in _BLOCK and not self.pre_depth:
            self.flush()

    def handle_endtag(self, tag: str) -> None:
        if self.drop_stack:
            # Close up to the matching open tag (tolerates unclosed children such as <li> or <p>).
            if tag in self.drop_stack:
                while self.drop_stack and self.drop_stack.pop() != tag:
                    pass
            return
        if tag in _HEADINGS and self.heading is not None:
            level, parts = self.heading
            self.heading = None
            title = " ".join("".join(parts).split()).rstrip(_PERMALINK_MARKS + " ")
            self.levels = {lv: t for lv, t in self.levels.items() if lv < level}
            if title:
                self.levels[level] = title
            self.sections.append(Section(path=" > ".join(self.levels[lv] for lv in sorted(self.levels))))
        elif tag == "pre" and self.pre_depth:
            self.pre_depth -= 1
            if not self.pre_depth:
                self.flush(kind="code")
        elif tag in _BLOCK and not self.pre_depth:
            self.flush()

    def handle_data(self, data: str) -> None:
        if self.drop_stack:
            return
        if self.heading is not None:
            self.heading[1].append(data)
            return
        stripped = data.strip()
        if stripped or self.pre_depth:
            line = self.getpos()[0]
            if stripped:
                lead = data[: len(data) - len(data.lstrip())]
                if self.start is None:
                    self.start = line + lead.count("\n")
                self.end = line + data.rstrip().count("\n")
        self.buf.append(data)

    def flush(self, kind: str = "para") -> None:
        raw = "".join(self.buf)
        self.buf.clear()
        if kind == "code":
            text = raw.strip("\n")
            text = "\n".join(line.rstrip() for line in text.split("\n"))
        else:
            text = " ".join(raw.split())
        if text.strip() and self.start is not None:
            self.sections[-1].blocks.append(Block(text, kind, self.start, self.end))  # type: ignore[arg-type]
        self.start = self.end = None


def load_html(text: str) -> list[Section]:
    """Parse normalised HTML ``text`` into sections of ``para``/``code`` blocks (empty sections dropped)."""
    parser = _Parser()
    parser.feed(text)
    parser.close()
    parser.flush()
    return [s for s in parser.sections if s.blocks]
