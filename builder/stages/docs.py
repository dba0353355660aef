"""Stages that follow the documents: ``ingest`` (files -> chunks), ``index`` (embed + sqlite-vec/FTS5) and
``smoke question`` (a question the device's own retrieval must answer from the right document).

A docs-only change reruns these three (and the model stages that read document text: the eval split and
PPL/KLD); the embedder and the language model stages are reused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fieldpack.builder.index_build import IndexStats
from fieldpack.builder.ingest.model import Chunk, FileReport
from fieldpack.builder.stages.base import Input, Stage, StageInputs, StageRecord
from fieldpack.shared.errors import BuildError

CHUNKS_NAME = "chunks.jsonl"
INGEST_CODE = ("fieldpack.builder.ingest",)


# --- ingest ----------------------------------------------------------------------------------------------------
class IngestInputs(StageInputs):
    docs: Input
    tokenizer: Input  # the embedder's tokenizer.json: chunk budgets are counted in its tokens
    chunk_tokens: int
    overlap_tokens: int
    exclude: tuple[str, ...] = ()  # --exclude patterns (builder.ingest.exclude), in the order given


class IngestRecord(StageRecord):
    """``report``: one entry per file seen; counts of files and chunks; chunks are in ``chunks.jsonl``."""

    report: list[FileReport]
    indexed_files: int
    skipped_files: int
    chunks: int
    tokens: int

    def load_chunks(self) -> list[Chunk]:
        """The chunks, in ingest order (one JSON object per line of ``chunks.jsonl``)."""
        return _read_chunks(self.artefact(CHUNKS_NAME).path)


def run_ingest(inputs: IngestInputs, out_dir: Path) -> IngestRecord:
    """Load and chunk every document. Raises NoDocumentsError, IngestError, InputNotFoundError (see ingest)."""
    from fieldpack.builder.ingest import ingest
    from fieldpack.builder.ingest.exclude import Excludes
    from fieldpack.retrieval.embedder import load_tokenizer

    counter = load_tokenizer(inputs.tokenizer.path, max_tokens=None)
    result = ingest(inputs.docs.path, count_tokens=lambda t: len(counter.encode(t, add_special_tokens=False).ids),
                    chunk_tokens=inputs.chunk_tokens, overlap_tokens=inputs.overlap_tokens,
                    exclude=Excludes.parse(inputs.exclude))
    with open(out_dir / CHUNKS_NAME, "w", encoding="utf-8") as fh:
        for c in result.chunks:
            fh.write(json.dumps(c.to_dict(), ensure_ascii=False, sort_keys=True) + "\n")
    return IngestRecord(report=result.report, indexed_files=len(result.indexed), skipped_files=len(result.skipped),
                        chunks=len(result.chunks), tokens=result.total_tokens)


INGEST = Stage("ingest", "1", IngestRecord, run_ingest, libraries=("tokenizers", "pypdf", "beautifulsoup4"),
               code=INGEST_CODE)


# --- index -----------------------------------------------------------------------------------------------------
class EmbedderFiles(StageInputs):
    """The exported embedder as a later stage reads it."""

    onnx: Input
    tokenizer: Input
    max_tokens: int
    name: str

    def open(self) -> Any:
        """An :class:`~fieldpack.retrieval.embedder.OnnxEmbedder` on these files (close it)."""
        from fieldpack.retrieval.embedder import OnnxEmbedder

        return OnnxEmbedder(self.onnx.path, self.tokenizer.path, max_tokens=self.max_tokens)


class IndexInputs(StageInputs):
    chunks: Input
    embedder: EmbedderFiles


class IndexRecord(StageRecord):
    stats: IndexStats


INDEX_NAME = "index.sqlite"


def run_index(inputs: IndexInputs, out_dir: Path) -> IndexRecord:
    """Embed every chunk and write the sqlite-vec + FTS5 index. Raises IngestError, OutputNotWritableError."""
    from fieldpack.builder.index_build import build_index, embed_chunks

    chunks = _read_chunks(inputs.chunks.path)
    with inputs.embedder.open() as embedder:
        vectors = embed_chunks(chunks, embedder)
    return IndexRecord(stats=build_index(chunks, vectors, out_dir / INDEX_NAME, embedder_name=inputs.embedder.name))


INDEX = Stage("index", "1", IndexRecord, run_index, libraries=("onnxruntime", "tokenizers", "sqlite-vec", "apsw"),
              code=("fieldpack.builder.index_build", "fieldpack.retrieval"))


# --- smoke question --------------------------------------------------------------------------------------------
class SmokeInputs(StageInputs):
    chunks: Input
    index: Input
    embedder: EmbedderFiles
    k: int = 5


class SmokeRecord(StageRecord):
    question: str
    expected_source: str
    k: int


def run_smoke(inputs: SmokeInputs, out_dir: Path) -> SmokeRecord:
    """Pick the post-install smoke question with the device's retriever. Raises BuildError if none works."""
    from fieldpack.retrieval.search import Retriever

    chunks = _read_chunks(inputs.chunks.path)
    with inputs.embedder.open() as embedder:
        retriever = Retriever(inputs.index.path, embedder)
        try:
            q, src = choose_smoke_question(chunks, lambda q, k: [h.source for h in retriever.search(q, k=k)],
                                           k=inputs.k)
        finally:
            retriever.close()
    return SmokeRecord(question=q, expected_source=src, k=inputs.k)


SMOKE = Stage("smoke", "1", SmokeRecord, run_smoke, libraries=("onnxruntime", "sqlite-vec", "apsw"),
              code=("fieldpack.retrieval",), label=lambda _: "smoke question")


def choose_smoke_question(chunks: list[Any], search: Callable[[str, int], list[str]], k: int = 5) -> tuple[str, str]:
    """Pick a smoke question for the device's post-install check: a section title (or the chunk's first
    sentence) whose own document comes back in the top ``k``. Returns (question, expected source).

    Raises:
        BuildError: no candidate among the first 200 retrieves its own document.
    """
    candidates: list[tuple[str, str]] = []
    for c in chunks:
        title = c.section.split(" > ")[-1].strip() if c.section else ""
        if len(title.split()) >= 2:
            candidates.append((title, c.source))
    for c in chunks:
        first = c.text.strip().split(". ")[0][:200]
        if len(first.split()) >= 4:
            candidates.append((first, c.source))
    for question, source in candidates[:200]:
        if source in search(question, k):
            return question, source
    raise BuildError("no smoke question retrieves its own document from the index",
                     hint="check the documents: they may be near-duplicates or too short")


def _read_chunks(path: Path) -> list[Chunk]:
    with open(path, encoding="utf-8") as fh:
        return [Chunk(**json.loads(line)) for line in fh if line.strip()]
