"""fieldpack kit end to end: build a kit for this machine, install it with install.sh in a fresh folder with
no network, and answer from the bundle in the kit; a tampered kit is refused before anything is installed; a
Python of another version is refused in one line; the rendered systemd unit passes ``systemd-analyze verify``.

No network: ``unshare -n`` (a new network namespace with only a down loopback) when this process may create
one (root); otherwise pip is forced offline (PIP_NO_INDEX=1 and an unreachable proxy), which the test names in
its skip/xfail-free output through ``OFFLINE_MODE``.

Speed: the kit's third-party wheels (the cold ``pip download`` + llama-cpp-python from pip's cache) are kept in
the test cache keyed by pyproject.toml and the target; each run rebuilds the kit from them with
``--wheels ... --no-index`` (fieldpack's own wheel is always built fresh).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, cached_dir, run_cli

pytestmark = pytest.mark.slow
KIT_CACHE_VERSION = "kit-1"
QUESTION = "The connection pool is exhausted. What should I do?"


def _unshare_works() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


OFFLINE_MODE = "unshare -n" if _unshare_works() else "PIP_NO_INDEX=1 + unreachable proxy"


def offline(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with no network (see module doc); never raises on a non-zero exit."""
    env = dict(os.environ, **kw.pop("env", {}))
    env.pop("VIRTUAL_ENV", None)
    if OFFLINE_MODE == "unshare -n":
        cmd = ["unshare", "-n", *cmd]
    else:
        env.update(PIP_NO_INDEX="1", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
                   HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, **kw)


@pytest.fixture(scope="session")
def kit_wheels(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Third-party wheels of a kit for this host (cold ``fieldpack kit`` once per pyproject.toml)."""
    from fieldpack.builder.kit import parse_target

    target = parse_target(None, None)
    key = hashlib.sha256(KIT_CACHE_VERSION.encode() + (REPO / "pyproject.toml").read_bytes()
                         + f"{target.platform}/{target.python}".encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        out = tmp_path_factory.mktemp("cold") / "kit"
        r = run_cli("kit", "-o", str(out))
        assert r.returncode == 0, r.stderr[-3000:]
        for whl in (out / "wheels").glob("*.whl"):
            if not whl.name.startswith("fieldpack-"):
                shutil.copyfile(whl, tmp / whl.name)

    return cached_dir(cache_dir, f"kit-wheels-{key}", build)


@pytest.fixture(scope="module")
def kit_dir(tmp_path_factory: pytest.TempPathFactory, kit_wheels: Path, bundle_v1: Path, e2e_keys: Path) -> Path:
    out = tmp_path_factory.mktemp("kit") / "kit"
    r = run_cli("kit", "-o", str(out), "--wheels", str(kit_wheels), "--no-index", "--bundle", str(bundle_v1),
                "--trust", str(e2e_keys / "builder.pub"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kit.json sha256" in r.stdout
    return out


def _install(kit: Path, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return offline(["sh", str(kit / "install.sh"), "--prefix", str(root / "opt"), "--data-dir", str(root / "data"),
                    "--no-service", *extra], cwd=root)


def test_kit_manifest_lists_every_file_with_its_hash(kit_dir: Path) -> None:
    manifest = json.loads((kit_dir / "kit.json").read_text())
    on_disk = {str(p.relative_to(kit_dir)) for p in kit_dir.rglob("*") if p.is_file()} - {"kit.json"}
    assert set(manifest["files"]) == on_disk
    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((kit_dir / rel).read_bytes()).hexdigest() == entry["sha256"], rel
    pins = manifest["requirements"]
    assert any(p.startswith("llama-cpp-python==") for p in pins) and any(p.startswith("fieldpack==") for p in pins)
    assert not any(p.startswith(("torch==", "transformers==")) for p in pins)  # device closure only
    assert manifest["bundle"].startswith("bundle/") and manifest["trust"] == ["trust/builder.pub"]


def test_offline_install_then_ask_then_upgrade_in_place(kit_dir: Path, tmp_path: Path) -> None:
    print(f"network isolation: {OFFLINE_MODE}")
    r = _install(kit_dir, tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "verified:" in r.stdout and "created" in r.stdout and "installed into" in r.stdout
    fp = tmp_path / "opt" / "venv" / "bin" / "fieldpack"
    ask = offline([str(fp), "ask", QUESTION, "--data-dir", str(tmp_path / "data"), "--json"], cwd=tmp_path)
    assert ask.returncode == 0, ask.stderr[-3000:]
    answer = json.loads(ask.stdout)
    assert answer["sources"] and answer["sources"][0]["source"].endswith("database.md"), answer["sources"]
    # the venv runs the kit's code, not this checkout's
    where = subprocess.run([str(tmp_path / "opt" / "venv" / "bin" / "python"), "-c",
                            "import fieldpack.device, sys; print(fieldpack.device.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert where.stdout.startswith(str(tmp_path / "opt" / "venv")), where.stdout + where.stderr

    assert "command:" not in r.stdout and f"done: fieldpack is {fp}" in r.stdout  # custom prefix: nothing on PATH

    state_before = (tmp_path / "data" / "state.json").read_text()
    foreign = tmp_path / "other-bin"
    foreign.mkdir()
    (foreign / "fieldpack").write_text("#!/bin/sh\necho mine\n")
    again = _install(kit_dir, tmp_path, "--bin-dir", str(tmp_path / "bin"))
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert "upgraded in place" in again.stdout and "already active" in again.stdout
    assert (tmp_path / "data" / "state.json").read_text() == state_before
    # the `fieldpack` command runs the kit's venv with the kit's data dir as its default (no --data-dir needed)
    assert f"done: fieldpack is {tmp_path / 'bin' / 'fieldpack'}" in again.stdout, again.stdout
    ask = offline([str(tmp_path / "bin" / "fieldpack"), "ask", QUESTION], cwd=tmp_path,
                  env={"FIELDPACK_DATA_DIR": ""})
    assert ask.returncode == 0 and "database.md" in ask.stdout, ask.stderr[-2000:]
    kept = _install(kit_dir, tmp_path, "--bin-dir", str(foreign))  # a command it did not write is left alone
    assert kept.returncode == 0 and "not ours; left as is" in kept.stdout, (kept.stdout + kept.stderr)[-3000:]
    assert (foreign / "fieldpack").read_text() == "#!/bin/sh\necho mine\n"
    soft = _install(kit_dir, tmp_path, "--no-bundle")  # software only: a device that moved on keeps its bundle
    assert soft.returncode == 0 and "skipped (--no-bundle)" in soft.stdout, (soft.stdout + soft.stderr)[-3000:]
    assert (tmp_path / "data" / "state.json").read_text() == state_before

    _unit_passes_systemd_analyze(kit_dir, tmp_path)


def _unit_passes_systemd_analyze(kit: Path, root: Path) -> None:
    """The unit as install.sh would install it (custom and default data dir) passes systemd-analyze verify."""
    sa = shutil.which("systemd-analyze")
    if sa is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd provides it)")
    for data_dir in (root / "data", Path("/var/lib/fieldpack")):
        unit_dir = root / f"unit-{len(data_dir.parts)}"
        unit_dir.mkdir()
        unit = subprocess.run(["sh", str(kit / "install.sh"), "--prefix", str(root / "opt"), "--data-dir",
                               str(data_dir), "--print-unit"], capture_output=True, text=True, check=True).stdout
        assert f"ExecStart={root}/opt/venv/bin/fieldpack serve --data-dir {data_dir}" in unit
        assert ("ReadWritePaths=" in unit) is (data_dir != Path("/var/lib/fieldpack"))
        (unit_dir / "fieldpack-serve.service").write_text(unit)
        v = subprocess.run([sa, "verify", str(unit_dir / "fieldpack-serve.service")], capture_output=True, text=True)
        if v.returncode != 0 and "Failed to connect to bus" in v.stderr + v.stdout:
            pytest.skip(f"systemd-analyze cannot run in this container: {v.stderr.strip()[:200]}")
        assert v.returncode == 0 and not v.stderr.strip(), v.stderr


def _copy_kit(kit: Path, dest: Path) -> Path:
    shutil.copytree(kit, dest, copy_function=os.link)  # hard links: cheap; files are replaced, never edited
    return dest


@pytest.mark.parametrize("tamper", ["wheel-byte", "extra-wheel", "bundle-missing", "kit-json-rewritten"])
def test_tampered_kit_is_refused_before_anything_is_installed(kit_dir: Path, tmp_path: Path, tamper: str) -> None:
    kit = _copy_kit(kit_dir, tmp_path / "kit")
    extra: tuple[str, ...] = ()
    if tamper == "kit-json-rewritten":  # a consistent forgery: only the hash carried apart catches it
        extra = ("--kit-sha256", hashlib.sha256((kit / "kit.json").read_bytes()).hexdigest())
        manifest = json.loads((kit / "kit.json").read_text())
        (kit / "install.sh").unlink()
        (kit / "install.sh").write_text((kit_dir / "install.sh").read_text() + "# changed\n")
        manifest["files"]["install.sh"]["sha256"] = hashlib.sha256((kit / "install.sh").read_bytes()).hexdigest()
        manifest["files"]["install.sh"]["size"] = (kit / "install.sh").stat().st_size
        (kit / "kit.json").unlink()
        (kit / "kit.json").write_text(json.dumps(manifest))
    elif tamper == "wheel-byte":
        victim = next((kit / "wheels").glob("numpy-*.whl"))
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.unlink()
        victim.write_bytes(bytes(data))
    elif tamper == "extra-wheel":
        shutil.copyfile(next((kit / "wheels").glob("rich-*.whl")), kit / "wheels" / "rich-99.0.0-py3-none-any.whl")
    else:
        next((kit / "bundle").glob("*.fpk")).unlink()
    r = _install(kit, tmp_path, *extra)
    assert r.returncode == 4, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "failed verification, nothing was installed" in lines[0], r.stderr
    assert not (tmp_path / "opt").exists() and not (tmp_path / "data").exists()


def _other_python() -> str | None:
    """A working CPython of another minor version (pyenv's own binaries first: its shims may not run)."""
    mine = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for cand in ("3.12", "3.13", "3.10", "3.9"):
        if cand == mine:
            continue
        for path in (*Path.home().glob(f".pyenv/versions/{cand}*/bin/python{cand}"), shutil.which(f"python{cand}")):
            if path and subprocess.run([str(path), "-c", "pass"], capture_output=True).returncode == 0:
                return str(path)
    return None


def test_python_of_another_version_is_refused_in_one_line(kit_dir: Path, tmp_path: Path) -> None:
    other = _other_python()
    if other is None:
        pytest.skip("no Python of another version on this machine to run the kit with")
    r = _install(kit_dir, tmp_path, "--python", other)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: this kit is for Python 3.11 but"), r.stderr
    assert "Fix: build the kit with fieldpack kit --python" in lines[0]
    assert not (tmp_path / "opt").exists()
