"""On-disk staging of a bundle that arrives in chunks, resumable across restarts; never the whole bundle in RAM.

Layout, one folder per bundle (keyed by the ``.fpk`` sha256, so a re-pushed rollout of the same bundle
resumes)::

    <data_dir>/fleet/staging/<sha256>/bundle.part   the .fpk being assembled, each chunk written at its offset
    <data_dir>/fleet/staging/<sha256>/chunks.log    one line per staged chunk: "<index> <sha256 of its bytes>"

A chunk counts as staged once its line is in the log. On open, every logged chunk is re-hashed from
``bundle.part`` (a power cut may have kept the log line but not the data); mismatches are dropped and will
be asked for again. The data file is fsynced before the log, every :data:`SYNC_EVERY` chunks and at the end.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from fieldpack.shared.errors import IntegrityError, OutputNotWritableError

log = logging.getLogger(__name__)

SYNC_EVERY = 16
HASH_BLOCK = 1 << 20


def staging_root(data_dir: Path) -> Path:
    return Path(data_dir) / "fleet" / "staging"


class ChunkStore:
    """Chunks of one bundle file on disk.

    Args:
        folder: this bundle's staging folder (created).
        size: bytes of the whole file; ``chunk_size``: bytes per chunk (the last may be shorter).

    Raises:
        OutputNotWritableError: the folder cannot be written.
    """

    def __init__(self, folder: Path, size: int, chunk_size: int) -> None:
        self.folder = Path(folder)
        self.size, self.chunk_size = size, chunk_size
        self.chunks = -(-size // chunk_size)
        self.part_path = self.folder / "bundle.part"
        self.log_path = self.folder / "chunks.log"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT, 0o644)
            os.ftruncate(self._fd, size)
        except OSError as exc:
            raise OutputNotWritableError(f"cannot stage a bundle in {self.folder} ({exc})",
                                         hint="check the data dir's permissions and free space") from exc
        self.have: set[int] = self._recover()
        self._prefix = 0
        self._log = open(self.log_path, "a", encoding="ascii")
        self._unsynced = 0

    def _recover(self) -> set[int]:
        have: set[int] = set()
        if not self.log_path.is_file():
            return have
        lines = self.log_path.read_text(encoding="ascii", errors="replace").splitlines()
        good: list[str] = []
        for line in lines:
            parts = line.split()
            if len(parts) != 2 or not parts[0].isdigit():
                continue
            index, digest = int(parts[0]), parts[1]
            if index >= self.chunks or index in have:
                continue
            if hashlib.sha256(self.read(index)).hexdigest() == digest:
                have.add(index)
                good.append(line)
            else:
                log.warning("staged chunk %d of %s does not match its log line; asking again", index, self.folder.name)
        if len(good) != len(lines):
            tmp = self.log_path.with_suffix(".tmp")
            tmp.write_text("".join(f"{g}\n" for g in good), encoding="ascii")
            os.replace(tmp, self.log_path)
        return have

    def chunk_len(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def read(self, index: int) -> bytes:
        """Bytes of chunk ``index`` as on disk."""
        return os.pread(self._fd, self.chunk_len(index), index * self.chunk_size)

    def missing(self, limit: int | None = None) -> list[int]:
        """Indices not staged yet, ascending (at most ``limit``)."""
        out: list[int] = []
        for i in range(self.have_prefix(), self.chunks):
            if i not in self.have:
                out.append(i)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def have_prefix(self) -> int:
        """Number of chunks staged without a gap from index 0."""
        while self._prefix < self.chunks and self._prefix in self.have:
            self._prefix += 1
        return self._prefix

    @property
    def complete(self) -> bool:
        return len(self.have) == self.chunks

    def put(self, index: int, data: bytes | memoryview, sha256: str) -> bool:
        """Stage chunk ``index`` after checking its length and sha256; False when it was already staged.

        Raises:
            IntegrityError: wrong length or hash (a corrupted chunk; nothing is written).
            OutputNotWritableError: the write failed (disk full).
        """
        if index in self.have:
            return False
        if not 0 <= index < self.chunks or len(data) != self.chunk_len(index):
            raise IntegrityError(f"chunk {index} has {len(data)} bytes, expected {self.chunk_len(index) if 0 <= index < self.chunks else 0}",
                                 hint="it is asked for again")
        digest = hashlib.sha256(data).hexdigest()
        if digest != sha256:
            raise IntegrityError(f"chunk {index} hashes to {digest[:12]}…, its header says {sha256[:12]}…",
                                 hint="it is asked for again")
        try:
            os.pwrite(self._fd, data, index * self.chunk_size)
            self._log.write(f"{index} {digest}\n")
            self._unsynced += 1
            if self._unsynced >= SYNC_EVERY:
                self.sync()
        except OSError as exc:
            raise OutputNotWritableError(f"cannot write chunk {index} to {self.part_path} ({exc})",
                                         hint="free disk space on the data dir") from exc
        self.have.add(index)
        return True

    def write_stream(self, offset: int, data: bytes) -> None:
        """Write bytes at ``offset`` (HTTP source); whole chunks covered are logged by :meth:`mark_through`."""
        os.pwrite(self._fd, data, offset)

    def mark_through(self, end_offset: int) -> None:
        """Log every not-yet-staged chunk that lies wholly below ``end_offset`` (after an HTTP write)."""
        for index in range(min(self.have_prefix(), self.chunks), self.chunks):
            if index in self.have:
                continue
            if index * self.chunk_size + self.chunk_len(index) > end_offset:
                break
            self._log.write(f"{index} {hashlib.sha256(self.read(index)).hexdigest()}\n")
            self.have.add(index)
        self.sync()

    def sync(self) -> None:
        """fsync the data, then the log."""
        os.fsync(self._fd)
        self._log.flush()
        os.fsync(self._log.fileno())
        self._unsynced = 0

    def file_sha256(self) -> str:
        """sha256 of the assembled file, read in 1 MiB blocks."""
        h = hashlib.sha256()
        offset = 0
        while offset < self.size:
            block = os.pread(self._fd, min(HASH_BLOCK, self.size - offset), offset)
            h.update(block)
            offset += len(block)
        return h.hexdigest()

    def close(self) -> None:
        try:
            self.sync()
        except (OSError, ValueError):
            pass
        self._log.close()
        os.close(self._fd)

    def discard(self) -> None:
        """Close and delete the staging folder."""
        try:
            self.close()
        except OSError:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)


def clear_other_staging(data_dir: Path, keep: str | None) -> None:
    """Delete staging folders of bundles other than ``keep`` (sha256), e.g. an abandoned rollout's."""
    root = staging_root(data_dir)
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.name != keep:
            shutil.rmtree(child, ignore_errors=True)
