"""Questions made by a teacher model for RAFT (``--qa-teacher``): a local GGUF (llama-cpp-python) or an
OpenAI-compatible endpoint (the ``openai`` client) reads calibration chunks of the build's own documents and
writes, per chunk, up to ``qa_per_chunk`` technician-style questions the chunk answers, with short answers.
The kept pairs are :class:`~.data.QAPair` s (the chunk's document is the ``source``) and feed the RAFT example
builder exactly like a ``--qa-train`` file (the synthetic-question step of RAFT, Zhang et al. 2024, and of
"InPars"/"Promptagator"-style query generation).

::

    calibration chunks (never the held-out split), seeded order
        ─▶ teacher chat completion (temperature 0, JSON constrained by a schema where the server supports one)
        ─▶ parse_reply: JSON {"pairs": [...]}, a list, one object, or "Q:/A:" lines
        ─▶ screen_pair: malformed | unanswerable | not grounded in the chunk | duplicate  -> dropped (counted)
        ─▶ TeacherQA (pairs, counts) ─▶ written atomically as JSONL into the adapt stage's cache

A remote teacher is not deterministic (its weights, server and sampling are outside the build), so a recipe
replay with an endpoint teacher reuses the cached pairs when the stage cache holds them and otherwise may get
other pairs: the bundle is then not the same byte for byte. A local GGUF teacher is greedy on a fixed thread
count and its file hash is in the cache key. llama_cpp and openai are imported lazily.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from fieldpack.builder.adapt.data import QAPair
from fieldpack.shared.errors import AdaptationError
from fieldpack.shared.prompt_format import ABSTAIN_ANSWER

log = logging.getLogger(__name__)

#: Environment variable read for an endpoint's API key (never stored in a recipe); ``OPENAI_API_KEY`` also works.
API_KEY_ENV = "FIELDPACK_TEACHER_API_KEY"
GGUF_MAGIC = b"GGUF"
#: Longest question / answer kept, in characters.
MAX_QUESTION_CHARS = 300
MAX_ANSWER_CHARS = 300
#: Chunks asked at most, as a multiple of the chunks the cap needs (replies that are dropped use up chunks).
CHUNK_BUDGET = 2

SYSTEM_PROMPT = (
    "You write training questions for field technicians from an excerpt of their documentation. Each question "
    "is one a technician could ask on the job and that the excerpt alone answers; each answer is short (a phrase "
    "or one sentence) and taken from the excerpt. Reply with JSON only.")

_WORD = re.compile(r"[^\W_]{3,}", re.UNICODE)
_QA_LINE = re.compile(r"^\s*(?:[-*\d.)\s]*)(q|question|a|answer)\s*\d*\s*[:.)-]\s*(.*)$", re.IGNORECASE)
#: An HTTP 400 about the request's length (llama.cpp, OpenAI, vLLM wording): that chunk alone is refused.
_TOO_LONG = re.compile(r"context (window|length)|maximum context|too long|exceeds?\b.*\btokens", re.IGNORECASE)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_UNANSWERABLE = re.compile(
    r"\b(not (stated|mentioned|specified|given|provided|answered|covered)|does not (say|state|mention|answer)|"
    r"doesn't (say|state|mention|answer)|cannot be (answered|determined)|can't be (answered|determined)|"
    r"no information|unknown|i don't know|i do not know|n/?a)\b", re.IGNORECASE)


def is_endpoint(spec: str | Path) -> bool:
    """True when ``spec`` is an ``http(s)://`` URL (an OpenAI-compatible endpoint), False for a file path."""
    return str(spec).strip().lower().startswith(("http://", "https://"))


def teacher_label(spec: str | Path, model: str | None = None) -> str:
    """What the quality report names: the GGUF's file name, or ``URL#model`` for an endpoint."""
    return f"{str(spec).rstrip('/')}#{model}" if is_endpoint(spec) else Path(spec).name


def reply_schema(per_chunk: int) -> dict[str, Any]:
    """JSON schema of a reply: ``{"pairs": [{"question": str, "answer": str}, ...]}``, at most ``per_chunk``."""
    pair = {"type": "object", "properties": {
        "question": {"type": "string", "minLength": 1, "maxLength": MAX_QUESTION_CHARS},
        "answer": {"type": "string", "minLength": 1, "maxLength": MAX_ANSWER_CHARS}},
        "required": ["question", "answer"]}
    return {"type": "object", "properties": {"pairs": {"type": "array", "items": pair, "maxItems": per_chunk}},
            "required": ["pairs"]}


def reply_tokens(per_chunk: int) -> int:
    """``max_tokens`` of a reply: room for ``per_chunk`` pairs at their longest (about 2 characters a token)."""
    return 64 + per_chunk * (MAX_QUESTION_CHARS + MAX_ANSWER_CHARS) // 2


def teacher_messages(chunk: Any, per_chunk: int) -> list[dict[str, str]]:
    """The chat messages asking for ``per_chunk`` pairs about one chunk (``source``, ``section``, ``text``)."""
    where = chunk.source + (f" > {chunk.section}" if getattr(chunk, "section", "") else "")
    user = (f"Source: {where}\nExcerpt:\n\"\"\"\n{chunk.text.strip()}\n\"\"\"\n\n"
            f"Write up to {per_chunk} question(s) with answers, as JSON: "
            '{"pairs": [{"question": "...", "answer": "..."}]}. '
            'If the excerpt answers no practical question, reply {"pairs": []}.')
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# --- parsing and screening ---------------------------------------------------------------------------------------
def _first_json(text: str) -> tuple[bool, Any]:
    """``(found, value)``: the first JSON value in ``text``: the whole text, a fenced block, or what follows the
    first ``{`` / ``[`` that starts a valid value (trailing prose ignored)."""
    decoder = json.JSONDecoder(strict=False)  # raw newlines inside strings, as small models write them
    for cand in [text.strip(), *(m.strip() for m in _FENCE.findall(text))]:
        try:
            return True, decoder.decode(cand)
        except ValueError:
            pass
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return True, decoder.raw_decode(text[i:])[0]
            except ValueError:
                continue
    return False, None


def _pairs_of(value: Any) -> list[tuple[str, str]] | None:
    """``(question, answer)`` items of a decoded JSON reply, or None when its shape is not a reply."""
    if isinstance(value, dict):
        for key in ("pairs", "questions", "qa", "items"):
            if isinstance(value.get(key), list):
                return _pairs_of(value[key])
        q = value.get("question", value.get("q"))
        a = value.get("answer", value.get("a"))
        return [(q, a)] if isinstance(q, str) and isinstance(a, str) else None
    if isinstance(value, list):  # an item that is not a pair stays, as ("", ""), for screening to count
        out: list[tuple[str, str]] = []
        for item in value:
            got = _pairs_of(item) if isinstance(item, dict) else None
            out.extend(got or [("", "")])
        return out
    return None


def _qa_lines(text: str) -> list[tuple[str, str]]:
    """``Q: ... / A: ...`` (or ``Question:`` / ``Answer:``) lines; continuation lines join the open field."""
    out: list[tuple[str, str]] = []
    q: str | None = None
    a: str | None = None
    for line in text.splitlines():
        m = _QA_LINE.match(line)
        if m:
            kind = m.group(1)[0].lower()
            if kind == "q":
                if q is not None and a is not None:
                    out.append((q, a))
                q, a = m.group(2).strip(), None
            elif q is not None:
                a = m.group(2).strip()
        elif line.strip() and q is not None:
            if a is None:
                q += " " + line.strip()
            else:
                a += " " + line.strip()
    if q is not None and a is not None:
        out.append((q, a))
    return out


def parse_reply(text: str) -> list[tuple[str, str]] | None:
    """The raw ``(question, answer)`` pairs of one teacher reply, unscreened.

    Accepts a JSON object ``{"pairs": [...]}`` (also ``questions``/``qa``/``items``), a JSON list of
    ``{"question", "answer"}`` objects, a single such object (JSON may sit in a ```` ```json ```` fence or after
    prose), or ``Q:``/``A:`` (``Question:``/``Answer:``) lines.

    Returns:
        the pairs (possibly ``[]``: the teacher said the chunk answers nothing), or None when the reply is
        malformed (neither shape).
    """
    found, value = _first_json(text)
    pairs = _pairs_of(value) if found else None
    if pairs is not None:
        return pairs
    lines = _qa_lines(text)
    return lines or None


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)}


def screen_pair(question: str, answer: str, chunk_text: str) -> str | None:
    """Why a pair is dropped (``malformed``, ``unanswerable``, ``not grounded``), or None to keep it.

    malformed: a question of fewer than 3 words or over :data:`MAX_QUESTION_CHARS`, an empty answer or one over
    :data:`MAX_ANSWER_CHARS`, the answer equal to the question. unanswerable: the answer says the excerpt does
    not answer (the abstention phrase, "not stated", "unknown", ...). not grounded: no word of 3+ letters of the
    answer occurs in the chunk (the answer was not taken from it).
    """
    q, a = " ".join(question.split()), " ".join(answer.split())
    if len(q.split()) < 3 or len(q) > MAX_QUESTION_CHARS or not a or len(a) > MAX_ANSWER_CHARS \
            or q.lower() == a.lower() or not _words(q):
        return "malformed"
    if a.strip(" .").lower() == ABSTAIN_ANSWER.strip(" .").lower() or _UNANSWERABLE.search(a):
        return "unanswerable"
    if not _words(a) & _words(chunk_text):
        return "not grounded"
    return None


def _norm_question(q: str) -> str:
    """Dedupe key: the question's words, lower case (punctuation and spacing ignored)."""
    return " ".join(re.findall(r"\w+", q.lower()))


# --- generation --------------------------------------------------------------------------------------------------
@dataclass
class TeacherQA:
    """What a teacher produced.

    Attributes:
        pairs: the kept pairs (source = the chunk's document), in generation order.
        teacher: :func:`teacher_label`.
        chunks_asked / replies: chunks sent / replies received (fewer when the teacher refused a request).
        gguf_sha256: a local GGUF teacher's file digest (None for an endpoint); set by the caller.
        kept: ``len(pairs)``; dropped: reason -> count (``refused (HTTP 400)``: a request the teacher refused,
            ``malformed reply``, ``malformed``, ``unanswerable``,
            ``not grounded``, ``duplicate``, ``over the cap``, ``no question``: the reply said the chunk answers
            nothing).
    """

    pairs: list[QAPair]
    teacher: str
    chunks_asked: int = 0
    replies: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    gguf_sha256: str | None = None

    @property
    def kept(self) -> int:
        return len(self.pairs)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_jsonl(self) -> str:
        """The kept pairs as a ``--qa-train``-style JSONL text (question, answer, source per line)."""
        return "".join(json.dumps({"question": p.question, "answer": p.answer, "source": p.source},
                                  ensure_ascii=False) + "\n" for p in self.pairs)


#: ``(messages, json_schema, max_tokens) -> reply text``
Complete = Callable[[list[dict[str, str]], dict[str, Any], int], str]


def generate_qa(complete: Complete, chunks: Sequence[Any], *, per_chunk: int, max_pairs: int, seed: int,
                teacher: str, known_questions: Sequence[str] = ()) -> TeacherQA:
    """Ask the teacher about chunks until ``max_pairs`` pairs are kept or the chunk budget is spent.

    Args:
        complete: ``(messages, json_schema, max_tokens) -> reply text`` (:class:`EndpointTeacher` / :class:`GGUFTeacher`).
        chunks: the calibration chunks (``source``, ``section``, ``text``); asked in a ``seed``-shuffled order,
            at most ``CHUNK_BUDGET * ceil(max_pairs / per_chunk)`` of them.
        per_chunk: pairs asked per chunk; max_pairs: the cap on kept pairs.
        teacher: the label recorded; known_questions: questions already given (``--qa-train``), not repeated.

    Returns:
        the :class:`TeacherQA` (possibly with no pair: the caller refuses that).

    Raises:
        AdaptationError: from ``complete`` (the teacher failed).
    """
    order = list(range(len(chunks)))
    random.Random(seed).shuffle(order)
    budget = CHUNK_BUDGET * math.ceil(max_pairs / per_chunk)
    seen = {_norm_question(q) for q in known_questions}
    out = TeacherQA(pairs=[], teacher=teacher)
    dropped: Counter[str] = Counter()
    schema = reply_schema(per_chunk)
    for idx in order[:budget]:
        if out.kept >= max_pairs:
            break
        chunk = chunks[idx]
        out.chunks_asked += 1
        try:
            reply = complete(teacher_messages(chunk, per_chunk), schema, reply_tokens(per_chunk))
        except TeacherRefused as exc:
            dropped[f"refused ({exc})"] += 1
            continue
        out.replies += 1
        raw = parse_reply(reply)
        if raw is None:
            dropped["malformed reply"] += 1
            log.debug("teacher reply for %s dropped (malformed): %.200r", chunk.source, reply)
            continue
        if not raw:
            dropped["no question"] += 1
        for n, (q, a) in enumerate(raw):
            if n >= per_chunk or out.kept >= max_pairs:
                dropped["over the cap"] += 1
                continue
            why = screen_pair(q, a, chunk.text)
            key = _norm_question(q)
            if why is None and key in seen:
                why = "duplicate"
            if why is not None:
                dropped[why] += 1
                continue
            seen.add(key)
            out.pairs.append(QAPair(question=" ".join(q.split()), answer=" ".join(a.split()), source=chunk.source))
    out.dropped = dict(sorted(dropped.items()))
    log.info("teacher %s: %d chunks asked, %d pairs kept, %d dropped %s", teacher, out.chunks_asked, out.kept,
             out.n_dropped, out.dropped)
    return out


# --- teachers ----------------------------------------------------------------------------------------------------
def _api_key() -> str:
    import os

    return os.environ.get(API_KEY_ENV) or os.environ.get("OPENAI_API_KEY") or "not-needed"


def _endpoint_error(url: str, exc: Exception) -> AdaptationError:
    """One-line AdaptationError for an openai client exception against ``url``."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return AdaptationError(f"--qa-teacher {url} did not answer in time (timeout)",
                               hint="check the server is up and not overloaded, or raise --qa-teacher-timeout")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return AdaptationError(f"--qa-teacher {url} is unreachable ({type(cause).__name__}: "
                               f"{str(cause).splitlines()[0][:120] if str(cause) else 'connection failed'})",
                               hint="start the OpenAI-compatible server, or fix the URL (e.g. http://host:8000/v1)")
    if isinstance(exc, openai.APIStatusError):
        return AdaptationError(f"--qa-teacher {url} answered HTTP {exc.status_code}: {str(exc.message)[:160]}",
                               hint="check the URL ends in /v1, --qa-teacher-model names a served model, and "
                                    f"the API key (${API_KEY_ENV})")
    return AdaptationError(f"--qa-teacher {url} failed: {type(exc).__name__}: {str(exc)[:160]}",
                           hint="check the endpoint speaks the OpenAI chat completions API")


def _client(url: str, timeout: float) -> Any:
    import openai

    return openai.OpenAI(base_url=url.rstrip("/"), api_key=_api_key(), timeout=timeout, max_retries=0)


@lru_cache(maxsize=16)
def resolve_endpoint_model(url: str, model: str | None = None, timeout: float = 10.0) -> str:
    """The model an endpoint will be asked with: ``model`` when given, else the first of ``GET /models``.
    Also the reachability check (cached per process).

    Raises:
        AdaptationError: unreachable (connection refused, timeout), an HTTP error, no model served, or
            ``model`` not among the served ones.
    """
    import openai

    try:
        served = [m.id for m in _client(url, timeout).models.list()]
    except openai.OpenAIError as exc:
        raise _endpoint_error(url, exc) from exc
    if model:
        if served and model not in served:
            raise AdaptationError(f"--qa-teacher-model {model!r} is not served by {url} (it serves "
                                  f"{', '.join(served[:5])})", hint="name one of the served models")
        return model
    if not served:
        raise AdaptationError(f"--qa-teacher {url} serves no model", hint="pass --qa-teacher-model NAME")
    return served[0]


class EndpointTeacher:
    """An OpenAI-compatible chat completions endpoint as a :data:`Complete` (temperature 0, fixed seed).

    The reply is constrained by the JSON schema where the server supports it: llama.cpp's servers take
    ``{"type": "json_object", "schema": ...}``, OpenAI and vLLM ``{"type": "json_schema", ...}``; plain text is
    the last resort. A request refused (HTTP 400/422; 500 from a format not yet accepted) is sent again with the
    next format, and the first format a server accepts is kept for the next chunks. A 400 about the request's
    length (a chunk over the server's context), or a refusal in every format: :class:`TeacherRefused` for that
    chunk alone.
    """

    def __init__(self, url: str, model: str, *, timeout: float = 120.0, seed: int = 0):
        self.url, self.model, self.seed = url, model, seed
        self._client = _client(url, timeout)
        self._format: int = 0

    @staticmethod
    def _formats(schema: dict[str, Any]) -> list[dict[str, Any] | None]:
        return [{"type": "json_object", "schema": schema},
                {"type": "json_schema", "json_schema": {"name": "qa_pairs", "schema": schema}},
                None]

    def __call__(self, messages: list[dict[str, str]], schema: dict[str, Any], max_tokens: int) -> str:
        import openai

        formats = self._formats(schema)
        status: int | str = "?"
        for i in range(self._format, len(formats)):
            fmt = formats[i]
            extra = {"response_format": fmt} if fmt is not None else {}
            try:
                r = self._client.chat.completions.create(model=self.model, messages=messages, temperature=0.0,
                                                         max_tokens=max_tokens, seed=self.seed, **extra)
            except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
                log.info("teacher %s refused a request with response_format %s (HTTP %s): %.200s", self.url,
                         fmt["type"] if fmt else "none", exc.status_code, exc.message)
                status = exc.status_code
                if _TOO_LONG.search(str(exc.message)):
                    raise TeacherRefused(f"HTTP {status}, over its context") from exc
                continue
            except openai.InternalServerError as exc:
                if i > self._format:  # a format this server never took (llama-cpp-python answers 500 to a
                    status = exc.status_code  # request body it does not validate)
                    continue
                raise _endpoint_error(self.url, exc) from exc
            except openai.OpenAIError as exc:
                raise _endpoint_error(self.url, exc) from exc
            self._format = i
            return (r.choices[0].message.content or "") if r.choices else ""
        raise TeacherRefused(f"HTTP {status}")


class TeacherRefused(Exception):
    """The teacher refused one chunk's request (HTTP 400/422 in every format, or a prompt over its n_ctx)."""


def check_gguf_file(path: Path) -> Path:
    """``path`` if it is a readable file starting with the GGUF magic.

    Raises:
        AdaptationError: not a file, unreadable, or not a GGUF.
    """
    path = Path(path)
    if not path.is_file():
        raise AdaptationError(f"--qa-teacher {path} is not a file",
                              hint="give a local .gguf model file or an http(s)://host:port/v1 endpoint")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise AdaptationError(f"--qa-teacher {path} cannot be read: {exc.strerror}",
                              hint="check the file's permissions") from exc
    if magic != GGUF_MAGIC:
        raise AdaptationError(f"--qa-teacher {path} is not a GGUF (it starts with {magic!r}, not b'GGUF')",
                              hint="give a .gguf model file (convert a checkpoint with llama.cpp) or an endpoint URL")
    return path


class GGUFTeacher:
    """A local GGUF through llama-cpp-python as a :data:`Complete`: greedy, schema-constrained (llama.cpp
    grammar from the JSON schema), the GGUF's own chat template, ``threads`` CPU threads; every layer on the GPU
    when llama.cpp was built with a GPU backend (``n_gpu_layers`` -1; ignored by a CPU build)."""

    def __init__(self, path: Path, *, n_ctx: int = 4096, threads: int = 2, seed: int = 0, n_gpu_layers: int = -1):
        import llama_cpp

        from fieldpack.shared.llama_backend import llama_cpp_module

        Llama = llama_cpp_module(llama_cpp).Llama
        self.path = check_gguf_file(path)
        from fieldpack.builder.llama_eval import capture_llama_log

        try:
            with capture_llama_log():  # load-time notes go to DEBUG, not the build's output
                self._llm = Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=threads, seed=seed,
                                  n_gpu_layers=n_gpu_layers, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise AdaptationError(f"--qa-teacher {path} does not load in llama.cpp: {str(exc)[:160]}",
                                  hint="give a GGUF that llama.cpp (llama-cpp-python) can run") from exc
        self._ctx = n_ctx

    def __call__(self, messages: list[dict[str, str]], schema: dict[str, Any], max_tokens: int) -> str:
        try:
            r = self._llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=max_tokens,
                                                 response_format={"type": "json_object", "schema": schema})
        except ValueError as exc:  # prompt longer than n_ctx: this chunk is skipped
            log.debug("teacher %s: %s", self.path.name, exc)
            raise TeacherRefused("over n_ctx") from exc
        return r["choices"][0]["message"]["content"] or ""

    def close(self) -> None:
        close = getattr(self._llm, "close", None)
        if close is not None:
            close()


def check_qa_teacher(spec: str | Path, model: str | None = None, *, timeout: float = 10.0) -> str | None:
    """Cheap check before any build work: a GGUF is a file with the GGUF magic; an endpoint answers
    ``GET /models`` (and serves ``model``). Returns the endpoint's model (None for a GGUF).

    Raises:
        AdaptationError: naming the teacher and the fix.
    """
    if is_endpoint(spec):
        return resolve_endpoint_model(str(spec).rstrip("/"), model or None, timeout)
    check_gguf_file(Path(spec))
    return None


def teacher_questions(spec: str | Path, chunks: Sequence[Any], *, model: str | None = None, per_chunk: int,
                      max_pairs: int, seed: int, threads: int = 2, known_questions: Sequence[str] = (),
                      timeout: float = 120.0) -> TeacherQA:
    """Open the teacher named by ``spec`` (GGUF path or endpoint URL) and :func:`generate_qa` on ``chunks``.

    Raises:
        AdaptationError: the teacher is unreachable / not a GGUF, fails mid-way, or keeps no pair (with the
            counts of what was dropped and why).
    """
    if not chunks:
        raise AdaptationError("--qa-teacher has no calibration chunk to ask about",
                              hint="add documents (the eval split holds out a share of the chunks)")
    if is_endpoint(spec):
        url = str(spec).rstrip("/")
        resolved = resolve_endpoint_model(url, model or None)
        complete: Any = EndpointTeacher(url, resolved, timeout=timeout, seed=seed)
        label = teacher_label(url, resolved)
    else:
        complete = GGUFTeacher(Path(spec), threads=threads, seed=seed)
        label = teacher_label(spec)
    try:
        got = generate_qa(complete, chunks, per_chunk=per_chunk, max_pairs=max_pairs, seed=seed, teacher=label,
                          known_questions=known_questions)
    finally:
        if isinstance(complete, GGUFTeacher):
            complete.close()
    if not got.pairs:
        why = ", ".join(f"{n} {k}" for k, n in got.dropped.items()) or "every reply was empty"
        raise AdaptationError(f"--qa-teacher {label} gave no usable question from {got.chunks_asked} chunks "
                              f"(dropped: {why})",
                              hint="use a stronger instruction-tuned teacher, or give --qa-train pairs.jsonl")
    return got
