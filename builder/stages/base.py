"""The stage contract's building blocks: content-addressed inputs, result records, and the stage descriptor.

A :class:`Stage` is a pure-ish function ``fn(inputs, out_dir) -> record``:

- ``inputs`` is a frozen pydantic model. Its plain fields (numbers, strings, option dicts) and the ``sha256`` of
  its :class:`Input` fields make the cache key; an ``Input``'s ``path`` only says where to read, so a moved
  but unchanged docs folder or checkpoint still hits the cache.
- ``out_dir`` is an empty folder the stage writes its artefacts into (and nothing else).
- the record is a pydantic :class:`StageRecord` subclass, JSON-serialisable (paths, sha256, counts, figures).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Generic, TypeVar

from fieldpack.shared.bundle import hash_file
from pydantic import BaseModel, ConfigDict

#: Bump when the cache layout or key recipe changes: every entry written before is then ignored.
CACHE_FORMAT = "stage-cache-1"


class Input(BaseModel):
    """A file or folder a stage reads: where (``path``) and what (``sha256`` of its content).

    For a folder, ``sha256`` is :func:`hash_tree` (relative POSIX paths and file digests, sorted); only the
    digest goes into a cache key.
    """

    model_config = ConfigDict(frozen=True)

    path: Path
    sha256: str

    @classmethod
    def file(cls, path: Path, sha256: str | None = None) -> "Input":
        """An input file; hashes it unless ``sha256`` is already known (e.g. from an upstream record)."""
        return cls(path=Path(path), sha256=sha256 or hash_file(Path(path))[1])

    @classmethod
    def tree(cls, path: Path) -> "Input":
        """An input folder, hashed with :func:`hash_tree`."""
        return cls(path=Path(path), sha256=hash_tree(Path(path)))


class StageInputs(BaseModel):
    """Base of every stage's inputs: frozen, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def key_material(self) -> dict[str, Any]:
        """The part of the inputs that decides the result: every field, an :class:`Input` by its digest only."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            v = getattr(self, name)
            out[name] = v.sha256 if isinstance(v, Input) else _jsonable(v)
        return out


class Artefact(BaseModel):
    """A file a stage wrote: absolute path, size in bytes, sha256 (hex)."""

    path: Path
    size: int
    sha256: str

    def as_input(self) -> Input:
        """This artefact as a downstream stage's :class:`Input` (no re-hashing)."""
        return Input(path=self.path, sha256=self.sha256)


class StageRecord(BaseModel):
    """Base of every stage's result record; everything in it is JSON (NaN kept as ``NaN``).

    Set by the cache, never stored in ``record.json``: ``cached`` (True: reused, not recomputed) and ``files``
    (every artefact under the entry's ``out/``, by relative POSIX path, verified before reuse).
    """

    model_config = ConfigDict(ser_json_inf_nan="constants")

    cached: bool = False
    files: dict[str, Artefact] = {}

    def artefact(self, name: str) -> Artefact:
        """The artefact ``name`` (relative to the stage's ``out/``). Raises KeyError naming what exists."""
        try:
            return self.files[name]
        except KeyError:
            raise KeyError(f"{type(self).__name__} has no artefact {name!r} (has {sorted(self.files)})") from None

    def input_for(self, path: Path) -> Input:
        """The artefact at ``path`` (a path the record names, e.g. ``conversion.path``) as a downstream input."""
        for a in self.files.values():
            if a.path == Path(path):
                return a.as_input()
        raise KeyError(f"{type(self).__name__} has no artefact at {path}")


I = TypeVar("I", bound=StageInputs)
R = TypeVar("R", bound=StageRecord)


@dataclass(frozen=True)
class Stage(Generic[I, R]):
    """One build stage.

    Attributes:
        name: progress label and cache sub-folder (``"convert"``).
        version: bump when the stage's output changes for the same inputs (a new algorithm).
        record: the record class ``fn`` returns (used to load a cached record).
        fn: ``fn(inputs, out_dir) -> record``; writes only inside ``out_dir``.
        libraries: distributions whose versions go into the key (``"torch"``, ``"llama_cpp_python"``...).
        code: modules (``fieldpack.builder.convert``) whose source files go into the key, so editing the
            code that makes an artefact invalidates it even when the package version is unchanged.
    """

    name: str
    version: str
    record: type[R]
    fn: Callable[[I, Path], R]
    libraries: tuple[str, ...] = ()
    code: tuple[str, ...] = ()
    label: Callable[[I], str] | None = field(default=None, compare=False)

    def key(self, inputs: I) -> str:
        """64 hex digits: sha256 of :meth:`key_doc` (canonical JSON)."""
        doc = json.dumps(self.key_doc(inputs), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()

    def key_doc(self, inputs: I) -> dict[str, Any]:
        """What the key hashes: the stage, its version, fieldpack's version, library versions, the code
        fingerprint and :meth:`StageInputs.key_material` (kept as ``key.json`` in the cache entry, to tell
        why a stage reran)."""
        return {
            "format": CACHE_FORMAT,
            "stage": self.name,
            "version": self.version,
            "fieldpack": _dist_version("fieldpack"),
            "libraries": {lib: _dist_version(lib) for lib in sorted(self.libraries)},
            "code": {m: code_fingerprint(m) for m in sorted(self.code)},
            "inputs": inputs.key_material(),
        }

    def title(self, inputs: I) -> str:
        """Progress label, e.g. ``quantize Q4_K_M``."""
        return self.label(inputs) if self.label else self.name


def hash_tree(root: Path) -> str:
    """sha256 over a folder's files (those inside hidden folders and ``__pycache__`` skipped, as ingest does; a
    hidden file counts, since ingest reports it as skipped): for each file in sorted
    relative-POSIX-path order, the path, a NUL, its sha256, a NUL. A file is hashed at most once per
    (path, size, mtime_ns, inode) in this process."""
    h = hashlib.sha256(b"tree-1\0")
    for p in sorted(root.rglob("*"), key=lambda q: q.relative_to(root).as_posix()):
        rel = p.relative_to(root)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts[:-1]) or not p.is_file():
            continue
        st = p.stat()
        digest = _file_digest(str(p), st.st_size, st.st_mtime_ns, st.st_ino)
        h.update(rel.as_posix().encode() + b"\0" + digest.encode() + b"\0")
    return h.hexdigest()


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return hash_file(Path(path))[1]


@lru_cache(maxsize=None)
def code_fingerprint(module: str) -> str:
    """sha256 of the source files of ``module`` (a package: every ``.py`` under it), 16 hex digits."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return "absent"
    origin = Path(spec.origin)
    files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "absent"


def _jsonable(v: Any) -> Any:
    if isinstance(v, BaseModel):
        return v.model_dump(mode="json")
    if isinstance(v, Path):
        return os.fspath(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v
