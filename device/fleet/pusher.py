"""The operator side of a fleet rollout: publish the desired bundle, serve its chunks, run the waves.

:class:`Rollout` (``fieldpack fleet push``):

1. reads the ``.fpk`` once (sha256, size) and its signed manifest through ``shared.bundle.BundleReader``
   (the bundle must be signed; devices verify the signature before they fetch anything);
2. connects with MQTT v5 and sizes chunks from the CONNACK's Maximum Packet Size
   (``fleet_protocol.chunk_size_for``);
3. finds the group's members from the retained device statuses (``Status.groups``) and rollout states;
4. publishes the retained desired record with ``targets`` = the canary share (at least one device), waits for
   their reports, halts the rollout (record ``state = "halted"``) when failures pass ``max_failures``
   (a fraction of the devices started so far), else widens ``targets`` wave by wave and finally to
   ``None`` (everyone, later joiners included);
5. meanwhile serves chunk requests: each (device, index) is queued once (a request repeated while queued is
   ignored), read from the file with ``pread`` when its turn comes, paced by a token bucket shared by the
   whole rollout (``rate`` bytes/s) and published QoS 1 to the device's chunk topic; at most
   :data:`MAX_UNACKED` chunks wait for PUBACK, so memory stays bounded whatever the fleet size.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
import base64
import hashlib
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fieldpack.shared import errors, fleet_protocol as fp, protocol
from fieldpack.shared.bundle import BundleReader
from fieldpack.shared.hashing import sha256_file

from fieldpack.device.mqtt.client import BrokerSettings, fresh_client_id, json_properties, make_client, probe_broker

log = logging.getLogger(__name__)

MAX_UNACKED = 16
"""Chunk publications waiting for PUBACK, at most."""
SETTLE_S = 0.5
"""Seconds to collect retained messages after subscribing."""

class TokenBucket:
    """Paces bytes to ``rate`` bytes/s with a burst of one second's worth (``None``: unlimited)."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._tokens = rate or 0.0
        self._at = time.monotonic()

    def take(self, n: int, stop: threading.Event) -> None:
        """Block until ``n`` bytes may go (or ``stop`` is set)."""
        if not self.rate:
            return
        while not stop.is_set():
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens >= n or self._tokens >= self.rate:
                self._tokens -= n
                return
            stop.wait((min(n, self.rate) - self._tokens) / self.rate)


class FleetView:
    """One MQTT v5 connection that collects retained fleet messages: desired records, device rollout states and
    device statuses. Used by the pusher, ``fleet status`` and ``fleet abort``.

    Raises (``connect``):
        DeviceError: the broker's host does not resolve, refuses or does not answer TCP
            (:func:`~fieldpack.device.mqtt.client.probe_broker`), or did not accept the MQTT connection in time.
    """

    def __init__(self, settings: BrokerSettings, group: str, *, client_prefix: str = "fieldpack-fleet") -> None:
        self.settings, self.group = settings, protocol.check_name(group, "group")
        self.client = make_client(settings, fresh_client_id(client_prefix))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._lock = threading.Lock()
        self._connected = threading.Event()  # the first CONNACK came
        self._closing = False
        self.online = threading.Event()
        """Set while connected (cleared on a disconnect, set again after the reconnect's SUBSCRIBE)."""
        self.max_packet: int | None = None
        self.desired: fp.DesiredBundle | None = None
        self.states: dict[str, fp.DeviceRollout] = {}
        self.statuses: dict[str, protocol.Status] = {}
        self.changed = threading.Condition(self._lock)
        self.on_need: Callable[[fp.ChunkRequest], None] | None = None
        self.own_record: fp.DesiredBundle | None = None
        """Record this client published; republished after a reconnect (a restarted broker may have lost it)."""

    def connect(self, timeout_s: float = 10.0) -> None:
        probe_broker(self.settings)  # an unknown host or a refused port: say so now, not after timeout_s
        self.client.connect_async(self.settings.host, self.settings.port, keepalive=self.settings.keepalive_s,
                                  clean_start=True)
        self.client.loop_start()
        if not self._connected.wait(timeout_s):
            self.close()
            raise errors.DeviceError(f"broker {self.settings.url} did not accept the connection in {timeout_s:.0f} s",
                                     hint="check --broker, the login and TLS options")
        time.sleep(SETTLE_S)  # retained messages arrive right after SUBACK

    def close(self) -> None:
        self._closing = True
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason.getName())
            return
        self.max_packet = getattr(props, "MaximumPacketSize", None)
        topics = [fp.desired_topic(self.group), fp.DEVICE_STATE_ALL, protocol.STATUS_ALL]
        if self.on_need is not None:
            topics.append(fp.need_topic(self.group))
        client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])
        if self.own_record is not None and self._connected.is_set():
            log.info("reconnected; republishing the desired record of %s", self.group)
            client.publish(fp.desired_topic(self.group), self.own_record.encode(), qos=1, retain=True,
                           properties=json_properties())
        self._connected.set()
        self.online.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        self.online.clear()
        if not self._closing:
            log.warning("disconnected from %s (%s); reconnecting", self.settings.url, reason.getName() if reason else "?")

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        try:
            if message.topic == fp.need_topic(self.group):
                if self.on_need is not None:
                    self.on_need(fp.decode_chunk_request(payload))
                return
            with self._lock:
                if message.topic == fp.desired_topic(self.group):
                    self.desired = fp.decode_desired(payload) if payload else None
                elif mqtt.topic_matches_sub(fp.DEVICE_STATE_ALL, message.topic):
                    if payload:
                        state = fp.decode_device_state(payload)
                        self.states[state.device] = state
                elif mqtt.topic_matches_sub(protocol.STATUS_ALL, message.topic) and payload:
                    status = protocol.decode_status(payload)
                    self.statuses[status.device] = status
                self.changed.notify_all()
        except errors.ProtocolError as err:
            log.debug("ignoring message on %s: %s", message.topic, err)

    def members(self, *, online_only: bool = False) -> list[str]:
        """Devices of the group: their status lists it or their rollout state names it; sorted. With
        ``online_only``, those whose retained status says online (or that have no status)."""
        with self._lock:
            ids = {d for d, s in self.statuses.items() if self.group in s.groups}
            ids |= {d for d, s in self.states.items() if s.group == self.group}
            if online_only:
                ids = {d for d in ids if d not in self.statuses or self.statuses[d].online}
        return sorted(ids)

    def publish_desired(self, record: fp.DesiredBundle) -> None:
        with self._lock:
            self.desired = self.own_record = record
        info = self.client.publish(fp.desired_topic(self.group), record.encode(), qos=1, retain=True,
                                   properties=json_properties())
        try:
            info.wait_for_publish(10)
        except (RuntimeError, ValueError) as exc:  # broker away: sent again after the reconnect
            log.warning("desired record not confirmed yet (%s)", exc)


@dataclass
class RolloutResult:
    """What a push ended with: ``outcome`` ``"done"``, ``"halted"``, ``"aborted"`` (``fleet abort``) or ``"superseded"``
    (another push replaced it), the last state of every device, and
    ``sends[(device, index)]`` = times each chunk was published to each device."""

    rollout: str
    outcome: str
    states: dict[str, fp.DeviceRollout]
    sends: Counter[tuple[str, int]] = field(default_factory=Counter)
    bytes_sent: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> list[str]:
        """Devices whose report about this rollout is a failure (an earlier rollout's retained failure is not)."""
        return sorted(d for d, s in self.states.items() if s.failed and s.rollout == self.rollout)


def parse_share(text: str, option: str = "share") -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1; ``option`` (``"--canary"``) names the input in errors. Raises UsageError
    outside (0, 1], with the percentage a bare number above 1 most likely meant (``10`` -> ``10%``)."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError as exc:
        raise errors.UsageError(f"{option} {text!r} is not a share of the devices",
                                hint=f"write e.g. {option} 10% or {option} 0.1") from exc
    if not 0 < value <= 1:
        meant = f"{option} {t}%" if not t.endswith("%") and 1 < value <= 100 else f"{option} 10%"
        raise errors.UsageError(f"{option} {text!r} is not a share between 0 and 100% (a fraction like 0.1 or a "
                                "percentage like 10%)", hint=f"write e.g. {meant}")
    return value


def parse_rate(text: str) -> float:
    """``"2MiB/s"``, ``"500KiB/s"``, ``"1000000"`` (bytes/s) -> bytes per second. Raises UsageError."""
    t = text.strip().removesuffix("/s")
    units = {"GiB": 2**30, "MiB": 2**20, "KiB": 2**10, "GB": 1e9, "MB": 1e6, "kB": 1e3, "KB": 1e3, "B": 1}
    for unit, factor in units.items():
        if t.endswith(unit):
            t, scale = t[: -len(unit)], factor
            break
    else:
        scale = 1
    try:
        value = float(t) * scale
    except ValueError as exc:
        raise errors.UsageError(f"rate {text!r} is not a rate", hint="write e.g. 2MiB/s") from exc
    if value <= 0:
        raise errors.UsageError(f"rate {text!r} is not positive", hint="write e.g. 2MiB/s")
    return value


class Rollout:
    """Pushes one bundle to one group (steps in the module doc).

    Args:
        bundle: the signed ``.fpk``.
        group: target group; ``settings``: the broker.
        canary: share of the members in the first wave (at least one device).
        wave: share of the members per later wave (1.0 = all the rest at once).
        rate: bytes/s for all chunk traffic of this rollout, ``None`` = unlimited.
        max_failures: halt when failed / started devices exceeds this fraction (0.0 = any failure halts).
        wave_timeout_s: a device that has not finished this long after its wave started counts as failed.
        url: optional HTTP(S) URL of the same file for devices that can reach it.
        health_timeout_s: the devices' budget for the smoke question after the switch, seconds.
        chunk_bytes: preferred chunk size (bytes), lowered to fit the broker.

    Raises (``__init__``):
        InputNotFoundError, BundleFormatError, ManifestError: from ``BundleReader``.
        SignatureError: the bundle is unsigned.
    """

    def __init__(self, bundle: Path, group: str, settings: BrokerSettings, *, canary: float = 0.1,
                 wave: float = 1.0, rate: float | None = None, max_failures: float = 0.0,
                 wave_timeout_s: float = 1800.0, url: str | None = None, health_timeout_s: float = 120.0,
                 chunk_bytes: int = fp.DEFAULT_CHUNK_BYTES) -> None:
        self.bundle = Path(bundle)
        self.group = protocol.check_name(group, "group")
        self.settings = settings
        self.canary, self.wave, self.max_failures = canary, wave, max_failures
        self.wave_timeout_s, self.url, self.health_timeout_s = wave_timeout_s, url, health_timeout_s
        self.chunk_bytes = chunk_bytes
        self._bucket = TokenBucket(rate)
        with BundleReader(self.bundle) as reader:
            if reader.signature_bytes is None:
                raise errors.SignatureError(f"{self.bundle} is not signed; devices would refuse it",
                                            hint="build it with --sign KEY")
            # every member against the manifest here, in seconds, before a byte goes out: a damaged bundle
            # would otherwise reach the canaries in full and only fail there (a trial sent 531 MiB to learn it)
            reader.verify_members()
            self._manifest_text = reader.manifest_bytes.decode("utf-8")
            self._signature = base64.b64encode(reader.signature_bytes).decode("ascii")
            self._name, self._version = reader.manifest.name, reader.manifest.version
        self.size = self.bundle.stat().st_size
        self.sha256 = sha256_file(self.bundle)
        self.rollout_id = os.urandom(6).hex()
        self._queue: deque[tuple[str, int]] = deque()
        self._queued: set[tuple[str, int]] = set()
        self._qcond = threading.Condition()
        self._stop = threading.Event()
        self.sends: Counter[tuple[str, int]] = Counter()
        self.bytes_sent = 0
        self.record: fp.DesiredBundle | None = None
        self.superseded_by: fp.DesiredBundle | None = None
        """The record of the push that replaced this one (outcome ``"superseded"``), else None."""

    # --- chunk server --------------------------------------------------------------------------------------
    def _on_need(self, req: fp.ChunkRequest) -> None:
        if self.record is None or req.rollout != self.rollout_id or self.record.state not in ("active", "done"):
            return
        with self._qcond:
            for i in req.indices:
                key = (req.device, i)
                if 0 <= i < self.record.chunks and key not in self._queued:
                    self._queued.add(key)
                    self._queue.append(key)
            self._qcond.notify()

    def frame(self, device: str, index: int, data: bytes) -> bytes:
        """The frame that carries chunk ``index`` (its bytes ``data``) to ``device``."""
        assert self.record is not None  # set before the server starts
        header = fp.ChunkHeader(rollout=self.record.rollout, index=index, offset=index * self.record.chunk_size,
                                size=len(data), sha256=hashlib.sha256(data).hexdigest())
        return fp.encode_chunk(header, data)

    def _serve(self, view: FleetView) -> None:
        assert self.record is not None
        record = self.record
        unacked: deque[mqtt.MQTTMessageInfo] = deque()
        fd = os.open(self.bundle, os.O_RDONLY)
        try:
            while not self._stop.is_set():
                if not view.online.wait(0.2):  # broker away: requests wait in the queue, not in paho's memory
                    continue
                with self._qcond:
                    while not self._queue and not self._stop.is_set():
                        self._qcond.wait(0.2)
                    if self._stop.is_set():
                        return
                    device, index = self._queue.popleft()
                    self._queued.discard((device, index))
                data = os.pread(fd, record.chunk_len(index), index * record.chunk_size)
                self._bucket.take(len(data), self._stop)
                frame = self.frame(device, index, data)
                unacked.append(view.client.publish(fp.chunk_topic(device), frame, qos=1))
                self.sends[(device, index)] += 1
                self.bytes_sent += len(data)
                while len(unacked) > MAX_UNACKED:
                    try:
                        unacked.popleft().wait_for_publish(5.0)
                    except (RuntimeError, ValueError):
                        pass
        finally:
            os.close(fd)

    # --- waves ---------------------------------------------------------------------------------------------
    def _record(self, targets: list[str] | None, state: fp.RolloutState = "active") -> fp.DesiredBundle:
        chunks = math.ceil(self.size / self._chunk_size)
        return fp.DesiredBundle(
            rollout=self.rollout_id, group=self.group, name=self._name, version=self._version, sha256=self.sha256,
            size=self.size, chunk_size=self._chunk_size, chunks=chunks, manifest=self._manifest_text,
            manifest_sig=self._signature, targets=targets, state=state, url=self.url,
            health_timeout_s=self.health_timeout_s, ts=time.time())

    def run(self, *, members: list[str] | None = None, on_update: Callable[[dict[str, fp.DeviceRollout]], None]
            | None = None) -> RolloutResult:
        """Run the rollout to its end (every member reported, or halted).

        Args:
            members: device ids of the group; default: discovered from retained statuses.
            on_update: called with the current states whenever one changes (progress display).

        Raises:
            UsageError: the group has no known members, or the broker's packet limit is too small.
            DeviceError: the broker cannot be reached.
        """
        t0 = time.monotonic()
        view = FleetView(self.settings, self.group, client_prefix="fieldpack-push")
        view.on_need = self._on_need
        view.connect()
        server: threading.Thread | None = None
        try:
            self._chunk_size = fp.chunk_size_for(view.max_packet, self.chunk_bytes)
            ids = sorted(members) if members is not None else view.members(online_only=True)
            offline = sorted(set(view.members()) - set(ids)) if members is None else []
            if offline:
                log.warning("offline now, they catch up from the retained record when a pusher serves again: %s",
                            ", ".join(offline))
            if not ids:
                raise errors.UsageError(f"group {self.group!r} has no known devices on {self.settings.url}",
                                        hint="start the devices with --group first (their retained status names the group)")
            self._check_upgrades(view, ids)
            n_canary = max(1, math.ceil(self.canary * len(ids)))
            per_wave = max(1, math.ceil(self.wave * len(ids)))
            waves = [ids[:n_canary]] + [ids[i : i + per_wave] for i in range(n_canary, len(ids), per_wave)]
            log.info("rollout %s: %s to %d devices of %s in %d waves (%d-byte chunks)", self.rollout_id,
                     f"{self._name}@{self._version}", len(ids), self.group, len(waves), self._chunk_size)
            server = threading.Thread(target=self._serve, args=(view,), name="fieldpack-fleet-serve", daemon=True)
            targets: list[str] = []
            outcome = "done"
            for n, wave in enumerate(waves):
                targets = targets + wave
                last = n == len(waves) - 1
                self.record = self._record(None if last else targets)
                view.publish_desired(self.record)
                if server.ident is None:
                    server.start()
                outcome = self._await(view, targets, on_update)
                if outcome != "done":
                    break
            if outcome not in ("aborted", "superseded"):  # an abort, or another push, is the retained record now
                final = self._record(self.record.targets if outcome == "halted" else None,
                                     "halted" if outcome == "halted" else "done")
                self.record = final
                view.publish_desired(final)
            with view._lock:
                states = {d: s for d, s in view.states.items() if d in ids}
        finally:
            self._stop.set()
            if server is not None and server.ident is not None:
                server.join(10)
            view.close()
        return RolloutResult(self.rollout_id, outcome, states, self.sends, self.bytes_sent, time.monotonic() - t0)

    def _check_upgrades(self, view: FleetView, ids: list[str]) -> None:
        """Refuse, before the first chunk, a bundle the devices would refuse after downloading it: an older version
        or another bundle name than the one a device runs (from its retained status; :func:`device.install.
        check_upgrade`, the devices' own rule). Raises DowngradeError naming the devices."""
        from fieldpack.device.install import check_upgrade

        refused: list[str] = []
        with view._lock:
            active = {d: view.statuses[d].bundle for d in ids if d in view.statuses and view.statuses[d].bundle}
        for device, label in sorted(active.items()):
            try:
                check_upgrade(label, self._name, self._version)
            except errors.DowngradeError:
                refused.append(f"{device} runs {label}")
        if refused:
            raise errors.DowngradeError(
                f"{self._name}@{self._version} would be refused by {len(refused)} of {len(ids)} devices of "
                f"{self.group!r} ({'; '.join(refused)}): devices install only newer versions of the same bundle",
                hint="to roll back, rebuild the older documents or recipe with a higher --version and push that")

    def _await(self, view: FleetView, targets: list[str],
               on_update: Callable[[dict[str, fp.DeviceRollout]], None] | None) -> str:
        """Wait until every target reported for this rollout: ``"done"``; ``"halted"`` when failures passed the
        threshold; ``"aborted"`` when ``fleet abort`` replaced the record; ``"superseded"`` when another push
        published a newer record for the group (this one then stops serving and leaves that record alone).

        Only reports about this rollout (its id) count: a device's retained state from an earlier push of the same
        bundle (healthy before a local rollback, or rolled back by a health check) is not this rollout's result."""
        assert self.record is not None
        deadline = time.monotonic() + self.wave_timeout_s
        with view.changed:
            while True:
                if view.desired is not None and view.desired.rollout == self.rollout_id \
                        and view.desired.state == "aborted":
                    log.warning("rollout %s aborted by the operator", self.rollout_id)
                    view.own_record = self.record = view.desired
                    return "aborted"
                if view.desired is not None and view.desired.rollout != self.rollout_id \
                        and view.desired.ts > self.record.ts:
                    log.error("rollout %s replaced by rollout %s of %s (another fleet push to %s); stopping",
                              self.rollout_id, view.desired.rollout, view.desired.label, self.group)
                    self.superseded_by = view.desired
                    view.own_record = None  # never republish ours over it after a reconnect
                    return "superseded"
                mine = {d: view.states[d] for d in targets
                        if d in view.states and view.states[d].rollout == self.rollout_id}
                if on_update is not None:
                    on_update(dict(mine))
                finished = [s for s in mine.values() if s.finished]
                failed = [s for s in finished if s.failed]
                if len(failed) > self.max_failures * len(targets):
                    log.error("rollout %s halted: %d of %d devices failed (%s)", self.rollout_id, len(failed),
                              len(targets), "; ".join(f"{s.device}: {s.reason}" for s in failed))
                    return "halted"
                if len(finished) == len(targets):
                    return "done"
                if time.monotonic() > deadline:
                    late = sorted(set(targets) - {s.device for s in finished})
                    log.error("rollout %s: no report from %s within %.0f s", self.rollout_id, ", ".join(late),
                              self.wave_timeout_s)
                    return "done" if len(failed) + len(late) <= self.max_failures * len(targets) else "halted"
                view.changed.wait(1.0)


def read_fleet(settings: BrokerSettings, group: str) -> tuple[fp.DesiredBundle | None, list[fp.DeviceRollout],
                                                              dict[str, protocol.Status]]:
    """One subscribe: the group's desired record, its devices' rollout states (sorted by device) and statuses."""
    view = FleetView(settings, group, client_prefix="fieldpack-fleet-status")
    view.connect()
    view.close()
    members = set(view.members())
    states = [view.states.get(d) or fp.DeviceRollout(device=d, group=group) for d in sorted(members)]
    return view.desired, states, {d: view.statuses[d] for d in members if d in view.statuses}


def abort_rollout(settings: BrokerSettings, group: str) -> tuple[fp.DesiredBundle, bool]:
    """Republish the group's desired record with ``state = "aborted"``: devices that have not switched stop,
    devices keep what they run.

    Returns:
        ``(record, aborted)``: the record now retained; ``aborted`` is False when the rollout had already ended
        (``done``, ``halted`` or ``aborted``), in which case nothing is published.

    Raises:
        UsageError: the group has no desired record.
    """
    view = FleetView(settings, group, client_prefix="fieldpack-fleet-abort")
    view.connect()
    try:
        if view.desired is None:
            raise errors.UsageError(f"group {group!r} has no rollout on {settings.url}", hint="check --group")
        if view.desired.state != "active":
            return view.desired, False
        record = view.desired.model_copy(update={"state": "aborted", "ts": time.time()})
        view.publish_desired(record)
    finally:
        view.close()
    return record, True
