"""The ingest report: a JSON-able form and a rich table."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from fieldpack.builder.ingest.model import FileReport, IngestResult

if TYPE_CHECKING:
    from rich.table import Table


def report_to_dict(item: IngestResult | FileReport) -> dict[str, Any]:
    """JSON-ready form of one :class:`FileReport` (its fields), or of a whole :class:`IngestResult`:
    ``files`` (one dict per file), ``indexed`` and ``skipped`` (counts), ``chunks``, ``tokens``."""
    if isinstance(item, FileReport):
        return asdict(item)
    result = item
    return {
        "files": [asdict(r) for r in result.report],
        "indexed": len(result.indexed),
        "skipped": len(result.skipped),
        "chunks": len(result.chunks),
        "tokens": result.total_tokens,
    }


def _notes(r: FileReport) -> str:
    notes = []
    if r.encoding and r.encoding not in ("utf-8", "binary"):
        notes.append(r.encoding)
    if r.had_bom:
        notes.append("BOM")
    if r.crlf:
        notes.append("CRLF")
    if r.note:
        notes.append(r.note)
    return ", ".join(notes)


def report_table(result: IngestResult, *, title: str = "Documents") -> Table:
    """A ``rich.table.Table`` with one row per file (status, format, chunks, tokens, reason or notes) and a
    totals caption; print it with ``rich.console.Console().print(...)``."""
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    table.add_column("file", overflow="fold")
    table.add_column("status")
    table.add_column("format")
    table.add_column("chunks", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("notes", overflow="fold")
    for r in result.report:
        status = "[green]indexed[/green]" if r.status == "indexed" else "[yellow]skipped[/yellow]"
        table.add_row(
            r.path, status, r.format or "-", str(r.chunks), str(r.tokens), r.reason if r.reason else _notes(r)
        )
    table.caption = (
        f"{len(result.indexed)} indexed, {len(result.skipped)} skipped; "
        f"{len(result.chunks)} chunks, {result.total_tokens} tokens"
    )
    return table
