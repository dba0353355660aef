"""How a bundle's model is prompted: the prompt formats, the grounded-answer instructions, and the chat-template
renderer both sides use (the builder decides and checks the format, the device renders with it).

Three formats, decided at build time and recorded in the manifest (``runtime.prompt_format``):

- ``chat``: the model's own chat template (Jinja2, ``tokenizer.chat_template``) with a system turn holding
  :data:`INSTRUCTIONS`, then a user turn with the numbered sources and the question.
- ``chat-no-system``: the template refuses a system role (Gemma's and some Mistral templates call
  ``raise_exception('System role not supported')``): the instructions are folded into the first user turn.
- ``completion``: a base (pretrained, not instruction-tuned) model without a chat template: a plain-text prompt
  (:data:`COMPLETION_TEMPLATE`: numbered sources, the instruction, the question, an answer cue ``Answer:``)
  continued by the model and cut by :data:`COMPLETION_STOP` strings.

The renderer mirrors llama-cpp-python's ``Jinja2ChatFormatter`` (sandboxed Jinja2, ``trim_blocks``,
``lstrip_blocks``, ``raise_exception``, ``strftime_now``), so what the builder checks is what the device runs.
Any template failure is a :class:`ChatTemplateError`, never a traceback.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from fieldpack.shared.errors import ChatTemplateError

PromptFormatName = Literal["chat", "chat-no-system", "completion"]
PROMPT_FORMATS: tuple[str, ...] = ("chat", "chat-no-system", "completion")

#: What the model is told, as a system turn (``chat``), at the head of the first user turn (``chat-no-system``),
#: or at the head of the completion prompt.
INSTRUCTIONS = (
    "You are a field assistant working offline. Answer the question using only the numbered sources. "
    "Cite the sources you use as [1], [2]. If the sources do not contain the answer, say that the documents "
    "do not answer it."
)

#: What a grounded answer says when none of the sources holds the answer (what :data:`INSTRUCTIONS` asks for; RAFT
#: fine-tuning teaches it on examples without the oracle source; ``fieldpack eval`` counts it as an abstention).
ABSTAIN_ANSWER = "The documents do not answer this question."

#: Completion prompt for base models. Placeholders (replaced literally, not ``str.format``, so braces in
#: documents are safe): ``{sources}`` (``[n] citation\ntext`` blocks), ``{history}`` (earlier exchanges as
#: ``Question:/Answer:`` pairs, may be empty), ``{question}``. Sources first, then the instruction right before
#: the question and the ``Answer:`` cue: with Gemma 3 270M base this order gave the most grounded one-sentence
#: answers on the demo documents and PostgreSQL passages; a worked example made the model copy the example's
#: answer when unsure (measured; see README "A real model").
COMPLETION_TEMPLATE = (
    "Sources:\n{sources}\n\n"
    "Answer the question using the sources above. Cite the sources you use as [1], [2].\n"
    "{history}Question: {question}\nAnswer:"
)

#: Where a base model's answer ends: it starts a new question or context block, or leaves a blank line.
COMPLETION_STOP: tuple[str, ...] = ("\nQuestion:", "\nSources:", "\n\n")


def template_echo_stops(template: str) -> tuple[str, ...]:
    """Stop strings for the fixed instruction lines of a completion ``template``: the first 40 characters of each
    line of at least 24 characters without a placeholder. A base model that has answered goes on with the prompt's
    next block, and without a blank line or a ``Question:`` it wrote the instruction line into the answer
    ("... open the discharge valve.\nAnswer the question using the sources above. Cite ...", a new-user trial on
    Gemma 3 270M). The device adds these to the manifest's stop strings, so bundles built before them are covered.
    """
    out: list[str] = []
    for line in template.splitlines():
        text = line.strip()
        if "{" not in text and len(text) >= 24 and text[:40] not in out:
            out.append(text[:40])
    return tuple(out)


#: Largest share of a chunk's characters put into the prompt; chunks are already small (embedder-token sized).
_MAX_SOURCE_CHARS = 2000


class Source(Protocol):
    """What a prompt needs of a retrieved chunk (``retrieval.types.Hit`` is one): its text and its citation."""

    text: str

    def citation(self) -> str: ...


@dataclass(frozen=True)
class Turn:
    """One past exchange kept as chat history (plain text, no sources).

    ``search_query``: what its sources were searched with when that was not ``question`` alone (a follow-up joined
    with the question before it, :mod:`retrieval.followup`), so that the next follow-up keeps the whole topic;
    ``None`` otherwise. Not part of the prompt.
    """

    question: str
    answer: str
    search_query: str | None = None


#: ``(question, sources, history) -> prompt text``: one prompt format's whole rendering.
PromptRenderer = Callable[[str, Sequence[Source], Sequence[Turn]], str]


def render_completion(template: str, *, sources: str, question: str, history: Sequence[Turn] = ()) -> str:
    """Fill a completion template (see :data:`COMPLETION_TEMPLATE`); history as ``Question:/Answer:`` pairs."""
    past = "".join(f"Question: {t.question}\nAnswer: {t.answer}\n\n" for t in history)
    return template.replace("{history}", past).replace("{sources}", sources).replace("{question}", question)


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Messages for a template without a system role: system contents are prepended to the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system:
        for m in rest:
            if m["role"] == "user":
                m["content"] = f"{system}\n\n{m['content']}"
                break
    return rest


def format_sources(hits: Sequence[Source]) -> str:
    """Render hits as ``[n] citation\\ntext`` blocks separated by blank lines."""
    blocks = []
    for i, h in enumerate(hits, start=1):
        text = unicodedata.normalize("NFC", h.text[:_MAX_SOURCE_CHARS].strip())
        blocks.append(f"[{i}] {h.citation()}\n{text}")
    return "\n\n".join(blocks)


def build_messages(question: str, hits: Sequence[Source], history: Sequence[Turn], *,
                   system_role: bool = True) -> list[dict[str, str]]:
    """Chat messages (OpenAI-style role/content dicts) for the chat template. ``system_role=False`` folds the
    instructions into the first user turn (templates that refuse a system role)."""
    msgs = [{"role": "system", "content": INSTRUCTIONS}]
    for t in history:
        msgs.append({"role": "user", "content": t.question})
        msgs.append({"role": "assistant", "content": t.answer})
    user = f"Sources:\n{format_sources(hits)}\n\nQuestion: {question}" if hits else f"Question: {question}"
    msgs.append({"role": "user", "content": user})
    return msgs if system_role else fold_system(msgs)


def prompt_renderer(prompt_format: str, *, chat: Callable[[list[dict[str, str]]], str] | None = None,
                    completion_template: str | None = None) -> PromptRenderer:
    """The renderer of one prompt format.

    Args:
        prompt_format: ``chat``, ``chat-no-system`` or ``completion`` (manifest ``runtime.prompt_format``).
        chat: chat template renderer, messages -> text with the generation prompt (chat formats only).
        completion_template: the manifest's completion template (``completion`` only).

    Raises:
        ValueError: the format's ingredient is missing (the manifest schema prevents it for bundles).
    """
    if prompt_format == "completion":
        if not completion_template:
            raise ValueError("completion prompt format needs a completion template")
        template = completion_template
        return lambda q, hits, history: render_completion(
            template, sources=format_sources(hits) if hits else "(no sources)", question=q, history=history)
    if chat is None:
        raise ValueError(f"prompt format {prompt_format} needs a chat template renderer")
    system_role = prompt_format != "chat-no-system"
    render_chat = chat
    return lambda q, hits, history: render_chat(build_messages(q, hits, history, system_role=system_role))


class ChatTemplate:
    """A compiled chat template: ``render(messages) -> prompt text`` with the generation prompt appended.

    Args:
        source: the Jinja2 template text (``tokenizer.chat_template``).
        bos_token / eos_token: token texts the template may reference.
        origin: what to name in errors (a model folder, a bundle slot).

    Raises:
        ChatTemplateError: the template does not compile (on construction) or raises / fails while rendering.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", origin: str = "the model") -> None:
        import datetime

        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.origin = origin
        self._bos, self._eos = bos_token, eos_token

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def strftime_now(fmt: str) -> str:
            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(loader=jinja2.BaseLoader(), trim_blocks=True, lstrip_blocks=True)
        try:
            self._tmpl = env.from_string(source)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template of {origin} does not compile: {exc}",
                                    hint="rebuild with --prompt-format completion") from exc
        self._globals = dict(raise_exception=raise_exception, strftime_now=strftime_now)

    def render(self, messages: list[dict[str, str]]) -> str:
        """Render ``messages`` (role/content dicts). Raises ChatTemplateError on any template failure."""
        try:
            return self._tmpl.render(messages=messages, bos_token=self._bos, eos_token=self._eos,
                                     add_generation_prompt=True, **self._globals)
        except Exception as exc:  # jinja2 TemplateError, and TypeError/KeyError/... from template code
            raise ChatTemplateError(f"chat template of {self.origin} failed: {type(exc).__name__}: {exc}",
                                    hint="rebuild the bundle with --prompt-format completion") from exc

    def accepts_system(self) -> bool:
        """Whether a system turn renders and appears in the prompt (False: ``chat-no-system``).

        Raises:
            ChatTemplateError: not even a single user turn renders.
        """
        probe_sys, probe_user = "fieldpack-system-probe", "fieldpack-user-probe"
        try:
            text = self.render([{"role": "system", "content": probe_sys}, {"role": "user", "content": probe_user}])
            if probe_sys in text:
                return True
        except ChatTemplateError:
            pass
        self.render([{"role": "user", "content": probe_user}])  # raises when the template cannot work at all
        return False


def decide_prompt_format(chat_template: str | None, requested: str | None, *, bos_token: str = "",
                         eos_token: str = "", origin: str = "the model") -> PromptFormatName:
    """The prompt format a bundle's model gets, decided at build time.

    Args:
        chat_template: the model's Jinja chat template, or None when it has none (a base model).
        requested: ``"chat"``, ``"completion"``, or None (decide from the template).

    Returns:
        ``"completion"`` when asked or when there is no template; else ``"chat"`` when the template takes a
        system turn, ``"chat-no-system"`` when it refuses one.

    Raises:
        ChatTemplateError: ``chat`` asked for a model without a template; or the template fails to render even a
            single user turn (the fix names ``--prompt-format completion``).
    """
    if requested not in (None, "chat", "completion"):
        raise ChatTemplateError(f"unknown prompt format {requested!r}", hint="use --prompt-format completion or chat")
    if requested == "completion":
        return "completion"
    if not chat_template:
        if requested == "chat":
            raise ChatTemplateError(f"{origin} has no chat template, so --prompt-format chat cannot work",
                                    hint="use --prompt-format completion (base model), or a checkpoint with a chat template")
        return "completion"
    tmpl = ChatTemplate(chat_template, bos_token=bos_token, eos_token=eos_token, origin=origin)
    try:
        return "chat" if tmpl.accepts_system() else "chat-no-system"
    except ChatTemplateError as exc:
        raise ChatTemplateError(f"cannot determine the prompt format: {exc.message}",
                                hint="pass --prompt-format completion (plain-text prompt) or fix the model's "
                                     "chat template and use --prompt-format chat") from exc
