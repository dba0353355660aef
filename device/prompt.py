"""Grounded prompt construction inside a token budget.

The prompt follows the bundle's prompt format (``runtime.prompt_format``, :mod:`shared.prompt_format`): the
model's own chat template (``tokenizer.chat_template`` in the GGUF, Jinja2), so an instruction-tuned model sees
the turn markers it was trained on, with the instructions as a system turn or folded into the first user turn
when the template has no system role; or, for a base model, a plain-text completion prompt ending in an answer
cue. Retrieved chunks go in as numbered sources ``[1]..[n]`` in rank order; the budget is
``n_ctx - max_tokens`` tokens, and when the prompt would not fit, the lowest-ranked chunk is dropped first,
then the oldest history turn; the question itself is never cut (a question that alone does not fit raises
:class:`QuestionTooLongError`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from fieldpack.retrieval.types import Hit
from fieldpack.shared.errors import QuestionTooLongError
from fieldpack.shared.prompt_format import INSTRUCTIONS as SYSTEM_PROMPT
from fieldpack.shared.prompt_format import (
    PromptRenderer,
    Turn,
    build_messages,
    format_sources,
    prompt_renderer,
)

__all__ = ["SYSTEM_PROMPT", "ABSTAIN_TEXT", "NO_ROOM_TEXT", "BuiltPrompt", "PromptRenderer", "Turn",
           "build_messages", "fit_prompt", "format_sources", "prompt_renderer"]

#: Sentence returned, without generation, when retrieval finds nothing relevant enough.
ABSTAIN_TEXT = "I cannot answer that from the installed documents: no passage is relevant enough to the question."

#: Returned when relevant passages exist but not even a trimmed one fits the context beside the question.
NO_ROOM_TEXT = ("I cannot answer that within this model's context: the relevant passages do not fit beside the "
                "question. Ask a shorter question, or use a larger n_ctx or a smaller max_tokens.")

#: A source trimmed below this many words is dropped instead (too little left to ground an answer).
_MIN_SOURCE_WORDS = 24


@dataclass(frozen=True)
class BuiltPrompt:
    """A prompt ready for generation: ``tokens`` (model token ids) and the hits it cites, in citation order."""

    text: str
    tokens: list[int]
    hits: list[Hit]
    history_used: int


def fit_prompt(
    question: str,
    hits: Sequence[Hit],
    history: Sequence[Turn],
    *,
    render: PromptRenderer,
    tokenize: Callable[[str], list[int]],
    budget_tokens: int,
) -> BuiltPrompt:
    """Build the largest prompt that fits ``budget_tokens``.

    Drops the lowest-ranked hit first (down to one), then the oldest history turn, then halves the best hit's
    text (never below ``_MIN_SOURCE_WORDS`` words), until the rendered prompt's token count is at most
    ``budget_tokens``. The caller abstains when no hit is left. Cost: one render + tokenize per attempt.

    Args:
        render: the prompt format's renderer, (question, hits, history) -> prompt text (:func:`prompt_renderer`).
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
        text = render(question, hits, history)
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
                hint="ask a shorter question or for fewer answer tokens (max_tokens), or raise n_ctx if the device has "
                     "the memory",
            )
