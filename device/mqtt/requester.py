"""The asking side: a small MQTT v5 client that sends requests to devices and reads their status.

Used by ``fieldpack mqtt ask`` / ``fieldpack mqtt status``, the benchmark and the tests. One connection
serves many requests at once: each request gets its own id, sent as Correlation Data (MQTT v5) and in the
payload, and every reply on the client's reply topic is matched back to its :class:`Pending` by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import logging
import socket
import ssl
import threading
import time
from typing import Any, Callable
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fieldpack.shared import errors, protocol

from fieldpack.device.mqtt.client import BrokerSettings, fresh_client_id, json_properties, make_client

log = logging.getLogger(__name__)

PartialCallback = Callable[[protocol.Partial], None]


@dataclass(eq=False)
class Pending:
    """A request sent and its replies so far.

    Attributes:
        id: the request id (also the Correlation Data, UTF-8).
        sent_at: ``time.monotonic()`` just before publishing, seconds.
        partials: partial replies in arrival order.
        first_partial_at, final_at: ``time.monotonic()`` at arrival, or ``None``.
        final: the final reply once it came.
        on_partial: called on the paho network thread for each partial; keep it short.
    """

    id: str
    sent_at: float
    on_partial: PartialCallback | None = None
    partials: list[protocol.Partial] = field(default_factory=list)
    first_partial_at: float | None = None
    final: protocol.Final | None = None
    final_at: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout_s: float) -> protocol.Final | None:
        """The final reply, or ``None`` if none came within ``timeout_s`` seconds."""
        self.done.wait(timeout_s)
        return self.final

    @property
    def streamed_text(self) -> str:
        """The partial pieces joined in ``seq`` order."""
        return "".join(p.text for p in sorted(self.partials, key=lambda p: p.seq))


@dataclass(frozen=True)
class DeviceState:
    """A device's retained status and, when published, its latest metrics."""

    status: protocol.Status
    metrics: protocol.Metrics | None


class Requester:
    """Asks devices over MQTT.

    Args:
        settings: broker and login.
        client_id: MQTT client id; default ``fieldpack-cli-<random>`` (unique per run).

    Use as a context manager, or :meth:`connect` / :meth:`close`.
    """

    def __init__(self, settings: BrokerSettings, *, client_id: str | None = None) -> None:
        self.settings = settings
        self.client_id = protocol.check_name(client_id or fresh_client_id("fieldpack-cli"), "client id")
        self.reply_topic = protocol.reply_topic(self.client_id)
        self._pending: dict[str, Pending] = {}
        self._lock = threading.Lock()
        self._connack: threading.Event = threading.Event()
        self._connack_reason: ReasonCode | None = None
        self._suback: dict[int, threading.Event] = {}
        self._states: dict[str, protocol.Status] = {}
        self._metrics: dict[str, protocol.Metrics] = {}
        self._last_state_at = 0.0
        self._ready = False  # reply topic subscribed once: resubscribe after reconnects
        self.client = make_client(settings, self.client_id)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def __enter__(self) -> Requester:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, timeout_s: float = 10.0) -> None:
        """Connect, subscribe to the reply topic, and return when both are acknowledged.

        Raises:
            UsageError: login refused, or the broker's TLS certificate does not verify.
            DeviceError: the broker cannot be reached, or does not answer within ``timeout_s`` seconds.
        """
        s = self.settings
        try:
            self.client.connect(s.host, s.port, keepalive=s.keepalive_s, clean_start=True)
        except ssl.SSLError as exc:
            raise errors.UsageError(
                f"TLS handshake with broker {s.url} failed ({exc})",
                hint="give the CA that signed the broker's certificate with --tls-ca, and the host name it names",
            ) from exc
        except (OSError, socket.timeout) as exc:
            raise errors.DeviceError(
                f"cannot reach broker {s.url} ({exc})", hint="check the --broker address and that the broker runs"
            ) from exc
        self.client.loop_start()
        if not self._connack.wait(timeout_s):
            self.close()
            raise errors.DeviceError(
                f"broker {s.url} did not answer the MQTT CONNECT within {timeout_s:.0f} s",
                hint="check that the port is an MQTT listener (TLS ports need mqtts:// or --tls-ca)",
            )
        reason = self._connack_reason
        if reason is not None and reason.is_failure:
            self.close()
            raise errors.UsageError(
                f"broker {s.url} refused the connection: {reason.getName()}",
                hint="check --username and --password-file",
            )
        self._subscribe([self.reply_topic], timeout_s)
        self._ready = True

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()

    # --- requests ----------------------------------------------------------------------------------------------
    def submit(
        self,
        question: str,
        *,
        device: str | None = None,
        group: str | None = None,
        bundle: str | None = None,
        stream: bool = True,
        expiry_s: int | None = None,
        request_id: str | None = None,
        on_partial: PartialCallback | None = None,
    ) -> Pending:
        """Publish a request (QoS 1) to ``device`` or ``group`` and return at once.

        Args:
            expiry_s: MQTT v5 Message Expiry Interval, seconds: the device drops the request unanswered if it
                waited longer than this.
            request_id: default a random UUID.

        Raises:
            UsageError: neither or both of ``device`` and ``group``, or a name unfit for a topic.
        """
        topic = self._request_topic(device, group)
        rid = request_id or uuid.uuid4().hex
        request = protocol.Request(id=rid, question=question, bundle=bundle, stream=stream)
        props = json_properties()
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = rid.encode("utf-8")
        if expiry_s is not None:
            props.MessageExpiryInterval = int(expiry_s)
        pending = Pending(id=rid, sent_at=time.monotonic(), on_partial=on_partial)
        with self._lock:
            self._pending[rid] = pending
        self.client.publish(topic, request.encode(), qos=1, properties=props)
        return pending

    def ask(self, question: str, *, timeout_s: float = 120.0, **kwargs: Any) -> protocol.Final:
        """:meth:`submit` and wait for the final reply (which may be an error reply: check ``ok``).

        Raises:
            DeviceError: no final reply within ``timeout_s`` seconds.
        """
        pending = self.submit(question, **kwargs)
        final = pending.wait(timeout_s)
        with self._lock:
            self._pending.pop(pending.id, None)
        if final is None:
            target = kwargs.get("device") or f"group {kwargs.get('group')}"
            raise errors.DeviceError(
                f"no reply from {target} within {timeout_s:.0f} s",
                hint="check with `fieldpack mqtt status` that the device is online, or raise --timeout",
            )
        return final

    def cancel(self, request_id: str, *, device: str | None = None, group: str | None = None) -> None:
        """Ask the device (or every member of the group) to cancel request ``request_id``."""
        if (device is None) == (group is None):
            raise errors.UsageError("cancel needs exactly one of device and group", hint="name one")
        topic = protocol.cancel_topic(device) if device is not None else protocol.group_cancel_topic(group or "")
        props = json_properties()
        props.CorrelationData = request_id.encode("utf-8")
        self.client.publish(topic, protocol.Cancel(id=request_id).encode(), qos=1, properties=props)

    def forget(self, pending: Pending) -> None:
        """Stop tracking ``pending`` (late replies to it are then ignored)."""
        with self._lock:
            self._pending.pop(pending.id, None)

    # --- status ------------------------------------------------------------------------------------------------
    def device_states(self, *, timeout_s: float = 5.0, settle_s: float = 0.3,
                      device: str | None = None) -> list[DeviceState]:
        """Every device's retained status (and metrics), sorted by device id; only ``device``'s when given
        (an empty list: it never published one, or it was forgotten).

        Subscribes to all status and metrics topics, then collects the retained messages the broker sends
        right after the SUBACK until no retained one came for ``settle_s`` seconds (at most ``timeout_s``);
        live updates arriving meanwhile replace them but do not extend the wait.
        """
        with self._lock:
            self._states.clear()
            self._metrics.clear()
        topics = ([protocol.status_topic(device), protocol.metrics_topic(device)] if device is not None
                  else [protocol.STATUS_ALL, protocol.METRICS_ALL])
        self._subscribe(topics, timeout_s)
        with self._lock:
            self._last_state_at = max(self._last_state_at, time.monotonic())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                quiet = time.monotonic() - self._last_state_at
            if quiet >= settle_s:
                break
            time.sleep(min(settle_s - quiet, max(0.0, deadline - time.monotonic())) + 0.01)
        self.client.unsubscribe(topics)
        with self._lock:
            return [DeviceState(self._states[d], self._metrics.get(d)) for d in sorted(self._states)]

    def forget_device(self, device: str, *, timeout_s: float = 10.0) -> None:
        """Clear ``device``'s retained status and metrics on the broker (an empty retained message on each topic),
        so a decommissioned device no longer shows in ``fieldpack mqtt status``.

        Raises:
            DeviceError: the broker did not acknowledge the clearing within ``timeout_s``.
        """
        for topic in (protocol.status_topic(device), protocol.metrics_topic(device)):
            info = self.client.publish(topic, b"", qos=1, retain=True)
            info.wait_for_publish(timeout_s)
            if not info.is_published():
                raise errors.DeviceError(f"broker {self.settings.url} did not acknowledge clearing {topic}",
                                         hint="check the broker's ACL allows this user to publish there")

    # --- internals ---------------------------------------------------------------------------------------------
    @staticmethod
    def _request_topic(device: str | None, group: str | None) -> str:
        if (device is None) == (group is None):
            raise errors.UsageError(
                "a request goes to exactly one of a device and a group", hint="give --device or --group, not both"
            )
        return protocol.request_topic(device) if device is not None else protocol.group_request_topic(group or "")

    def _subscribe(self, topics: list[str], timeout_s: float) -> None:
        event = threading.Event()
        with self._lock:
            rc, mid = self.client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])
            if mid is not None:
                self._suback[mid] = event
        if rc != mqtt.MQTT_ERR_SUCCESS or not event.wait(timeout_s):
            raise errors.DeviceError(
                f"broker {self.settings.url} did not confirm the subscription to {', '.join(topics)}",
                hint="check the broker's ACL for this user",
            )

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self._connack_reason = reason
        self._connack.set()
        if not reason.is_failure and self._ready:  # a reconnect: the clean session lost the subscription
            client.subscribe([(self.reply_topic, SubscribeOptions(qos=1))])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Any) -> None:
        with self._lock:
            event = self._suback.pop(mid, None)
        if any(c.is_failure for c in codes):
            log.warning("subscription %d refused: %s", mid, ", ".join(c.getName() for c in codes))
            return
        if event is not None:
            event.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        kind = protocol.parse_topic(message.topic)
        try:
            if kind is not None and kind[0] == "status":
                status = protocol.decode_status(message.payload)
                with self._lock:
                    self._states[status.device] = status
                    if message.retain:
                        self._last_state_at = time.monotonic()
            elif kind is not None and kind[0] == "metrics":
                metrics = protocol.decode_metrics(message.payload)
                with self._lock:
                    self._metrics[metrics.device] = metrics
                    if message.retain:
                        self._last_state_at = time.monotonic()
            elif message.topic == self.reply_topic:
                self._on_reply(message)
        except errors.ProtocolError as err:
            log.warning("ignoring message on %s: %s", message.topic, err)

    def _on_reply(self, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        reply = protocol.decode_reply(message.payload)
        correlation = getattr(message.properties, "CorrelationData", None)
        rid = correlation.decode("utf-8", "replace") if correlation is not None else reply.id
        with self._lock:
            pending = self._pending.get(rid) if rid is not None else None
        if pending is None:
            log.debug("reply for unknown request %s", rid)
            return
        if isinstance(reply, protocol.Partial):
            if pending.first_partial_at is None:
                pending.first_partial_at = now
            pending.partials.append(reply)
            if pending.on_partial is not None:
                pending.on_partial(reply)
        else:
            pending.final, pending.final_at = reply, now
            pending.done.set()

