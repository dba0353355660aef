"""Plain records the device runtime hands to its callers (CLI, chat, MQTT daemon, eval).

They are frozen dataclasses with JSON-ready ``to_dict`` methods; no native handles live here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import threading
from typing import Any, Callable, Protocol


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
        """Human-readable citation: ``file § section, p. N`` or ``file § section, lines a-b``."""
        parts = [self.source]
        if self.section:
            parts.append(f"§ {self.section}")
        if self.page is not None:
            parts.append(f"p. {self.page}")
        elif self.line_start is not None:
            parts.append(f"lines {self.line_start}-{self.line_end}")
        return ", ".join(parts[:1]) + (" " + ", ".join(parts[1:]) if len(parts) > 1 else "")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["citation"] = self.citation()
        return d


@dataclass(frozen=True)
class Timings:
    """Where the time of one answer went. Milliseconds unless named otherwise; tokens are model tokens."""

    retrieval_ms: float = 0.0
    prompt_tokens: int = 0
    prompt_eval_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    completion_tokens: int = 0
    decode_ms: float = 0.0
    tokens_per_s: float = 0.0
    total_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Answer:
    """The result of one question.

    Attributes:
        question: the question as asked (stripped).
        text: the generated answer; when ``abstained`` it is the fixed refusal sentence.
        sources: the chunks given to the model, numbered ``[1]..[n]`` in this order.
        abstained: True when retrieval found nothing relevant enough and no generation was run.
        timings: see :class:`Timings`.
        bundle: ``"name@version"`` of the bundle that answered.
        finish_reason: ``"stop"`` (EOS/EOT or stop string), ``"length"``, ``"cancelled"`` or ``"abstained"``.
    """

    question: str
    text: str
    sources: list[Hit]
    abstained: bool
    timings: Timings
    bundle: str
    finish_reason: str = "stop"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "answer": self.text,
            "abstained": self.abstained,
            "finish_reason": self.finish_reason,
            "bundle": self.bundle,
            "sources": [dict(h.to_dict(), n=i + 1) for i, h in enumerate(self.sources)],
            "timings": self.timings.to_dict(),
        }


class AnswerEngine(Protocol):
    """What answers questions: the device runtime (``device.runtime.Runtime``) or a test double.

    ``answer`` streams text pieces to ``on_token`` as they are generated (UTF-8 safe, stop strings already
    removed), checks ``cancel`` between tokens, and returns the full :class:`Answer`. Raises
    ``shared.errors.QueryError`` subclasses for a bad question.
    """

    @property
    def bundle_label(self) -> str: ...

    def answer(
        self,
        question: str,
        *,
        on_token: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Answer: ...


class EngineProvider(Protocol):
    """Hands out the engine of the currently active bundle; reloads (closing the old one) when the active slot
    changed since the last call. Called by the daemon between requests, never during one."""

    def get(self) -> AnswerEngine: ...

    def close(self) -> None: ...
