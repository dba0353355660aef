"""A disk that fills up mid-write: one clear error, and no partial bundle or temp file left behind.

Uses a real 1 MiB tmpfs (needs root and mount(2), as on CI and build hosts run as root); skipped elsewhere."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fieldpack.shared.bundle import write_bundle
from fieldpack.shared.errors import OutputNotWritableError
from tests.shared.factories import make_keys, make_manifest, make_member_files


@pytest.fixture()
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_write_bundle_disk_full_leaves_nothing(tiny_fs: Path, tmp_path: Path) -> None:
    keys = make_keys(tmp_path / "keys")
    files = make_member_files(tmp_path / "members", model_bytes=3 * 1024 * 1024)
    manifest = make_manifest(files)
    out = tiny_fs / "big.fpk"
    with pytest.raises(OutputNotWritableError, match="disk full") as info:
        write_bundle(out, manifest, files, keys.private)
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)
    assert list(tiny_fs.iterdir()) == []
