"""Records of the ingest stage: what loaders produce (sections of blocks) and what ingest returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: ``para``: prose, split by sentences when too long; ``code``: a fenced/pre block, kept whole, split by lines
#: only when it alone exceeds the budget; ``table``: table lines, split by lines; ``row``: one CSV record.
BlockKind = Literal["para", "code", "table", "row"]


@dataclass(frozen=True)
class Block:
    """A structural unit a loader found: a paragraph, code block, table or CSV row.

    ``line_start``/``line_end``: 1-based inclusive lines in the normalised text (LF line ends, no BOM), or
    ``None`` for PDF.
    """

    text: str
    kind: BlockKind
    line_start: int | None = None
    line_end: int | None = None


@dataclass
class Section:
    """Blocks under one heading path (``" > "``-joined, ``""`` before the first heading) or on one PDF page."""

    path: str
    page: int | None = None
    blocks: list[Block] = field(default_factory=list)


@dataclass(frozen=True)
class Chunk:
    """One retrievable piece of a document.

    Attributes:
        source: path relative to the docs folder, POSIX separators (``procedures/pumps.md``).
        section: heading path, ``" > "``-joined (``"Pumps and pressure > Cavitation"``); ``""`` when none.
        page: 1-based PDF page, ``None`` otherwise.
        line_start, line_end: 1-based inclusive lines in the normalised text; ``None`` for PDF.
        text: the chunk text (the section path is not repeated in it; see :meth:`embedding_text`).
        n_tokens: ``count_tokens(text)``, in embedder tokens.
        doc_sha256: hex sha256 of the document's normalised text (UTF-8, LF line ends, no BOM) for text
            formats, of the file bytes for PDF: the same content gives the same digest whatever its line ends.
    """

    source: str
    section: str
    page: int | None
    line_start: int | None
    line_end: int | None
    text: str
    n_tokens: int
    doc_sha256: str

    def embedding_text(self) -> str:
        """Text to embed: the section path as a title line, then the chunk text (the section is context the
        chunk itself often lacks: a paragraph under "Connection pool exhausted" may never say it)."""
        return f"{self.section}\n{self.text}" if self.section else self.text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FileStatus = Literal["indexed", "skipped"]


@dataclass(frozen=True)
class FileReport:
    """What ingest did with one file.

    Attributes:
        path: relative POSIX path.
        status: ``"indexed"`` or ``"skipped"``.
        reason: why skipped (``"empty"``, ``"binary (NUL bytes)"``, ``"unsupported extension .xyz"``,
            ``"decode error"``, ``"no text"``, ...); ``""`` when indexed.
        format: loader used (``markdown``, ``text``, ``html``, ``pdf``, ``csv``) or ``""``.
        encoding: codec the text was decoded with (``utf-8``, ``utf-8-sig``, ``utf-16``, ``cp1252``,
            ``latin-1``), ``"binary"`` for PDF, ``""`` when not decoded.
        had_bom: the file started with a byte-order mark.
        crlf: the file used CRLF or CR line ends (normalised to LF).
        note: what decoding guessed or replaced (``"guessed cp1251"``, ``"1 invalid UTF-8 sequence replaced"``,
            ``"2 control characters removed"``); ``""`` for plain valid text.
        chunks: chunks made from it.
        tokens: sum of their ``n_tokens``.
        size_bytes: file size in bytes.
    """

    path: str
    status: FileStatus
    reason: str = ""
    format: str = ""
    encoding: str = ""
    had_bom: bool = False
    crlf: bool = False
    note: str = ""
    chunks: int = 0
    tokens: int = 0
    size_bytes: int = 0


@dataclass(frozen=True)
class IngestResult:
    """Chunks of every indexed file, in sorted path order, and one report entry per file seen."""

    chunks: list[Chunk]
    report: list[FileReport]

    @property
    def indexed(self) -> list[FileReport]:
        return [r for r in self.report if r.status == "indexed"]

    @property
    def skipped(self) -> list[FileReport]:
        return [r for r in self.report if r.status == "skipped"]

    @property
    def total_tokens(self) -> int:
        return sum(c.n_tokens for c in self.chunks)


class SkipFile(Exception):
    """Internal: a loader or the decoder decided the file is not indexable; ``reason`` goes to the report.

    Never escapes :func:`builder.ingest.ingest` (it becomes a ``"skipped"`` :class:`FileReport`).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
