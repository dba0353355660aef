"""The fieldpack wire protocol: MQTT topic tree and JSON payloads, version 1.

This module is the only place that spells a topic name or a payload key; the daemon (``device.mqtt``), the
requester client and the CLI build and read messages only through it. Payloads are UTF-8 JSON objects, and
every one carries ``"v"`` (the protocol version, :data:`PROTOCOL_VERSION`) and ``"type"``.

Topic tree (``<root>`` is :data:`TOPIC_ROOT`, ``fieldpack/v1``)::

    <root>/device/<device>/request    requests for one device                     client -> device, QoS 1
    <root>/device/<device>/cancel     cancel a request by id                      client -> device, QoS 1
    <root>/device/<device>/status     retained status; the Last Will marks it     device -> all,    QoS 1, retained
                                      offline when the device drops off
    <root>/device/<device>/metrics    retained metrics, published periodically   device -> all,    QoS 0, retained
    <root>/group/<group>/request      requests for any device of a group; the     client -> one device of the group
                                      devices subscribe through the shared
                                      subscription ``$share/fieldpack-<group>/...``, so the broker hands each
                                      request to one of them
    <root>/group/<group>/cancel       cancel for group requests; every member     client -> devices, QoS 1
                                      sees it and the one holding the id acts
    <root>/reply/<client>             a conventional reply topic for clients (any topic without wildcards works)
    <root>/group/<group>/fleet/...,   fleet rollouts: desired bundle, chunk requests, device rollout state,
    <root>/device/<device>/fleet/...  chunks; payloads and topics in :mod:`shared.fleet_protocol`

A request (:class:`Request`) is answered on its MQTT v5 Response Topic with its Correlation Data echoed in
the same property. MQTT 3.1.1 clients, which have neither property, put ``reply_to`` in the payload; the
request ``id`` is echoed in every reply payload either way. An answer is streamed as :class:`Partial`
messages numbered ``seq = 0, 1, ...`` (QoS 0: a display nicety, the final message repeats the whole text)
and ends with exactly one :class:`Final` (QoS 1) carrying the answer, its sources with citations and its
timings, or ``ok = false`` and an :class:`ErrorBody` (``code`` from :class:`ErrorCode` or a
``shared.errors`` class code, a human-readable ``reason`` and a ``hint``). A request whose MQTT v5 Message
Expiry Interval runs out while it waits in the device's queue is not answered at all.

Request payload (MQTT v5 client; a 3.1.1 client adds ``"reply_to": "<topic>"``)::

    {"v": 1, "type": "request", "id": "4f1c...", "question": "How do I rotate the logs?",
     "bundle": "manuals@1.2.0", "stream": true}

``bundle`` (optional) is ``"name"`` or ``"name@version"``: the device refuses with ``unknown_bundle`` when its
active bundle does not match. ``stream: false`` asks for the final message only.
"""

from __future__ import annotations

from enum import StrEnum
import json
import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fieldpack.shared import errors
from fieldpack.shared.text import clean_question

PROTOCOL_VERSION = 1
"""Version of this protocol; in every payload (``"v"``) and in the topic root."""

TOPIC_ROOT = f"fieldpack/v{PROTOCOL_VERSION}"
SHARE_PREFIX = "$share"

MAX_PAYLOAD_BYTES = 64 * 1024
"""Largest request payload a device accepts, bytes; larger ones get ``payload_too_large``."""

MAX_QUESTION_CHARS = 4000
"""Longest question a device accepts, characters after stripping; longer ones get ``question_too_long``."""

MAX_ID_CHARS = 128
"""Longest request id, characters."""

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
"""Device ids, group names and client ids that go into topics: 1-64 of ``A-Z a-z 0-9 . _ -``."""

CONTENT_TYPE = "application/json"


class ErrorCode(StrEnum):
    """Wire error codes that are not the ``code`` of a ``shared.errors`` class.

    Errors raised as ``shared.errors`` classes travel with that class's ``code`` (``empty_question``,
    ``question_too_long``, ``no_active_bundle``, ...); :meth:`ErrorBody.to_exception` maps both back.
    """

    PAYLOAD_TOO_LARGE = "payload_too_large"
    NOT_UTF8 = "not_utf8"
    NOT_JSON = "not_json"
    BAD_SHAPE = "bad_shape"
    UNSUPPORTED_VERSION = "unsupported_version"
    DUPLICATE_REQUEST = "duplicate_request"
    UNKNOWN_BUNDLE = "unknown_bundle"
    BUSY = "busy"
    CANCELLED = "cancelled"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


_PROTOCOL_CODES = frozenset(
    {
        ErrorCode.PAYLOAD_TOO_LARGE,
        ErrorCode.NOT_UTF8,
        ErrorCode.NOT_JSON,
        ErrorCode.BAD_SHAPE,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.DUPLICATE_REQUEST,
    }
)


# --- topics ------------------------------------------------------------------------------------------------
def check_name(name: str, what: str) -> str:
    """Return ``name`` if it may be one topic level (see :data:`NAME_PATTERN`).

    Raises:
        UsageError: ``name`` is empty, too long, or holds ``/``, ``+``, ``#`` or other characters.
    """
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise errors.UsageError(
            f"{what} {name!r} cannot be used in an MQTT topic",
            hint=f"use 1-64 characters from A-Z a-z 0-9 . _ - for the {what}, starting with a letter or digit",
        )
    return name


def device_topic(device_id: str, *parts: str) -> str:
    """``fieldpack/device/<device_id>/<parts...>``: the one shape of every per-device topic.

    Raises:
        UsageError: ``device_id`` is not a valid topic level (see :func:`check_name`).
    """
    return "/".join((TOPIC_ROOT, "device", check_name(device_id, "device id"), *parts))


def group_topic(group: str, *parts: str) -> str:
    """``fieldpack/group/<group>/<parts...>``: the one shape of every per-group topic.

    Raises:
        UsageError: ``group`` is not a valid topic level (see :func:`check_name`).
    """
    return "/".join((TOPIC_ROOT, "group", check_name(group, "group"), *parts))


def request_topic(device_id: str) -> str:
    """Topic a device takes its own requests from."""
    return device_topic(device_id, "request")


def cancel_topic(device_id: str) -> str:
    """Topic a device takes cancellations of its own requests from."""
    return device_topic(device_id, "cancel")


def status_topic(device_id: str) -> str:
    """Retained status of one device (also its Last Will topic)."""
    return device_topic(device_id, "status")


def metrics_topic(device_id: str) -> str:
    """Retained, periodically refreshed metrics of one device."""
    return device_topic(device_id, "metrics")


def group_request_topic(group: str) -> str:
    """Topic clients publish group requests to (devices read it through :func:`group_subscription`)."""
    return group_topic(group, "request")


def group_subscription(group: str) -> str:
    """MQTT v5 shared subscription over :func:`group_request_topic`: the broker gives each request to one
    subscribed device of the group (MQTT 5.0 spec, section 4.8.2)."""
    return f"{SHARE_PREFIX}/fieldpack-{check_name(group, 'group')}/{group_request_topic(group)}"


def group_cancel_topic(group: str) -> str:
    """Cancellations of group requests; every member subscribes (not shared)."""
    return group_topic(group, "cancel")


def reply_topic(client_id: str) -> str:
    """Conventional reply topic of a requesting client."""
    return f"{TOPIC_ROOT}/reply/{check_name(client_id, 'client id')}"


STATUS_ALL = f"{TOPIC_ROOT}/device/+/status"
"""Subscription matching every device's status."""

METRICS_ALL = f"{TOPIC_ROOT}/device/+/metrics"
"""Subscription matching every device's metrics."""

TopicKind = Literal["request", "cancel", "status", "metrics", "group_request", "group_cancel", "reply"]


def parse_topic(topic: str) -> tuple[TopicKind, str] | None:
    """Classify a topic of this tree: ``(kind, device id | group | client id)``, or ``None`` if foreign."""
    parts = topic.split("/")
    root = TOPIC_ROOT.split("/")
    if parts[: len(root)] != root:
        return None
    rest = parts[len(root) :]
    if len(rest) == 3 and rest[0] == "device" and rest[2] in ("request", "cancel", "status", "metrics"):
        return rest[2], rest[1]  # type: ignore[return-value]
    if len(rest) == 3 and rest[0] == "group" and rest[2] in ("request", "cancel"):
        return ("group_request" if rest[2] == "request" else "group_cancel"), rest[1]
    if len(rest) == 2 and rest[0] == "reply":
        return "reply", rest[1]
    return None


def check_reply_topic(topic: str) -> str:
    """Return ``topic`` if a reply may be published to it (non-empty, no wildcards, not ``$``-prefixed).

    Raises:
        ProtocolError: code ``bad_shape``.
    """
    if not topic or "+" in topic or "#" in topic or topic.startswith("$") or len(topic.encode()) > 65535:
        raise errors.ProtocolError(
            f"reply topic {topic!r} cannot be published to",
            hint="give a topic without wildcards (+, #) that does not start with $",
            code=ErrorCode.BAD_SHAPE,
        )
    return topic


# --- bundle references -------------------------------------------------------------------------------------
def parse_bundle_ref(ref: str) -> tuple[str, str | None]:
    """Split ``"name"`` or ``"name@version"`` into ``(name, version or None)``.

    Raises:
        ProtocolError: code ``bad_shape`` when a part is empty.
    """
    name, sep, version = ref.partition("@")
    if not name.strip() or (sep and not version.strip()):
        raise errors.ProtocolError(
            f"bundle {ref!r} is not a bundle reference",
            hint='name a bundle as "name" or "name@version"',
            code=ErrorCode.BAD_SHAPE,
        )
    return name.strip(), (version.strip() if sep else None)


def bundle_matches(ref: str, label: str) -> bool:
    """True when the reference ``ref`` (``"name"`` / ``"name@version"``) names the bundle ``label``
    (``"name@version"``, as ``AnswerEngine.bundle_label`` gives it)."""
    want_name, want_version = parse_bundle_ref(ref)
    have_name, _, have_version = label.partition("@")
    return want_name == have_name and (want_version is None or want_version == have_version)


# --- messages ----------------------------------------------------------------------------------------------
class _Record(BaseModel):
    """Base of every payload and nested record: strict types (no ``"1"`` for ``1``), unknown keys ignored
    when read (a reader of version 1 tolerates keys a later minor revision adds)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")


class _Wire(_Record):
    """Base of every top-level payload: carries the protocol version ``v``."""

    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        """Compact UTF-8 JSON of this message (``None`` fields kept, so readers see every key)."""
        return self.model_dump_json().encode("utf-8")


class Request(_Wire):
    """A question for a device (or a group). Unknown keys are refused (``bad_shape``).

    Attributes:
        id: request id chosen by the client, 1..:data:`MAX_ID_CHARS` characters; echoed in every reply and
            used to cancel. Must be unique among the client's requests in flight.
        question: the question, stripped; 1..:data:`MAX_QUESTION_CHARS` characters.
        bundle: ``"name"`` / ``"name@version"`` the answer must come from, or ``None`` for the active one.
        reply_to: reply topic for MQTT 3.1.1 clients; ignored when the MQTT v5 Response Topic is set.
        stream: send :class:`Partial` messages (``True``) or only the :class:`Final` one.
    """

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    type: Literal["request"] = "request"
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    question: str
    bundle: str | None = None
    reply_to: str | None = None
    stream: bool = True


class Cancel(_Wire):
    """Cancel the request with ``id``: dropped if still queued, stopped between tokens if running. The
    request gets a final ``cancelled`` error reply; the cancel itself is never answered."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    type: Literal["cancel"] = "cancel"
    id: str = Field(min_length=1, max_length=MAX_ID_CHARS)


class Partial(_Wire):
    """One streamed piece of an answer: ``seq`` counts from 0 per request; the pieces concatenated in
    ``seq`` order are the answer text."""

    type: Literal["partial"] = "partial"
    id: str | None
    seq: int
    text: str


class Source(_Record):
    """One cited chunk of a final answer; ``n`` is the number the answer cites as ``[n]``.

    Lines are 1-based inclusive, ``page`` is the 1-based PDF page; ``score`` is the fused RRF score.
    """

    n: int
    source: str
    section: str
    page: int | None
    line_start: int | None
    line_end: int | None
    citation: str
    text: str
    score: float


class GateInfo(_Record):
    """Why a question was refused without running the model (``abstained``): ``closest``, the citation of the
    nearest passage; ``closest_cosine``, its cosine to the question (to the searched query for a follow-up),
    rounded down to 3 decimals; ``threshold_cosine``, the bundle's relevance
    threshold (manifest ``runtime.min_similarity``). An operator can then tell other words from a question the
    documents do not cover. Added in a minor revision of version 1; older readers ignore it."""

    closest: str
    closest_cosine: float
    threshold_cosine: float


class AnswerTimings(_Record):
    """Where the time of one answer went, as the engine measures it (``fieldpack.device.types.Timings`` is this
    class): milliseconds unless named otherwise; tokens are model tokens."""

    retrieval_ms: float = 0.0
    prompt_tokens: int = 0
    prompt_eval_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    completion_tokens: int = 0
    decode_ms: float = 0.0
    tokens_per_s: float = 0.0
    total_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return self.model_dump()


class ReplyTimings(AnswerTimings):
    """:class:`AnswerTimings` on the wire, plus ``queue_ms``: the wait in the device's queue."""

    queue_ms: float = 0.0


class ErrorBody(_Record):
    """Why a request was not answered.

    Attributes:
        code: :class:`ErrorCode` value or the ``code`` of a ``shared.errors`` class.
        reason: one human-readable sentence naming the input.
        hint: what the requester can do, or ``None``.
        queue_depth: requests waiting on the device when it answered ``busy``; ``None`` otherwise.
    """

    code: str
    reason: str
    hint: str | None = None
    queue_depth: int | None = None

    @classmethod
    def from_error(cls, err: errors.FieldpackError) -> ErrorBody:
        """Wire form of a fieldpack error: its ``code``, its message and its hint."""
        return cls(code=str(err.code), reason=" ".join(err.message.split()), hint=err.hint)

    def to_exception(self) -> errors.FieldpackError:
        """The ``shared.errors`` error this body stands for: the class whose ``code`` it is, else
        ``ProtocolError`` for protocol codes, else ``DeviceError`` carrying ``code``."""
        cls = _error_class_for(self.code)
        if cls is errors.ProtocolError or (cls is None and self.code in _PROTOCOL_CODES):
            return errors.ProtocolError(self.reason, hint=self.hint, code=self.code)
        err = (cls or errors.DeviceError)(self.reason, hint=self.hint)
        err.code = self.code
        return err


def _error_class_for(code: str) -> type[errors.FieldpackError] | None:
    stack: list[type[errors.FieldpackError]] = [errors.FieldpackError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return None


class Final(_Wire):
    """The last message of every reply: the answer (``ok``) or an error (``not ok``, ``error`` set).

    Attributes:
        id: the request id, ``None`` when the request was too broken to read one.
        device: id of the device that replied.
        answer: the answer text; with ``stream`` it equals the partial pieces concatenated.
        abstained: True when retrieval found nothing relevant enough and no generation ran.
        finish_reason: ``"stop"``, ``"length"`` or ``"abstained"`` (see ``device.types.Answer``).
        bundle: ``"name@version"`` of the bundle that answered.
        sources: cited chunks, ``[1]..[n]`` in order.
        timings: see :class:`ReplyTimings`.
        partials: how many :class:`Partial` messages were sent before this one.
        gate: set when the relevance gate refused the question (:class:`GateInfo`).
    """

    type: Literal["final"] = "final"
    id: str | None
    device: str
    ok: bool
    answer: str | None = None
    abstained: bool | None = None
    finish_reason: str | None = None
    bundle: str | None = None
    sources: list[Source] = Field(default_factory=list)
    timings: ReplyTimings | None = None
    partials: int = 0
    error: ErrorBody | None = None
    gate: GateInfo | None = None

    @model_validator(mode="after")
    def _ok_xor_error(self) -> Final:
        if self.ok == (self.error is not None):
            raise ValueError("a final message has `error` exactly when `ok` is false")
        return self

    @classmethod
    def failure(cls, request_id: str | None, device: str, body: ErrorBody, partials: int = 0) -> Final:
        """An error reply."""
        return cls(id=request_id, device=device, ok=False, error=body, partials=partials)


class Status(_Wire):
    """Retained state of one device; the Last Will is a ``Status`` with ``online = false``.

    Attributes:
        online: False in the Last Will and after a clean shutdown.
        groups: groups the device takes requests for.
        bundle, bundle_name, bundle_version: active bundle (``"name@version"`` and its parts), or ``None``.
        model: model file / name of the active bundle when the engine tells it, else ``None``.
        queue_depth: requests waiting (not counting the one being answered); ``queue_max`` the bound.
        busy: True while a request is being answered.
        uptime_s: seconds since the daemon started.
        ts: device wall clock, Unix seconds, when this status was made.
        error: why the device cannot answer right now (e.g. no active bundle), else ``None``.
        instance: random id of the daemon process (part of its MQTT client id); two live instances with one
            device id are a misconfiguration that the daemons detect through it.
        started_at: device wall clock, Unix seconds, when that process started.
    """

    type: Literal["status"] = "status"
    device: str
    online: bool
    groups: list[str] = Field(default_factory=list)
    bundle: str | None = None
    bundle_name: str | None = None
    bundle_version: str | None = None
    model: str | None = None
    queue_depth: int | None = None
    queue_max: int | None = None
    busy: bool | None = None
    uptime_s: float | None = None
    ts: float | None = None
    error: str | None = None
    instance: str | None = None
    started_at: float | None = None


class Stats(_Record):
    """Summary of one measure over the last answers: count, last value, mean and nearest-rank p50/p95."""

    n: int = 0
    last: float | None = None
    mean: float | None = None
    p50: float | None = None
    p95: float | None = None

    @classmethod
    def of(cls, values: list[float]) -> Stats:
        """Summary of ``values`` (oldest first); all ``None`` when empty."""
        if not values:
            return cls()
        ordered = sorted(values)

        def rank(q: float) -> float:
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        return cls(n=len(values), last=values[-1], mean=sum(values) / len(values), p50=rank(0.5), p95=rank(0.95))


MetricsCounter = Literal["requests", "answered", "errors", "busy", "expired", "cancelled", "reconnects"]
METRICS_COUNTERS: tuple[MetricsCounter, ...] = (
    "requests", "answered", "errors", "busy", "expired", "cancelled", "reconnects"
)
"""Names of the :class:`Metrics` counters (keys of the payload)."""


class Metrics(_Wire):
    """Counters since start and latency summaries over the last answers of one device.

    Counters: ``requests`` every request message received (valid or not); ``answered`` final answers sent;
    ``errors`` error replies (other than ``busy``/``cancelled``) plus requests with nowhere to reply;
    ``busy`` refusals for a full queue; ``expired`` requests dropped because their Message Expiry ran out
    while queued; ``cancelled``; ``reconnects`` broker connections after the first.
    Summaries (:class:`Stats`): ``ttft_ms`` engine time to first token, ``tokens_per_s`` decode speed,
    ``retrieval_ms``, ``queue_ms`` wait in the device queue, ``total_ms`` engine time per answer.
    Example (also the shape of the daemon's ``<data_dir>/metrics.json``)::

        {"v": 1, "type": "metrics", "device": "fieldbox-7", "ts": 1732871234.5, "uptime_s": 3600.2,
         "requests": 120, "answered": 112, "errors": 3, "busy": 4, "expired": 1, "cancelled": 0,
         "reconnects": 1, "queue_depth": 0,
         "ttft_ms":      {"n": 112, "last": 210.0, "mean": 230.1, "p50": 220.0, "p95": 310.0},
         "tokens_per_s": {...}, "retrieval_ms": {...}, "queue_ms": {...}, "total_ms": {...}}
    """

    type: Literal["metrics"] = "metrics"
    device: str
    ts: float
    uptime_s: float
    requests: int = 0
    answered: int = 0
    errors: int = 0
    busy: int = 0
    expired: int = 0
    cancelled: int = 0
    reconnects: int = 0
    queue_depth: int = 0
    ttft_ms: Stats = Field(default_factory=Stats)
    tokens_per_s: Stats = Field(default_factory=Stats)
    retrieval_ms: Stats = Field(default_factory=Stats)
    queue_ms: Stats = Field(default_factory=Stats)
    total_ms: Stats = Field(default_factory=Stats)


# --- decoding ----------------------------------------------------------------------------------------------
def _load_object(payload: bytes, *, max_bytes: int, what: str) -> dict[str, Any]:
    """Bytes -> JSON object of the right protocol version, or ``ProtocolError`` with the matching code."""
    if len(payload) > max_bytes:
        raise errors.ProtocolError(
            f"{what} payload is {len(payload)} bytes, more than the {max_bytes} bytes a device accepts",
            hint="send a shorter question",
            code=ErrorCode.PAYLOAD_TOO_LARGE,
        )
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.ProtocolError(
            f"{what} payload is not UTF-8 (bad byte at offset {exc.start})",
            hint="encode the JSON payload as UTF-8",
            code=ErrorCode.NOT_UTF8,
        ) from exc
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise errors.ProtocolError(
            f"{what} payload is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            hint='send a JSON object such as {"v": 1, "type": "request", "id": "...", "question": "..."}',
            code=ErrorCode.NOT_JSON,
        ) from exc
    if not isinstance(obj, dict):
        raise errors.ProtocolError(
            f"{what} payload is a JSON {type(obj).__name__}, not an object",
            hint='send a JSON object such as {"v": 1, "type": "request", "id": "...", "question": "..."}',
            code=ErrorCode.BAD_SHAPE,
        )
    version = obj.get("v")
    if version != PROTOCOL_VERSION or isinstance(version, bool):
        raise errors.ProtocolError(
            f"{what} has protocol version {version!r}; this device speaks version {PROTOCOL_VERSION}",
            hint=f'set "v": {PROTOCOL_VERSION} and follow the version {PROTOCOL_VERSION} schema',
            code=ErrorCode.UNSUPPORTED_VERSION,
        )
    return obj


def _shape_error(what: str, exc: ValidationError) -> errors.ProtocolError:
    return errors.ProtocolError(
        f"{what} key {errors.first_validation_error(exc, top='(payload)')}",
        hint="follow the shared.protocol schema (strict JSON types, no unknown keys)",
        code=ErrorCode.BAD_SHAPE,
    )


def decode_request(
    payload: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES, max_question_chars: int = MAX_QUESTION_CHARS
) -> Request:
    """Read and check a request payload; the question comes back cleaned (shared.text.clean_question: no
    control characters, ligatures folded, whitespace collapsed).

    Checks in this order, each with its own error: size, UTF-8, JSON, object, version, schema, question.

    Raises:
        ProtocolError: code ``payload_too_large``, ``not_utf8``, ``not_json``, ``unsupported_version`` or
            ``bad_shape`` (wrong keys or types, wrong ``type``, bad ``bundle`` or ``reply_to``).
        EmptyQuestionError: the question is empty or blank.
        QuestionTooLongError: more than ``max_question_chars`` characters after stripping.
    """
    obj = _load_object(payload, max_bytes=max_bytes, what="request")
    try:
        request = Request.model_validate(obj)
    except ValidationError as exc:
        raise _shape_error("request", exc) from exc
    question = clean_question(request.question)  # NUL and other control characters never go further
    if not question:
        raise errors.EmptyQuestionError(
            f"request {request.id!r} has an empty question", hint="put the question in the `question` key"
        )
    if len(question) > max_question_chars:
        raise errors.QuestionTooLongError(
            f"request {request.id!r} has a question of {len(question)} characters, more than {max_question_chars}",
            hint="ask a shorter question",
        )
    if request.bundle is not None:
        parse_bundle_ref(request.bundle)
    if request.reply_to is not None:
        check_reply_topic(request.reply_to)
    return request.model_copy(update={"question": question})


def decode_cancel(payload: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Cancel:
    """Read and check a cancel payload.

    Raises:
        ProtocolError: as :func:`decode_request` for the envelope; ``bad_shape`` for the schema.
    """
    obj = _load_object(payload, max_bytes=max_bytes, what="cancel")
    try:
        return Cancel.model_validate(obj)
    except ValidationError as exc:
        raise _shape_error("cancel", exc) from exc


def salvage_reply_route(payload: bytes) -> tuple[str | None, str | None]:
    """Best-effort ``(reply_to, id)`` from a request that failed :func:`decode_request`, so the error can
    still reach an MQTT 3.1.1 client. Each is ``None`` when absent or unusable."""
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, None
    if not isinstance(obj, dict):
        return None, None
    reply_to, request_id = obj.get("reply_to"), obj.get("id")
    if not isinstance(reply_to, str):
        reply_to = None
    else:
        try:
            check_reply_topic(reply_to)
        except errors.ProtocolError:
            reply_to = None
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_CHARS:
        request_id = None
    return reply_to, request_id


ReplyMessage = Partial | Final


def decode_reply(payload: bytes) -> ReplyMessage:
    """Read a reply payload (client side).

    Raises:
        ProtocolError: not UTF-8 JSON of this version, or neither a partial nor a final message.
    """
    obj = _load_object(payload, max_bytes=len(payload), what="reply")
    kind = obj.get("type")
    model: type[_Wire] = Partial if kind == "partial" else Final
    try:
        return model.model_validate(obj)  # type: ignore[return-value]
    except ValidationError as exc:
        raise _shape_error("reply", exc) from exc


def decode_status(payload: bytes) -> Status:
    """Read a retained status payload (client side). Raises ``ProtocolError`` as :func:`decode_reply`."""
    obj = _load_object(payload, max_bytes=len(payload), what="status")
    try:
        return Status.model_validate(obj)
    except ValidationError as exc:
        raise _shape_error("status", exc) from exc


def decode_metrics(payload: bytes) -> Metrics:
    """Read a metrics payload (client side, or ``metrics.json``). Raises ``ProtocolError`` as
    :func:`decode_reply`."""
    obj = _load_object(payload, max_bytes=len(payload), what="metrics")
    try:
        return Metrics.model_validate(obj)
    except ValidationError as exc:
        raise _shape_error("metrics", exc) from exc
