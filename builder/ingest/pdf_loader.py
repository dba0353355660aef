"""PDF -> one section per page, with pypdf's text extraction.

Each page's text is split into paragraphs at blank lines (pypdf often emits none: then the page is one
paragraph and the chunker splits it by sentences). The section is the page's first heading-like line (short,
starts with a capital or a section number, no final punctuation) or ``""``. No line numbers: pages cite.
"""

from __future__ import annotations

import io
import logging
import re

from fieldpack.builder.ingest.model import Block, Section, SkipFile
from fieldpack.builder.ingest.pdf_spacing import Lexicon, SpacingRepair, repair_spacing
from fieldpack.shared.text import normalize_for_search

log = logging.getLogger(__name__)

MAX_HEADING_CHARS = 80
_HEADING = re.compile(r"^(\d+(\.\d+)*\.?\s+)?[A-Z][^\n]*$")


def page_heading(lines: list[str]) -> str:
    """First heading-like line among the first five non-empty ``lines``, or ``""``."""
    for line in [ln.strip() for ln in lines if ln.strip()][:5]:
        if (
            len(line) <= MAX_HEADING_CHARS
            and _HEADING.match(line)
            and not line.endswith((".", ",", ";", ":"))
            and sum(c.isalpha() for c in line) >= 3
        ):
            return " ".join(line.split())
    return ""


def load_pdf(raw: bytes) -> list[Section]:
    """Extract the text of every page of the PDF ``raw`` (:func:`load_pdf_report` without the repair counts)."""
    return load_pdf_report(raw)[0]


def load_pdf_report(raw: bytes) -> tuple[list[Section], SpacingRepair]:
    """Extract the text of every page of the PDF ``raw``, folded for search and with split words rejoined.

    Returns:
        (one section per page with text, counts of the spacing repairs made: see
        :mod:`fieldpack.builder.ingest.pdf_spacing`).

    Raises:
        SkipFile: ``"unreadable PDF (...)"`` when pypdf cannot parse it, ``"encrypted PDF"`` when it needs a
            password, ``"no text (scanned PDF?)"`` when no page has extractable text.
    """
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted and not reader.decrypt(""):
            raise SkipFile("encrypted PDF")
        pages = list(reader.pages)
    except SkipFile:
        raise
    except Exception as exc:  # pypdf raises PyPdfError but also bare ValueError/KeyError/... on damaged files
        raise SkipFile(f"unreadable PDF ({type(exc).__name__}: {exc})") from exc
    texts: list[tuple[int, str]] = []
    for number, page in enumerate(pages, start=1):
        try:
            text = page.extract_text() or ""
        except Exception as exc:  # as above: one damaged page must not lose the document
            log.warning("page %d: text extraction failed (%s); skipping the page", number, exc)
            continue
        texts.append((number, normalize_for_search(text.replace("\r\n", "\n").replace("\r", "\n"))))  # "ﬁ" -> "fi"
    lexicon = Lexicon(t for _, t in texts)
    repairs = SpacingRepair()
    sections: list[Section] = []
    for number, text in texts:
        text, counts = repair_spacing(text, lexicon)
        repairs.joined += counts.joined
        repairs.letter_runs += counts.letter_runs
        lines = text.split("\n")
        section = Section(path=page_heading(lines), page=number)
        for para in re.split(r"\n[ \t]*\n", text):
            if para.strip():
                section.blocks.append(Block(para.strip(), "para"))
        if section.blocks:
            sections.append(section)
    if not sections:
        raise SkipFile("no text (scanned PDF?)")
    return sections, repairs
