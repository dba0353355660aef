"""Publishing replies: partial pieces (QoS 0 by default) and the final message (QoS 1) of each request.

Replies go out from one publisher thread in the order they were handed over, so the replies of one device
to one topic arrive in order and every final message follows its partials. Handing a piece over costs the
worker a queue append (about a microsecond), so publishing overlaps with the engine's next decode step
(llama.cpp releases the GIL while it computes) instead of adding to every token's time. When pieces of one
request pile up faster than they can be sent, the publisher merges them into one partial message; ``seq``
numbers the messages actually sent (0, 1, ...) and the final message's ``partials`` says how many there were.

Every reply goes to the request's :class:`~device.mqtt.jobs.ReplyRoute` topic with the request's Correlation
Data (MQTT v5) and the request id in the payload (MQTT 3.1.1 clients).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties

from fieldpack.shared import protocol

from fieldpack.device.mqtt.client import json_properties
from fieldpack.device.mqtt.jobs import ReplyRoute

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Piece:
    stream: object
    route: ReplyRoute
    text: str


@dataclass(frozen=True)
class _Final:
    stream: object
    route: ReplyRoute
    message: protocol.Final


class Replier:
    """Publishes the replies of one device from its own thread (:meth:`start` / :meth:`close`).

    Args:
        client: a connected (or reconnecting) paho client; QoS 1 replies published while it is offline are
            kept by paho and sent after the reconnect, QoS 0 ones are dropped.
        device_id: put in every final message.
        partial_qos: QoS of partial messages (0: cheapest; the final message repeats the whole text).
    """

    def __init__(self, client: mqtt.Client, device_id: str, *, partial_qos: int = 0) -> None:
        self._client = client
        self._device_id = device_id
        self._partial_qos = partial_qos
        self._outbox: queue.SimpleQueue[_Piece | _Final | None] = queue.SimpleQueue()
        self._sent: dict[object, int] = {}  # partial messages sent per stream in flight
        self._props: dict[object, Properties] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the publisher thread."""
        self._thread = threading.Thread(target=self._run, name="fieldpack-mqtt-replies", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Publish what was handed over, then stop the thread."""
        if self._thread is None:
            return
        self._outbox.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("reply publisher still busy after %.0f s", timeout_s)

    def partial(self, stream: object, route: ReplyRoute, text: str) -> None:
        """Hand over the next piece of the answer to ``route`` (returns at once). ``stream`` identifies the
        request (the worker passes its job); its partial messages are numbered per stream."""
        self._outbox.put(_Piece(stream, route, text))

    def final(self, route: ReplyRoute, message: protocol.Final, *, stream: object | None = None) -> None:
        """Hand over the final message (QoS 1) that ends ``stream``; its ``partials`` is set to the number of
        partial messages sent for that stream."""
        self._outbox.put(_Final(stream if stream is not None else object(), route, message))

    def error(self, route: ReplyRoute, body: protocol.ErrorBody, *, stream: object | None = None) -> None:
        """Hand over a final error message (QoS 1)."""
        log.info("request %s -> error %s: %s", route.request_id, body.code, body.reason)
        self.final(route, protocol.Final.failure(route.request_id, self._device_id, body), stream=stream)

    # --- publisher thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        pending: _Piece | _Final | None = None
        while True:
            item = pending if pending is not None else self._outbox.get()
            pending = None
            if item is None:
                return
            try:
                if isinstance(item, _Piece):
                    text, pending = self._merge(item)
                    self._send_partial(item, text)
                else:
                    self._send_final(item)
            except Exception:  # publishing must never stop the replies of later requests
                log.exception("publishing a reply to %s failed", item.route.topic)

    def _merge(self, first: _Piece) -> tuple[str, _Piece | _Final | None]:
        """Join the pieces of ``first.stream`` already waiting; return the text and the next other item."""
        parts = [first.text]
        while True:
            try:
                nxt = self._outbox.get_nowait()
            except queue.Empty:
                return "".join(parts), None
            if isinstance(nxt, _Piece) and nxt.stream is first.stream:
                parts.append(nxt.text)
            else:
                return "".join(parts), nxt

    def _stream_props(self, stream: object, route: ReplyRoute) -> Properties:
        """The PUBLISH properties of one stream, made once (paho's Properties are slow to build)."""
        props = self._props.get(stream)
        if props is None:
            props = json_properties()
            if route.correlation is not None:
                props.CorrelationData = route.correlation
            self._props[stream] = props
        return props

    def _send_partial(self, piece: _Piece, text: str) -> None:
        seq = self._sent.get(piece.stream, 0)
        message = protocol.Partial(id=piece.route.request_id, seq=seq, text=text)
        if self._publish(piece.stream, piece.route, message.encode(), self._partial_qos):
            self._sent[piece.stream] = seq + 1

    def _send_final(self, item: _Final) -> None:
        sent = self._sent.pop(item.stream, 0)
        message = item.message.model_copy(update={"partials": sent}) if sent != item.message.partials else item.message
        self._publish(item.stream, item.route, message.encode(), 1)
        self._props.pop(item.stream, None)

    def _publish(self, stream: object, route: ReplyRoute, payload: bytes, qos: int) -> bool:
        """Publish; False when paho dropped it (QoS 0 while disconnected) or refused it."""
        info = self._client.publish(route.topic, payload, qos=qos, properties=self._stream_props(stream, route))
        if info.rc == mqtt.MQTT_ERR_SUCCESS or (info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0):
            return True  # sent, or kept by paho for after the reconnect
        if info.rc == mqtt.MQTT_ERR_NO_CONN:
            log.debug("partial reply to %s dropped while disconnected", route.topic)
        else:
            log.warning("reply to %s not queued: %s", route.topic, mqtt.error_string(info.rc))
        return False
