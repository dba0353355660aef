"""Deciding, at build time, how the device will prompt the model, and rendering the real prompt once.

A base model (no chat template) gets the plain-text completion prompt; a chat template that refuses a system
role gets the instructions folded into the first user turn; a template that cannot render at all is refused
here, with the fix, never on the device at answer time (:func:`shared.prompt_format.decide_prompt_format`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fieldpack.shared.errors import BuildError
from fieldpack.shared.prompt_format import (
    COMPLETION_STOP,
    COMPLETION_TEMPLATE,
    ChatTemplate,
    PromptFormatName,
    Source,
    decide_prompt_format,
    prompt_renderer,
    template_echo_stops,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptPlan:
    """The prompt format a bundle records (``runtime.prompt_format``) and what rendering it needs.

    Attributes:
        prompt_format: ``chat``, ``chat-no-system`` or ``completion``.
        completion_template: the template text for ``completion`` (None otherwise).
        extra_stop: stop strings added to the model's EOS/EOT texts (the completion format's).
        chat_template / bos_token / eos_token: for rendering chat formats at build time.
    """

    prompt_format: PromptFormatName
    completion_template: str | None = None
    extra_stop: list[str] = field(default_factory=list)
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    origin: str = "the model"

    def renderer(self) -> Callable[[str, Sequence[Source], Sequence], str]:
        """(question, sources, history) -> prompt text, exactly as the device renders it."""
        chat = None
        if self.prompt_format != "completion":
            chat = ChatTemplate(self.chat_template or "", bos_token=self.bos_token, eos_token=self.eos_token,
                                origin=self.origin).render
        return prompt_renderer(self.prompt_format, chat=chat, completion_template=self.completion_template)


def plan_prompt(chat_template: str | None, requested: str | None, *, bos_token: str = "", eos_token: str = "",
                origin: str = "the model") -> PromptPlan:
    """Decide the prompt format (see :func:`shared.prompt_format.decide_prompt_format`).

    Raises:
        ChatTemplateError: the format cannot be decided (a BuildError; the fix names ``--prompt-format``).
    """
    fmt = decide_prompt_format(chat_template, requested, bos_token=bos_token, eos_token=eos_token, origin=origin)
    if fmt == "completion":
        return PromptPlan("completion", completion_template=COMPLETION_TEMPLATE, extra_stop=[*COMPLETION_STOP, *template_echo_stops(COMPLETION_TEMPLATE)],
                          origin=origin)
    return PromptPlan(fmt, chat_template=chat_template, bos_token=bos_token, eos_token=eos_token, origin=origin)


def check_real_prompt(plan: PromptPlan, question: str, sources: Sequence[Source], *,
                      count_tokens: Callable[[str], int], budget_tokens: int) -> int:
    """Render the prompt the device will build for ``question`` over its retrieved ``sources`` (the smoke
    question), so a template that breaks on real content fails the build, not the first ``ask``.

    Returns:
        The prompt's length in model tokens (counted with ``count_tokens``; informative: the device trims
        sources to ``budget_tokens`` = n_ctx - max_tokens).

    Raises:
        ChatTemplateError: the template fails on the real prompt.
        BuildError: not even the question with the best source alone fits the budget.
    """
    render = plan.renderer()
    n = count_tokens(render(question, list(sources), []))
    if n > budget_tokens:
        n_one = count_tokens(render(question, list(sources[:1]), []))
        if n_one > budget_tokens:
            raise BuildError(f"the prompt for the smoke question needs {n_one} tokens with one source, more than "
                             f"n_ctx - max_tokens = {budget_tokens}",
                             hint="raise --n-ctx, lower --max-tokens, or use smaller chunks")
    log.info("real prompt (%s) for the smoke question: %d tokens with %d sources", plan.prompt_format, n,
             len(sources))
    return n


def plan_prompt_for_gguf(path: Path, requested: str | None) -> PromptPlan:
    """:func:`plan_prompt` for a GGUF input: template and BOS/EOS texts read from the file's header.

    Raises:
        ChatTemplateError: the prompt format cannot be decided.  ModelLoadError: the header cannot be read.
    """
    from gguf import Keys

    from fieldpack.builder.gguf_header import read_gguf_header

    kv = read_gguf_header(path, arrays={Keys.Tokenizer.LIST}).kv
    tokens = kv.get(Keys.Tokenizer.LIST) or []

    def text(key: str) -> str:
        tid = kv.get(key)
        return str(tokens[int(tid)]) if tid is not None and 0 <= int(tid) < len(tokens) else ""

    template = kv.get(Keys.Tokenizer.CHAT_TEMPLATE)
    return plan_prompt(str(template) if template else None, requested, bos_token=text(Keys.Tokenizer.BOS_ID),
                       eos_token=text(Keys.Tokenizer.EOS_ID), origin=f"model {path}")


def gguf_token_counter(path: Path) -> Callable[[str], int]:
    """``text -> number of model tokens`` with llama.cpp's own tokenizer (vocab only, no weights loaded)."""
    from fieldpack.builder.llama_eval import vocab_only

    llm = vocab_only(path)
    return lambda text: len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
