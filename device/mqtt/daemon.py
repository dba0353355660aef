"""The MQTT daemon core: ``fieldpack serve`` without the CLI.

Threads and who owns what::

    paho network thread   reads/writes the socket, keep-alive, reconnect with backoff (loop_start).
                          Its callbacks only put events on the intake queue.
    dispatcher            takes intake events: restores subscriptions and status after every (re)connect;
                          checks each request (protocol.decode_request) and replies at once to bad ones;
                          admits good ones to the bounded JobBoard or replies "busy"; applies cancels.
    worker                owns the engine (EngineProvider), answers one job at a time (worker.Worker).
    housekeeping          publishes the retained status when it changed (at most every 0.25 s) and the
                          metrics every ``metrics_interval_s``; writes ``<data_dir>/metrics.json``.

Generation never runs on the network thread, so a long answer cannot starve MQTT keep-alive.

The daemon gets its engine provider, broker settings, client factory and clock from the caller, so tests run
it against a real Mosquitto with a fake engine and a clock they move.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
import os
from pathlib import Path
import queue
import threading
from typing import Any, Callable, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fieldpack.shared import errors, protocol

from fieldpack.device.mqtt.admission import Admission, InboundRequest
from fieldpack.device.mqtt.client import BrokerSettings, connect_async, json_properties, make_client
from fieldpack.device.mqtt.clock import Clock, SystemClock
from fieldpack.device.mqtt.jobs import Job, JobBoard
from fieldpack.device.mqtt.metrics import MetricsRecorder, write_metrics_file
from fieldpack.device.mqtt.replies import Replier
from fieldpack.device.mqtt.worker import EngineInfo, Worker
from fieldpack.device.types import EngineProvider

log = logging.getLogger(__name__)

ClientFactory = Callable[..., mqtt.Client]
"""``make_client(settings, client_id, *, will=(topic, payload), userdata=None) -> paho Client``."""

# CONNACK / DISCONNECT reason codes after which retrying cannot help (MQTT 5.0 spec, 3.2.2.2 and 3.14.2.1).
_FATAL_CONNACK = {
    "Client identifier not valid",
    "Bad user name or password",
    "Not authorized",
    "Banned",
    "Bad authentication method",
}


class DaemonPlugin(Protocol):
    """Something that runs beside the daemon with its own connection (the fleet rollout agent)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


def default_plugins(config: DaemonConfig, settings: BrokerSettings) -> list[DaemonPlugin]:
    """The fleet rollout agent when the daemon serves a group from an initialised data dir, else none."""
    from fieldpack.device.fleet.agent import fleet_agent_for

    agent = fleet_agent_for(config.device_id, config.groups, settings, config.data_dir)
    return [agent] if agent is not None else []


STATUS_PERIOD_S = 0.25
"""Housekeeping tick, seconds: a changed status is published at most this often."""


@dataclass(frozen=True)
class DaemonConfig:
    """How the daemon serves.

    Attributes:
        device_id: this device's id (topic level; see ``shared.protocol.NAME_PATTERN``). The MQTT client id is
            ``fieldpack-<device_id>-<instance>`` with a random instance per process, so no two clients ever
            share one. A second live daemon with the same device id is noticed through the status topic: the
            later-started one stops with a ``UsageError`` (see :meth:`MqttDaemon._check_twin`).
        groups: groups whose shared request topic this device serves.
        queue_size: requests that may wait while one is answered; one more gets ``busy``.
        max_question_chars, max_payload_bytes: request limits (characters, bytes).
        metrics_interval_s: seconds between metrics publications (and ``metrics.json`` writes).
        data_dir: where ``metrics.json`` is written, or ``None`` for none.
        partial_qos: QoS of streamed partial replies (final replies are always QoS 1).
    """

    device_id: str
    groups: tuple[str, ...] = ()
    queue_size: int = 8
    max_question_chars: int = protocol.MAX_QUESTION_CHARS
    max_payload_bytes: int = protocol.MAX_PAYLOAD_BYTES
    metrics_interval_s: float = 30.0
    data_dir: Path | None = None
    partial_qos: int = 0

    def __post_init__(self) -> None:
        protocol.check_name(self.device_id, "device id")
        for group in self.groups:
            protocol.check_name(group, "group")
        if self.queue_size < 1:
            raise errors.UsageError(f"queue size {self.queue_size} is below 1", hint="use --queue-size 1 or more")
        if self.metrics_interval_s <= 0:
            raise errors.UsageError(
                f"metrics interval {self.metrics_interval_s} s is not positive", hint="use a positive number of seconds"
            )
        if self.partial_qos not in (0, 1):
            raise errors.UsageError(f"partial QoS {self.partial_qos} is not 0 or 1", hint="use 0 or 1")


@dataclass(frozen=True)
class _Inbound:
    kind: str  # "message" | "connected" | "disconnected" | "subscribed" | "stop"
    message: mqtt.MQTTMessage | None = None
    received_at: float = 0.0
    reason: ReasonCode | None = None
    codes: tuple[ReasonCode, ...] = ()


class MqttDaemon:
    """Serves one device over MQTT.

    Args:
        config: see :class:`DaemonConfig`.
        provider: the engine provider (``device.runtime`` in production, a fake in tests); closed by
            :meth:`stop`.
        settings: broker and login.
        clock: deadlines (Message Expiry), queue wait and uptime; defaults to the system clock.
        client_factory: builds the paho client; defaults to :func:`device.mqtt.client.make_client`.

    Use :meth:`run` (blocks until a stop event or a fatal error) or :meth:`start`/:meth:`stop`. The paho
    client (MQTT v5, Last Will set, not connected until :meth:`start`) is :attr:`client`.

    Raises:
        UsageError: TLS files that cannot be loaded (from the client factory).
    """

    def __init__(
        self,
        config: DaemonConfig,
        provider: EngineProvider,
        settings: BrokerSettings,
        *,
        clock: Clock | None = None,
        client_factory: ClientFactory = make_client,
        plugins: list[DaemonPlugin] | None = None,
    ) -> None:
        self.config = config
        self._plugins = plugins if plugins is not None else default_plugins(config, settings)
        self._provider = provider
        self._settings = settings
        self._clock = clock or SystemClock()
        self._status_dirty = threading.Event()
        self._board = JobBoard(config.queue_size, on_change=self._status_dirty.set)  # busy, queue depth
        self._metrics = MetricsRecorder(config.device_id, self._clock)
        self._intake: queue.SimpleQueue[_Inbound] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._admission = Admission(config.device_id, self._board, max_payload_bytes=config.max_payload_bytes,
                                    max_question_chars=config.max_question_chars, stopping=self._stopping.is_set)
        self._halt = threading.Event()  # set by a fatal error or stop()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._state_lock = threading.Lock()
        self._engine: EngineInfo | None = None
        self._engine_error: str | None = None
        self._fatal: errors.FieldpackError | None = None
        self._connections = 0
        self._started_at = self._clock.monotonic()
        self._started_wall = self._clock.time()
        self.instance = os.urandom(4).hex()
        """Random id of this daemon process, in its client id and status."""
        self.client_id = f"fieldpack-{config.device_id}-{self.instance}"
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopped = False
        describe = getattr(provider, "active_label", None)  # what it will run, known before the first CONNECT
        label = describe() if callable(describe) else None
        name, _, version = (label or "").partition("@")
        will = protocol.Status(
            device=config.device_id, online=False, groups=list(config.groups), instance=self.instance,
            started_at=self._started_wall, bundle=label, bundle_name=name or None, bundle_version=version or None,
            ts=self._started_wall,
        )
        self.client: mqtt.Client = client_factory(
            settings, self.client_id, will=(protocol.status_topic(config.device_id), will.encode())
        )
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self._replier = Replier(self.client, config.device_id, partial_qos=config.partial_qos)
        self._worker = Worker(
            device_id=config.device_id,
            provider=provider,
            board=self._board,
            replier=self._replier,
            metrics=self._metrics,
            clock=self._clock,
            on_engine=self._engine_changed,
            stopping=self._stopping,
        )

    # --- lifecycle --------------------------------------------------------------------------------------------
    @property
    def metrics(self) -> MetricsRecorder:
        """Counters and timings of this daemon."""
        return self._metrics

    @property
    def clock(self) -> Clock:
        """The clock of queue waits and expiry."""
        return self._clock

    @property
    def board(self) -> JobBoard:
        """The bounded queue the worker answers from (shared with the HTTP API in one process)."""
        return self._board

    @property
    def connected(self) -> bool:
        """Connected to the broker now (False while it reconnects with backoff)."""
        return self._connected.is_set()

    @property
    def stopping(self) -> bool:
        """:meth:`stop` has begun: queued requests are refused and the running one is cancelled."""
        return self._stopping.is_set()

    @property
    def fatal_error(self) -> errors.FieldpackError | None:
        """The error that stopped the daemon (login refused, device id served by another daemon), or ``None``."""
        return self._fatal

    def start(self) -> None:
        """Connect (in the background; retried with backoff until the broker answers) and start the threads.
        Call once."""
        if self._started:
            raise errors.DeviceError(f"MQTT daemon of {self.config.device_id} started twice", hint="call start() once")
        self._started = True
        self._started_at = self._clock.monotonic()
        log.info(
            "device %s connecting to %s as %s (groups: %s)",
            self.config.device_id, self._settings.url, self.client_id, ", ".join(self.config.groups) or "-",
        )
        connect_async(self.client, self._settings)
        self.client.loop_start()
        self._replier.start()
        self._worker.start()
        for target, name in ((self._dispatch_loop, "dispatcher"), (self._housekeeping_loop, "housekeeping")):
            thread = threading.Thread(target=target, name=f"fieldpack-mqtt-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        for plugin in self._plugins:
            plugin.start()

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until connected and subscribed (requests sent after this are received); False on timeout."""
        return self._subscribed.wait(timeout_s)

    def run(self, stop: threading.Event) -> None:
        """:meth:`start`, serve until ``stop`` is set or a fatal error, then :meth:`stop`.

        Raises:
            UsageError: the broker refused the login, or another daemon serves this device id.
        """
        self.start()
        try:
            while not stop.is_set() and not self._halt.is_set():
                stop.wait(0.5)
        finally:
            self.stop()
        if self._fatal is not None:
            raise self._fatal

    def stop(self, timeout_s: float = 10.0) -> None:
        """Refuse the queued requests (``shutting_down``), cancel the running one, publish the last metrics
        and an offline status, disconnect cleanly and close the provider. Idempotent."""
        if self._stopped or not self._started:
            return
        self._stopped = True
        self._stopping.set()
        self._halt.set()
        for plugin in self._plugins:
            plugin.stop()
        self._intake.put(_Inbound("stop"))
        for thread in self._threads:  # dispatcher first: after it, nothing more is admitted
            thread.join(timeout_s)
        for job in self._board.drain():
            self._metrics.count("errors")
            if job.task is not None:  # an HTTP request sharing the queue: it answers its own client
                job.task(None, self._shutting_down_body(job).to_exception())
                continue
            self._replier.error(job.route, self._shutting_down_body(job))
        running = self._board.running
        if running is not None:
            running.cancel.set()
        if not self._worker.join(timeout_s):
            log.warning("worker still answering after %.0f s; leaving it", timeout_s)
        self._replier.close(timeout_s)  # every reply handed over goes out before the goodbye
        self._publish_metrics()
        if self._connected.is_set() and self._fatal is None:  # a twin that yields leaves the status alone
            info = self._publish_status(online=False)
            try:
                info.wait_for_publish(timeout=min(timeout_s, 5.0))
            except (RuntimeError, ValueError) as exc:
                log.warning("offline status not confirmed: %s", exc)
        self.client.disconnect()
        self.client.loop_stop()
        try:
            self._provider.close()
        except Exception:  # closing must not hide the shutdown
            log.exception("engine provider failed to close")
        log.info("device %s stopped", self.config.device_id)

    # --- paho callbacks (network thread): enqueue only ---------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self._intake.put(_Inbound("connected", reason=reason))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        log.warning("cannot reach broker %s; retrying with backoff", self._settings.url)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        self._intake.put(_Inbound("disconnected", reason=reason))

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, codes: list[ReasonCode], props: Any) -> None:
        self._intake.put(_Inbound("subscribed", codes=tuple(codes)))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._intake.put(_Inbound("message", message=message, received_at=self._clock.monotonic()))

    # --- dispatcher thread -------------------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while True:
            event = self._intake.get()
            if event.kind == "stop":
                return
            try:
                if event.kind == "message" and event.message is not None:
                    self._handle_message(event.message, event.received_at)
                elif event.kind == "connected":
                    self._handle_connected(event.reason)
                elif event.kind == "disconnected":
                    self._handle_disconnected(event.reason)
                elif event.kind == "subscribed":
                    self._handle_subscribed(event.codes)
            except Exception:  # a bad message must never stop the dispatcher
                log.exception("dispatcher failed on a %s event", event.kind)

    def _handle_connected(self, reason: ReasonCode | None) -> None:
        if reason is not None and reason.is_failure:
            name = reason.getName()
            if name in _FATAL_CONNACK:
                self._fail(
                    errors.UsageError(
                        f"broker {self._settings.url} refused device {self.config.device_id}: {name}",
                        hint="check --username, --password-file and the broker's ACL for this client",
                    )
                )
            else:
                log.warning("broker %s refused the connection: %s; retrying", self._settings.url, name)
            return
        self._connections += 1
        if self._connections > 1:
            self._metrics.count("reconnects")
        log.info("connected to %s (connection %d)", self._settings.url, self._connections)
        subscriptions = [
            protocol.request_topic(self.config.device_id),
            protocol.cancel_topic(self.config.device_id),
            protocol.status_topic(self.config.device_id),  # to notice a twin (same device id, other process)
        ]
        for group in self.config.groups:
            subscriptions += [protocol.group_subscription(group), protocol.group_cancel_topic(group)]
        self.client.subscribe([(topic, SubscribeOptions(qos=1)) for topic in subscriptions])
        self._connected.set()
        self._publish_status(online=True)
        self._publish_metrics()

    def _handle_disconnected(self, reason: ReasonCode | None) -> None:
        name = reason.getName() if reason is not None else "unknown"
        if self._stopping.is_set():
            return
        log.warning("disconnected from %s (%s); reconnecting", self._settings.url, name)

    def _handle_subscribed(self, codes: tuple[ReasonCode, ...]) -> None:
        refused = [c.getName() for c in codes if c.is_failure]
        if refused:
            log.error("broker refused %d subscription(s): %s; check its ACL", len(refused), ", ".join(refused))
        self._subscribed.set()

    def _fail(self, err: errors.FieldpackError) -> None:
        """Stop for good: no more reconnects; :meth:`run` raises ``err``."""
        log.error("%s", err)
        self._fatal = err
        self._halt.set()
        self.client.disconnect()

    def _handle_message(self, message: mqtt.MQTTMessage, received_at: float) -> None:
        kind = protocol.parse_topic(message.topic)
        if kind is None:
            log.debug("ignoring message on %s", message.topic)
        elif kind[0] in ("request", "group_request"):
            self._handle_request(message, received_at)
        elif kind[0] in ("cancel", "group_cancel"):
            self._handle_cancel(message)
        elif kind[0] == "status" and kind[1] == self.config.device_id and not message.retain:
            self._check_twin(message)
        else:
            log.debug("ignoring %s message on %s", kind[0], message.topic)

    def _handle_request(self, message: mqtt.MQTTMessage, received_at: float) -> None:
        self._metrics.count("requests")
        props = message.properties
        decision = self._admission.admit(InboundRequest(
            topic=message.topic,
            payload=bytes(message.payload),
            response_topic=getattr(props, "ResponseTopic", None),
            correlation=getattr(props, "CorrelationData", None),
            expiry_s=getattr(props, "MessageExpiryInterval", None),
            received_at=received_at,
        ))
        if decision.counter is not None:
            self._metrics.count(decision.counter)
        if decision.refusal is not None and decision.route is not None:
            self._replier.error(decision.route, decision.refusal)

    def _check_twin(self, message: mqtt.MQTTMessage) -> None:
        """A live (not retained) online status of this device id from another instance means two daemons
        serve one device id. Both order themselves by ``(started_at, instance)``; the later one stops with a
        ``UsageError`` (exit 2: systemd does not restart it), the earlier one re-announces itself so the later
        one learns of it and keeps serving."""
        try:
            other = protocol.decode_status(bytes(message.payload))
        except errors.ProtocolError:
            return
        if not other.online or other.instance in (None, self.instance):
            return
        mine = (self._started_wall, self.instance)
        theirs = (other.started_at or 0.0, other.instance or "")
        if mine > theirs:
            self._fail(
                errors.UsageError(
                    f"device id {self.config.device_id!r} is already served by another daemon "
                    f"(instance {other.instance}) on {self._settings.url}",
                    hint="give every device its own --device-id",
                )
            )
        else:
            log.error(
                "a second daemon (instance %s) uses device id %r; it will stop", other.instance, self.config.device_id
            )
            self._status_dirty.set()

    def _handle_cancel(self, message: mqtt.MQTTMessage) -> None:
        try:
            cancel = protocol.decode_cancel(bytes(message.payload), max_bytes=self.config.max_payload_bytes)
        except errors.FieldpackError as err:
            log.warning("ignoring cancel on %s: %s", message.topic, err)
            return
        correlation: bytes | None = getattr(message.properties, "CorrelationData", None)
        outcome, job = self._board.cancel(cancel.id, correlation)
        if outcome == "dequeued" and job is not None:
            self._metrics.count("cancelled")
            self._replier.error(
                job.route,
                protocol.ErrorBody(
                    code=protocol.ErrorCode.CANCELLED,
                    reason=f"request {cancel.id} was cancelled on device {self.config.device_id} before it started",
                ),
            )
        elif outcome == "signalled":
            log.info("cancelling running request %s", cancel.id)
        else:
            log.debug("cancel for request %s not in flight here", cancel.id)

    # --- status and metrics -----------------------------------------------------------------------------------
    def _engine_changed(self, info: EngineInfo | None, error: str | None) -> None:
        with self._state_lock:
            self._engine, self._engine_error = info, error
        self._status_dirty.set()
        self._refresh_will(info)

    def _refresh_will(self, info: EngineInfo | None) -> None:
        """Make the Last Will say what this process runs ("was running X"), with ``ts`` the time of the change.

        MQTT fixes the will at CONNECT, so the new one takes effect from the next (re)connect; until then the
        broker keeps the one of the current connection."""
        from paho.mqtt.packettypes import PacketTypes

        will = protocol.Status(
            device=self.config.device_id, online=False, groups=list(self.config.groups),
            bundle=info.label if info else None, bundle_name=info.name if info else None,
            bundle_version=info.version if info else None, model=info.model if info else None,
            ts=self._clock.time(), instance=self.instance, started_at=self._started_wall,
        )
        self.client.will_set(protocol.status_topic(self.config.device_id), will.encode(), qos=1, retain=True,
                             properties=json_properties(PacketTypes.WILLMESSAGE))

    @property
    def engine_info(self) -> EngineInfo | None:
        """What the worker last loaded, or ``None`` (nothing loaded yet, or no engine can be had)."""
        with self._state_lock:
            return self._engine

    def status(self, *, online: bool = True) -> protocol.Status:
        """The current status message."""
        with self._state_lock:
            engine, engine_error = self._engine, self._engine_error
        return protocol.Status(
            device=self.config.device_id,
            online=online,
            groups=list(self.config.groups),
            bundle=engine.label if engine else None,
            bundle_name=engine.name if engine else None,
            bundle_version=engine.version if engine else None,
            model=engine.model if engine else None,
            queue_depth=self._board.depth,
            queue_max=self._board.capacity,
            busy=self._board.running is not None,
            uptime_s=round(self._clock.monotonic() - self._started_at, 3),
            ts=self._clock.time(),
            error=engine_error,
            instance=self.instance,
            started_at=self._started_wall,
        )

    def _publish_status(self, *, online: bool) -> mqtt.MQTTMessageInfo:
        self._status_dirty.clear()
        return self.client.publish(
            protocol.status_topic(self.config.device_id),
            self.status(online=online).encode(),
            qos=1,
            retain=True,
            properties=json_properties(),
        )

    def _publish_metrics(self) -> None:
        snapshot = self._metrics.snapshot(
            uptime_s=self._clock.monotonic() - self._started_at, queue_depth=self._board.depth
        )
        if self._connected.is_set():
            self.client.publish(
                protocol.metrics_topic(self.config.device_id),
                snapshot.encode(),
                qos=0,
                retain=True,
                properties=json_properties(),
            )
        if self.config.data_dir is not None:
            try:
                write_metrics_file(self.config.data_dir, snapshot)
            except errors.OutputNotWritableError as err:
                log.warning("%s", err)

    def _housekeeping_loop(self) -> None:
        ticks_per_metrics = max(1, round(self.config.metrics_interval_s / STATUS_PERIOD_S))
        tick = 0
        while not self._stopping.wait(STATUS_PERIOD_S):
            tick += 1
            try:
                if self._status_dirty.is_set() and self._connected.is_set():
                    self._publish_status(online=True)
                if tick % ticks_per_metrics == 0:
                    self._publish_metrics()
            except Exception:
                log.exception("housekeeping failed")

    def _shutting_down_body(self, job: Job) -> protocol.ErrorBody:
        return protocol.ErrorBody(
            code=protocol.ErrorCode.SHUTTING_DOWN,
            reason=f"device {self.config.device_id} stopped before answering request {job.route.request_id}",
            hint="send the request again when the device is back online",
        )
