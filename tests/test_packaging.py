"""The wheel installs one top-level import name, ``fieldpack``; the folders at the top of the repository map to
``fieldpack.builder``, ``fieldpack.device``, ``fieldpack.shared`` and ``fieldpack.retrieval``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # build from a copy of the tree so setuptools' build/ and egg-info never land in the checkout
    src = tmp_path_factory.mktemp("src") / "fieldpack"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".fieldpack-cache", "build", "dist", "*.egg-info", "__pycache__", "demo-out", "bench"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(out), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("fieldpack-*.whl")
    return whl


def test_wheel_top_level_is_only_fieldpack(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fieldpack"}, tops
    for sub in ("builder", "device", "shared", "retrieval", "cli"):
        assert f"fieldpack/{sub}/__init__.py" in names, sub
    # the subpackages, data files and the systemd unit's neighbours come along
    assert "fieldpack/builder/convert/writer.py" in names
    assert "fieldpack/device/mqtt/daemon.py" in names
    assert "fieldpack/retrieval/search.py" in names
    top_level = [n for n in names if n.endswith("top_level.txt")]
    if top_level:  # setuptools writes it for bdist_wheel
        assert zipfile.ZipFile(wheel).read(top_level[0]).decode().split() == ["fieldpack"]


def test_wheel_installs_and_imports_in_a_clean_target(wheel: Path, tmp_path: Path) -> None:
    """Installed from the wheel alone (no source tree on sys.path), the subpackages import under fieldpack.*
    and nothing named ``device``/``shared``/``builder`` appears."""
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith(".dist-info")
                  and p.name != "bin") == ["fieldpack"]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fieldpack.shared.bundle_format, "
            "fieldpack.retrieval.types, fieldpack.device.slots; "
            "assert fieldpack.shared.bundle_format.__file__.startswith(sys.argv[1]), "
            "fieldpack.shared.bundle_format.__file__; "
            "assert not any(m.split('.')[0] in ('shared', 'device', 'builder', 'retrieval') for m in sys.modules)")
    r = subprocess.run([sys.executable, "-I", "-c", code, str(target)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]


def test_python_dash_m_fieldpack_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "fieldpack", "--help"], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "build" in r.stdout and "install" in r.stdout


def test_every_package_folder_is_in_the_wheel(wheel: Path) -> None:
    """pyproject lists packages by name: a new subpackage (builder/stages, ...) missing from it would vanish
    from the wheel while the editable install still works."""
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("builder", "device", "shared", "retrieval", "fieldpack"):
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.relative_to(REPO / folder).as_posix()
            want = f"fieldpack/{rel}" if folder == "fieldpack" else f"fieldpack/{folder}/{rel}"
            assert want in names, f"{init.relative_to(REPO)} is not in the wheel: add it to pyproject's packages"
