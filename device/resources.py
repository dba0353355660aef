"""Can this device hold and run a bundle? Free disk, available RAM, and the KV-cache arithmetic.

psutil is used when it is installed (it is in the ``device`` extra); without it the numbers come from
``os.statvfs`` (disk) and ``/proc/meminfo`` ``MemAvailable`` (RAM, Linux >= 3.14), falling back to
``sysconf(SC_AVPHYS_PAGES)`` elsewhere. Every size here is in bytes; messages show MiB.

The RAM a bundle needs is what its manifest says (``runtime.memory.total_bytes``, computed by the builder at
``runtime.n_ctx``), with the KV-cache part recomputed when the device is configured with another ``n_ctx``:
the formula is :func:`fieldpack.shared.kv_cache.kv_cache_bytes`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fieldpack.shared.errors import InsufficientResourcesError
from fieldpack.shared.kv_cache import kv_cache_bytes
from fieldpack.shared.manifest import Manifest

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: Free disk kept in reserve after an install, on top of the payload (bytes): the larger of this and
#: :data:`DISK_MARGIN_FRACTION` of the payload. Room for logs, sqlite journals and the state file.
DISK_MARGIN_BYTES = 16 * MIB
DISK_MARGIN_FRACTION = 0.02
#: Bytes per KV-cache element (llama.cpp's default cache type is f16).


def free_disk_bytes(path: Path) -> int:
    """Bytes an unprivileged process can still write on the file system holding ``path`` (must exist)."""
    try:
        import psutil
    except ImportError:
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize
    return int(psutil.disk_usage(str(path)).free)


def _meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key == "MemAvailable":
            value, *unit = rest.split()
            return int(value) * (1024 if unit and unit[0].lower() == "kb" else 1)
    return None


def available_ram_bytes() -> int:
    """RAM that can be allocated without swapping (bytes): psutil's ``available``, else ``MemAvailable``."""
    try:
        import psutil
    except ImportError:
        pass
    else:
        return int(psutil.virtual_memory().available)
    avail = _meminfo_available()
    if avail is not None:
        return avail
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def ram_needed(manifest: Manifest, n_ctx: int | None = None) -> int:
    """RAM the bundle needs resident (bytes) at ``n_ctx`` tokens (default: the manifest's ``runtime.n_ctx``).

    The manifest's own KV-cache figure is replaced by :func:`kv_cache_bytes` at ``n_ctx`` when that differs
    from the manifest's ``n_ctx``; the other parts (weights, embedder, index, overhead) are taken as given.
    """
    mem = manifest.runtime.memory
    if n_ctx is None or n_ctx == manifest.runtime.n_ctx:
        return mem.total_bytes
    m = manifest.model
    kv = kv_cache_bytes(n_ctx, n_layer=m.n_layer, n_head_kv=m.n_head_kv, head_dim=m.n_embd // m.n_head)
    return mem.total_bytes - mem.kv_cache_bytes + kv


def disk_needed(payload_bytes: int) -> int:
    """Free disk an install of ``payload_bytes`` of members needs (bytes), margin included."""
    return payload_bytes + max(DISK_MARGIN_BYTES, int(payload_bytes * DISK_MARGIN_FRACTION))


@dataclass(frozen=True)
class ResourceProbe:
    """Where the free-space and free-RAM numbers come from. Tests inject fixed numbers; the default reads
    the machine (:func:`free_disk_bytes`, :func:`available_ram_bytes`)."""

    free_disk: Callable[[Path], int] = field(default=free_disk_bytes)
    available_ram: Callable[[], int] = field(default=available_ram_bytes)


@dataclass(frozen=True)
class Feasibility:
    """The numbers an install was judged on (bytes)."""

    disk_needed: int
    disk_free: int
    ram_needed: int
    ram_available: int


def check_feasibility(manifest: Manifest, payload_bytes: int, data_dir: Path, *, reclaimable_bytes: int = 0,
                      n_ctx: int | None = None, probe: ResourceProbe | None = None,
                      bundle_label: str | None = None) -> Feasibility:
    """Refuse a bundle that will not fit on disk or in RAM.

    Args:
        manifest: the bundle's validated manifest (memory needs, model shape).
        payload_bytes: bytes the install will write (sum of member sizes).
        data_dir: a folder on the file system the bundle goes to.
        reclaimable_bytes: bytes the install frees before writing (the inactive slot's old contents).
        n_ctx: context the device will run with (tokens); ``None`` = the manifest's default.
        probe: where free disk / RAM come from (default: this machine).
        bundle_label: ``name@version`` for messages (default: the manifest's label).

    Returns:
        The numbers compared.

    Raises:
        InsufficientResourcesError: disk or RAM below what is needed; the message gives both numbers in MiB.
    """
    probe = probe or ResourceProbe()
    label = bundle_label or manifest.label
    need_disk = disk_needed(payload_bytes)
    free = probe.free_disk(Path(data_dir)) + reclaimable_bytes
    if free < need_disk:
        raise InsufficientResourcesError(
            f"not enough disk for {label} in {data_dir}: needs {need_disk / MIB:.1f} MiB, "
            f"{free / MIB:.1f} MiB free",
            hint="free space on that file system or pick a --data-dir on a larger one")
    need_ram = ram_needed(manifest, n_ctx)
    avail = probe.available_ram()
    if avail < need_ram:
        ctx = n_ctx if n_ctx is not None else manifest.runtime.n_ctx
        raise InsufficientResourcesError(
            f"not enough RAM for {label} at n_ctx={ctx}: needs {need_ram / MIB:.1f} MiB, "
            f"{avail / MIB:.1f} MiB available",
            hint="stop other programs, configure a smaller n_ctx, or rebuild with a smaller model or quant type")
    log.debug("feasible: disk %d/%d bytes, RAM %d/%d bytes", need_disk, free, need_ram, avail)
    return Feasibility(need_disk, free, need_ram, avail)
