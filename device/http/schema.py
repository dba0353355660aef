"""Request bodies of the HTTP API (pydantic): the OpenAI fields fieldpack honours, plus its own ``/v1/ask``.

Fields OpenAI clients commonly send but that do not apply to a greedy, grounded device (``temperature``,
``top_p``, ``presence_penalty``, ``seed``, ``user``, ...) are accepted and ignored: decoding is always greedy,
so answers are reproducible. Unknown extra fields are ignored too, as OpenAI-compatible servers do; a known
field of the wrong type is a 400 with an OpenAI-style error body.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

#: Most inputs one ``/v1/embeddings`` request may embed.
MAX_EMBEDDING_INPUTS = 256
#: Longest text accepted anywhere (characters); the body size limit bounds the total.
MAX_TEXT_CHARS = 32_000


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=False)


class TextPart(_Body):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text (content parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    model: str | None = Field(default=None, max_length=200)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s][:4]

    def answer_cap(self) -> int | None:
        """Requested answer length in tokens, ``None`` for the bundle's default."""
        return self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``. ``grounding`` (fieldpack's own, default true): answer from the bundle's
    documents with numbered sources (returned in ``sources``); false: the model alone, on the messages."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    grounding: bool = True


class CompletionRequest(_Generation):
    """``POST /v1/completions``: raw continuation of ``prompt`` (special tokens parsed), never grounded."""

    prompt: str | list[str] = Field(max_length=MAX_TEXT_CHARS)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError("prompt must be one string (batches are not supported)")
        return self.prompt[0]


class EmbeddingRequest(_Body):
    """``POST /v1/embeddings`` with the bundle's sentence embedder (unit-length float32 vectors)."""

    input: str | list[str] = Field(max_length=MAX_EMBEDDING_INPUTS)
    model: str | None = Field(default=None, max_length=200)
    encoding_format: Literal["float", "base64"] = "float"

    def texts(self) -> list[str]:
        items = [self.input] if isinstance(self.input, str) else list(self.input)
        if not items:
            raise ValueError("input is empty")
        for i, t in enumerate(items):
            if len(t) > MAX_TEXT_CHARS:
                raise ValueError(f"input[{i}] has {len(t)} characters (limit {MAX_TEXT_CHARS})")
        return items


class HistoryTurn(_Body):
    """An earlier exchange. ``retrieval_query``: the one its answer reported, if any (a follow-up's joined search),
    so the next follow-up is searched with the whole topic."""

    question: str = Field(max_length=MAX_TEXT_CHARS)
    answer: str = Field(max_length=MAX_TEXT_CHARS)
    retrieval_query: str | None = Field(default=None, max_length=2 * MAX_TEXT_CHARS)


class AskRequest(_Body):
    """``POST /v1/ask``: fieldpack's own question -> answer with sources and timings. ``history`` holds earlier
    turns the prompt builder keeps while the model's budget allows (oldest dropped first)."""

    question: str = Field(max_length=MAX_TEXT_CHARS)
    history: list[HistoryTurn] = Field(default_factory=list, max_length=32)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
