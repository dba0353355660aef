"""Offline install kit: everything a device with no network needs to run fieldpack, in one folder.

``build_kit`` writes::

    kit/
      wheels/            fieldpack's own wheel + the [device] extra's closure for the target, all binary wheels,
                         including a built llama-cpp-python wheel
      requirements.txt   every wheel pinned as ``name==version`` (install.sh installs exactly these)
      bundle/B.fpk       optional: a bundle to install
      trust/KEY.pub      optional: the builder public key the device trusts
      fieldpack-serve.service   the systemd unit (a template; install.sh fills in its paths)
      install.sh         POSIX sh: checks Python/platform, verifies every hash, venv, install, data dir, service
      kit.json           manifest: target, pins, and sha256 + size (bytes) of every other file

The dependency closure is resolved by pip itself (``pip download --only-binary=:all: --platform ...
--python-version ...``), never by us. Newer pip does not expand ``manylinux_2_X`` into the older glibc levels it
implies (PEP 600), so :func:`platform_tags` lists them. llama-cpp-python ships only as an sdist: for a target
the build host can serve (same CPU architecture, glibc at least the host's) its wheel comes from pip's wheel
cache or is built here once (``pip wheel``, minutes); for any other target it must be given with ``--wheels``.

Builder side only: imports shared, never device.
"""

from __future__ import annotations

import email.parser
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from fieldpack.shared.atomic import atomic_write_bytes
from fieldpack.shared.errors import BuildError, InputNotFoundError, UsageError

log = logging.getLogger(__name__)

KIT_FORMAT = "fieldpack-kit/1"
MANIFEST = "kit.json"
LLAMA = "llama-cpp-python"
REPO = Path(__file__).resolve().parents[1]
UNIT_SOURCE = REPO / "scripts" / "fieldpack-serve.service"
INSTALL_TEMPLATE = Path(__file__).with_name("kit_install.sh")
_PLATFORM = re.compile(r"^manylinux_(\d+)_(\d+)_([a-z0-9_]+)$")
_LEGACY = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}
_ARCHES = ("x86_64", "aarch64", "armv7l", "ppc64le", "s390x", "i686")


@dataclass(frozen=True)
class Target:
    """A device kind: ``manylinux_<glibc major>_<glibc minor>_<arch>`` and a CPython ``major.minor``."""

    glibc: tuple[int, int]
    arch: str
    python: str

    @property
    def platform(self) -> str:
        return f"manylinux_{self.glibc[0]}_{self.glibc[1]}_{self.arch}"

    @property
    def python_tag(self) -> str:
        return "cp" + self.python.replace(".", "")


def parse_target(platform_tag: str | None, python: str | None) -> Target:
    """The target from ``--platform`` / ``--python`` (default: this host's).

    Raises:
        UsageError: a platform that is not ``manylinux_X_Y_ARCH`` / ``manylinux2014_ARCH``, or a bad Python version.
    """
    py = python or f"{sys.version_info[0]}.{sys.version_info[1]}"
    if not re.fullmatch(r"3\.\d{1,2}", py):
        raise UsageError(f"--python {py!r} is not a CPython version like 3.11", hint="pass e.g. --python 3.11")
    if platform_tag is None:
        return Target(host_glibc(), host_arch(), py)
    m = _PLATFORM.match(platform_tag)
    if m and m.group(3) in _ARCHES:
        return Target((int(m.group(1)), int(m.group(2))), m.group(3), py)
    for legacy, glibc in _LEGACY.items():
        if platform_tag.startswith(legacy + "_") and platform_tag[len(legacy) + 1:] in _ARCHES:
            return Target(glibc, platform_tag[len(legacy) + 1:], py)
    raise UsageError(f"--platform {platform_tag!r} is not a glibc Linux wheel platform",
                     hint="pass e.g. --platform manylinux_2_28_x86_64 or manylinux_2_28_aarch64")


def host_arch() -> str:
    return platform.machine().lower().replace("arm64", "aarch64").replace("amd64", "x86_64")


def host_glibc() -> tuple[int, int]:
    """glibc version of this host as (major, minor); raises BuildError on a non-glibc host (musl, macOS)."""
    lib, ver = platform.libc_ver()
    if lib != "glibc" or not ver:
        raise BuildError("this build host is not a glibc Linux", hint="pass --platform for the device explicitly")
    major, minor = ver.split(".")[:2]
    return int(major), int(minor)


def platform_tags(target: Target) -> list[str]:
    """Every wheel platform tag a device of ``target`` accepts, newest first (PEP 600 + legacy aliases), plus
    ``linux_<arch>`` for a wheel built on a host the target can run (llama-cpp-python built here)."""
    major, top = target.glibc
    tags = [f"manylinux_{major}_{minor}_{target.arch}" for minor in range(top, 4, -1)]
    tags += [f"{legacy}_{target.arch}" for legacy, glibc in _LEGACY.items() if glibc <= target.glibc]
    return tags + [f"linux_{target.arch}"]


def wheel_fits(name: str, target: Target) -> bool:
    """True when wheel file ``name`` installs on ``target`` (its Python and platform tags)."""
    from packaging.tags import Tag
    from packaging.utils import parse_wheel_filename

    _, _, _, tags = parse_wheel_filename(name)
    minor = int(target.python.split(".")[1])
    pythons = {target.python_tag, "py3", f"py3{minor}"} | {f"cp3{m}" for m in range(2, minor + 1)}
    plats = set(platform_tags(target)) | {"any"}
    return any(_tag_ok(t, pythons, target, plats) for t in tags if isinstance(t, Tag))


def _tag_ok(tag, pythons: set[str], target: Target, plats: set[str]) -> bool:
    if tag.interpreter not in pythons or tag.platform not in plats:
        return False
    if tag.abi == "abi3" or tag.abi == "none":
        return True
    return tag.abi == target.python_tag and tag.interpreter == target.python_tag


def host_can_serve(target: Target) -> bool:
    """A wheel compiled here runs on ``target``: same CPU architecture, target glibc >= this host's."""
    try:
        return target.arch == host_arch() and target.glibc >= host_glibc()
    except BuildError:
        return False


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _pip(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    log.info("running %s", " ".join(cmd))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _last_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("ERROR")]
    return (errs or lines or [f"exit status {proc.returncode}"])[0]


def build_fieldpack_wheel(out: Path) -> Path:
    """``pip wheel --no-deps`` of this source checkout into ``out``; returns the wheel's path."""
    if not (REPO / "pyproject.toml").is_file():
        raise BuildError(f"fieldpack kit needs fieldpack's source checkout; {REPO} has no pyproject.toml",
                         hint="run it from a git checkout installed with pip install -e")
    proc = _pip("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO), timeout=900)
    if proc.returncode != 0:
        raise BuildError(f"building fieldpack's wheel failed: {_last_error(proc)}", hint="run pip wheel . to see why")
    (whl,) = out.glob("fieldpack-*.whl")
    return whl


def pinned_version(wheel: Path, dist: str) -> str:
    """The ``==`` version that ``wheel``'s metadata pins for ``dist`` (e.g. llama-cpp-python in [device])."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode("utf-8"))
    for req in meta.get_all("Requires-Dist") or []:
        m = re.match(rf"^{re.escape(dist)}\s*==\s*([^\s;,]+)", req, re.I)
        if m:
            return m.group(1)
    raise BuildError(f"{wheel.name} does not pin {dist} with ==", hint=f"pin {dist} in pyproject.toml [device]")


def _wheel_prefix(dist: str, version: str) -> str:
    return f"{dist.replace('-', '_')}-{version}-"


def find_wheel(folders: list[Path], dist: str, version: str, target: Target) -> Path | None:
    """A wheel of ``dist==version`` that fits ``target`` anywhere under ``folders`` (recursively), or None."""
    prefix = _wheel_prefix(dist, version).lower()
    for folder in folders:
        if not folder.is_dir():
            continue
        for whl in sorted(folder.rglob("*.whl")):
            if whl.name.lower().startswith(prefix) and wheel_fits(whl.name, target):
                return whl
    return None


def pip_cache_dir() -> Path | None:
    proc = _pip("cache", "dir", timeout=60)
    return Path(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


def llama_wheel(target: Target, version: str, wheels: Path | None, staging: Path) -> Path:
    """llama-cpp-python ``version`` as a wheel for ``target``: from ``wheels``, else (when this host can serve
    the target) from pip's wheel cache, else built here with ``pip wheel`` (compiles for minutes, cached after).

    Raises:
        InputNotFoundError: another platform and no fitting wheel in ``wheels``.
        BuildError: the local build failed.
    """
    found = find_wheel([wheels] if wheels else [], LLAMA, version, target)
    if found:
        return found
    if not host_can_serve(target):
        where = f"in {wheels}" if wheels else "(no --wheels given)"
        raise InputNotFoundError(
            f"no {LLAMA} {version} wheel for {target.platform} / Python {target.python} {where}; it ships only as "
            f"source and this host ({host_arch()}) cannot build one for that device",
            hint=f"on one device of that kind run `pip wheel --no-deps {LLAMA}=={version} -w wheels/` once "
                 "(README: offline install kit) and pass --wheels wheels/")
    cache = pip_cache_dir()
    found = find_wheel([cache / "wheels"] if cache else [], LLAMA, version, target)
    if found:
        log.info("using %s from pip's wheel cache", found.name)
        return found
    log.warning("building %s %s here (compiles llama.cpp: several minutes, cached by pip afterwards)", LLAMA, version)
    proc = _pip("wheel", "--no-deps", "-q", "-w", str(staging), f"{LLAMA}=={version}")
    found = find_wheel([staging], LLAMA, version, target)
    if proc.returncode != 0 or not found:
        raise BuildError(f"building {LLAMA} {version} failed: {_last_error(proc)}",
                         hint="install a C/C++ compiler and cmake, or pass --wheels with a prebuilt wheel")
    return found


def download_closure(requirements: list[str], target: Target, dest: Path, wheels: Path | None,
                     no_index: bool) -> None:
    """``pip download`` the binary-only closure of ``requirements`` for ``target`` into ``dest``."""
    args = ["download", "--only-binary=:all:", "--python-version", target.python, "--implementation", "cp",
            "-d", str(dest)]
    for tag in platform_tags(target):
        args += ["--platform", tag]
    if wheels:
        args += ["--find-links", str(wheels)]
    if no_index:
        args += ["--no-index"]
    proc = _pip(*args, *requirements)
    if proc.returncode != 0:
        raise BuildError(f"pip could not gather the [device] closure for {target.platform} / Python "
                         f"{target.python}: {_last_error(proc)}",
                         hint="check the network to the package index, or give the missing wheels with --wheels")


@dataclass
class KitResult:
    """What :func:`build_kit` made: ``files`` relative path -> size (bytes); ``seconds`` wall time."""

    out: Path
    target: Target
    files: dict[str, int] = field(default_factory=dict)
    manifest_sha256: str = ""
    seconds: float = 0.0

    @property
    def size_bytes(self) -> int:
        return sum(self.files.values())


def _wheel_pin(name: str) -> str:
    from packaging.utils import parse_wheel_filename

    dist, version, _, _ = parse_wheel_filename(name)
    return f"{dist}=={version}"


def _min_glibc(names: list[str], target: Target) -> tuple[int, int]:
    """The newest glibc any of the wheels needs on ``target`` (a wheel needs the oldest of its own tags)."""
    from packaging.utils import parse_wheel_filename

    need = (2, 5)
    for name in names:
        levels = []
        for tag in parse_wheel_filename(name)[3]:
            if tag.platform == "any":
                levels.append((0, 0))
            elif tag.platform.startswith("linux_"):
                levels.append(host_glibc())  # built on this host
            elif m := _PLATFORM.match(tag.platform):
                levels.append((int(m.group(1)), int(m.group(2))))
            else:
                levels += [g for legacy, g in _LEGACY.items() if tag.platform.startswith(legacy + "_")]
        if levels:
            need = max(need, min(levels))
    return need


def _copy_into(src: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    shutil.copyfile(src, dst)
    return dst


def build_kit(out: Path, *, platform_tag: str | None = None, python: str | None = None, bundle: Path | None = None,
              trust: list[Path] | None = None, wheels: Path | None = None, no_index: bool = False) -> KitResult:
    """Write an offline install kit for one device kind into ``out`` (created; must be empty or absent).

    Args:
        out: the kit folder.
        platform_tag: target wheel platform, e.g. ``manylinux_2_28_aarch64`` (default: this host's).
        python: target CPython ``major.minor`` (default: this interpreter's).
        bundle: a signed ``.fpk`` to ship and install.
        trust: builder public keys (PEM) the device's data dir trusts.
        wheels: folder of extra wheels (``--find-links``); must hold llama-cpp-python for another platform.
        no_index: resolve only from ``wheels`` (no package index; e.g. rebuilding from an earlier kit's wheels).

    Returns:
        KitResult with every file's size and the manifest's sha256.

    Raises:
        UsageError / InputNotFoundError: bad target, missing inputs, ``out`` not empty.
        BuildError: a wheel could not be built or resolved.
    """
    started = time.monotonic()
    target = parse_target(platform_tag, python)
    trust = list(trust or [])
    for path, what in [(bundle, "--bundle"), (wheels, "--wheels"), *((k, "--trust") for k in trust)]:
        if path is not None and not path.exists():
            raise InputNotFoundError(f"{what} {path} does not exist", hint="check the path")
    if no_index and not wheels:
        raise UsageError("--no-index needs --wheels DIR to resolve from", hint="pass --wheels with the wheels")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"kit folder {out} is not empty", hint="choose a new folder or delete the old kit first")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    wheel_dir = tmp / "wheels"
    staging = tmp / ".staging"
    staging.mkdir(parents=True)
    try:
        own = build_fieldpack_wheel(staging)
        llama = llama_wheel(target, pinned_version(own, LLAMA), wheels, staging)
        download_closure([f"{own}[device]", str(llama)], target, wheel_dir, wheels, no_index)
        for whl in (own, llama):  # pip copies local files too; make sure
            if not (wheel_dir / whl.name).exists():
                _copy_into(whl, wheel_dir)
        shutil.rmtree(staging)
        names = sorted(p.name for p in wheel_dir.glob("*.whl"))
        misfits = [n for n in names if not wheel_fits(n, target)]
        if misfits:
            raise BuildError(f"wheels that do not fit {target.platform} / Python {target.python}: {misfits}",
                             hint="remove them from --wheels")
        pins = sorted(_wheel_pin(n) for n in names)
        (tmp / "requirements.txt").write_text("".join(p + "\n" for p in pins), encoding="utf-8")
        bundle_rel = None
        if bundle is not None:
            bundle_rel = f"bundle/{_copy_into(bundle, tmp / 'bundle').name}"
        trust_rel = [f"trust/{_copy_into(k, tmp / 'trust').name}" for k in trust]
        shutil.copyfile(UNIT_SOURCE, tmp / UNIT_SOURCE.name)
        glibc = _min_glibc(names, target)
        script = (INSTALL_TEMPLATE.read_text(encoding="utf-8")
                  .replace("@KIT_PYTHON@", target.python).replace("@KIT_ARCH@", target.arch)
                  .replace("@KIT_GLIBC@", f"{glibc[0]}.{glibc[1]}").replace("@KIT_PLATFORM@", target.platform))
        (tmp / "install.sh").write_text(script, encoding="utf-8")
        os.chmod(tmp / "install.sh", 0o755)
        files = {str(p.relative_to(tmp)): p for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "format": KIT_FORMAT,
            "fieldpack_version": pinned_version_of(own),
            "python": target.python,
            "platform": target.platform,
            "arch": target.arch,
            "glibc_min": f"{glibc[0]}.{glibc[1]}",
            "created_unix": int(time.time()),
            "requirements": pins,
            "bundle": bundle_rel,
            "trust": trust_rel,
            "files": {rel: {"sha256": sha256_file(p), "size": p.stat().st_size} for rel, p in files.items()},
        }
        data = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
        atomic_write_bytes(tmp / MANIFEST, data)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sizes = {rel: (out / rel).stat().st_size for rel in [*files, MANIFEST]}
    return KitResult(out=out, target=target, files=sizes, manifest_sha256=hashlib.sha256(data).hexdigest(),
                     seconds=time.monotonic() - started)


def pinned_version_of(wheel: Path) -> str:
    """The version in a wheel's file name (``fieldpack-0.1.0-py3-none-any.whl`` -> ``0.1.0``)."""
    return wheel.name.split("-")[1]
