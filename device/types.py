"""Plain records the device runtime hands to its callers (CLI, chat, MQTT daemon, eval).

They are frozen dataclasses with JSON-ready ``to_dict`` methods; no native handles live here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import threading
from typing import Any, Callable, Protocol

from fieldpack.retrieval.types import Hit
from fieldpack.shared.protocol import AnswerTimings as Timings
from fieldpack.shared.protocol import GateInfo

__all__ = ["Answer", "AnswerEngine", "EngineProvider", "Hit", "Timings"]


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
        extra: details for the curious: ``retrieval_query`` when a follow-up was searched together with the
            previous question (:mod:`retrieval.followup`), ``reason`` of an abstention without a gate refusal,
            ``stopped_repeating`` when the answer was stopped at a loop and cut to its first copy
            (:mod:`device.repetition`; ``finish_reason`` is then ``"stop"``), ``gate`` of a question the relevance
            gate refused (:class:`shared.protocol.GateInfo`: the nearest passage, its cosine, the threshold).
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
            **answer_notes_json(self.extra),
        }


def answer_notes_json(extra: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON fields an answer's ``extra`` adds where set (``--json``, ``/v1/ask``, the chat API's ``fieldpack``
    field): ``retrieval_query`` when a follow-up was searched with the previous question, ``stopped_repeating``
    when the answer was stopped at a loop (:mod:`device.repetition`), ``gate`` (closest passage, its cosine and
    the threshold) when the relevance gate refused the question."""
    extra = extra or {}
    query = extra.get("retrieval_query")
    return {**({"retrieval_query": query} if query else {}),
            **({"stopped_repeating": True} if extra.get("stopped_repeating") else {}),
            **({"gate": extra["gate"].model_dump()} if extra.get("gate") else {})}


def refusal_notice(ans: Answer) -> str | None:
    """The line shown under a question the relevance gate refused: the closest passage and how far its cosine is
    from the bundle's threshold, so a question asked in other words than the documents' can be told from one
    they do not cover. ``None`` for any other answer."""
    gate = ans.extra.get("gate") if ans.abstained else None
    return gate_notice(gate) if gate else None


def gate_notice(gate: GateInfo) -> str:
    """The refusal line of :func:`refusal_notice` from a :class:`shared.protocol.GateInfo` (also
    ``fieldpack mqtt ask``, from the wire's final)."""
    return (f"[closest passage: {gate.closest}, cosine {gate.closest_cosine:.3f}; this bundle answers from "
            f"{gate.threshold_cosine:.3f}. If that page should answer it, ask with the words it uses]")


def cut_notice(tokens: int, how: str | None = None) -> str:
    """The line shown under an answer that stopped at its length cap (``finish_reason == "length"``): it ends
    mid-sentence, and the missing part may be the instruction that matters (a new-user trial lost "switch to
    standby pump 4"). ``how``: how to ask for more (``"--max-tokens N"``), or ``None`` where the asker cannot."""
    more = f"; ask again with {how} for more" if how else ""
    return f"[cut at {tokens} tokens: the answer goes on{more}]"


def empty_notice(ans: Answer) -> str | None:
    """The line shown in place of an answer the model ended at once (EOS/EOT or a stop string before any visible
    text; a new-user trial got a blank line and exit 0, which reads like a broken device), or ``None`` when
    ``ans`` has text, abstained, or was cut, cancelled or stopped for another reason."""
    if ans.abstained or ans.finish_reason != "stop" or ans.text.strip():
        return None
    cited = "; the sources below may still answer it" if ans.sources else ""
    return f"[the model ended without an answer{cited}]"


#: The line shown under an answer stopped at a loop (``extra["stopped_repeating"]``).
LOOP_NOTICE = "[stopped: the model began repeating itself; the repeats are not part of the answer]"


def answer_notices(ans: Answer, how_more: str | None) -> list[str]:
    """The plain-text lines shown (dim) under an answer in ``fieldpack ask`` and ``fieldpack chat``, in one order:
    an empty answer (:func:`empty_notice`), a loop cut (:data:`LOOP_NOTICE`), a gate refusal's closest passage
    (:func:`refusal_notice`), the length cap (:func:`cut_notice`
    with ``how_more``), and for a follow-up what was searched. Empty for a plain, complete answer."""
    lines = [n for n in (empty_notice(ans), LOOP_NOTICE if ans.extra.get("stopped_repeating") else None,
                         refusal_notice(ans)) if n]
    if ans.finish_reason == "length":
        lines.append(cut_notice(ans.timings.completion_tokens, how_more))
    if ans.extra.get("retrieval_query"):  # a follow-up: say what was searched, so a wrong page can be understood
        lines.append(f"searched with the previous question: {ans.extra['retrieval_query']}")
    return lines


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
