"""scripts/flash with a kit folder (from ``fieldpack kit``): checked against kit.json, copied whole to a card
(temp name + rename, read back) or over scp -r (fake ssh/scp that act on this machine), stale copies replaced."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FLASH = REPO / "scripts" / "flash"
FAKE_SSH = """#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in -o) shift 2;; -*) shift;; *) break;; esac; done
shift; exec sh -c "$*"
"""
FAKE_SCP = """#!/bin/sh
while [ $# -gt 0 ]; do case "$1" in -o) shift 2;; -*) shift;; *) break;; esac; done
exec cp -r -- "$1" "${2#*:}"
"""


@pytest.fixture()
def kit(tmp_path: Path) -> Path:
    """A small kit folder in fieldpack kit's layout: files plus kit.json with their sha256 and size."""
    k = tmp_path / "kit"
    (k / "wheels").mkdir(parents=True)
    (k / "wheels" / "demo-1.0-py3-none-any.whl").write_bytes(os.urandom(50_000))
    (k / "install.sh").write_text("#!/bin/sh\necho installed\n")
    files = {str(p.relative_to(k)): {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
             for p in k.rglob("*") if p.is_file()}
    (k / "kit.json").write_text(json.dumps({"format": "fieldpack-kit/1", "files": files}))
    return k


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("ssh", FAKE_SSH), ("scp", FAKE_SCP)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755 | stat.S_IXUSR)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def flash(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(FLASH), *args], capture_output=True, text=True, env=env, timeout=120)


def _same_tree(a: Path, b: Path) -> bool:
    def listing(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    return listing(a) == listing(b)


def test_kit_to_card_replaces_an_older_copy_whole(kit: Path, env: dict[str, str], tmp_path: Path) -> None:
    card = tmp_path / "card"
    (card / "kit" / "wheels").mkdir(parents=True)
    (card / "kit" / "wheels" / "stale-0.1-py3-none-any.whl").write_bytes(b"old")
    r = flash(str(kit), "--to", str(card), env=env)
    assert r.returncode == 0, r.stderr
    assert _same_tree(kit, card / "kit") and "install.sh" in r.stdout
    assert [p.name for p in card.iterdir()] == ["kit"]  # no temp folder left


def test_kit_over_ssh(kit: Path, env: dict[str, str], tmp_path: Path) -> None:
    remote = tmp_path / "device-home"
    remote.mkdir()
    (remote / "kit").mkdir()
    (remote / "kit" / "stale.whl").write_bytes(b"old")
    r = flash(str(kit), "--to", f"pi@fieldbox-7:{remote}", env=env)
    assert r.returncode == 0, r.stderr
    assert _same_tree(kit, remote / "kit")
    assert f"ssh pi@fieldbox-7 'sh {remote}/kit/install.sh'" in r.stdout
    assert sorted(p.name for p in remote.iterdir()) == ["kit"]


def test_a_damaged_kit_is_not_copied(kit: Path, env: dict[str, str], tmp_path: Path) -> None:
    (kit / "install.sh").write_text("#!/bin/sh\necho changed\n")
    card = tmp_path / "card"
    card.mkdir()
    r = flash(str(kit), "--to", str(card), env=env)
    assert r.returncode == 4 and "does not match kit.json" in r.stderr
    assert not any(card.iterdir())


def test_allow_downgrade_is_for_bundles_only(kit: Path, env: dict[str, str], tmp_path: Path) -> None:
    card = tmp_path / "card"
    card.mkdir()
    r = flash(str(kit), "--to", str(card), "--allow-downgrade", env=env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: --allow-downgrade applies to a bundle, not to a kit folder. Fix:")
    assert not any(card.iterdir())
