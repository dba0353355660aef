"""The device's data dir: two A/B bundle slots, the trusted builder keys, and the state that says which slot
is active.

Layout (created by ``fieldpack device init --data-dir DIR --trust builder.pub``)::

    DIR/
      state.json        which slot is active / previous, and what each holds (written atomically, see below)
      install.lock      flock(2) target; held by the one install or rollback running
      trust/<key_id>.pub  PEM ed25519 public keys of the builders this device accepts
      slots/a/  slots/b/  one unpacked bundle each: the members, manifest.json(.sig) and slot.json

Default data dir: ``$FIELDPACK_DATA_DIR`` if set, else ``~/.local/share/fieldpack``.

Truth is ``state.json``: a slot is *active* only because the state says so, and a slot may be rolled back to
only when the state's record of it (label, manifest sha256) matches the ``slot.json`` inside the slot, which
the installer writes last. ``state.json`` is replaced with temp file + fsync + rename
(:mod:`shared.atomic`), so after a power cut it is either the old or the new one, never a mixture. The
installer never writes into the active slot (a repair in place first records that no slot is active). The
scheme is the one of A/B OTA updaters (Mender, RAUC, Android A/B): write the inactive copy, check it, then flip
one pointer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.atomic import atomic_write_bytes, fsync_dir
from fieldpack.shared.errors import (
    DeviceError,
    InstallInProgressError,
    IntegrityError,
    NoActiveBundleError,
    NotInitializedError,
    OutputNotWritableError,
    UsageError,
)
from fieldpack.shared.manifest import Manifest, parse_manifest
from fieldpack.shared.signing import PublicKey, load_public_key

log = logging.getLogger(__name__)

ENV_DATA_DIR = "FIELDPACK_DATA_DIR"
SLOT_NAMES = ("a", "b")
STATE_FILE = "state.json"
LOCK_FILE = "install.lock"
TRUST_DIR = "trust"
SLOTS_DIR = "slots"
#: Written last into a slot by the installer; its presence (matching the state) makes the slot complete.
SLOT_RECORD_FILE = "slot.json"
STATE_SCHEMA = 1


def default_data_dir() -> Path:
    """``$FIELDPACK_DATA_DIR`` when set and non-empty, else ``~/.local/share/fieldpack``."""
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else Path.home() / ".local" / "share" / "fieldpack"


def utc_now() -> str:
    """Current UTC time as ISO 8601 with seconds, e.g. ``2025-01-31T12:00:00+00:00``."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class SlotInfo:
    """What a slot holds.

    Attributes:
        label: ``name@version`` of the bundle.
        manifest_sha256: hex sha256 of the bundle's exact ``manifest.json`` bytes (identifies the bundle).
        installed_at: ISO 8601 UTC time the install finished unpacking and checking.
        payload_bytes: bytes of members unpacked.
        key_id: id of the trusted key that signed it.
    """

    label: str
    manifest_sha256: str
    installed_at: str
    payload_bytes: int
    key_id: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SlotInfo":
        return cls(label=str(d["label"]), manifest_sha256=str(d["manifest_sha256"]),
                   installed_at=str(d["installed_at"]), payload_bytes=int(d["payload_bytes"]),
                   key_id=str(d["key_id"]))


@dataclass(frozen=True)
class State:
    """Contents of ``state.json``.

    Attributes:
        active: slot name (``"a"``/``"b"``) the runtime loads, or ``None`` before the first install.
        previous: slot a rollback returns to, or ``None``.
        slots: slot name -> what the state knows it holds, ``None`` for empty/unknown (being written).
        updated_at: ISO 8601 UTC time of the last write.
    """

    active: str | None
    previous: str | None
    slots: dict[str, SlotInfo | None]
    updated_at: str

    @classmethod
    def empty(cls) -> "State":
        return cls(active=None, previous=None, slots={s: None for s in SLOT_NAMES}, updated_at=utc_now())

    def to_bytes(self) -> bytes:
        doc = {"schema": STATE_SCHEMA, "active": self.active, "previous": self.previous,
               "slots": {k: (asdict(v) if v else None) for k, v in self.slots.items()},
               "updated_at": self.updated_at}
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "State":
        """Parse state.json bytes. Raises ValueError/KeyError/TypeError on anything malformed."""
        doc = json.loads(data.decode("utf-8"))
        if doc.get("schema") != STATE_SCHEMA:
            raise ValueError(f"schema {doc.get('schema')!r}, expected {STATE_SCHEMA}")
        slots = {s: (SlotInfo.from_dict(doc["slots"][s]) if doc["slots"].get(s) else None) for s in SLOT_NAMES}
        state = cls(active=doc["active"], previous=doc["previous"], slots=slots, updated_at=str(doc["updated_at"]))
        for key in ("active", "previous"):
            value = getattr(state, key)
            if value is not None and (value not in SLOT_NAMES or slots[value] is None):
                raise ValueError(f"{key} slot {value!r} is not a known, filled slot")
        if state.active is not None and state.active == state.previous:
            raise ValueError("active and previous are the same slot")
        return state

    def forget(self, slot: str) -> "State":
        """This state with ``slot`` marked empty (and no longer the rollback target). Never the active slot."""
        if slot == self.active:
            raise ValueError("refusing to forget the active slot")
        return replace(self, slots={**self.slots, slot: None},
                       previous=None if self.previous == slot else self.previous, updated_at=utc_now())


class DataDir:
    """An initialised data dir (see the module doc). Get one from :func:`open_data_dir` or
    :func:`init_data_dir`; it reads the disk on every call and caches nothing."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"DataDir({str(self.root)!r})"

    # -- paths -----------------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def lock_path(self) -> Path:
        return self.root / LOCK_FILE

    @property
    def trust_dir(self) -> Path:
        return self.root / TRUST_DIR

    def slot_path(self, slot: str) -> Path:
        """Folder of slot ``"a"`` or ``"b"``."""
        if slot not in SLOT_NAMES:
            raise UsageError(f"unknown slot {slot!r}", hint=f"use one of {', '.join(SLOT_NAMES)}")
        return self.root / SLOTS_DIR / slot

    # -- state -----------------------------------------------------------------------------------------------
    def state(self) -> State:
        """Read ``state.json``.

        Raises:
            NotInitializedError: the file is missing.
            DeviceError: it is unreadable or malformed (it is written atomically, so only outside hands do this).
        """
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError as exc:
            raise _not_initialized(self.root) from exc
        except OSError as exc:
            raise DeviceError(f"cannot read {self.state_path}: {exc.strerror}",
                              hint="check the permissions of the data dir") from exc
        try:
            return State.from_bytes(data)
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
            raise DeviceError(f"{self.state_path} is damaged ({exc})",
                              hint=f"restore it, or re-create the data dir with `fieldpack device init "
                                   f"--data-dir {self.root} --trust KEY.pub` and reinstall") from exc

    def write_state(self, state: State) -> None:
        """Replace ``state.json`` atomically (temp + fsync + rename + fsync dir)."""
        atomic_write_bytes(self.state_path, state.to_bytes())
        log.debug("state: active=%s previous=%s", state.active, state.previous)

    def active_slot(self) -> str | None:
        """Name of the active slot, or ``None`` before the first install."""
        return self.state().active

    def active_slot_path(self) -> Path | None:
        """Folder of the active bundle (holds ``manifest.json`` and the members), or ``None`` if none yet."""
        active = self.active_slot()
        return self.slot_path(active) if active else None

    def require_active_slot_path(self) -> Path:
        """Folder of the active bundle; the one place that says "nothing installed" to every caller (CLI,
        eval, daemon).

        Raises:
            NoActiveBundleError: nothing has been installed into this data dir yet, or no slot is active (an
                interrupted repair; the message then names the previous bundle and the hint `fieldpack rollback`).
        """
        state = self.state()
        if state.active is None:
            hint = f"run `fieldpack install BUNDLE.fpk --data-dir {self.root}`"
            if state.previous is None:
                raise NoActiveBundleError(f"no bundle is installed in data dir {self.root}", hint=hint)
            raise NoActiveBundleError(
                f"no bundle is active in data dir {self.root} ({state.slots[state.previous].label} is kept as the "
                f"previous bundle)", hint=f"{hint}, or `fieldpack rollback --data-dir {self.root}` to run the previous one")
        return self.slot_path(state.active)

    def inactive_slot(self, state: State | None = None) -> str:
        """The slot an install writes to: the one that is not active (``"a"`` on a fresh device). With no
        active slot but a rollback target (an interrupted repair, see :mod:`device.install`), the other one."""
        state = state or self.state()
        taken = state.active if state.active is not None else state.previous
        return next(s for s in SLOT_NAMES if s != taken)

    # -- slots -----------------------------------------------------------------------------------------------
    def read_slot_record(self, slot: str) -> SlotInfo | None:
        """The ``slot.json`` inside ``slot`` if present, well-formed and marked complete, else ``None``."""
        try:
            doc = json.loads((self.slot_path(slot) / SLOT_RECORD_FILE).read_bytes().decode("utf-8"))
            if doc.get("complete") is not True:
                return None
            return SlotInfo.from_dict(doc)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def write_slot_record(self, slot: str, info: SlotInfo) -> None:
        """Write ``slot.json`` (atomically), which marks the slot complete."""
        doc = {**asdict(info), "complete": True}
        atomic_write_bytes(self.slot_path(slot) / SLOT_RECORD_FILE,
                           (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())

    def slot_complete(self, slot: str, state: State | None = None) -> bool:
        """True when the state has a record of ``slot``, its ``slot.json`` matches it, and the slot's
        ``manifest.json`` hashes to the recorded sha256 (cheap: the members themselves are not re-hashed;
        see :meth:`verify_slot`)."""
        want = (state or self.state()).slots.get(slot)
        if want is None:
            return False
        have = self.read_slot_record(slot)
        if have is None or have.manifest_sha256 != want.manifest_sha256:
            return False
        try:
            data = (self.slot_path(slot) / fmt.MANIFEST_NAME).read_bytes()
        except OSError:
            return False
        return hashlib.sha256(data).hexdigest() == want.manifest_sha256

    def slot_manifest(self, slot: str) -> Manifest:
        """Parse the ``manifest.json`` the installer put into ``slot``. Raises DeviceError if missing, or
        ManifestError/UnsupportedFormatVersion if invalid."""
        path = self.slot_path(slot) / fmt.MANIFEST_NAME
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DeviceError(f"slot {slot} in {self.root} has no readable manifest ({exc.strerror})",
                              hint="reinstall the bundle with `fieldpack install`") from exc
        return parse_manifest(data, origin=str(path))

    def verify_slot(self, slot: str) -> Manifest:
        """Deep check: every member listed in the slot's manifest exists with its size and sha256.

        Returns:
            The slot's manifest.

        Raises:
            IntegrityError: a member is missing, or its size or sha256 differs (names it).
            DeviceError: the slot has no manifest.
        """
        from fieldpack.shared.bundle import hash_file

        manifest = self.slot_manifest(slot)
        for m in manifest.members:
            path = self.slot_path(slot) / m.name
            try:
                size, digest = hash_file(path)
            except OSError as exc:
                raise IntegrityError(f"slot {slot}: member {m.name} is unreadable ({exc.strerror})",
                                     hint="reinstall the bundle with `fieldpack install`") from exc
            if size != m.size or digest != m.sha256:
                raise IntegrityError(f"slot {slot}: member {m.name} does not match its manifest entry",
                                     hint="the storage may be failing; reinstall the bundle with `fieldpack install`")
        return manifest

    def slot_size(self, slot: str) -> int:
        """Bytes of regular files under the slot folder (0 if it does not exist)."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.slot_path(slot)):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        return total

    def clear_slot(self, slot: str, state: State | None = None) -> None:
        """Empty the folder of ``slot`` (re-created empty). Refuses the active slot.

        Raises:
            DeviceError: ``slot`` is the active slot.
            OutputNotWritableError: it cannot be removed.
        """
        if slot == (state or self.state()).active:
            raise DeviceError(f"refusing to clear the active slot {slot} of {self.root}",
                              hint="install into the inactive slot")
        path = self.slot_path(slot)
        try:
            if path.exists() or path.is_symlink():
                if path.is_symlink() or not path.is_dir():
                    path.unlink()
                else:
                    shutil.rmtree(path)
            path.mkdir(parents=True)
        except OSError as exc:
            raise OutputNotWritableError(f"cannot clear slot folder {path}: {exc.strerror}",
                                         hint="check the permissions of the data dir") from exc
        fsync_dir(path.parent)

    # -- trust -----------------------------------------------------------------------------------------------
    def trusted_keys(self) -> list[PublicKey]:
        """The builder public keys in ``trust/`` (``*.pub``), sorted by file name.

        Raises:
            SigningKeyError: a key file there is unreadable or not an ed25519 public key.
        """
        if not self.trust_dir.is_dir():
            return []
        return [load_public_key(p) for p in sorted(self.trust_dir.glob("*.pub"))]

    def add_trust(self, key: Path) -> PublicKey:
        """Copy a builder's public key into ``trust/<key_id>.pub`` (idempotent).

        Raises:
            SigningKeyError: ``key`` is missing or not an ed25519 PEM public key.
            OutputNotWritableError: ``trust/`` cannot be written.
        """
        pub = load_public_key(Path(key))
        self.trust_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.trust_dir / f"{pub.key_id}.pub", Path(key).read_bytes())
        log.info("trusting key %s from %s", pub.key_id, key)
        return pub

    # -- lock ------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the exclusive install lock (``flock`` on ``install.lock``, non-blocking). The kernel drops it
        when the process dies, so a killed install never leaves the device locked.

        Raises:
            InstallInProgressError: another process holds it (names its pid when known).
        """
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputNotWritableError(f"cannot open {self.lock_path}: {exc.strerror}",
                                         hint="check the permissions of the data dir") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise DeviceError(f"cannot lock {self.lock_path}: {exc.strerror}",
                                      hint="put the data dir on a local file system that supports flock") from exc
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise InstallInProgressError(
                    f"another install or rollback (pid {holder}) is running on {self.root}",
                    hint="wait for it to finish, then retry") from exc
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _not_initialized(root: Path) -> NotInitializedError:
    return NotInitializedError(f"data dir {root} is not initialised",
                               hint=f"run `fieldpack device init --data-dir {root} --trust builder.pub`")


def init_data_dir(data_dir: Path | None, trust_keys: list[Path]) -> DataDir:
    """Create (or complete) a data dir: ``slots/a``, ``slots/b``, ``trust/`` and an empty
    ``state.json``, and trust ``trust_keys``. Re-running it on an initialised dir keeps its state and
    installed bundles and only adds keys.

    Args:
        data_dir: folder to use; ``None`` = :func:`default_data_dir`.
        trust_keys: builder public keys (PEM) to trust; at least one unless the dir already trusts one.

    Raises:
        UsageError: no key given and none trusted yet.
        SigningKeyError: a key is missing or not an ed25519 public key (checked before anything is written).
        OutputNotWritableError: the folder cannot be created or written.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    dd = DataDir(root)
    for key in trust_keys:
        load_public_key(Path(key))  # validate all before writing anything
    if not trust_keys and not (dd.trust_dir.is_dir() and any(dd.trust_dir.glob("*.pub"))):
        raise UsageError(f"no trusted key given for {root}",
                         hint="pass the builder's public key: --trust builder.pub")
    try:
        for sub in (dd.trust_dir, *(dd.slot_path(s) for s in SLOT_NAMES)):
            sub.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot create the data dir {root}: {exc.strerror}",
                                     hint="choose a writable --data-dir") from exc
    for key in trust_keys:
        dd.add_trust(Path(key))
    if not dd.state_path.exists():
        dd.write_state(State.empty())
        log.info("initialised data dir %s", root)
    fsync_dir(root)
    return dd


def open_data_dir(data_dir: Path | None = None) -> DataDir:
    """Open an initialised data dir (``None`` = :func:`default_data_dir`).

    Raises:
        NotInitializedError: no ``state.json`` there; the message names the dir and the ``fieldpack device
            init`` command that fixes it.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if not (root / STATE_FILE).is_file():
        raise _not_initialized(root)
    return DataDir(root)


__all__ = ["DataDir", "State", "SlotInfo", "init_data_dir", "open_data_dir", "default_data_dir",
           "SLOT_NAMES", "SLOT_RECORD_FILE", "ENV_DATA_DIR"]
