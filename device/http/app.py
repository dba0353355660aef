"""The HTTP API and the operator's page: an OpenAI-compatible surface over the device's one engine.

Routes::

    GET  /                      the chat page (one self-contained HTML file, no CDN)
    GET  /health                200 {"status":"ok",...} (beside MQTT also "mqtt": "connected"|"disconnected");
                                503 while loading/switching a bundle or with none
    GET  /metrics               Prometheus text (device.http.prom)
    GET  /v1/models             the active bundle as the one model
    POST /v1/chat/completions   grounded by default ("sources" extra field); "grounding": false -> model alone
                                (needs a chat template: 400 no_chat_template on a completion-format bundle)
    POST /v1/completions        raw continuation of a prompt (its leading space kept)
    POST /v1/embeddings         the bundle's sentence embedder
    POST /v1/ask                fieldpack's answer: text, sources, timings (JSON, or SSE with "stream": true)
    GET  /v1/sources/{id}       one cited passage (the chunk id of a source)

Every engine call is a task in the worker's bounded queue (device.http.engine): a full queue is a 503 with
``Retry-After``; a client that disconnects withdraws its task (dequeued, or generation stopped before the next
token). Errors are OpenAI-style bodies: ``{"error": {"message", "type", "param", "code"}}``. Streaming is
server-sent events, ``data: {chunk}`` lines ending with ``data: [DONE]``, as OpenAI sends them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
import base64
import importlib.resources
import json
import logging
import math
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fieldpack.shared import errors

from fieldpack.device.http.engine import EngineHost, submit, withdraw
from fieldpack.device.http.prom import CONTENT_TYPE, PromMetrics
from fieldpack.device.options import check_answer_options
from fieldpack.device.types import answer_notes_json
from fieldpack.device.http.schema import (
    AskRequest,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EmbeddingRequest,
)
from fieldpack.device.http.security import REFUSED_SCOPE_KEY, BodyTooLarge, HttpSecurity, install_security
from fieldpack.device.mqtt.jobs import Job

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# --- errors ----------------------------------------------------------------------------------------------------
class ApiError(Exception):
    """An error answered with an OpenAI-style body. ``status``: HTTP status; ``kind``: OpenAI ``type``."""

    def __init__(self, status: int, message: str, *, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


#: What a client whose answer the shutdown stopped gets (503, code ``shutting_down``).
SHUTDOWN_STOPPED = errors.ShuttingDownError("the device is shutting down; the answer was stopped",
                                            hint="send the request again when the device is back")


def api_error_of(err: errors.FieldpackError) -> ApiError:
    """HTTP form of a fieldpack error: a bad question is the client's (400), a missing or broken bundle the
    device's (503), anything else a server error (500)."""
    if isinstance(err, errors.MaxTokensError):
        return ApiError(400, err.api_message(), code=err.code, param="max_tokens")
    if isinstance(err, (errors.QueryError, errors.UsageError)):
        return ApiError(400, str(err), code=err.code)
    if isinstance(err, errors.DeviceError):
        return ApiError(503, str(err), kind="server_error", code=err.code, headers={"Retry-After": "5"})
    return ApiError(500, str(err), kind="server_error", code=err.code)


# --- bridging the worker thread and the event loop ----------------------------------------------------------------
@dataclass
class Outcome:
    """What a task produced. ``timings`` is a ``device.types.Timings``; ``sources`` are hits."""

    text: str
    finish_reason: str
    timings: Any
    sources: list[Any] = field(default_factory=list)
    abstained: bool = False
    bundle: str = ""
    extra: Any = None


Work = Callable[[Any, Callable[[str], None], threading.Event], Outcome]
"""``work(engine, on_token, cancel) -> Outcome``, run on the worker thread."""


class _Run:
    """One queued task and the asyncio queue its events arrive on: ``("token", str)``, ``("done", Outcome)``,
    ``("error", FieldpackError)``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.job: Job | None = None
        self.finished = False

    def put(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (server stopping): nobody to tell
            pass

    def task(self, work: Work, label: Callable[[Any], str]) -> Callable[[Any, Any], None]:
        def run(engine: Any, err: errors.FieldpackError | None) -> None:
            if err is not None:
                self.put("error", err)
                return
            job = self.job
            assert job is not None
            if job.cancel.is_set():
                self.put("error", errors.DeviceError("cancelled"))
                return
            try:
                outcome = work(engine, lambda piece: self.put("token", piece), job.cancel)
                outcome.bundle = outcome.bundle or label(engine)
                if outcome.finish_reason == "cancelled":  # the client left, or the daemon is stopping
                    log.info("request %s stopped after %d answer tokens", job.route.request_id,
                             outcome.timings.completion_tokens)
                self.put("done", outcome)
            except errors.FieldpackError as exc:
                self.put("error", exc)
            except Exception as exc:  # the worker survives; the client gets a 500
                log.exception("HTTP task failed")
                self.put("error", errors.FieldpackError(f"the engine failed: {type(exc).__name__}: {exc}",
                                                        hint="retry; see the device log if it persists"))
        return run


# --- the app -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ApiConfig:
    """Limits and identity of the API.

    Attributes:
        security: bind, key, body size and CORS settings (device.http.security).
        max_answer_tokens: cap on a request's ``max_tokens`` (tokens); ``None``: the model's context.
    """

    security: HttpSecurity = field(default_factory=HttpSecurity)
    max_answer_tokens: int | None = None


def _bundle_name(label: str | None) -> str:
    return (label or "").partition("@")[0]


def create_app(host: EngineHost, config: ApiConfig | None = None) -> FastAPI:
    """The FastAPI application over ``host``'s worker (start the host yourself)."""
    cfg = config or ApiConfig()
    app = FastAPI(title="fieldpack device API", docs_url=None, redoc_url=None, openapi_url=None)
    prom = PromMetrics(host)
    count_response = prom.response_hook()
    install_security(app, cfg.security, on_refused=lambda status: count_response("refused", status))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return ApiError(400, "the request body is not valid JSON", code="invalid_json").response()
        where = ".".join(loc) or "body"
        if not loc and first.get("type") in ("model_attributes_type", "dict_type"):  # no JSON object arrived
            return ApiError(400, "the request body is not a JSON object. Fix: send one, with the header Content-Type: "
                            "application/json", code="invalid_json").response()
        return ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", code="invalid_value",
                        param=where).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, BodyTooLarge):  # a chunked body ran past the limit while being read
            return ApiError(413, f"the request body is larger than {cfg.security.max_body_bytes} bytes",
                            code="payload_too_large").response()
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        if request.scope.get(REFUSED_SCOPE_KEY):  # the guard refused it and counted it as "refused"
            return response
        route = request.scope.get("route")
        count_response(getattr(route, "path", "unmatched"), response.status_code)
        return response

    # -- helpers --------------------------------------------------------------------------------------------------
    def check_model(model: str | None) -> str:
        state = host.state()
        if state.bundle is None:
            raise unavailable(state)
        if model and model not in (state.bundle, _bundle_name(state.bundle)):
            raise ApiError(404, f"model {model!r} is not on this device; it serves {_bundle_name(state.bundle)!r}",
                           code="model_not_found", param="model")
        return state.bundle

    def unavailable(state: Any) -> ApiError:
        if state.loading:
            return ApiError(503, "the device is loading its bundle; retry shortly", kind="server_error",
                            code="loading", headers={"Retry-After": "2"})
        return ApiError(503, state.error or "no bundle is loaded", kind="server_error", code="no_active_bundle",
                        headers={"Retry-After": "10"})

    def retry_after() -> str:
        snap = host.metrics.snapshot(uptime_s=0.0, queue_depth=host.board.depth)
        mean_s = (snap.total_ms.mean or 1000.0) / 1e3
        return str(max(1, math.ceil(mean_s * (host.board.depth + 1))))

    def start(work: Work) -> _Run:
        run = _Run(asyncio.get_running_loop())
        host.metrics.count("requests")
        job = submit(host, run.task(work, lambda engine: str(engine.bundle_label)))
        if job is None:
            host.metrics.count("busy")
            raise ApiError(503, f"the device is busy: {host.board.capacity} requests are already waiting",
                           kind="server_error", code="busy", headers={"Retry-After": retry_after()})
        run.job = job
        return run

    def record(outcome: Outcome, run: _Run) -> None:
        assert run.job is not None
        t = outcome.timings
        host.metrics.count("answered")
        queue_ms = max(0.0, (host.clock.monotonic() - run.job.received_at) * 1e3 - t.total_ms)
        host.metrics.observe_answer(ttft_ms=t.time_to_first_token_ms, tokens_per_s=t.tokens_per_s,
                                    retrieval_ms=t.retrieval_ms, queue_ms=queue_ms, total_ms=t.total_ms,
                                    generated=not outcome.abstained and t.completion_tokens > 0)

    def fail(run: _Run, err: errors.FieldpackError) -> ApiError:
        host.metrics.count("errors")
        return api_error_of(err)

    def cancelled(run: _Run) -> None:
        if run.job is not None and not run.finished:
            withdraw(host, run.job)
            host.metrics.count("cancelled")
            run.finished = True

    async def result(run: _Run, request: Request) -> Outcome:
        """Wait for the outcome (tokens ignored), withdrawing the task if the client disconnects."""
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(run.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        cancelled(run)
                        raise ApiError(499, "client closed the request", code="client_closed")
                    continue
                if kind == "done" and stopped_by_shutdown(value):
                    kind, value = "error", SHUTDOWN_STOPPED
                if kind == "done":
                    run.finished = True
                    record(value, run)
                    return value
                if kind == "error":
                    run.finished = True
                    raise fail(run, value)
        finally:
            cancelled(run)

    async def stream(run: _Run, first: Callable[[], list[dict[str, Any]]],
                     piece: Callable[[str], dict[str, Any]],
                     last: Callable[[Outcome], list[dict[str, Any]]]) -> AsyncIterator[bytes]:
        """SSE ``data:`` lines: ``first()`` chunks, one per token, ``last(outcome)`` chunks, ``[DONE]``. An error
        after the stream began is sent as an ``{"error": ...}`` chunk (the status line is gone by then)."""
        try:
            for chunk in first():
                yield _sse(chunk)
            while True:
                kind, value = await run.events.get()
                if kind == "done" and stopped_by_shutdown(value):
                    kind, value = "error", SHUTDOWN_STOPPED
                if kind == "token":
                    yield _sse(piece(value))
                elif kind == "done":
                    run.finished = True
                    record(value, run)
                    for chunk in last(value):
                        yield _sse(chunk)
                    break
                else:
                    run.finished = True
                    yield _sse(fail(run, value).body())
                    break
            yield b"data: [DONE]\n\n"
        finally:  # the client went away mid-stream (the generator is closed): free the engine
            cancelled(run)

    def stopped_by_shutdown(out: Outcome) -> bool:
        """A cancelled answer while the daemon stops: the shutdown cut it, not the client (who is still there).
        Sent as a ``shutting_down`` error, so a stream does not end with ``finish_reason: "stop"`` as if complete."""
        return out.finish_reason == "cancelled" and host.state().stopping

    def check_question(text: str, param: str, what: str | None = None) -> None:
        """Refuse what the runtime would refuse, before queueing, so a streamed request gets a status code.
        ``what`` names the text in the message (default ``param``)."""
        from fieldpack.device.runtime import MAX_QUESTION_CHARS

        if not text.strip():
            raise ApiError(400, f"{what or param} is empty; ask a question in words", code="empty_question",
                           param=param)
        if len(" ".join(text.split())) > MAX_QUESTION_CHARS:
            raise ApiError(400, f"{param} has {len(text)} characters (limit {MAX_QUESTION_CHARS})",
                           code="question_too_long", param=param)

    def check_cap(requested: int | None, *, grounded: bool) -> None:
        """Refuse a ``max_tokens`` the loaded context cannot hold before queueing, so a streamed request gets a 400
        instead of a 200 and an error event (the worker still checks the exact bound, which needs the prompt). A
        grounded answer gets the runtime's own check (:func:`device.options.check_answer_options`); a raw prompt
        needs at least one token of the context."""
        n_ctx = host.state().n_ctx
        if requested is None or n_ctx is None:
            return
        try:
            if grounded:
                check_answer_options(k=None, max_tokens=requested, n_ctx=n_ctx)
            elif requested >= n_ctx:
                raise errors.MaxTokensError(requested, n_ctx - 1, f"leaves no token of n_ctx {n_ctx} for the prompt")
        except errors.FieldpackError as exc:
            raise api_error_of(exc) from exc

    def cap(requested: int | None) -> int | None:
        if requested is None or cfg.max_answer_tokens is None:
            return requested
        return min(requested, cfg.max_answer_tokens)

    # -- routes ---------------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = importlib.resources.files("fieldpack.device.http").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": "default-src 'self'; style-src 'self' "
                                           "'unsafe-inline'; script-src 'self' 'unsafe-inline'"})

    @app.get("/health")
    async def health() -> JSONResponse:
        state = host.state()
        body = {"status": "ok", "bundle": state.bundle, "model": state.model,
                "queue": {"waiting": host.board.depth, "capacity": host.board.capacity}}
        if state.mqtt_connected is not None:  # HTTP answers either way; the broker link is said, not judged
            body["mqtt"] = "connected" if state.mqtt_connected else "disconnected"
        if state.loading:
            return JSONResponse(dict(body, status="loading"), status_code=503, headers={"Retry-After": "2"})
        if state.bundle is None:
            return JSONResponse(dict(body, status="unavailable", error=state.error), status_code=503)
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(prom.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        state = host.state()
        data = []
        if state.bundle:
            data.append({"id": _bundle_name(state.bundle), "object": "model", "created": 0,
                         "owned_by": "fieldpack", "bundle": state.bundle, "model": state.model})
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        bundle = check_model(body.model)
        model_id = _bundle_name(bundle)
        max_tokens, stop = cap(body.answer_cap()), body.stop_list()
        check_cap(max_tokens, grounded=body.grounding)
        if body.messages[-1].role != "user":
            raise ApiError(400, "the last message must be the user's", code="invalid_value", param="messages")
        if body.grounding:
            check_question(body.messages[-1].text(), "messages", "the last message's content")
        elif not host.state().chat:
            raise ApiError(400, str(_no_chat_template(bundle)), code="no_chat_template", param="grounding")
        work = _grounded_chat(body.messages, max_tokens, stop) if body.grounding else \
            _plain_chat(body.messages, max_tokens, stop)
        run = start(work)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id}
        if not body.stream:
            out = await result(run, request)
            return dict(_chat_json(out, rid, created, model_id), **_extras(out, body.grounding))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def first() -> list[dict[str, Any]]:
            return [dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "finish_reason": None}])]

        def piece(text: str) -> dict[str, Any]:
            return dict(head, choices=[{"index": 0, "delta": {"content": text}, "finish_reason": None}])

        def last(out: Outcome) -> list[dict[str, Any]]:
            chunks = [dict(head, choices=[{"index": 0, "delta": {}, "finish_reason": _finish(out)}],
                           **_extras(out, body.grounding))]
            if include_usage:
                chunks.append(dict(head, choices=[], usage=_usage(out)))
            return chunks

        return StreamingResponse(stream(run, first, piece, last), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        bundle = check_model(body.model)
        model_id = _bundle_name(bundle)
        try:
            prompt = body.prompt_text()
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_value", param="prompt") from exc
        if not prompt:
            raise ApiError(400, "prompt is empty", code="invalid_value", param="prompt")
        max_tokens, stop = cap(body.answer_cap()) or 16, body.stop_list()  # OpenAI's default max_tokens: 16
        check_cap(max_tokens, grounded=False)

        def work(engine: Any, on_token: Callable[[str], None], cancel: threading.Event) -> Outcome:
            tokens = engine.tokenize_prompt(prompt)
            room = engine.n_ctx - len(tokens)
            if room < 1:
                raise errors.QuestionTooLongError(f"the prompt has {len(tokens)} tokens; the context holds {engine.n_ctx}",
                                                  hint="send a shorter prompt")
            if max_tokens > room:  # refused, as OpenAI and llama.cpp's server do, rather than cut without a word
                raise errors.MaxTokensError(max_tokens, room, f"and the prompt's {len(tokens)} tokens exceed the "
                                            f"context of {engine.n_ctx} tokens")
            text, finish, timings = engine.generate(tokens, max_tokens=max_tokens, on_token=on_token,
                                                    cancel=cancel, extra_stop=stop)
            return _with_usage(engine, Outcome(text=text, finish_reason=finish, timings=timings))

        run = start(work)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_id}
        if not body.stream:
            out = await result(run, request)
            return dict(head, choices=[{"index": 0, "text": out.text, "logprobs": None,
                                        "finish_reason": _finish(out)}], usage=_usage(out))
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def piece(text: str) -> dict[str, Any]:
            return dict(head, choices=[{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])

        def last(out: Outcome) -> list[dict[str, Any]]:
            chunks = [dict(head, choices=[{"index": 0, "text": "", "logprobs": None, "finish_reason": _finish(out)}])]
            if include_usage:
                chunks.append(dict(head, choices=[], usage=_usage(out)))
            return chunks

        return StreamingResponse(stream(run, lambda: [], piece, last), media_type="text/event-stream",
                                 headers=SSE_HEADERS)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: Request) -> dict[str, Any]:
        bundle = check_model(body.model)
        try:
            texts = body.texts()
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_value", param="input") from exc
        holder: dict[str, Any] = {}

        def work(engine: Any, on_token: Callable[[str], None], cancel: threading.Event) -> Outcome:
            from fieldpack.device.types import Timings

            t0 = time.perf_counter()
            holder["vectors"], holder["tokens"] = engine.embed(texts)
            return Outcome(text="", finish_reason="stop", timings=Timings(total_ms=(time.perf_counter() - t0) * 1e3),
                           abstained=True)

        await result(start(work), request)
        vectors = holder["vectors"]
        data = []
        for i, vec in enumerate(vectors):
            emb: Any = base64.b64encode(vec.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" \
                else [float(x) for x in vec]
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": _bundle_name(bundle),
                "usage": {"prompt_tokens": holder["tokens"], "total_tokens": holder["tokens"]}}

    @app.post("/v1/ask")
    async def ask(body: AskRequest, request: Request) -> Any:
        check_model(None)
        check_question(body.question, "question")
        from fieldpack.device.prompt import Turn

        check_cap(cap(body.max_tokens), grounded=True)
        history = [Turn(question=t.question, answer=t.answer, search_query=t.retrieval_query) for t in body.history]
        work = _answer_work(body.question, history, cap(body.max_tokens), [])
        run = start(work)
        if not body.stream:
            return _ask_json(await result(run, request))
        return StreamingResponse(
            stream(run, lambda: [], lambda text: {"type": "token", "text": text},
                   lambda out: [dict(_ask_json(out), type="final")]),
            media_type="text/event-stream", headers=SSE_HEADERS)

    @app.get("/v1/sources/{source_id}")
    async def source(source_id: int, request: Request) -> dict[str, Any]:
        check_model(None)
        if source_id < 0:
            raise ApiError(404, f"no source {source_id}", code="not_found")
        holder: dict[str, Any] = {}

        def work(engine: Any, on_token: Callable[[str], None], cancel: threading.Event) -> Outcome:
            from fieldpack.device.types import Timings

            holder["hit"] = engine.passage(source_id)
            return Outcome(text="", finish_reason="stop", timings=Timings(), abstained=True)

        await result(start(work), request)
        hit = holder["hit"]
        if hit is None:
            raise ApiError(404, f"no source {source_id} in the active bundle", code="not_found", param="id")
        return _source_json(hit)

    return app


# --- work run on the worker thread -----------------------------------------------------------------------------------
def _with_usage(engine: Any, outcome: Outcome) -> Outcome:
    """Usage counts the answer's tokens by tokenizing its text with the model's tokenizer: llama.cpp's decode
    count also holds a re-evaluated prompt token when the prompt cache is reused, so it differs between two
    identical requests. A refusal generated nothing: 0 tokens."""
    n = 0 if outcome.abstained or not outcome.text else \
        len(engine.llama.tokenize(outcome.text.encode("utf-8"), add_bos=False, special=False))
    outcome.timings = outcome.timings.model_copy(update={"completion_tokens": n})
    return outcome


#: Earlier turns whose search chain is rebuilt when the messages do not carry it.
CHAIN_TURNS = 4


def _with_search_chain(engine: Any, history: list[Any]) -> list[Any]:
    """``history`` with its last turn's ``search_query`` rebuilt from the last :data:`CHAIN_TURNS` questions, when
    no turn carries one (OpenAI-style messages cannot; a third-turn follow-up then lost the topic: a new-user
    trial). Costs up to two searches per turn."""
    chain = getattr(engine, "search_query", None)
    if chain is None or len(history) < 2 or any(t.search_query for t in history):
        return history
    previous: str | None = None
    for turn in history[-CHAIN_TURNS:]:
        previous = chain(turn.question, previous)
    if previous is None or previous == history[-1].question:
        return history
    return [*history[:-1], dataclasses.replace(history[-1], search_query=previous)]


def _answer_work(question: str, history: list[Any], max_tokens: int | None, stop: list[str]) -> Work:
    def work(engine: Any, on_token: Callable[[str], None], cancel: threading.Event) -> Outcome:
        answer = engine.answer(question, on_token=on_token, cancel=cancel,
                               history=_with_search_chain(engine, history), max_tokens=max_tokens, extra_stop=stop)
        return _with_usage(engine, Outcome(text=answer.text, finish_reason=answer.finish_reason,
                                           timings=answer.timings, sources=list(answer.sources),
                                           abstained=answer.abstained, bundle=answer.bundle, extra=answer.extra))
    return work


def _grounded_chat(messages: list[ChatMessage], max_tokens: int | None, stop: list[str]) -> Work:
    """The last user message is the question; earlier user/assistant pairs are history (system messages are
    replaced by the grounding instructions)."""
    from fieldpack.device.prompt import Turn

    history: list[Turn] = []
    pending: str | None = None
    for m in messages[:-1]:
        if m.role == "user":
            pending = m.text()
        elif m.role == "assistant" and pending is not None:
            history.append(Turn(question=pending, answer=m.text()))
            pending = None
    return _answer_work(messages[-1].text(), history, max_tokens, stop)


def _no_chat_template(bundle: str) -> errors.UsageError:
    """Why ``"grounding": false`` cannot run on ``bundle`` (a base model prompted in completion format)."""
    return errors.UsageError(f'bundle {bundle} has no chat template (prompt format completion), so "grounding": '
                             "false is unavailable", hint="send the text to /v1/completions for a raw continuation, "
                             "or build the bundle from a checkpoint with a chat template")


def _plain_chat(messages: list[ChatMessage], max_tokens: int | None, stop: list[str]) -> Work:
    """The model alone on the messages, with its chat template; the oldest non-system messages are dropped
    until the prompt fits ``n_ctx - max_tokens``."""

    def work(engine: Any, on_token: Callable[[str], None], cancel: threading.Event) -> Outcome:
        cap = int(max_tokens or engine.manifest.runtime.max_tokens)
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        while True:
            tokens = engine.tokenize_prompt(engine.render(msgs))
            if len(tokens) <= engine.n_ctx - cap:
                break
            droppable = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]
            if len(tokens) < engine.n_ctx and (cap >= engine.n_ctx or not droppable):
                # the messages fit; the cap leaves them no room (a cap beyond the context drops no history first)
                raise errors.MaxTokensError(cap, engine.n_ctx - len(tokens), f"and the messages' {len(tokens)} "
                                            f"prompt tokens exceed the context of {engine.n_ctx} tokens")
            if not droppable:
                raise errors.QuestionTooLongError(
                    f"the messages need {len(tokens)} prompt tokens but the context allows {engine.n_ctx - cap}",
                    hint="send shorter messages or fewer max_tokens")
            del msgs[droppable[0]]
        text, finish, timings = engine.generate(tokens, max_tokens=cap, on_token=on_token, cancel=cancel,
                                                extra_stop=stop)
        return _with_usage(engine, Outcome(text=text, finish_reason=finish, timings=timings))
    return work


# --- response shapes -------------------------------------------------------------------------------------------------
def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def _finish(out: Outcome) -> str:
    """OpenAI finish reasons: ``length`` when the token cap cut the answer, else ``stop`` (EOS/EOT, a stop
    string, or a refusal because the documents do not answer)."""
    return "length" if out.finish_reason == "length" else "stop"


def _usage(out: Outcome) -> dict[str, int]:
    p, c = int(out.timings.prompt_tokens), int(out.timings.completion_tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


#: Retrieval internals left out of a source as the API returns it.
_HIT_INTERNALS = frozenset({"chunk_id", "source", "vector_rank", "bm25_rank", "vector_similarity", "bm25"})


def _source_json(hit: Any, n: int | None = None) -> dict[str, Any]:
    """A cited passage: ``id`` (for /v1/sources/{id}), ``document``, section, page / line range, citation, score,
    text."""
    d = {k: v for k, v in hit.to_dict().items() if k not in _HIT_INTERNALS}
    d.update(id=hit.chunk_id, document=hit.source, score=round(float(hit.score), 6))
    if n is not None:
        d["n"] = n
    return d


def _timings(out: Outcome) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in out.timings.to_dict().items()}


def _extras(out: Outcome, grounded: bool) -> dict[str, Any]:
    """Fields OpenAI clients ignore: the numbered sources and fieldpack's own figures."""
    if not grounded:
        return {"fieldpack": {"grounded": False, "bundle": out.bundle, "timings": _timings(out)}}
    return {"sources": [_source_json(h, i + 1) for i, h in enumerate(out.sources)],
            "fieldpack": {"grounded": True, "abstained": out.abstained, "bundle": out.bundle,
                          "timings": _timings(out), **answer_notes_json(out.extra)}}


def _chat_json(out: Outcome, rid: str, created: int, model_id: str) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                         "finish_reason": _finish(out), "logprobs": None}],
            "usage": _usage(out)}


def _ask_json(out: Outcome) -> dict[str, Any]:
    return {"answer": out.text, "abstained": out.abstained, "finish_reason": out.finish_reason,
            "bundle": out.bundle, "sources": [_source_json(h, i + 1) for i, h in enumerate(out.sources)],
            "timings": _timings(out), "usage": _usage(out), **answer_notes_json(out.extra)}
