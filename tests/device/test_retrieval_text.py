"""Questions with control characters or compatibility forms, on a real index; SQLite errors named for what
they are (damage only when SQLite says so)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from fieldpack.retrieval.search import Retriever
from fieldpack.shared.errors import EmptyQuestionError, RuntimeLoadError
from tests.retrieval_fixtures import demo_index, embedder, minilm_int8  # noqa: F401


@pytest.fixture()
def retriever(demo_index: Path, embedder: Any):  # noqa: ANN201,F811
    r = Retriever(demo_index, embedder)
    yield r
    r.close()


@pytest.mark.parametrize("mode", ["hybrid", "bm25", "vector"])
@pytest.mark.parametrize("dirty", ["What is cavitation\x00", "\x00What is\x1f cavitation\x7f", "What is cavitation\x85\x9f"])
def test_control_characters_in_the_question_are_removed(retriever: Retriever, mode: str, dirty: str) -> None:
    clean = [h.chunk_id for h in retriever.search("What is cavitation", k=5, mode=mode)]
    assert clean and [h.chunk_id for h in retriever.search(dirty, k=5, mode=mode)] == clean


def test_only_control_characters_is_an_empty_question(retriever: Retriever) -> None:
    with pytest.raises(EmptyQuestionError):
        retriever.search("\x00\x01\x02", k=3)


def test_ligature_question_finds_the_plain_document(retriever: Retriever) -> None:
    plain = [h.chunk_id for h in retriever.search("connection pool configuration", k=5, mode="bm25")]
    assert plain
    assert [h.chunk_id for h in retriever.search("connection pool con\ufb01guration", k=5, mode="bm25")] == plain


def test_sqlite_errors_blame_damage_only_when_it_is_damage(demo_index: Path, embedder: Any, tmp_path: Path) -> None:  # noqa: F811
    r = Retriever(demo_index, embedder)
    try:
        with pytest.raises(RuntimeLoadError) as ei:  # a statement error: the file is fine
            r._query("SELECT no_such_column FROM chunks", ())
        assert "damaged" not in str(ei.value) and "reinstall" not in str(ei.value)
        assert "index itself is fine" in str(ei.value)
    finally:
        r.close()
    broken = tmp_path / "index.sqlite"
    shutil.copy(demo_index, broken)
    r = Retriever(broken, embedder)
    try:
        with open(broken, "r+b") as f:  # overwrite every page after the first: SQLITE_CORRUPT on read
            f.seek(4096)
            size = broken.stat().st_size
            f.write(b"\xa5" * (size - 4096))
        with pytest.raises(RuntimeLoadError) as ei:
            r.search("What is cavitation", k=5, mode="bm25")
        assert "damaged" in str(ei.value) and "verify --installed" in str(ei.value)
    finally:
        r.close()


def test_chunk_texts_gives_the_stored_text(retriever: Retriever) -> None:
    hits = retriever.search("What is cavitation", k=3)
    texts = retriever.chunk_texts([h.chunk_id for h in hits] + [10**9])
    assert set(texts) == {h.chunk_id for h in hits} and all(texts[h.chunk_id] == h.text for h in hits)


def test_content_terms_drop_stop_words_even_when_nothing_is_left() -> None:
    from fieldpack.retrieval.search import content_terms, fts5_query

    assert content_terms("What should I do about it?") == []
    assert fts5_query("What should I do about it?") is not None  # BM25 still searches the stop words then
    assert content_terms("How do I clear alarm A-202?") == ["clear", "alarm", "A-202"]


def test_unknown_terms_are_the_words_no_chunk_uses(retriever: Retriever) -> None:
    """Matched as BM25 matches them (Porter stemming): the demo documents say "backwash", so "backwashing" is
    known; nothing there mentions a pharmacy."""
    assert retriever.unknown_terms("Nearest pharmacy?") == ["Nearest", "pharmacy"]
    assert retriever.unknown_terms("Backwashing the filters?") == []
    assert retriever.unknown_terms("What should I do about it?") == []
