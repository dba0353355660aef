"""File hashes, defined once: every sha256 fieldpack records (bundle members, build-stage inputs, converted
GGUFs) is computed here, streaming so a multi-GB file never sits in memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

#: Read size while hashing (bytes).
CHUNK_BYTES = 1 << 20


def hash_file(path: Path) -> tuple[int, str]:
    """Return ``(size in bytes, lowercase hex sha256)`` of a file, reading :data:`CHUNK_BYTES` at a time.

    Raises:
        OSError: the file cannot be read (callers translate it where they know what the file is).
    """
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK_BYTES):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def sha256_file(path: Path) -> str:
    """Lowercase hex sha256 of a file (see :func:`hash_file`)."""
    return hash_file(path)[1]
