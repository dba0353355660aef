"""CSV/TSV -> one section of ``row`` blocks, each row rendered ``"header: value; header: value"``.

Rendering every row with its headers makes a row searchable on its own (BM25 sees "priority: high", the
embedder sees what each value means). The chunker then packs consecutive rows into chunks. The first row is
the header; the delimiter is sniffed (``,`` ``;`` tab ``|``), defaulting to ``,`` (tab for ``.tsv``).
"""

from __future__ import annotations

import csv
import io

from fieldpack.builder.ingest.model import Block, Section, SkipFile


def load_csv(text: str, *, title: str, tsv: bool = False) -> list[Section]:
    """Parse normalised CSV ``text``; the single section is named ``title`` (the file stem).

    Raises:
        SkipFile: ``"no text"`` (a header and no data rows) or ``"unreadable CSV (...)"``.
    """
    delimiter = "\t" if tsv else ","
    if not tsv:
        try:
            delimiter = csv.Sniffer().sniff(text[:8192], delimiters=",;\t|").delimiter
        except csv.Error:
            pass
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    section = Section(path=title)
    header: list[str] | None = None
    last_line = 0
    try:
        for row in reader:
            first, last_line = last_line + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [" ".join(h.split()) or f"column {i + 1}" for i, h in enumerate(row)]
                continue
            parts = []
            for i, cell in enumerate(row):
                value = " ".join(cell.split())
                if value:
                    name = header[i] if i < len(header) else f"column {i + 1}"
                    parts.append(f"{name}: {value}")
            if parts:
                section.blocks.append(Block("; ".join(parts), "row", first, last_line))
    except csv.Error as exc:
        raise SkipFile(f"unreadable CSV (line {reader.line_num}: {exc})") from exc
    if not section.blocks:
        raise SkipFile("no text")
    return [section]
