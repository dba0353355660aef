"""Hands the daemon the engine of the currently active bundle, reloading it between requests after an install
or rollback (:class:`device.types.EngineProvider`)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from fieldpack.device.runtime import Runtime
from fieldpack.device.slots import DataDir
from fieldpack.shared.errors import NoActiveBundleError

log = logging.getLogger(__name__)


class ActiveBundleProvider:
    """Owns at most one :class:`Runtime` (the active slot's) and swaps it when ``state.json`` changes.

    ``get()`` reads the state (one small file) and compares the active slot and its manifest sha256 with what
    is loaded; on a change it closes the old runtime (freeing the model, ONNX session and DB connection) before
    loading the new one, so two models are never resident at once. Call it between requests only.

    Raises (from ``get``):
        NoActiveBundleError: nothing is installed.
        RuntimeLoadError: the active bundle cannot be loaded.
    """

    def __init__(self, data_dir: DataDir, *, n_ctx: int | None = None, threads: int | None = None) -> None:
        self.data_dir = data_dir
        self.n_ctx, self.threads = n_ctx, threads
        self._key: tuple[str, str] | None = None
        self._runtime: Runtime | None = None
        self._lock = threading.Lock()
        self.loading = False
        """True while a bundle is being loaded (first load or a switch after install/rollback)."""

    def _active_key(self) -> tuple[str, str, Path]:
        path = self.data_dir.require_active_slot_path()
        state = self.data_dir.state()
        info = state.slots.get(path.name)
        if info is None:  # the state names an active slot it knows nothing of: same as nothing installed
            raise NoActiveBundleError(f"no bundle is installed in {self.data_dir.root}",
                                      hint=f"run `fieldpack install BUNDLE.fpk --data-dir {self.data_dir.root}`")
        return path.name, info.manifest_sha256, path

    def active_label(self) -> str | None:
        """``name@version`` of the active bundle from ``state.json`` (no model load), or ``None``."""
        try:
            state = self.data_dir.state()
        except Exception:  # noqa: BLE001 - a cheap hint for the Last Will; get() reports real problems
            return None
        info = state.slots.get(state.active) if state.active else None
        return info.label if info else None

    def get(self) -> Runtime:
        with self._lock:
            slot, sha, path = self._active_key()
            if self._runtime is None or self._key != (slot, sha):
                if self._runtime is not None:
                    log.info("active bundle changed (slot %s); reloading", slot)
                    self._runtime.close()
                    self._runtime = None
                self.loading = True
                try:
                    self._runtime = Runtime(Path(path), n_ctx=self.n_ctx, threads=self.threads)
                finally:
                    self.loading = False
                self._key = (slot, sha)
            return self._runtime

    def close(self) -> None:
        with self._lock:
            if self._runtime is not None:
                self._runtime.close()
                self._runtime = None
                self._key = None
