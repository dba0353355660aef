"""Admission of one request: decode and check it, find where to reply, and queue it or refuse it.

This is the daemon's decision logic with no broker and no paho types in it: the dispatcher turns an MQTT
message into an :class:`InboundRequest`, calls :meth:`Admission.admit`, and carries out the :class:`Decision`
(publish a refusal, or nothing: the job is queued). Tests drive it directly, with a real :class:`JobBoard` and a
clock of their own; the real-broker tests keep covering the transport.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fieldpack.shared import errors, protocol

from fieldpack.device.mqtt.jobs import Job, JobBoard, ReplyRoute

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InboundRequest:
    """A request as it arrived, transport details already read off the MQTT message.

    Attributes:
        topic: the topic it arrived on (for log lines).
        payload: the raw payload (bytes, UTF-8 JSON if well-formed).
        response_topic: MQTT v5 Response Topic property, or ``None``.
        correlation: MQTT v5 Correlation Data property (opaque bytes), or ``None``.
        expiry_s: MQTT v5 Message Expiry Interval (seconds), or ``None``.
        received_at: ``clock.monotonic()`` at arrival, seconds.
    """

    topic: str
    payload: bytes
    response_topic: str | None = None
    correlation: bytes | None = None
    expiry_s: int | None = None
    received_at: float = 0.0


Counter = Literal["errors", "busy"]


@dataclass(frozen=True)
class Decision:
    """What to do with one request.

    Attributes:
        job: the queued job, or ``None`` when it was refused or dropped.
        route: where a refusal goes; ``None`` when there is nowhere to reply (dropped, logged).
        refusal: the error reply to publish on ``route``, or ``None`` when queued or dropped.
        counter: the metrics counter the outcome adds to besides ``requests`` (``None`` when queued).
        depth: queue depth after admission (jobs waiting).
    """

    job: Job | None = None
    route: ReplyRoute | None = None
    refusal: protocol.ErrorBody | None = None
    counter: Counter | None = None
    depth: int = 0


class Admission:
    """Decides, for each inbound request, queue or refuse (and how), in this order: a payload that breaks the
    protocol -> its error (to the Response Topic, else to a ``reply_to`` salvaged from the payload); no reply
    route -> dropped; shutting down -> ``shutting_down``; same id or correlation data in flight ->
    ``duplicate_request``; queue full -> ``busy`` with the depth; else queued.

    Args:
        device_id: this device's id (named in refusals).
        board: the bounded queue the worker takes jobs from.
        max_payload_bytes, max_question_chars: request limits (bytes, characters).
        stopping: returns True once the daemon is shutting down.
    """

    def __init__(self, device_id: str, board: JobBoard, *, max_payload_bytes: int, max_question_chars: int,
                 stopping: Callable[[], bool]) -> None:
        self.device_id = device_id
        self.board = board
        self.max_payload_bytes = max_payload_bytes
        self.max_question_chars = max_question_chars
        self._stopping = stopping

    def admit(self, inbound: InboundRequest) -> Decision:
        """Decide for one request (see the class doc); a queued job is on :attr:`board` when this returns."""
        response_topic = inbound.response_topic
        if response_topic is not None:
            try:
                protocol.check_reply_topic(response_topic)
            except errors.ProtocolError:
                log.warning("ignoring unusable Response Topic %r on %s", response_topic, inbound.topic)
                response_topic = None
        payload = inbound.payload
        try:
            request = protocol.decode_request(payload, max_bytes=self.max_payload_bytes,
                                              max_question_chars=self.max_question_chars)
        except errors.FieldpackError as err:
            reply_to, request_id = (
                protocol.salvage_reply_route(payload) if len(payload) <= self.max_payload_bytes else (None, None)
            )
            topic = response_topic or reply_to
            if topic is None:
                log.warning("request on %s has no Response Topic and no reply_to; cannot reply: %s",
                            inbound.topic, err)
                return Decision(counter="errors")
            return Decision(route=ReplyRoute(topic, inbound.correlation, request_id),
                            refusal=protocol.ErrorBody.from_error(err), counter="errors")
        topic = response_topic or request.reply_to
        if topic is None:
            log.warning("request %s on %s has no Response Topic and no reply_to; nowhere to reply, dropped",
                        request.id, inbound.topic)
            return Decision(counter="errors")
        route = ReplyRoute(topic, inbound.correlation, request.id)
        if self._stopping():
            return Decision(route=route, counter="errors", refusal=protocol.ErrorBody(
                code=protocol.ErrorCode.SHUTTING_DOWN,
                reason=f"device {self.device_id} is shutting down",
                hint="send the request again when the device is back online",
            ))
        expires_at = inbound.received_at + inbound.expiry_s if inbound.expiry_s is not None else None
        job = Job(request=request, route=route, received_at=inbound.received_at, expires_at=expires_at)
        outcome, depth = self.board.admit(job)
        if outcome == "duplicate":
            return Decision(route=route, counter="errors", depth=depth, refusal=protocol.ErrorBody(
                code=protocol.ErrorCode.DUPLICATE_REQUEST,
                reason=f"request {request.id} (same id or correlation data) is already in flight on "
                       f"device {self.device_id}",
                hint="give every request its own id and correlation data; wait for the first reply",
            ))
        if outcome == "busy":
            return Decision(route=route, counter="busy", depth=depth, refusal=protocol.ErrorBody(
                code=protocol.ErrorCode.BUSY,
                reason=f"device {self.device_id} is busy: {depth} requests queued (limit {self.board.capacity})",
                hint="retry later or ask another device of the group",
                queue_depth=depth,
            ))
        log.debug("request %s queued (depth %d)", request.id, depth)
        return Decision(job=job, route=route, depth=depth)
