"""Field devices over MQTT: the daemon behind ``fieldpack serve`` and the client behind ``fieldpack mqtt``.

Modules, one job each::

    client     broker URL/login/TLS -> configured paho client (MQTT v5, TCP_NODELAY, backoff, Last Will)
    daemon     MqttDaemon: paho callbacks -> dispatcher -> bounded JobBoard -> worker; status and metrics
    jobs       ReplyRoute, Job, JobBoard (bounded queue + in-flight registry)
    worker     the thread that owns the engine and answers one request at a time
    replies    publishing partial and final replies
    metrics    counters, latency summaries, metrics.json
    requester  the asking client (CLI, benchmark, tests)
    clock      the injected clock

Topic names and payload keys live in :mod:`shared.protocol` only.
"""

from fieldpack.device.mqtt.client import BrokerSettings, make_client
from fieldpack.device.mqtt.clock import Clock, SystemClock
from fieldpack.device.mqtt.daemon import DaemonConfig, MqttDaemon
from fieldpack.device.mqtt.metrics import METRICS_FILENAME, write_metrics_file
from fieldpack.device.mqtt.requester import DeviceState, Pending, Requester

__all__ = [
    "BrokerSettings",
    "Clock",
    "DaemonConfig",
    "DeviceState",
    "METRICS_FILENAME",
    "MqttDaemon",
    "Pending",
    "Requester",
    "SystemClock",
    "make_client",
    "write_metrics_file",
]
