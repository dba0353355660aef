"""Documents in, chunks out: the ingest stage of the builder.

``ingest(docs_dir, count_tokens=...)`` walks a folder, loads each supported file (Markdown, plain text, HTML,
PDF, CSV/TSV), chunks it along its structure under a token budget and reports what happened to every file.

Modules: ``decode`` (bytes -> normalised text), ``md_loader`` / ``text_loader`` / ``html_loader`` /
``pdf_loader`` / ``csv_loader`` (text -> sections of blocks), ``chunker`` (sections -> chunks), ``pipeline``
(the walk), ``report`` (JSON and rich forms).
"""

from fieldpack.builder.ingest.model import Chunk, FileReport, IngestResult
from fieldpack.builder.ingest.pipeline import FORMATS, ingest
from fieldpack.builder.ingest.report import report_table, report_to_dict

__all__ = ["FORMATS", "Chunk", "FileReport", "IngestResult", "ingest", "report_table", "report_to_dict"]
