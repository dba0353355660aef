"""The device side of a fleet rollout: follow the group's desired bundle, fetch it in chunks, install, check
health, roll back on failure, and report every step (retained) on the device's fleet state topic.

Runs inside ``fieldpack serve`` (started by the daemon when its data dir is initialised and it serves a group;
the first group is the rollout group). One thread owns the state machine; the paho network thread only puts
events on its queue. Steps for a desired record (``shared.fleet_protocol.DesiredBundle``):

1. already active (same manifest sha256)? report ``healthy``. Failed before? repeat that report. Not in
   ``targets`` yet? report ``waiting``.
2. verify the record's manifest signature against ``trust/`` (refused: ``refused``, nothing downloaded);
   quota: free disk must hold the staged ``.fpk`` plus the unpacked members (``device.resources``), minus
   the inactive slot (reclaimed) and what is already staged — else ``refused`` before the first chunk.
3. fetch: the HTTP(S) URL when the record has one and it answers (Range requests resume), else chunks over
   MQTT: a window of :data:`WINDOW` requested chunks, each checked (length, sha256) and written at its
   offset (:mod:`device.fleet.staging`); a corrupted chunk is dropped and asked for again; after a
   reconnect, or :data:`STALL_S` without progress, the chunks in the window are asked for again.
4. sha256 of the whole file vs the record, then ``device.install.install_bundle`` (signature, every member
   hash, feasibility, A/B slot, the slot check, atomic switch). The daemon's worker reloads the engine
   between requests, so a request being answered finishes on the old bundle.
5. health: the manifest's smoke question is asked of this device over MQTT (through the real request path)
   and must be answered ``ok`` by the new bundle within the record's ``health_timeout_s``; else
   ``device.install.rollback`` and ``rolled_back`` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
import hashlib
import json
import logging
import os
import queue
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fieldpack.shared import errors, fleet_protocol as fp
from fieldpack.shared.atomic import atomic_write_bytes
from fieldpack.shared.manifest import Manifest, parse_manifest
from fieldpack.shared.signing import verify_manifest

from fieldpack.device.install import SlotCheck, install_bundle, rollback
from fieldpack.device.mqtt.client import BrokerSettings, json_properties, make_client
from fieldpack.device.resources import ResourceProbe, disk_needed
from fieldpack.device.slots import DataDir
from fieldpack.device.fleet.staging import ChunkStore, clear_other_staging, staging_root

log = logging.getLogger(__name__)

WINDOW = 8
"""Chunks asked for and not yet received, at most."""
STALL_S = 10.0
"""Seconds without a chunk after which the window is asked for again."""
REPORT_EVERY_S = 0.5
"""Seconds between two ``downloading n of m`` reports, at least."""
MEMORY_FILE = "agent.json"

HealthCheck = Callable[[fp.DesiredBundle, Manifest], "str | None"]
"""``health(record, manifest) -> None`` when healthy, else the reason (one line)."""


@dataclass
class _Event:
    kind: str  # "connected" | "desired" | "chunk" | "stop"
    payload: bytes = b""


class FleetAgent:
    """Follows one group's rollouts for one device.

    Args:
        device_id: this device; ``group``: the rollout group.
        settings: the broker (same as the daemon's).
        data_dir: the initialised data dir (trust store, slots, staging).
        check: the installer's slot check (``device.runtime.check_slot`` in production).
        health: post-switch health check; default :meth:`ask_smoke` (the smoke question over MQTT).
        probe: free-disk numbers (tests inject a small disk).
        client_factory: builds the paho client (default ``make_client``).
    """

    def __init__(
        self,
        device_id: str,
        group: str,
        settings: BrokerSettings,
        data_dir: DataDir,
        *,
        check: SlotCheck | None,
        health: HealthCheck | None = None,
        probe: ResourceProbe | None = None,
        client_factory: Callable[..., mqtt.Client] = make_client,
    ) -> None:
        self.device_id, self.group = device_id, group
        self._settings = settings
        self._dd = data_dir
        self._check = check
        self._health = health or self.ask_smoke
        self._probe = probe or ResourceProbe()
        self._events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.client = client_factory(settings, f"fieldpack-{device_id}-fleet-{os.urandom(3).hex()}")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._memory_path = self._dd.root / "fleet" / MEMORY_FILE
        self._failed: dict[str, dict[str, str]] = self._load_memory()
        self._record: fp.DesiredBundle | None = None
        self._store: ChunkStore | None = None
        self._in_flight: dict[int, float] = {}
        self._last_progress = 0.0
        self._fetched = 0
        self._reported_at = 0.0
        self._state = fp.DeviceRollout(device=device_id, group=group)

    # --- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background and start the agent thread."""
        self.client.connect_async(self._settings.host, self._settings.port, keepalive=self._settings.keepalive_s,
                                  clean_start=True)
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name="fieldpack-fleet-agent", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread (staged chunks stay for a resume) and disconnect."""
        self._stop.set()
        self._events.put(_Event("stop"))
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._store is not None:
            self._store.close()
            self._store = None
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, props: Any) -> None:
        if not reason.is_failure:
            self._events.put(_Event("connected"))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        kind = "chunk" if message.topic == fp.chunk_topic(self.device_id) else "desired"
        self._events.put(_Event(kind, bytes(message.payload)))

    # --- agent thread --------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                event = self._events.get(timeout=0.5)
            except queue.Empty:
                event = None
            try:
                if event is None:
                    self._tick()
                elif event.kind == "stop":
                    return
                elif event.kind == "connected":
                    self._on_connected()
                elif event.kind == "desired":
                    self._on_desired(event.payload)
                elif event.kind == "chunk":
                    self._on_chunk(event.payload)
            except Exception:  # the agent must survive anything the wire brings
                log.exception("fleet agent failed on a %s event", event.kind if event else "tick")

    def _on_connected(self) -> None:
        self.client.subscribe([(fp.desired_topic(self.group), SubscribeOptions(qos=1)),
                               (fp.chunk_topic(self.device_id), SubscribeOptions(qos=1))])
        if self._state.rollout is None:  # idle: say what runs now (a trial saw "active": null, "ts": 0 retained)
            self._state = self._state.model_copy(update={"active": self._active()[0], "ts": time.time()})
        self._publish(self._state)
        if self._store is not None and self._in_flight:  # what was in flight died with the old connection
            self._request(sorted(self._in_flight))

    def _tick(self) -> None:
        if self._store is None or not self._in_flight:
            return
        if time.monotonic() - self._last_progress > STALL_S:
            log.info("no chunk for %.0f s; asking again for %d", STALL_S, len(self._in_flight))
            self._request(sorted(self._in_flight))

    # --- desired record ------------------------------------------------------------------------------------
    def _on_desired(self, payload: bytes) -> None:
        if not payload:  # retained record cleared
            return
        try:
            record = fp.decode_desired(payload)
        except errors.ProtocolError as err:
            log.warning("ignoring desired record: %s", err)
            return
        if record.group != self.group:
            return
        active_label, active_sha = self._active()
        manifest_sha = hashlib.sha256(record.manifest_bytes()).hexdigest()
        downloading = self._record is not None and self._record.sha256 == record.sha256 and self._store is not None
        if record.state in ("halted", "aborted"):
            if downloading:
                log.info("rollout %s %s; stopping the download (staged chunks kept)", record.rollout, record.state)
                self._close_download()
            if not self._state.finished or self._state.rollout != record.rollout:
                self._report("idle", record, reason=f"rollout {record.state}" if downloading else None,
                             keep_target=downloading)
            return
        if active_sha == manifest_sha:
            if self._state.phase != "healthy" or self._state.rollout != record.rollout:
                self._report("healthy", record)
            return
        past = self._failed.get(record.sha256)
        if past is not None and past.get("rollout") == record.rollout:  # a new push of the bundle tries again
            self._report(past["phase"], record, reason=past["reason"])  # type: ignore[arg-type]
            return
        if not record.targets_device(self.device_id):
            if self._state.phase != "waiting" or self._state.rollout != record.rollout:
                self._report("waiting", record)
            return
        if downloading:
            self._record = record  # a later wave of the same bundle: carry on
            return
        self._begin(record)

    def _begin(self, record: fp.DesiredBundle) -> None:
        self._close_download()
        try:
            manifest = self._admit(record)
        except errors.FieldpackError as err:
            self._fail("refused", record, err)
            return
        clear_other_staging(self._dd.root, record.sha256)
        self._record, self._fetched = record, 0
        self._store = ChunkStore(staging_root(self._dd.root) / record.sha256, record.size, record.chunk_size)
        self._manifest = manifest
        self._report("downloading", record)
        if record.url and self._fetch_http(record):
            self._finish()
            return
        if self._store is not None and self._store.complete:
            self._finish()
            return
        self._last_progress = time.monotonic()
        self._fill_window()

    def _admit(self, record: fp.DesiredBundle) -> Manifest:
        """Signature and quota checks before the first chunk.

        Raises:
            SignatureError, ManifestError, InsufficientResourcesError.
        """
        trusted = self._dd.trusted_keys()
        key = verify_manifest(record.manifest_bytes(), record.signature_bytes(), trusted)
        manifest = parse_manifest(record.manifest_bytes(), origin=f"desired record of {record.label}")
        if manifest.name != record.name or manifest.version != record.version:
            raise errors.ManifestError(f"desired record says {record.label}, its manifest {manifest.label}",
                                       hint="republish with `fieldpack fleet push`")
        staged = staging_root(self._dd.root) / record.sha256 / "bundle.part"
        already = 0
        if staged.is_file():
            already = staged.stat().st_blocks * 512
        payload = sum(m.size for m in manifest.members)
        state = self._dd.state()
        reclaim = self._dd.slot_size(self._dd.inactive_slot(state))
        need = record.size - min(already, record.size) + disk_needed(payload)
        free = self._probe.free_disk(self._dd.root) + reclaim
        if free < need:
            raise errors.InsufficientResourcesError(
                f"not enough disk for {record.label} on {self.device_id}: needs {need / 2**20:.1f} MiB "
                f"(download + unpack), {free / 2**20:.1f} MiB free",
                hint="free space in the data dir or give the device a larger disk")
        log.info("rollout %s of %s admitted (signed by %s)", record.rollout, record.label, key.key_id)
        return manifest

    # --- chunks --------------------------------------------------------------------------------------------
    def _fill_window(self) -> None:
        assert self._store is not None
        want = [i for i in self._store.missing(limit=WINDOW + len(self._in_flight)) if i not in self._in_flight]
        want = want[: WINDOW - len(self._in_flight)]
        if want:
            self._request(want)

    def _request(self, indices: list[int]) -> None:
        if self._record is None or not indices:
            return
        now = time.monotonic()
        for i in indices:
            self._in_flight[i] = now
        self._last_progress = now
        req = fp.ChunkRequest(rollout=self._record.rollout, device=self.device_id, indices=indices)
        self.client.publish(fp.need_topic(self.group), req.encode(), qos=1, properties=json_properties())

    def _on_chunk(self, frame: bytes) -> None:
        if self._store is None or self._record is None:
            return
        try:
            header, data = fp.decode_chunk(frame)
        except errors.ProtocolError as err:
            log.warning("ignoring chunk frame: %s", err)
            return
        if header.rollout != self._record.rollout:
            return
        self._fetched += 1
        self._last_progress = time.monotonic()
        try:
            self._store.put(header.index, data, header.sha256)
        except errors.IntegrityError as err:
            log.warning("chunk %d of %s corrupted in transit (%s); asking again", header.index, self._record.label,
                        err.message)
            self._in_flight.pop(header.index, None)
            self._request([header.index])
            return
        self._in_flight.pop(header.index, None)
        store = self._store
        if store.complete:
            self._finish()
            return
        if time.monotonic() - self._reported_at >= REPORT_EVERY_S:
            self._report("downloading", self._record)
        self._fill_window()

    def _fetch_http(self, record: fp.DesiredBundle) -> bool:
        """Fetch the missing tail of the file from ``record.url`` with a Range request; False (MQTT takes over)
        on any error."""
        store = self._store
        assert store is not None and record.url is not None
        missing = store.missing(limit=1)
        if not missing:
            return True
        start = missing[0] * store.chunk_size
        req = urllib.request.Request(record.url, headers={"Range": f"bytes={start}-"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (URL given by the operator)
                if resp.status == 200 and start:
                    offset = 0  # server ignored Range: rewrite from the start
                else:
                    offset = start
                while True:
                    block = resp.read(store.chunk_size)
                    if not block:
                        break
                    store.write_stream(offset, block)
                    offset += len(block)
                    store.mark_through(offset)
                    if time.monotonic() - self._reported_at >= REPORT_EVERY_S:
                        self._report("downloading", record)
                    if self._stop.is_set():
                        return False
        except (OSError, ValueError) as exc:
            log.warning("HTTP source %s failed (%s); fetching over MQTT", record.url, exc)
            return False
        return store.complete

    # --- verify, install, health ---------------------------------------------------------------------------
    def _finish(self) -> None:
        record, store = self._record, self._store
        assert record is not None and store is not None
        self._in_flight.clear()
        self._report("verifying", record)
        store.sync()
        digest = store.file_sha256()
        if digest != record.sha256:
            store.discard()
            self._store = None
            self._fail("failed", record, errors.IntegrityError(
                f"assembled {record.label} hashes to {digest[:12]}…, the record says {record.sha256[:12]}…",
                hint="push the bundle again"))
            return
        self._report("installing", record)
        try:
            result = install_bundle(store.part_path, self._dd, check=self._check, probe=self._probe)
        except errors.FieldpackError as err:
            store.discard()
            self._store = None
            self._fail("failed", record, err)
            return
        store.discard()
        self._store = None
        log.info("%s", result.message)
        self._report("health_check", record)
        reason = self._health(record, self._manifest)
        if reason is None:
            self._report("healthy", record)
            return
        try:
            back = rollback(self._dd)
            why = f"health check failed: {reason}; rolled back to {back.label}"
            phase = "rolled_back"
        except errors.FieldpackError as err:
            why = f"health check failed: {reason}; rollback impossible: {err.message}"
            phase = "failed"
        log.error("%s", why)
        self._remember(record, phase, why)
        self._report(phase, record, reason=why)  # type: ignore[arg-type]

    def ask_smoke(self, record: fp.DesiredBundle, manifest: Manifest) -> str | None:
        """Ask this device the manifest's smoke question through the daemon; None when the new bundle answers
        ``ok`` within ``record.health_timeout_s``, else the reason."""
        from fieldpack.device.mqtt.requester import Requester

        try:
            with Requester(self._settings) as asker:
                final = asker.submit(manifest.smoke.question, device=self.device_id, bundle=record.label,
                                     stream=False).wait(record.health_timeout_s)
        except errors.FieldpackError as err:
            return f"could not ask the smoke question ({err.message})"
        if final is None:
            return f"no answer to the smoke question within {record.health_timeout_s:.0f} s"
        if not final.ok:
            return f"smoke question failed: {final.error.reason if final.error else 'error'}"
        if final.bundle != record.label:
            return f"smoke question answered by {final.bundle}, not {record.label}"
        return None

    # --- reporting -----------------------------------------------------------------------------------------
    def _fail(self, phase: str, record: fp.DesiredBundle, err: errors.FieldpackError) -> None:
        reason = " ".join(err.message.split())
        log.error("rollout %s of %s %s: %s", record.rollout, record.label, phase, reason)
        self._remember(record, phase, reason)
        self._report(phase, record, reason=reason)  # type: ignore[arg-type]

    def _close_download(self) -> None:
        if self._store is not None:
            self._store.close()
        self._store, self._in_flight = None, {}

    def _active(self) -> tuple[str | None, str | None]:
        try:
            state = self._dd.state()
        except errors.FieldpackError:
            return None, None
        info = state.slots.get(state.active) if state.active else None
        return (info.label, info.manifest_sha256) if info else (None, None)

    def _report(self, phase: fp.DevicePhase, record: fp.DesiredBundle | None, *, reason: str | None = None,
                keep_target: bool = True) -> None:
        active, _ = self._active()
        store = self._store
        self._state = fp.DeviceRollout(
            device=self.device_id, group=self.group, phase=phase,
            rollout=record.rollout if record else None,
            target=record.label if record and keep_target else None,
            target_sha256=record.sha256 if record else None,
            active=active,
            done=len(store.have) if store is not None else (record.chunks if record and phase in (
                "verifying", "installing", "health_check", "healthy") else 0),
            total=record.chunks if record else 0,
            reason=reason, fetched=self._fetched, ts=time.time())
        self._reported_at = time.monotonic()
        self._publish(self._state)

    def _publish(self, state: fp.DeviceRollout) -> None:
        self.client.publish(fp.device_state_topic(self.device_id), state.encode(), qos=1, retain=True,
                            properties=json_properties())

    @property
    def state(self) -> fp.DeviceRollout:
        """The last state reported."""
        return self._state

    def _load_memory(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self._memory_path.read_text(encoding="utf-8"))
            return {str(k): {"phase": str(v["phase"]), "reason": str(v["reason"]), "rollout": str(v["rollout"])}
                    for k, v in data["failed"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def _remember(self, record: fp.DesiredBundle, phase: str, reason: str) -> None:
        """Note that ``record``'s bundle failed in this rollout, so the retained record does not start it again
        (after a restart too); a new rollout of the same bundle does."""
        self._failed[record.sha256] = {"phase": phase, "reason": reason, "rollout": record.rollout}
        try:
            self._memory_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self._memory_path, json.dumps({"failed": self._failed}, indent=1).encode())
        except (OSError, errors.FieldpackError) as exc:
            log.warning("cannot record the failed rollout in %s: %s", self._memory_path, exc)


def fleet_agent_for(device_id: str, groups: tuple[str, ...], settings: BrokerSettings,
                    data_dir: Path | None) -> FleetAgent | None:
    """The agent ``fieldpack serve`` runs: for the first group, when the data dir is initialised (has a
    ``state.json``); else ``None`` (the daemon serves without fleet rollouts)."""
    if not groups or data_dir is None:
        return None
    from fieldpack.device.slots import STATE_FILE, open_data_dir

    if not (Path(data_dir) / STATE_FILE).is_file():
        return None
    from fieldpack.device.runtime import check_slot

    return FleetAgent(device_id, groups[0], settings, open_data_dir(Path(data_dir)), check=check_slot)
