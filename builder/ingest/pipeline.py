"""``ingest``: a docs folder -> chunks + a per-file report."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from fieldpack.builder.ingest.chunker import chunk_sections
from fieldpack.builder.ingest.csv_loader import load_csv
from fieldpack.builder.ingest.decode import decode_document
from fieldpack.builder.ingest.exclude import EXCLUDED_REASON, Excludes, excluded_reason
from fieldpack.builder.ingest.html_loader import load_html
from fieldpack.builder.ingest.md_loader import load_markdown
from fieldpack.builder.ingest.model import Chunk, FileReport, IngestResult, Section, SkipFile
from fieldpack.builder.ingest.pdf_loader import load_pdf_report
from fieldpack.builder.ingest.text_loader import load_text
from fieldpack.shared.errors import IngestError, InputNotFoundError, NoDocumentsError, UsageError

log = logging.getLogger(__name__)

#: File extension (lower case) -> loader name.
FORMATS: dict[str, str] = {
    ".md": "markdown",
    ".markdown": "markdown",
    ".txt": "text",
    ".text": "text",
    ".rst": "text",
    ".log": "text",
    ".html": "html",
    ".htm": "html",
    ".xhtml": "html",
    ".pdf": "pdf",
    ".csv": "csv",
    ".tsv": "csv",
}


def ingest(
    docs_dir: Path,
    *,
    count_tokens: Callable[[str], int],
    chunk_tokens: int = 200,
    overlap_tokens: int = 40,
    exclude: Excludes | None = None,
) -> IngestResult:
    """Load every supported document under ``docs_dir`` and chunk it.

    Files are visited in sorted relative-path order (deterministic). Hidden folders (``.git``, ...) are not
    entered; hidden files, unsupported extensions, empty, binary and undecodable files are reported as skipped.

    Args:
        docs_dir: folder of Markdown, text, HTML, PDF and CSV files (sub-folders included).
        count_tokens: text -> tokens in the embedder's tokenizer, no special tokens
            (``OnnxEmbedder.count_tokens``).
        chunk_tokens: token budget per chunk (keep below the embedder's ``max_tokens`` - 2).
        overlap_tokens: tokens repeated from the previous chunk of the same section, 0 <= overlap < budget.
        exclude: ``--exclude`` patterns (:mod:`.exclude`); a file they match is reported as skipped
            ("excluded by --exclude 'PATTERN'") and not read. A pattern that matches no file is logged as a warning.

    Returns:
        :class:`IngestResult`: chunks in file order then document order; one :class:`FileReport` per file.

    Raises:
        InputNotFoundError: ``docs_dir`` does not exist or is not a folder.
        UsageError: bad budget/overlap.
        NoDocumentsError: no file yielded a chunk; the message says what was found and why it was skipped.
        IngestError: a file cannot be read (permissions, I/O error).
    """
    docs_dir = Path(docs_dir)
    if not docs_dir.exists():
        raise InputNotFoundError(f"docs folder {docs_dir} does not exist", hint="pass the folder of your documents")
    if not docs_dir.is_dir():
        raise InputNotFoundError(f"{docs_dir} is a file, not a docs folder", hint="pass the folder that holds it")
    if chunk_tokens < 1 or not 0 <= overlap_tokens < chunk_tokens:
        raise UsageError(
            f"chunk budget {chunk_tokens} tokens with overlap {overlap_tokens} tokens cannot work",
            hint="use chunk_tokens >= 1 and 0 <= overlap_tokens < chunk_tokens (e.g. 200 and 40)",
        )
    root = docs_dir.resolve()
    chunks: list[Chunk] = []
    report: list[FileReport] = []
    exclude = exclude or Excludes()
    paths = _walk(docs_dir)
    for pattern in exclude.unused(paths):
        log.warning("--exclude %r matches no file under %s (patterns are relative to it, case-sensitive)",
                    pattern, docs_dir)
    for rel in paths:
        hit = exclude.match(rel)
        if hit is not None:
            entry, file_chunks = FileReport(rel, "skipped", reason=excluded_reason(hit),
                                            size_bytes=_size(docs_dir / rel)), []
        else:
            entry, file_chunks = _ingest_file(docs_dir, root, rel, count_tokens, chunk_tokens, overlap_tokens)
        report.append(entry)
        chunks.extend(file_chunks)
        if entry.status == "skipped":
            log.info("skipped %s: %s", rel, entry.reason)
    if not chunks:
        excluded = any(r.reason.startswith(EXCLUDED_REASON) for r in report)
        raise NoDocumentsError(_nothing_message(docs_dir, report), hint=_nothing_hint(excluded=excluded))
    log.info(
        "ingested %d of %d files from %s: %d chunks, %d tokens",
        sum(r.status == "indexed" for r in report), len(report), docs_dir, len(chunks),
        sum(c.n_tokens for c in chunks),
    )
    return IngestResult(chunks=chunks, report=report)


def _walk(docs_dir: Path) -> list[str]:
    """Relative POSIX paths of the regular files under ``docs_dir``, sorted; hidden folders not entered."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(docs_dir, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        base = Path(dirpath).relative_to(docs_dir)
        found.extend((base / f).as_posix() for f in filenames)
    return sorted(found)


def _ingest_file(
    docs_dir: Path,
    root: Path,
    rel: str,
    count_tokens: Callable[[str], int],
    chunk_tokens: int,
    overlap_tokens: int,
) -> tuple[FileReport, list[Chunk]]:
    path = docs_dir / rel
    ext = path.suffix.lower()
    fmt = FORMATS.get(ext, "")
    size = _size(path)
    if path.name.startswith("."):
        return FileReport(rel, "skipped", reason="hidden file", size_bytes=size), []
    if path.is_symlink() and not _inside(path.resolve(), root):
        return FileReport(rel, "skipped", reason="symlink outside the docs folder", size_bytes=size), []
    if not path.is_file():
        return FileReport(rel, "skipped", reason="not a regular file", size_bytes=size), []
    if not fmt:
        why = f"unsupported extension {ext}" if ext else "unsupported extension (none)"
        return FileReport(rel, "skipped", reason=why, size_bytes=size), []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise IngestError(
            f"cannot read {path}: {exc.strerror or exc}", hint="check the file's permissions, or remove it"
        ) from exc
    encoding, had_bom, crlf, note = "", False, False, ""
    try:
        if fmt == "pdf":
            if not raw.strip():
                raise SkipFile("empty")
            sections, repairs = load_pdf_report(raw)
            encoding, digest = "binary", hashlib.sha256(raw).hexdigest()
            if repairs.total:  # said in the build's per-file report, like a decoding guess
                note = f"{repairs.joined} split words rejoined, {repairs.letter_runs} letter-spaced runs (PDF text layer)"
        else:
            dec = decode_document(raw)
            encoding, had_bom, crlf, note = dec.encoding, dec.had_bom, dec.crlf, dec.note
            digest = hashlib.sha256(dec.text.encode("utf-8")).hexdigest()
            if fmt == "markdown":
                sections = load_markdown(dec.text)
            elif fmt == "html":
                sections = load_html(dec.text)
            elif fmt == "csv":
                sections = load_csv(dec.text, title=path.stem, tsv=ext == ".tsv")
            else:
                sections = load_text(dec.text)
        pieces = chunk_sections(
            sections, count_tokens=count_tokens, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens
        )
        if not pieces:
            raise SkipFile("no text")
    except SkipFile as skip:
        entry = FileReport(
            rel, "skipped", reason=skip.reason, format=fmt, encoding=encoding, had_bom=had_bom, crlf=crlf,
            size_bytes=size,
        )
        return entry, []
    file_chunks = [
        Chunk(
            source=rel,
            section=p.section,
            page=p.page,
            line_start=p.line_start,
            line_end=p.line_end,
            text=p.text,
            n_tokens=p.n_tokens,
            doc_sha256=digest,
        )
        for p in pieces
    ]
    entry = FileReport(
        rel, "indexed", format=fmt, encoding=encoding, had_bom=had_bom, crlf=crlf, note=note, chunks=len(file_chunks),
        tokens=sum(c.n_tokens for c in file_chunks), size_bytes=size,
    )
    return entry, file_chunks


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _nothing_message(docs_dir: Path, report: list[FileReport]) -> str:
    if not report:
        return f"no documents in {docs_dir}: the folder is empty"
    reasons = Counter(EXCLUDED_REASON if r.reason.startswith(EXCLUDED_REASON) else r.reason.split(" (")[0]
                      for r in report)
    summary = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    return f"no indexable documents in {docs_dir}: found {len(report)} file(s), all skipped ({summary})"


def _nothing_hint(*, excluded: bool = False) -> str:
    kinds = ", ".join(sorted(set(FORMATS)))
    if excluded:
        return f"narrow the --exclude patterns, or add documents with one of the extensions {kinds}"
    return f"put documents with one of the extensions {kinds} in the folder (see the skipped reasons above)"
