"""Prompt budgeting: lowest-ranked chunks go first, then the oldest history; never overflow."""

from __future__ import annotations

import pytest

from fieldpack.device.prompt import Turn, build_messages, fit_prompt, prompt_renderer
from fieldpack.retrieval.types import Hit
from fieldpack.shared.errors import QuestionTooLongError


def _hit(i: int, words: int = 50) -> Hit:
    return Hit(chunk_id=i, source=f"doc{i}.md", section="S", page=None, line_start=1, line_end=2,
               text=" ".join(f"w{i}" for _ in range(words)), score=1.0 / (i + 1))


def _render(msgs: list[dict[str, str]]) -> str:
    return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in msgs) + "<assistant>"


_prompt = prompt_renderer("chat", chat=_render)


def _tok(text: str) -> list[int]:
    return list(range(len(text.split())))


def test_everything_fits_when_budget_allows() -> None:
    hits = [_hit(i) for i in range(3)]
    p = fit_prompt("why?", hits, [Turn("q", "a")], render=_prompt, tokenize=_tok, budget_tokens=10_000)
    assert [h.chunk_id for h in p.hits] == [0, 1, 2]
    assert p.history_used == 1
    assert "[1] doc0.md § S, lines 1-2" in p.text


def test_drops_lowest_ranked_first_then_history() -> None:
    hits = [_hit(i) for i in range(3)]
    history = [Turn("old " * 30, "ans " * 30), Turn("new", "ans")]
    full = len(_tok(_render(build_messages("why?", hits, history))))
    p = fit_prompt("why?", hits, history, render=_prompt, tokenize=_tok, budget_tokens=full - 10)
    assert [h.chunk_id for h in p.hits] == [0, 1] and p.history_used == 2
    # the best source outlives the history: history goes (oldest first) before the last source
    one_hit_no_history = len(_tok(_render(build_messages("why?", hits[:1], []))))
    p = fit_prompt("why?", hits, history, render=_prompt, tokenize=_tok, budget_tokens=one_hit_no_history)
    assert [h.chunk_id for h in p.hits] == [0] and p.history_used < 2  # the long oldest turn went
    assert len(p.tokens) <= one_hit_no_history


def test_question_alone_too_long_is_refused() -> None:
    with pytest.raises(QuestionTooLongError, match="prompt tokens"):
        fit_prompt("word " * 500, [_hit(0)], [], render=_prompt, tokenize=_tok, budget_tokens=100)


def test_single_long_source_is_trimmed_not_dropped() -> None:
    big = _hit(0, words=400)
    only_question = len(_tok(_render(build_messages("why?", [], []))))
    p = fit_prompt("why?", [big, _hit(1)], [], render=_prompt, tokenize=_tok, budget_tokens=only_question + 120)
    assert [h.chunk_id for h in p.hits] == [0]
    assert len(p.hits[0].text.split()) < 400 and len(p.tokens) <= only_question + 120


def test_no_room_for_any_source_leaves_no_hits() -> None:
    only_question = len(_tok(_render(build_messages("why?", [], []))))
    p = fit_prompt("why?", [_hit(0, words=400)], [], render=_prompt, tokenize=_tok, budget_tokens=only_question + 5)
    assert p.hits == []
