"""Fleet rollout wire protocol (version 1, same envelope as :mod:`shared.protocol`): topics and payloads.

Topics (``<root>`` is :data:`shared.protocol.TOPIC_ROOT`)::

    <root>/group/<group>/fleet/desired     desired bundle of the group (DesiredBundle)   pusher -> devices, QoS 1, retained
    <root>/group/<group>/fleet/need        chunk requests (ChunkRequest)                 devices -> pusher, QoS 1
    <root>/device/<device>/fleet/state     rollout state of one device (DeviceRollout)   device -> all,     QoS 1, retained
    <root>/device/<device>/fleet/chunk     chunk frames for that device (binary)         pusher -> device,  QoS 1

The desired record carries the bundle's signed ``manifest.json`` and its ed25519 signature, so a device
verifies them against its trust store, and checks its disk quota against the manifest, before it asks for
the first chunk. Chunks are binary frames (:func:`encode_chunk`): the magic ``FPC1``, a 4-byte big-endian
header length, a JSON :class:`ChunkHeader` (index, offset, size, sha256 of the data) and the raw bytes — no
base64, so a frame is the chunk plus about 300 bytes.

Example desired record (``manifest`` shortened)::

    {"v": 1, "type": "desired", "rollout": "9f1c2ab04d3e", "group": "plant-north", "name": "pg-ops",
     "version": "1.1.0", "sha256": "<64 hex of the .fpk>", "size": 62914560, "chunk_size": 262144,
     "chunks": 240, "manifest": "{...}", "manifest_sig": "<base64>", "targets": ["pump-01"],
     "state": "active", "url": null, "health_timeout_s": 120.0, "ts": 1732871234.5}
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Literal, TypeVar

from pydantic import Field, ValidationError

from fieldpack.shared import errors
from fieldpack.shared.protocol import (
    ErrorCode,
    TOPIC_ROOT,
    _load_object,
    _shape_error,
    _Record,
    _Wire,
    device_topic,
    group_topic,
)

CHUNK_MAGIC = b"FPC1"
DEFAULT_CHUNK_BYTES = 256 * 1024
"""Chunk size used when the broker announces no Maximum Packet Size (bytes)."""
MIN_CHUNK_BYTES = 4 * 1024
CHUNK_PACKET_FRACTION = 4
"""A chunk is at most 1/this of the broker's Maximum Packet Size, leaving room for header and topic."""


# --- topics ------------------------------------------------------------------------------------------------
def desired_topic(group: str) -> str:
    """Retained desired-bundle record of ``group``."""
    return group_topic(group, "fleet", "desired")


def need_topic(group: str) -> str:
    """Chunk requests of ``group``'s devices (the pusher subscribes)."""
    return group_topic(group, "fleet", "need")


def device_state_topic(device: str) -> str:
    """Retained rollout state of one device."""
    return device_topic(device, "fleet", "state")


def chunk_topic(device: str) -> str:
    """Chunk frames sent to one device."""
    return device_topic(device, "fleet", "chunk")


DEVICE_STATE_ALL = f"{TOPIC_ROOT}/device/+/fleet/state"
"""Subscription matching every device's rollout state."""


def chunk_size_for(max_packet_bytes: int | None, preferred: int = DEFAULT_CHUNK_BYTES) -> int:
    """Chunk size (bytes) well under the broker's Maximum Packet Size (CONNACK property, MQTT 5.0 3.2.2.3.6).

    Returns ``preferred`` when the broker gives no limit, else at most a quarter of the limit, never below
    :data:`MIN_CHUNK_BYTES`.

    Raises:
        UsageError: the broker's limit is too small for a :data:`MIN_CHUNK_BYTES` chunk.
    """
    if max_packet_bytes is None:
        return preferred
    size = min(preferred, max_packet_bytes // CHUNK_PACKET_FRACTION)
    if size < MIN_CHUNK_BYTES:
        raise errors.UsageError(
            f"the broker's maximum packet size {max_packet_bytes} bytes leaves no room for {MIN_CHUNK_BYTES}-byte chunks",
            hint="raise max_packet_size on the broker to 64 KiB or more, or give devices an HTTP URL",
        )
    return size


# --- payloads ----------------------------------------------------------------------------------------------
RolloutState = Literal["active", "halted", "aborted", "done"]
DevicePhase = Literal[
    "idle", "waiting", "downloading", "verifying", "installing", "health_check", "healthy", "rolled_back",
    "failed", "refused",
]


class DesiredBundle(_Wire):
    """The bundle a group should run (retained on :func:`desired_topic`).

    Attributes:
        rollout: random id of this rollout (hex); device states name it.
        group: the group.
        name, version: the bundle's manifest name and version.
        sha256, size: of the whole ``.fpk`` file (hex, bytes).
        chunk_size, chunks: bytes per chunk (the last may be shorter) and their count.
        manifest: the exact signed ``manifest.json`` text; ``manifest_sig``: its signature, base64.
        targets: device ids allowed to start now (canary, then waves), ``None`` = every member of the group.
        state: ``active``; ``halted`` (failures passed the threshold) or ``aborted`` (operator) stop devices
            that have not switched yet; ``done`` when every target reported.
        url: optional HTTP(S) URL of the same ``.fpk`` for devices that can reach it (tried first).
        health_timeout_s: seconds the smoke question may take after the switch before the device rolls back.
        ts: pusher wall clock, Unix seconds.
    """

    type: Literal["desired"] = "desired"
    rollout: str = Field(min_length=1, max_length=64)
    group: str
    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1)
    chunk_size: int = Field(ge=1)
    chunks: int = Field(ge=1)
    manifest: str
    manifest_sig: str
    targets: list[str] | None = None
    state: RolloutState = "active"
    url: str | None = None
    health_timeout_s: float = 120.0
    ts: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def manifest_bytes(self) -> bytes:
        return self.manifest.encode("utf-8")

    def signature_bytes(self) -> bytes:
        return base64.b64decode(self.manifest_sig)

    def chunk_len(self, index: int) -> int:
        """Bytes of chunk ``index`` (the last one may be short)."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def targets_device(self, device: str) -> bool:
        return self.targets is None or device in self.targets


class DeviceRollout(_Wire):
    """Rollout state of one device (retained on :func:`device_state_topic`).

    Attributes:
        device, group: who reports.
        phase: see :data:`DevicePhase`; ``refused`` = not started (quota, untrusted signature); ``rolled_back``
            = switched, failed the health check, back on the previous bundle; ``failed`` = download/install
            failed, previous bundle still active.
        rollout: the rollout this state is about, or ``None`` when idle.
        target: ``name@version`` being rolled out; ``active``: ``name@version`` running now.
        done, total: chunks staged / chunks in the bundle while downloading.
        reason: why it refused, failed or rolled back; ``None`` otherwise.
        fetched: chunk frames received in this rollout (resent ones included).
        ts: device wall clock, Unix seconds.
    """

    type: Literal["rollout_state"] = "rollout_state"
    device: str
    group: str | None = None
    phase: DevicePhase = "idle"
    rollout: str | None = None
    target: str | None = None
    target_sha256: str | None = None
    active: str | None = None
    done: int = 0
    total: int = 0
    reason: str | None = None
    fetched: int = 0
    ts: float = 0.0

    @property
    def finished(self) -> bool:
        """True when the device will do nothing more for its rollout."""
        return self.phase in ("healthy", "rolled_back", "failed", "refused")

    @property
    def failed(self) -> bool:
        return self.phase in ("rolled_back", "failed", "refused")


class ChunkRequest(_Wire):
    """A device asks for chunks it misses (``indices`` ascending, at most :data:`MAX_INDICES_PER_REQUEST`)."""

    type: Literal["chunk_request"] = "chunk_request"
    rollout: str
    device: str
    indices: list[int] = Field(min_length=1, max_length=256)


MAX_INDICES_PER_REQUEST = 256


class ChunkHeader(_Record):
    """Header of a chunk frame: ``index`` (0-based), ``offset`` in the file (bytes), ``size`` (bytes) and
    the ``sha256`` (hex) of the data that follows."""

    v: int = 1
    type: Literal["chunk"] = "chunk"
    rollout: str
    index: int = Field(ge=0)
    offset: int = Field(ge=0)
    size: int = Field(ge=0)
    sha256: str


def encode_chunk(header: ChunkHeader, data: bytes) -> bytes:
    """One binary frame: ``FPC1`` + u32 big-endian header length + header JSON + data."""
    head = header.model_dump_json().encode("utf-8")
    return CHUNK_MAGIC + struct.pack(">I", len(head)) + head + data


def decode_chunk(frame: bytes) -> tuple[ChunkHeader, memoryview]:
    """Split a frame into its header and a view of its data (not copied).

    Raises:
        ProtocolError: wrong magic, truncated frame, bad header, or data length differing from ``size``.
    """
    view = memoryview(frame)
    if bytes(view[:4]) != CHUNK_MAGIC or len(view) < 8:
        raise errors.ProtocolError("chunk frame does not start with FPC1", hint="update the pusher",
                                   code=ErrorCode.BAD_SHAPE)
    (n,) = struct.unpack(">I", view[4:8])
    if 8 + n > len(view):
        raise errors.ProtocolError("chunk frame is truncated", hint="resend", code=ErrorCode.BAD_SHAPE)
    obj = _load_object(bytes(view[8 : 8 + n]), max_bytes=n, what="chunk header")
    try:
        header = ChunkHeader.model_validate(obj)
    except ValidationError as exc:
        raise _shape_error("chunk header", exc) from exc
    data = view[8 + n :]
    if len(data) != header.size:
        raise errors.ProtocolError(f"chunk {header.index} carries {len(data)} bytes, header says {header.size}",
                                   hint="resend", code=ErrorCode.BAD_SHAPE)
    return header, data


_W = TypeVar("_W", bound=_Wire)


def _decode(model: type[_W], payload: bytes, what: str) -> _W:
    obj = _load_object(payload, max_bytes=max(len(payload), 1), what=what)
    if obj.get("type") != model.model_fields["type"].default:
        raise errors.ProtocolError(f"{what} has type {obj.get('type')!r}", hint="check the topic",
                                   code=ErrorCode.BAD_SHAPE)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise _shape_error(what, exc) from exc


def decode_desired(payload: bytes) -> DesiredBundle:
    """Read a desired-bundle record. Raises ``ProtocolError`` (envelope or shape)."""
    record = _decode(DesiredBundle, payload, "desired bundle")
    if record.chunks != math.ceil(record.size / record.chunk_size):
        raise errors.ProtocolError(
            f"desired bundle says {record.chunks} chunks for {record.size} bytes in {record.chunk_size}-byte chunks",
            hint="republish with `fieldpack fleet push`", code=ErrorCode.BAD_SHAPE)
    return record


def decode_device_state(payload: bytes) -> DeviceRollout:
    """Read a device rollout state. Raises ``ProtocolError``."""
    return _decode(DeviceRollout, payload, "device rollout state")


def decode_chunk_request(payload: bytes) -> ChunkRequest:
    """Read a chunk request. Raises ``ProtocolError``."""
    return _decode(ChunkRequest, payload, "chunk request")


def manifest_json(payload: str) -> dict[str, object]:
    """The manifest text of a record as a dict (for display). Raises ``ProtocolError`` when not JSON."""
    try:
        obj = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise errors.ProtocolError(f"desired bundle manifest is not JSON ({exc.msg})", hint="republish",
                                   code=ErrorCode.BAD_SHAPE) from exc
    return obj if isinstance(obj, dict) else {}
