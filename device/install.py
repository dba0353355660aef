"""Install a signed bundle into the inactive A/B slot, check it, then make it active; roll back; report status.

The order follows A/B over-the-air updaters (Mender, RAUC): nothing the device is running is touched until the
new copy is complete and checked, and the switch is one atomic rename of ``state.json``
(:mod:`device.slots`). :func:`install_bundle` does, in this order:

1. take the data dir's install lock (non-blocking; a second install fails at once with
   :class:`InstallInProgressError`);
2. clean what an interrupted install left behind (an inactive slot the state does not vouch for, temp files);
3. open the bundle (:class:`shared.bundle.BundleReader` validates its structure and manifest), then verify
   the signature against ``trust/`` and every member's sha256 — a bad bundle is refused before any slot is
   touched, so the rollback target survives it;
4. check feasibility: free disk on the data dir's file system vs the payload (+ margin), and the manifest's RAM
   needs (KV cache recomputed for the configured ``n_ctx``) vs available RAM (:mod:`device.resources`);
5. forget the inactive slot in the state, empty it, unpack into it (``extract_to`` re-hashes each member as it
   streams, refuses unsafe names, fsyncs each file), and copy ``manifest.json`` and its signature beside;
6. run ``check(slot_path, manifest)`` (the runtime's load + smoke test, :func:`device.runtime.check_slot`);
7. write ``slot.json`` (the slot is now complete), then switch: ``state.json`` gets active=new, previous=old.

A failure or a power cut at any step leaves the previously active bundle active and intact. A stop that
Python sees (Ctrl-C, or SIGTERM once :func:`stop_on_sigterm` is installed, as ``fieldpack install`` does) also
empties the slot it was writing before the process exits, so no partial copy stays on disk; after a power cut
or SIGKILL the next install clears it.

Repair: installing the active bundle again when its slot no longer matches its manifest (a member's size or
sha256, or its ``manifest.json``/``slot.json``) rewrites it. With a rollback target in the other slot, the
repair goes into the damaged slot itself so that target survives: after step 4 the state is first written
with no active slot (active=None, previous kept), then steps 5-7 run on the damaged slot as on any inactive
one. A failure or a power cut from there on leaves no active bundle and the rollback target intact (rerun the
install, or ``fieldpack rollback``); the next install keeps that target. Without a rollback target the repair
goes to the empty slot like an upgrade, and the damaged copy is emptied after the switch.

Named steps: the installer reports each durable point it passes — ``after-verify``, ``mid-unpack`` (after the
first member), ``after-unpack``, ``after-check``, ``before-switch``, ``after-switch`` — to an optional
``on_step(name)`` observer (:data:`INSTALL_STEPS`). Callers may log or show them; the crash tests pass an
observer that SIGKILLs the process at one of them (a power cut, as the data dir sees it), from a test-only
driver (``tests/device/install_crash_driver.py``). The product has no fault-injection switch of its own.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.atomic import atomic_write_bytes, fsync_dir
from fieldpack.shared.bundle import BundleReader
from fieldpack.shared.errors import (ActiveSlotError, DowngradeError, FieldpackError, NoPreviousBundleError,
                                     SignatureError, SlotCheckError)
from fieldpack.shared.manifest import Manifest

from fieldpack.device.resources import ResourceProbe, check_feasibility
from fieldpack.device.slots import SLOT_NAMES, DataDir, SlotInfo, State, open_data_dir, utc_now

log = logging.getLogger(__name__)

#: The durable points an install passes, in order (see the module doc).
INSTALL_STEPS = ("after-verify", "mid-unpack", "after-unpack", "after-check", "before-switch", "after-switch")

#: ``check(slot_path, manifest)``: raise SlotCheckError if the unpacked bundle does not work.
SlotCheck = Callable[[Path, Manifest], None]
#: ``on_progress(phase, done_bytes, total_bytes)``; phase is ``"verify"`` or ``"unpack"``.
InstallProgress = Callable[[str, int, int], None]
#: ``on_step(name)`` with a name from :data:`INSTALL_STEPS`, called as the install passes that point.
InstallStep = Callable[[str], None]


@dataclass(frozen=True)
class InstallResult:
    """Outcome of :func:`install_bundle` or :func:`rollback`.

    Attributes:
        label: ``name@version`` now active.
        slot: slot name now active; ``slot_path`` its folder.
        previous: label of the bundle a rollback would return to, or ``None``.
        changed: False when nothing was done (the bundle was already active).
        message: one line for the user.
        payload_bytes: bytes unpacked (0 for a no-op or a rollback).
        seconds: wall time of the whole operation.
        key_id: the trusted key that signed the bundle.
    """

    label: str
    slot: str
    slot_path: Path
    previous: str | None
    changed: bool
    message: str
    payload_bytes: int = 0
    seconds: float = 0.0
    key_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "slot": self.slot, "slot_path": str(self.slot_path), "previous": self.previous,
                "changed": self.changed, "message": self.message, "payload_bytes": self.payload_bytes,
                "seconds": round(self.seconds, 3), "key_id": self.key_id}


def _as_data_dir(data_dir: DataDir | Path | None) -> DataDir:
    return data_dir if isinstance(data_dir, DataDir) else open_data_dir(data_dir)


def clean_leftovers(dd: DataDir, state: State) -> State:
    """Undo what an interrupted install left: temp files of the state, and any non-active slot the state does
    not vouch for as complete (emptied, and dropped from the state). Caller holds the lock.

    Returns:
        The state after cleaning (written to disk if it changed).
    """
    for tmp in dd.root.glob(f".{dd.state_path.name}.*.tmp"):
        log.info("removing leftover temp file %s", tmp)
        tmp.unlink(missing_ok=True)
    for slot in SLOT_NAMES:
        if slot == state.active or dd.slot_complete(slot, state):
            continue
        if state.slots[slot] is not None:
            log.warning("slot %s does not hold the %s the state records; forgetting it", slot,
                        state.slots[slot].label)
            state = state.forget(slot)
            dd.write_state(state)
        path = dd.slot_path(slot)
        if not path.is_dir() or any(path.iterdir()):
            log.info("emptying incomplete slot %s (leftover of an interrupted install)", slot)
            dd.clear_slot(slot, state)
    return state


def install_bundle(bundle: Path, data_dir: DataDir | Path | None, *, check: SlotCheck | None,
                   n_ctx: int | None = None, on_progress: InstallProgress | None = None,
                   probe: ResourceProbe | None = None, on_step: InstallStep | None = None,
                   allow_downgrade: bool = False) -> InstallResult:
    """Install ``bundle`` into the inactive slot and make it active, or repair the active slot (module doc).

    Args:
        bundle: the ``.fpk`` file.
        data_dir: an initialised data dir (a :class:`DataDir`, a path, or ``None`` for the default).
        check: post-unpack check run on the new slot before it becomes active; ``None`` skips it (unit tests
            of the mechanics only; the CLI passes :func:`device.runtime.check_slot`).
        n_ctx: context length the device will run with (tokens); ``None`` = the bundle's default. Only the
            RAM estimate depends on it.
        on_progress: called with (phase, bytes done, bytes total) as members are hashed and unpacked.
        on_step: called with each name of :data:`INSTALL_STEPS` as the install passes it.
        probe: source of free-disk / available-RAM numbers (tests inject them); default: this machine.
        allow_downgrade: install an older version, or a bundle of another name, over the active one (refused
            otherwise, as OTA updaters do).

    Returns:
        An :class:`InstallResult`; ``changed`` is False when the same bundle was already active.

    Raises:
        NotInitializedError: the data dir has no state.
        InstallInProgressError: another install or rollback holds the lock.
        InputNotFoundError, BundleFormatError, UnsafeMemberError, ManifestError, UnsupportedFormatVersion,
            SignatureError, IntegrityError: the bundle cannot be trusted (nothing was written).
        InsufficientResourcesError: not enough disk or RAM (nothing was written).
        SlotCheckError: the unpacked bundle failed ``check``; the slot is emptied.
        DowngradeError: an older version or another bundle name than the active one, without ``allow_downgrade``.
        OutputNotWritableError: the data dir cannot be written (disk full, permissions).
        In every case the previously active bundle stays active and intact, except in a repair in place (module
        doc): a failure while it writes leaves no bundle active and the rollback target intact (the message
        says so).
    """
    t0 = time.monotonic()
    dd = _as_data_dir(data_dir)
    bundle = Path(bundle)

    def step(name: str) -> None:
        log.debug("install step %s", name)
        if on_step is not None:
            on_step(name)

    with dd.lock():
        state = clean_leftovers(dd, dd.state())
        with BundleReader(bundle) as reader:
            manifest = reader.manifest
            label = manifest.label
            manifest_sha = hashlib.sha256(reader.manifest_bytes).hexdigest()
            trusted = dd.trusted_keys()
            if not trusted:
                raise SignatureError(f"data dir {dd.root} trusts no builder key, so no bundle can be verified",
                                     hint=f"run `fieldpack device init --data-dir {dd.root} --trust builder.pub`")
            active = state.active
            old = state.slots[active] if active else None
            damage: str | None = None
            if old is not None and old.manifest_sha256 == manifest_sha:
                damage = (slot_damage(dd, active) if dd.slot_complete(active, state)
                          else "its manifest.json or slot.json no longer matches the state")
                if damage is None:  # the file is still checked whole: a damaged copy is refused, not "installed"
                    key = reader.verify(trusted, on_progress=_counter("verify", reader.payload_bytes, on_progress))
                    msg = f"{label} is already active in slot {active}; nothing to do"
                    log.info(msg)
                    prev = state.slots[state.previous].label if state.previous else None
                    return InstallResult(label, active, dd.slot_path(active), prev, False, msg,
                                         seconds=time.monotonic() - t0, key_id=key.key_id)
                log.warning("active slot %s is damaged (%s); repairing it from %s", active, damage, bundle)
            elif old is not None and not allow_downgrade:
                check_upgrade(old.label, manifest.name, manifest.version)

            total = reader.payload_bytes
            key = reader.verify(trusted, on_progress=_counter("verify", total, on_progress))
            log.info("%s: signature by %s and %d member hashes verified", bundle, key.key_id,
                     len(manifest.members))
            step("after-verify")

            # A repair writes into the damaged slot itself when the other slot holds the rollback target, so
            # that bundle survives; with no rollback target it goes to the empty slot like any install.
            in_place = damage is not None and state.previous is not None
            target = active if in_place else dd.inactive_slot(state)
            kept = state.slots[state.previous].label if in_place else None  # in_place: previous is set
            check_feasibility(manifest, total, dd.root, reclaimable_bytes=dd.slot_size(target), n_ctx=n_ctx,
                              probe=probe)

            if in_place:  # the damaged copy stops being active before it is overwritten (see the module doc)
                state = State(active=None, previous=state.previous, slots={**state.slots, target: None},
                              updated_at=utc_now())
                dd.write_state(state)
                outcome = (f"no bundle is active now and {kept} is kept for rollback: retry the install, or "
                           f"`fieldpack rollback --data-dir {dd.root}` to run {kept}")
            else:
                if state.slots[target] is not None:  # the rollback target is about to be overwritten
                    state = state.forget(target)
                    dd.write_state(state)
                outcome = f"{old.label} stays active" if old else "no bundle is active yet"
            dd.clear_slot(target, state)
            path = dd.slot_path(target)
            try:
                reader.extract_to(path, on_progress=_counter("unpack", total, on_progress),
                                  on_member=_mid_unpack_hook(step))
                atomic_write_bytes(path / fmt.MANIFEST_NAME, reader.manifest_bytes)
                if reader.signature_bytes is not None:
                    atomic_write_bytes(path / fmt.SIGNATURE_NAME, reader.signature_bytes)
                fsync_dir(path)
                step("after-unpack")
            except FieldpackError as exc:  # disk full, bundle changed since verify: free the space now
                _clear_quietly(dd, target)
                if in_place:  # the active bundle is gone: say so
                    exc.message = f"{' '.join(exc.message.split()).rstrip('.')}; {outcome}"
                raise
            except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM (stop_on_sigterm): no partial copy
                _clear_quietly(dd, target)
                raise

        try:  # until the switch the slot is nobody's: an interrupted install empties it on the way out
            if check is not None:
                _run_check(check, dd, target, manifest, outcome)
            step("after-check")

            info = SlotInfo(label=label, manifest_sha256=manifest_sha, installed_at=utc_now(), payload_bytes=total,
                            key_id=key.key_id)
            dd.write_slot_record(target, info)
            fsync_dir(path)
            step("before-switch")
        except (KeyboardInterrupt, SystemExit):
            _clear_quietly(dd, target)
            raise

        new_state = State(active=target, previous=active if old is not None and damage is None else state.previous,
                          slots={**state.slots, target: info}, updated_at=utc_now())
        dd.write_state(new_state)
        step("after-switch")
        if damage is not None and not in_place and active is not None:  # the damaged copy is no rollback target
            new_state = new_state.forget(active)
            dd.write_state(new_state)
            _clear_quietly(dd, active)

    seconds = time.monotonic() - t0
    if in_place:
        msg = f"repaired {label} in slot {target}: it was damaged ({damage}); {kept} kept for rollback"
    elif damage is not None:
        msg = f"repaired {label}: slot {active} was damaged ({damage}); reinstalled into slot {target}"
    else:
        msg = f"installed {label} into slot {target}" + (f" (replaced {old.label}, kept for rollback)" if old else "")
    log.info("%s: %d bytes in %.2f s", msg, total, seconds)
    previous = new_state.slots[new_state.previous].label if new_state.previous else None
    return InstallResult(label, target, path, previous, True, msg, payload_bytes=total,
                         seconds=seconds, key_id=key.key_id)


def slot_damage(dd: DataDir, slot: str) -> str | None:
    """Deep check of ``slot`` (every member's size and sha256, :meth:`DataDir.verify_slot`): ``None`` when it
    matches its manifest, else what is wrong, one line."""
    try:
        dd.verify_slot(slot)
    except FieldpackError as exc:
        return exc.message
    return None


def slot_damage_quick(dd: DataDir, slot: str) -> str | None:
    """Cheap check for ``status``: every member exists with its manifest size (no hashing). ``None`` if so."""
    try:
        manifest = dd.slot_manifest(slot)
    except FieldpackError as exc:
        return exc.message
    for m in manifest.members:
        try:
            size = (dd.slot_path(slot) / m.name).stat().st_size
        except OSError:
            return f"member {m.name} is missing"
        if size != m.size:
            return f"member {m.name} has {size} bytes, its manifest says {m.size}"
    return None


def _version_key(version: str) -> Any:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version)
    except InvalidVersion:
        return None


def check_upgrade(active_label: str, name: str, version: str) -> None:
    """Refuse a bundle of another name, or an older version, than the active ``name@version``.

    Versions are compared as PEP 440 versions when both parse (``1.10.0`` > ``1.9.0``); otherwise only a name
    change is refused. Raises :class:`DowngradeError`."""
    old_name, _, old_version = active_label.partition("@")
    if name != old_name:
        raise DowngradeError(f"{name}@{version} is another bundle than the active {active_label}",
                             hint="pass --allow-downgrade to replace it anyway")
    old_v, new_v = _version_key(old_version), _version_key(version)
    if old_v is not None and new_v is not None and new_v < old_v:
        raise DowngradeError(f"{name}@{version} is older than the active {active_label}",
                             hint="pass --allow-downgrade to install it anyway, or `fieldpack rollback` if it was the "
                                  "previous bundle")


def _counter(phase: str, total: int, on_progress: InstallProgress | None) -> Callable[[int], None] | None:
    if on_progress is None:
        return None
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        on_progress(phase, done, total)

    return step


def _mid_unpack_hook(step: InstallStep) -> Callable[[str], None]:
    seen = 0

    def on_member(name: str) -> None:
        nonlocal seen
        seen += 1
        if seen == 2:  # called before each member: the first one is fully written now
            step("mid-unpack")

    return on_member


#: Exit status of an install stopped by SIGTERM (128 + 15, as a shell reports a process killed by it).
SIGTERM_EXIT = 143


def stop_on_sigterm() -> None:
    """Make SIGTERM (``systemctl stop``, ``kill``, a supervisor's timeout) raise ``SystemExit(143)`` in this
    process, so an install it interrupts empties the slot it was writing on the way out (:func:`install_bundle`
    clears it on KeyboardInterrupt/SystemExit) instead of leaving a partial copy on disk until the next install.
    A SIGKILL or a power cut still leaves one; the next install clears it. Call from the main thread (Python
    installs signal handlers only there); elsewhere it does nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def _exit(_sig: int, _frame: object) -> None:
        raise SystemExit(SIGTERM_EXIT)

    signal.signal(signal.SIGTERM, _exit)


def _clear_quietly(dd: DataDir, slot: str) -> None:
    try:
        dd.clear_slot(slot)
    except FieldpackError:
        log.exception("could not empty slot %s; the next install will", slot)


def _run_check(check: SlotCheck, dd: DataDir, slot: str, manifest: Manifest, outcome: str) -> None:
    """Run ``check`` on ``slot``; on failure empty the slot and raise SlotCheckError ending with ``outcome``
    (what is active now, e.g. ``"demo@1.0.0 stays active"``)."""
    try:
        check(dd.slot_path(slot), manifest)
    except Exception as exc:
        _clear_quietly(dd, slot)
        if isinstance(exc, FieldpackError):
            reason, hint = " ".join(exc.message.split()).rstrip("."), exc.hint
        else:
            reason, hint = f"{type(exc).__name__}: {exc}", None
        raise SlotCheckError(f"{manifest.label} failed its post-install check in slot {slot} ({reason}); {outcome}",
                             hint=hint or "rebuild the bundle, or free RAM/disk on the device, then retry") from exc


def rollback(data_dir: DataDir | Path | None) -> InstallResult:
    """Make the previous slot active again (its ``slot.json`` must match the state). The bundle that was
    active becomes the previous one, so a second rollback rolls forward.

    Raises:
        NotInitializedError: the data dir has no state.
        InstallInProgressError: an install or rollback holds the lock.
        NoPreviousBundleError: there is no previous bundle, or its slot is incomplete.
    """
    t0 = time.monotonic()
    dd = _as_data_dir(data_dir)
    with dd.lock():
        state = dd.state()
        prev = state.previous
        if prev is None or not dd.slot_complete(prev, state):
            raise NoPreviousBundleError(f"no complete previous bundle to roll back to in {dd.root}",
                                        hint=f"install a bundle with `fieldpack install BUNDLE.fpk --data-dir {dd.root}`")
        new_state = State(active=prev, previous=state.active, slots=dict(state.slots), updated_at=utc_now())
        dd.write_state(new_state)
    info = state.slots[prev]
    back = state.slots[state.active].label if state.active else None
    msg = f"rolled back to {info.label} in slot {prev}" + (f" (previous: {back})" if back else "")
    log.info(msg)
    return InstallResult(info.label, prev, dd.slot_path(prev), back, True, msg,
                         seconds=time.monotonic() - t0, key_id=info.key_id)


def remove_slot(data_dir: DataDir | Path | None, slot_or_label: str) -> str:
    """Empty a non-active slot given by name (``a``/``b``) or by the ``name@version`` it holds; returns one line.

    Raises:
        UsageError: no such slot or bundle.
        ActiveSlotError: it holds the active bundle.
        InstallInProgressError: an install or rollback holds the lock.
    """
    from fieldpack.shared.errors import UsageError

    dd = _as_data_dir(data_dir)
    with dd.lock():
        state = dd.state()
        slot = slot_or_label if slot_or_label in SLOT_NAMES else next(
            (s for s, info in state.slots.items() if info is not None and info.label == slot_or_label), None)
        if slot is None:
            held = ", ".join(f"{s}={i.label}" for s, i in state.slots.items() if i) or "nothing"
            raise UsageError(f"no slot or installed bundle {slot_or_label!r} in {dd.root} (it holds {held})",
                             hint="see `fieldpack list`")
        if slot == state.active:
            raise ActiveSlotError(f"slot {slot} holds the active bundle",
                                  hint="install or roll back to another bundle first")
        if state.slots[slot] is None:  # files a failed install left are still cleared
            path = dd.slot_path(slot)
            leftovers = path.is_symlink() or (path.is_dir() and any(path.iterdir())) or path.is_file()
            dd.clear_slot(slot, state)
            return f"slot {slot} holds no bundle; " + ("its leftover files are removed" if leftovers
                                                       else "nothing to remove")
        label = state.slots[slot].label
        state = state.forget(slot)
        dd.write_state(state)
        dd.clear_slot(slot, state)
    return f"removed {label} from slot {slot}"


def status(data_dir: DataDir | Path | None) -> dict[str, Any]:
    """What is installed, JSON-ready.

    Returns:
        ``{"data_dir", "active", "previous", "slots": {name: {...}}, "trusted_keys": [key ids],
        "updated_at"}``; ``active``/``previous`` are slot records (``slot``, ``label``, ``installed_at``,
        ``manifest_sha256``, ``payload_bytes``, ``size_bytes`` on disk, ``complete``) or ``None``.

    Raises:
        NotInitializedError: the data dir has no state.
    """
    dd = _as_data_dir(data_dir)
    state = dd.state()

    def record(slot: str | None) -> dict[str, Any] | None:
        if slot is None or state.slots.get(slot) is None:
            return None
        info = state.slots[slot]
        complete = dd.slot_complete(slot, state)
        rec: dict[str, Any] = {
            "slot": slot, "label": info.label, "installed_at": info.installed_at,
            "manifest_sha256": info.manifest_sha256, "payload_bytes": info.payload_bytes, "key_id": info.key_id,
            "size_bytes": dd.slot_size(slot), "complete": complete,
            "damage": slot_damage_quick(dd, slot) if complete else "slot is incomplete",
        }
        if complete:
            try:
                m = dd.slot_manifest(slot)
            except FieldpackError:
                return rec
            rec["bundle"] = {"name": m.name, "version": m.version, "created_at": m.created_at.isoformat(),
                             "architecture": m.model.architecture, "file_type": m.model.file_type,
                             "parameters": m.model.parameter_count, "documents": m.index.documents,
                             "chunks": m.index.chunks, "n_ctx": m.runtime.n_ctx,
                             "memory_bytes": m.runtime.memory.total_bytes, "embedder": m.embedder.name}
        return rec

    return {
        "data_dir": str(dd.root),
        "active": record(state.active),
        "previous": record(state.previous),
        "slots": {s: record(s) for s in SLOT_NAMES},
        "trusted_keys": [k.key_id for k in dd.trusted_keys()],
        "updated_at": state.updated_at,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m fieldpack.device.install BUNDLE [--data-dir D] [--n-ctx N] [--no-check] [--progress]
    [--allow-downgrade]``.

    A bare entry for scripts and the crash tests; technicians use ``fieldpack install``. Prints the result on
    one line (stdout), or the error on one line (stderr) and exits with the error's ``exit_code``.
    ``--progress`` prints ``progress PHASE DONE TOTAL`` lines (bytes) to stdout as it goes.
    """
    p = argparse.ArgumentParser(prog="python -m fieldpack.device.install", description=main.__doc__)
    p.add_argument("bundle", type=Path)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--n-ctx", type=int, default=None)
    p.add_argument("--no-check", action="store_true", help="skip the runtime check (tests of the mechanics)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--allow-downgrade", action="store_true", help="as `fieldpack install --allow-downgrade`")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stop_on_sigterm()

    def progress(phase: str, done: int, total: int) -> None:
        print(f"progress {phase} {done} {total}", flush=True)

    try:
        check = None
        if not args.no_check:
            from fieldpack.device.runtime import check_slot
            check = check_slot
        result = install_bundle(args.bundle, args.data_dir, check=check, n_ctx=args.n_ctx,
                                on_progress=progress if args.progress else None,
                                allow_downgrade=args.allow_downgrade)
    except FieldpackError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    print(result.message, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
