"""Publishing replies: partial pieces (QoS 0 by default) and the final message (QoS 1) of a request.

Every reply goes to the request's :class:`~device.mqtt.jobs.ReplyRoute` topic with the request's Correlation
Data (MQTT v5) and the request id in the payload (MQTT 3.1.1 clients). ``paho`` ``publish`` is thread-safe
and only queues the packet for the network thread, so the worker never waits on the network here.
"""

from __future__ import annotations

import logging

import paho.mqtt.client as mqtt

from shared import protocol

from device.mqtt.client import json_properties
from device.mqtt.jobs import ReplyRoute

log = logging.getLogger(__name__)


class Replier:
    """Publishes the replies of one device.

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

    def partial(self, route: ReplyRoute, seq: int, text: str) -> None:
        """Publish piece number ``seq`` (0-based) of the answer."""
        message = protocol.Partial(id=route.request_id, seq=seq, text=text)
        self._publish(route, message.encode(), self._partial_qos)

    def final(self, route: ReplyRoute, message: protocol.Final) -> mqtt.MQTTMessageInfo:
        """Publish the final message (QoS 1)."""
        return self._publish(route, message.encode(), 1)

    def error(self, route: ReplyRoute, body: protocol.ErrorBody, *, partials: int = 0) -> mqtt.MQTTMessageInfo:
        """Publish a final error message (QoS 1)."""
        log.info("request %s -> error %s: %s", route.request_id, body.code, body.reason)
        return self.final(route, protocol.Final.failure(route.request_id, self._device_id, body, partials))

    def _publish(self, route: ReplyRoute, payload: bytes, qos: int) -> mqtt.MQTTMessageInfo:
        props = json_properties()
        if route.correlation is not None:
            props.CorrelationData = route.correlation
        info = self._client.publish(route.topic, payload, qos=qos, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("reply to %s not queued: %s", route.topic, mqtt.error_string(info.rc))
        elif info.rc == mqtt.MQTT_ERR_NO_CONN and qos == 0:
            log.debug("partial reply to %s dropped while disconnected", route.topic)
        return info
