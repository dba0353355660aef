"""Crash-safe file writes: write to a temp path in the same folder, fsync, rename, fsync the folder.

A reader never sees a half-written file: it sees the old one or the new one (POSIX ``rename(2)`` is atomic
within a file system). A failure (disk full, permission) removes the temp file and raises
:class:`shared.errors.OutputNotWritableError` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fieldpack.shared.errors import OutputNotWritableError


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename or create inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _explain(path: Path, exc: OSError) -> OutputNotWritableError:
    if exc.errno == errno.ENOSPC:
        return OutputNotWritableError(
            f"disk full while writing {path}", hint=f"free space on the file system of {path.parent} and retry"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputNotWritableError(
            f"cannot write {path}: {exc.strerror}", hint="choose a writable output path or fix its permissions"
        )
    if exc.errno == errno.ENOENT:
        return OutputNotWritableError(
            f"cannot write {path}: folder {path.parent} does not exist", hint="create the folder first"
        )
    return OutputNotWritableError(f"cannot write {path}: {exc}", hint="check the output path")


@contextlib.contextmanager
def atomic_writer(path: Path, mode: int = 0o644) -> Iterator[BinaryIO]:
    """Open a binary temp file beside ``path``; on clean exit fsync it and rename it onto ``path``.

    Args:
        path: final destination. Its folder must exist.
        mode: permission bits of the final file.

    Raises:
        OutputNotWritableError: the folder is missing or not writable, or the disk filled up. The temp file is
            removed and ``path`` is left as it was.
    """
    with atomic_path(path, mode) as tmp:  # one temp/fsync/rename/cleanup mechanism for both entry points
        with open(tmp, "xb") as fh:
            yield fh
            fh.flush()


def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, mode) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_writer`)."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def fsync_file(path: Path) -> None:
    """fsync a file that another writer (a library, a native tool) closed, so its bytes are on disk."""
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextlib.contextmanager
def atomic_path(path: Path, mode: int | None = 0o644, *, suffix: str = ".tmp") -> Iterator[Path]:
    """Give a temp path beside ``path`` for a writer that wants a file name, not a file object (llama.cpp's
    quantizer, gguf-py's writer, matplotlib, SQLite, safetensors); on clean exit fsync the file, rename it onto
    ``path`` and fsync the folder. The temp file does not exist when the block starts.

    Args:
        path: final destination. Its folder must exist.
        mode: permission bits of the final file; ``None`` keeps what the writer made.
        suffix: end of the temp name (some writers pick the format from it, e.g. ``".png.tmp"`` is not a PNG).

    Raises:
        OutputNotWritableError: the folder is missing or not writable, or the disk filled up.
        Whatever the block raises; in every failure the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise _explain(path, exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        fsync_file(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _explain(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
