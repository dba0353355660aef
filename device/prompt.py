"""Grounded prompt construction inside a token budget.

The prompt is rendered with the model's own chat template (``tokenizer.chat_template`` in the GGUF, Jinja2,
through llama-cpp-python's ``Jinja2ChatFormatter``), so the model sees the turn markers it was trained on.
Retrieved chunks go into the user turn as numbered sources ``[1]..[n]`` in rank order; the budget is
``n_ctx - max_tokens`` tokens, and when the prompt would not fit, the lowest-ranked chunk is dropped first,
then the oldest history turn; the question itself is never cut (a question that alone does not fit raises
:class:`QuestionTooLongError`).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from fieldpack.retrieval.types import Hit
from fieldpack.shared.errors import QuestionTooLongError

SYSTEM_PROMPT = (
    "You are a field assistant working offline. Answer the question using only the numbered sources. "
    "Cite the sources you use as [1], [2]. If the sources do not contain the answer, say that the documents "
    "do not answer it."
)

#: Sentence returned, without generation, when retrieval finds nothing relevant enough.
ABSTAIN_TEXT = "I cannot answer that from the installed documents: no passage is relevant enough to the question."

#: Returned when relevant passages exist but not even a trimmed one fits the context beside the question.
NO_ROOM_TEXT = ("I cannot answer that within this model's context: the relevant passages do not fit beside the "
                "question. Ask a shorter question, or use a larger n_ctx or a smaller max_tokens.")

#: Largest share of a chunk's characters put into the prompt; chunks are already small (embedder-token sized).
_MAX_SOURCE_CHARS = 2000
#: A source trimmed below this many words is dropped instead (too little left to ground an answer).
_MIN_SOURCE_WORDS = 24


@dataclass(frozen=True)
class Turn:
    """One past exchange kept as chat history (plain text, no sources)."""

    question: str
    answer: str


@dataclass(frozen=True)
class BuiltPrompt:
    """A prompt ready for generation: ``tokens`` (model token ids) and the hits it cites, in citation order."""

    text: str
    tokens: list[int]
    hits: list[Hit]
    history_used: int


def format_sources(hits: Sequence[Hit]) -> str:
    """Render hits as ``[n] citation\\ntext`` blocks separated by blank lines."""
    blocks = []
    for i, h in enumerate(hits, start=1):
        text = unicodedata.normalize("NFC", h.text[:_MAX_SOURCE_CHARS].strip())
        blocks.append(f"[{i}] {h.citation()}\n{text}")
    return "\n\n".join(blocks)


def build_messages(question: str, hits: Sequence[Hit], history: Sequence[Turn]) -> list[dict[str, str]]:
    """Chat messages (OpenAI-style role/content dicts) for the chat template."""
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}]
    for t in history:
        msgs.append({"role": "user", "content": t.question})
        msgs.append({"role": "assistant", "content": t.answer})
    user = f"Sources:\n{format_sources(hits)}\n\nQuestion: {question}" if hits else f"Question: {question}"
    msgs.append({"role": "user", "content": user})
    return msgs


def fit_prompt(
    question: str,
    hits: Sequence[Hit],
    history: Sequence[Turn],
    *,
    render: Callable[[list[dict[str, str]]], str],
    tokenize: Callable[[str], list[int]],
    budget_tokens: int,
) -> BuiltPrompt:
    """Build the largest prompt that fits ``budget_tokens``.

    Drops the lowest-ranked hit first (down to one), then the oldest history turn, then halves the best hit's
    text (never below ``_MIN_SOURCE_WORDS`` words), until the rendered prompt's token count is at most
    ``budget_tokens``. The caller abstains when no hit is left. Cost: one render + tokenize per attempt.

    Args:
        render: chat template renderer, messages -> prompt text (with the generation prompt appended).
        tokenize: prompt text -> model token ids (BOS handled by the caller's tokenizer).
        budget_tokens: ``n_ctx - max_tokens`` (tokens).

    Raises:
        QuestionTooLongError: even with no sources and no history the prompt exceeds the budget.
    """
    hits = list(hits)
    history = list(history)
    best = hits[0] if hits else None
    keep_words = len(best.text.split()) if best else 0
    while True:
        text = render(build_messages(question, hits, history))
        tokens = tokenize(text)
        if len(tokens) <= budget_tokens:
            return BuiltPrompt(text=text, tokens=tokens, hits=hits, history_used=len(history))
        if len(hits) > 1:
            hits.pop()
        elif history:
            history.pop(0)
        elif hits and keep_words > _MIN_SOURCE_WORDS:
            # the best source alone is too long: keep its first half rather than answer ungrounded
            keep_words = max(_MIN_SOURCE_WORDS, keep_words // 2)
            hits[0] = replace(best, text=" ".join(best.text.split()[:keep_words]) + " …")
        elif hits:
            hits.pop()
        else:
            raise QuestionTooLongError(
                f"the question needs {len(tokens)} prompt tokens but the context allows {budget_tokens} "
                f"(n_ctx minus the answer's max_tokens)",
                hint="ask a shorter question, or raise --n-ctx if the device has the memory",
            )
