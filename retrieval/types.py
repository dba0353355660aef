"""Records retrieval hands to its callers: the device runtime, the build's smoke question, eval."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk.

    Attributes:
        chunk_id: row id in the bundle index's ``chunks`` table.
        source: document path relative to the docs folder the bundle was built from (POSIX separators).
        section: heading path inside the document, ``" > "``-joined; ``""`` when the document has none.
        page: 1-based PDF page, or ``None`` for non-paginated documents.
        line_start, line_end: 1-based inclusive line range in the source text, or ``None`` (PDF).
        text: the chunk text as indexed.
        score: fused score (reciprocal rank fusion, higher is better; Cormack et al. 2009).
        vector_rank, bm25_rank: 1-based rank in each retriever's list, ``None`` when absent from it.
        vector_similarity: cosine similarity of query and chunk embeddings in [-1, 1], ``None`` if not scored.
        bm25: FTS5 ``bm25()`` score (lower is better, as SQLite returns it), ``None`` if not matched.
    """

    chunk_id: int
    source: str
    section: str
    page: int | None
    line_start: int | None
    line_end: int | None
    text: str
    score: float
    vector_rank: int | None = None
    bm25_rank: int | None = None
    vector_similarity: float | None = None
    bm25: float | None = None

    def citation(self) -> str:
        """Human-readable citation: ``file § section, p. N``, ``file § section, lines a-b``, or ``line a`` when the
        chunk is one line."""
        parts = [self.source]
        if self.section:
            parts.append(f"§ {self.section}")
        if self.page is not None:
            parts.append(f"p. {self.page}")
        elif self.line_start is not None:
            one = self.line_end is None or self.line_end == self.line_start
            parts.append(f"line {self.line_start}" if one else f"lines {self.line_start}-{self.line_end}")
        return ", ".join(parts[:1]) + (" " + ", ".join(parts[1:]) if len(parts) > 1 else "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["citation"] = self.citation()
        return d
