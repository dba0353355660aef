"""Test helpers for the MQTT tests: a raw paho client that publishes exactly what a test says (bad payloads,
MQTT v5 properties, or MQTT 3.1.1) and records what it receives, and a polling wait."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fieldpack.shared import protocol

from fieldpack.device.mqtt.client import BrokerSettings, fresh_client_id, tls_context


def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 10 ms until it is truthy; ``AssertionError`` naming ``what`` after
    ``timeout_s`` (a readiness wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Probe:
    """A raw MQTT client (v5 by default, or 3.1.1) for tests.

    Every received message goes to :attr:`inbox` (a queue of ``paho MQTTMessage``).
    """

    def __init__(self, settings: BrokerSettings, *, v311: bool = False) -> None:
        self.v311 = v311
        self.client_id = fresh_client_id("probe")
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv311 if v311 else mqtt.MQTTv5,
        )
        if settings.username:
            self.client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            self.client.tls_set_context(tls_context(settings))
        self.inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self._subacks: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.client.on_message = lambda c, u, m: self.inbox.put(m)
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(settings.host, settings.port, keepalive=30)
        self.client.loop_start()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, codes: object, props: object) -> None:
        with self._lock:
            event = self._subacks.pop(mid, None)
        if event is not None:
            event.set()

    def subscribe(self, topic: str, timeout_s: float = 10.0) -> None:
        """Subscribe (QoS 1) and wait for the SUBACK."""
        event = threading.Event()
        with self._lock:
            _, mid = self.client.subscribe(topic, qos=1)
            self._subacks[mid] = event
        assert event.wait(timeout_s), f"no SUBACK for {topic}"

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        expiry_s: int | None = None,
        retain: bool = False,
    ) -> None:
        """Publish QoS 1 and wait until the broker acknowledged it."""
        props = None
        if not self.v311 and (response_topic or correlation is not None or expiry_s is not None):
            props = Properties(PacketTypes.PUBLISH)
            if response_topic:
                props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_s
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=props)
        info.wait_for_publish(10)

    def next(self, timeout_s: float = 10.0) -> mqtt.MQTTMessage:
        """The next received message; ``AssertionError`` if none within ``timeout_s``."""
        try:
            return self.inbox.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout_s} s") from None

    def final(self, timeout_s: float = 10.0) -> tuple[protocol.Final, mqtt.MQTTMessage]:
        """Skip partial replies; return the next final reply and its raw message."""
        while True:
            message = self.next(timeout_s)
            reply = protocol.decode_reply(message.payload)
            if isinstance(reply, protocol.Final):
                return reply, message

    def status(self, device_id: str, timeout_s: float = 10.0) -> protocol.Status:
        """Next status message of ``device_id`` (subscribe to its status topic first)."""
        while True:
            message = self.next(timeout_s)
            if message.topic == protocol.status_topic(device_id):
                return protocol.decode_status(message.payload)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
