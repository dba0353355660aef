"""The build cache: stage results stored by the hash of their inputs, verified by sha256 before reuse.

Layout under the cache root (default :func:`default_cache_dir`)::

    <root>/<stage>/<key>/record.json   the stage record (paths inside out/ stored as "@out/<rel>")
    <root>/<stage>/<key>/files.json    {relative path: {"size": bytes, "sha256": hex}} of every artefact
    <root>/<stage>/<key>/key.json      what the key hashed (versions, code fingerprints, inputs): why it reran
    <root>/<stage>/<key>/out/...       the artefacts (GGUF, ONNX, index, chunks.jsonl, ...)
    <root>/<stage>/.<key>.lock         flock: concurrent builds wait for one computation (removed after)

An entry is written into ``.<key>.<pid>.tmp/``, every file fsynced, then renamed into place (one atomic
``rename(2)``), so a killed build leaves either no entry or a whole one. Before reuse every artefact is
re-hashed against ``files.json``; a missing, truncated or altered file discards the entry and the stage reruns.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fieldpack.builder.stages.base import Stage, StageInputs, StageRecord
from fieldpack.shared.atomic import atomic_write_bytes, fsync_dir
from fieldpack.shared.bundle import hash_file
from fieldpack.shared.errors import OutputNotWritableError
from pydantic import ValidationError

log = logging.getLogger(__name__)

R = TypeVar("R", bound=StageRecord)
StageHook = Callable[[str, str], None]  # (stage title, "start" | "done" | "cached")

_OUT = "@out"


def default_cache_dir() -> Path:
    """``$FIELDPACK_BUILD_CACHE``, else ``$XDG_CACHE_HOME/fieldpack/build``, else ``~/.cache/fieldpack/build``."""
    env = os.environ.get("FIELDPACK_BUILD_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "fieldpack" / "build"


class StageCache:
    """Stage results under ``root`` keyed by :meth:`Stage.key`.

    Raises:
        OutputNotWritableError: ``root`` cannot be created or written.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputNotWritableError(f"cannot create build cache {self.root}: {exc.strerror}",
                                         hint="pass --cache-dir a writable folder, or --no-cache") from exc

    def entry(self, stage: Stage[Any, Any], key: str) -> Path:
        """The folder of ``stage``'s entry for ``key``."""
        return self.root / stage.name / key

    @contextmanager
    def lock(self, stage: Stage[Any, Any], key: str) -> Iterator[None]:
        """Exclusive flock for one (stage, key): a second build waits, then finds the entry.

        The lock file is removed when the holder is done, so finished keys leave no ``.lock`` files behind. A
        waiter that wakes holding a file that was unlinked meanwhile (its inode no longer at the path) opens
        the path again: the usual lock-then-verify-inode pattern, so two holders never overlap."""
        d = self.root / stage.name
        d.mkdir(parents=True, exist_ok=True)
        path = d / f".{key}.lock"
        while True:
            fh = open(path, "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX)
                held, now = os.fstat(fh.fileno()), os.stat(path)
            except FileNotFoundError:  # unlinked between our flock and stat: try the new file
                fh.close()
                continue
            except BaseException:
                fh.close()
                raise
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                break
            fh.close()
        try:
            yield
        finally:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    def load(self, stage: Stage[Any, R], key: str) -> R | None:
        """The cached record with its artefacts verified, or None (absent, or discarded as damaged)."""
        entry = self.entry(stage, key)
        if not (entry / "record.json").is_file():
            return None
        files, problem = _verify(entry)
        record: R | None = None
        if problem is None:
            try:
                doc = json.loads((entry / "record.json").read_text(encoding="utf-8"))
                doc["files"] = {rel: {"path": str(entry / "out" / rel), **f} for rel, f in files.items()}
                record = stage.record.model_validate(_resolve(doc, entry / "out"))
            except (OSError, ValueError, ValidationError) as exc:
                problem = f"record.json unreadable ({str(exc).splitlines()[0]})"
        if problem is not None:
            log.warning("build cache: %s entry %s discarded: %s; rebuilding", stage.name, key[:12], problem)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        assert record is not None
        record.cached = True
        return record

    def store(self, stage: Stage[Any, R], key: str, compute: Callable[[Path], R], *,
              key_doc: dict[str, Any] | None = None) -> R:
        """Run ``compute(out_dir)`` in a temp entry, record its artefacts, rename the entry into place and
        return the record as loaded from there (paths pointing into the final entry)."""
        entry = self.entry(stage, key)
        tmp = entry.with_name(f".{key}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:  # from the first mkdir on: a Ctrl-C or SIGTERM at any point removes the temp entry
            (tmp / "out").mkdir(parents=True)
            record = compute(tmp / "out")
            files = _describe(tmp / "out")
            doc = _relativise(record.model_dump(mode="json", exclude={"cached", "files"}), tmp / "out")
            atomic_write_bytes(tmp / "files.json", json.dumps(files, indent=1, sort_keys=True).encode())
            if key_doc is not None:
                atomic_write_bytes(tmp / "key.json", json.dumps(key_doc, indent=1, sort_keys=True).encode())
            atomic_write_bytes(tmp / "record.json", json.dumps(doc, indent=1, sort_keys=True).encode())
            shutil.rmtree(entry, ignore_errors=True)
            os.rename(tmp, entry)
            fsync_dir(entry.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        loaded = self.load(stage, key)
        if loaded is None:  # pragma: no cover - the entry was just written and verified
            raise OutputNotWritableError(f"build cache entry {entry} did not survive writing",
                                         hint="check the disk, or build with --no-cache")
        loaded.cached = False
        return loaded


@dataclass
class StageTiming:
    """One stage's wall time in seconds (lookup + verification when ``cached``)."""

    name: str
    seconds: float
    cached: bool = False


@dataclass
class Runner:
    """Runs stages through a :class:`StageCache`, reports progress and keeps the timings.

    ``runner(stage, inputs)`` returns the stage's record: from the cache when an entry for the inputs' key
    verifies (``record.cached`` is True, the hook gets ``"cached"``), else computed and stored.
    """

    cache: StageCache | None
    on_stage: StageHook | None = None
    timings: list[StageTiming] = field(default_factory=list)

    def __call__(self, stage: Stage[StageInputs, R], inputs: StageInputs) -> R:
        if self.cache is None:
            raise RuntimeError("Runner.cache is not set")  # a programming error, not a user's
        title = stage.title(inputs)
        t0 = time.perf_counter()
        key_doc = stage.key_doc(inputs)
        key = stage.key(inputs)
        with self.cache.lock(stage, key):
            record = self.cache.load(stage, key)
            if record is None:
                self._hook(title, "start")
                log.info("stage %s (key %s)", title, key[:12])
                record = self.cache.store(stage, key, lambda out: stage.fn(inputs, out), key_doc=key_doc)
            # told as soon as the entry is kept, before the lock's clean-up: an interrupt that lands after this
            # is "after" the stage (a plan stopped then said "while" and had kept it)
            self.timings.append(StageTiming(title, time.perf_counter() - t0, record.cached))
            self._hook(title, "cached" if record.cached else "done")
        return record

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        """Time and report a step that is not cached (input checks, the bundle)."""
        t0 = time.perf_counter()
        self._hook(title, "start")
        yield
        self.timings.append(StageTiming(title, time.perf_counter() - t0))
        self._hook(title, "done")

    def _hook(self, title: str, event: str) -> None:
        if self.on_stage:
            self.on_stage(title, event)


def _describe(out: Path) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb+") as fh:
                os.fsync(fh.fileno())
            size, digest = hash_file(p)
            files[p.relative_to(out).as_posix()] = {"size": size, "sha256": digest}
    for d in sorted({p.parent for p in out.rglob("*")} | {out}, key=lambda q: -len(q.parts)):
        fsync_dir(d)
    return files


def _verify(entry: Path) -> tuple[dict[str, dict[str, Any]], str | None]:
    """(files.json, None) if every artefact it lists is present with its size and sha256, else (_, what is
    wrong)."""
    try:
        files = json.loads((entry / "files.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}, "files.json missing or unreadable"
    for rel, want in files.items():
        p = entry / "out" / rel
        if not p.is_file():
            return files, f"{rel} is missing"
        size, digest = hash_file(p)
        if size != want.get("size") or digest != want.get("sha256"):
            return files, f"{rel} does not match its recorded sha256"
    return files, None


def _relativise(doc: Any, out: Path) -> Any:
    prefix = str(out)
    if isinstance(doc, str) and (doc == prefix or doc.startswith(prefix + os.sep)):
        return _OUT + doc[len(prefix):]
    if isinstance(doc, dict):
        return {k: _relativise(v, out) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_relativise(v, out) for v in doc]
    return doc


def _resolve(doc: Any, out: Path) -> Any:
    if isinstance(doc, str) and (doc == _OUT or doc.startswith(_OUT + "/")):
        return str(out) + doc[len(_OUT):]
    if isinstance(doc, dict):
        return {k: _resolve(v, out) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_resolve(v, out) for v in doc]
    return doc
