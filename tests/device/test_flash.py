"""scripts/flash: the folder/card mode for real; the ssh mode through a fake ``ssh``/``scp`` on PATH that run
the remote command on this machine (a real sshd cannot be assumed), against the real ``fieldpack`` CLI and
the real installer.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fieldpack.device.install import install_bundle
from fieldpack.device.slots import init_data_dir, open_data_dir
from fieldpack.shared.bundle import BundleReader
from fieldpack.shared.errors import NotInitializedError, SignatureError, SlotCheckError
from tests.shared.factories import Keys, base_bundle, make_bundle, make_keys, rebuild_bundle, truncated_copy

REPO = Path(__file__).resolve().parents[2]
FLASH = REPO / "scripts" / "flash"

FAKE_SSH = r"""#!/usr/bin/env bash
# fake ssh for tests: ssh [options] [user@]host COMMAND... runs COMMAND here with bash
echo "ssh $*" >> "$FAKE_SSH_LOG"
while [ $# -gt 0 ]; do case "$1" in -o|-p|-i|-l|-F) shift 2;; -*) shift;; *) break;; esac; done
host=$1; shift
if [ "${host#*@}" = unreachable ]; then echo "ssh: connect to host unreachable port 22: No route to host" >&2; exit 255; fi
exec bash -c "$*"
"""

FAKE_SCP = r"""#!/usr/bin/env bash
# fake scp for tests: scp [options] SRC [user@]host:DST copies SRC to DST here
echo "scp $*" >> "$FAKE_SSH_LOG"
args=()
while [ $# -gt 0 ]; do case "$1" in -o|-P|-i|-F) shift 2;; -*) shift;; *) args+=("$1"); shift;; esac; done
src=${args[0]}; dst=${args[1]}; host=${dst%%:*}; path=${dst#*:}
if [ "${host#*@}" = unreachable ]; then echo "ssh: connect to host unreachable port 22: No route to host" >&2; exit 255; fi
exec cp -- "$src" "$path"
"""

# The real CLI, as a device would have it on PATH.
FIELDPACK = f"""#!/bin/sh
PYTHONPATH={REPO} exec {sys.executable} -m fieldpack "$@"
"""

# The same install path without the runtime's model-load check, for synthetic payloads (they hold no real
# model): `fieldpack-nocheck install B --data-dir D` -> `python -m fieldpack.device.install --no-check B --data-dir D`.
FIELDPACK_NOCHECK = f"""#!/bin/sh
[ "$1" = --version ] && PYTHONPATH={REPO} exec {sys.executable} -m fieldpack --version
[ "$1" = install ] && shift
PYTHONPATH={REPO} exec {sys.executable} -m fieldpack.device.install --no-check "$@"
"""


def _exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Path:
    return base_bundle(tmp_path_factory.mktemp("b"), keys, model_bytes=1 << 20)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Path:
    """Always synthetic (its model.gguf is not a model), whatever FIELDPACK_TEST_BUNDLE says."""
    return make_bundle(tmp_path_factory.mktemp("s") / "synthetic.fpk", keys, model_bytes=1 << 20)


def label_of(bundle: Path) -> str:
    with BundleReader(bundle) as r:
        return r.manifest.label


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _exe(bin_dir / "ssh", FAKE_SSH)
    _exe(bin_dir / "scp", FAKE_SCP)
    _exe(bin_dir / "fieldpack", FIELDPACK)
    _exe(bin_dir / "fieldpack-nocheck", FIELDPACK_NOCHECK)
    (tmp_path / "remote-tmp").mkdir()
    e = {k: v for k, v in os.environ.items() if k not in ("FIELDPACK_DATA_DIR", "FIELDPACK_CMD")}
    return dict(e, PATH=f"{bin_dir}{os.pathsep}{e['PATH']}", FAKE_SSH_LOG=str(tmp_path / "ssh.log"),
                HOME=str(tmp_path / "home"))


def flash(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(FLASH), *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- folder / card mode --------------------------------------------------------------------------------------
def test_to_folder_verified_atomic_with_sidecar(bundle: Path, keys: Keys, env: dict[str, str],
                                                tmp_path: Path) -> None:
    card = tmp_path / "sdcard"
    card.mkdir()
    (card / bundle.name).write_bytes(b"an older bundle of the same name")
    r = flash(str(bundle), "--to", str(card), "--trust", str(keys.public), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"OK {label_of(bundle)}")  # the real `fieldpack verify` ran first
    copied = card / bundle.name
    assert copied.read_bytes() == bundle.read_bytes()
    assert sorted(p.name for p in card.iterdir()) == [bundle.name, f"{bundle.name}.sha256"]  # no partials
    assert (card / f"{bundle.name}.sha256").read_text() == f"{sha256(bundle)}  {bundle.name}\n"
    check = subprocess.run(["sha256sum", "-c", f"{bundle.name}.sha256"], cwd=card, capture_output=True, text=True)
    assert check.returncode == 0 and "OK" in check.stdout
    assert f"cd {card} && sha256sum -c {bundle.name}.sha256 && fieldpack install {bundle.name}" in r.stdout
    # later, on the device: the copy installs
    dd = init_data_dir(tmp_path / "device", [keys.public])
    assert install_bundle(copied, dd, check=None).label == label_of(bundle)


def test_to_folder_without_trust_warns(bundle: Path, env: dict[str, str], tmp_path: Path) -> None:
    card = tmp_path / "card"
    card.mkdir()
    r = flash(str(bundle), "--to", str(card), env=env)
    assert r.returncode == 0 and "not verified here" in r.stderr
    assert (card / bundle.name).read_bytes() == bundle.read_bytes()


def test_to_missing_folder_creates_nothing(bundle: Path, env: dict[str, str], tmp_path: Path) -> None:
    r = flash(str(bundle), "--to", str(tmp_path / "not-mounted"), env=env)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "mount the card" in line
    assert not (tmp_path / "not-mounted").exists()


@pytest.mark.parametrize("make_bad, code", [
    (lambda b, d: rebuild_bundle(b, d / "foreign.fpk", make_keys(d / "stranger")), SignatureError.exit_code),
    (lambda b, d: rebuild_bundle(b, d / "unsigned.fpk", None), SignatureError.exit_code),
])
def test_local_verify_failure_copies_nothing(bundle: Path, keys: Keys, env: dict[str, str], tmp_path: Path,
                                             make_bad, code: int) -> None:
    bad = make_bad(bundle, tmp_path)
    card = tmp_path / "card"
    card.mkdir()
    r = flash(str(bad), "--to", str(card), "--trust", str(keys.public), env=env)
    assert r.returncode == code
    [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "failed verification here, nothing was copied" in line and "Fix:" in line
    assert list(card.iterdir()) == []


def test_missing_bundle(env: dict[str, str], tmp_path: Path) -> None:
    r = flash(str(tmp_path / "nope.fpk"), "--to", str(tmp_path), env=env)
    assert r.returncode == 2 and "does not exist" in r.stderr


# --- ssh mode (fake ssh/scp) ---------------------------------------------------------------------------------
def test_over_ssh_installs_and_cleans_up(bundle: Path, keys: Keys, env: dict[str, str], tmp_path: Path) -> None:
    dd = init_data_dir(tmp_path / "device data", [keys.public])  # a space in the path: quoting is exercised
    r = flash(str(bundle), "--to", f"tech@pi-07:{dd.root}", "--trust", str(keys.public),
              "--remote-fieldpack", "fieldpack-nocheck", "--remote-tmp", str(tmp_path / "remote-tmp"),
              "-o", "BatchMode=yes", env=env)
    assert r.returncode == 0, r.stderr
    assert f"pi-07: installed {label_of(bundle)} into slot a" in r.stdout and "flashed" in r.stdout
    assert open_data_dir(dd.root).active_slot() == "a"
    assert list((tmp_path / "remote-tmp").iterdir()) == []  # the upload was removed
    log = (tmp_path / "ssh.log").read_text().splitlines()
    assert log[0] == "ssh -o BatchMode=yes tech@pi-07 fieldpack-nocheck --version"  # checked before the upload
    assert log[1].startswith("scp -q -o BatchMode=yes ") and f"tech@pi-07:{tmp_path}/remote-tmp/" in log[1]
    assert log[2].startswith("ssh -o BatchMode=yes tech@pi-07 ") and "--allow-downgrade" not in log[2]
    # flashing the same bundle again is a no-op on the device, still success
    again = flash(str(bundle), "--to", f"tech@pi-07:{dd.root}", "--remote-fieldpack", "fieldpack-nocheck",
                  "--remote-tmp", str(tmp_path / "remote-tmp"), env=env)
    assert again.returncode == 0 and "already active" in again.stdout


def test_over_ssh_real_cli_reports_the_device_error(synthetic: Path, keys: Keys, env: dict[str, str],
                                                    tmp_path: Path) -> None:
    """The real `fieldpack install` runs the runtime's check, which a synthetic model cannot pass: the flash
    must fail with the device's exit status and its one-line error, and leave the device as it was."""
    dd = init_data_dir(tmp_path / "device", [keys.public])
    r = flash(str(synthetic), "--to", f"pi-07:{dd.root}", "--remote-tmp", str(tmp_path / "remote-tmp"), env=env)
    assert r.returncode == SlotCheckError.exit_code, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("pi-07: error: demo@1.0.0 failed its post-install check") and "Fix:" in line
    assert line.count("Fix:") == 1
    assert open_data_dir(dd.root).active_slot() is None
    assert list((tmp_path / "remote-tmp").iterdir()) == []


def test_over_ssh_uninitialised_device(bundle: Path, env: dict[str, str], tmp_path: Path) -> None:
    r = flash(str(bundle), "--to", f"pi-07:{tmp_path / 'blank'}", "--remote-tmp", str(tmp_path / "remote-tmp"),
              env=env)
    assert r.returncode == NotInitializedError.exit_code
    assert "fieldpack device init" in r.stderr.strip().splitlines()[-1]


def test_over_ssh_unreachable_host(bundle: Path, env: dict[str, str], tmp_path: Path) -> None:
    r = flash(str(bundle), "--to", "pi@unreachable", "--remote-tmp", str(tmp_path / "remote-tmp"), env=env)
    assert r.returncode == 255
    assert "No route to host" in r.stderr and "ssh pi@unreachable" in r.stderr


def test_over_ssh_missing_remote_fieldpack(bundle: Path, env: dict[str, str], tmp_path: Path) -> None:
    """A device where `fieldpack` is not on PATH (the kit's venv): refused before anything is uploaded."""
    r = flash(str(bundle), "--to", "pi-07", "--remote-fieldpack", "no-such-fieldpack",
              "--remote-tmp", str(tmp_path / "remote-tmp"), env=env)
    assert r.returncode == 127
    [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith("error: pi-07: `no-such-fieldpack` cannot be run there") and "nothing was copied" in line
    assert "Fix: pass --remote-fieldpack PATH, e.g. /usr/local/bin/fieldpack" in line
    assert not [ln for ln in (tmp_path / "ssh.log").read_text().splitlines() if ln.startswith("scp")]
    assert "copying" not in r.stdout and list((tmp_path / "remote-tmp").iterdir()) == []


def test_over_ssh_allow_downgrade(keys: Keys, env: dict[str, str], tmp_path: Path) -> None:
    """The device refuses an older version and says to pass --allow-downgrade; flash passes it on."""
    old = make_bundle(tmp_path / "demo-1.0.0.fpk", keys, model_bytes=100_000, seed=1, version="1.0.0")
    new = make_bundle(tmp_path / "demo-1.1.0.fpk", keys, model_bytes=100_000, seed=2, version="1.1.0")
    dd = init_data_dir(tmp_path / "device", [keys.public])
    install_bundle(new, dd, check=None)
    common = ["--to", f"pi-07:{dd.root}", "--remote-fieldpack", "fieldpack-nocheck",
              "--remote-tmp", str(tmp_path / "remote-tmp")]
    r = flash(str(old), *common, env=env)
    assert r.returncode == 6 and "pass --allow-downgrade" in r.stderr.strip().splitlines()[-1]
    r = flash(str(old), *common, "--allow-downgrade", env=env)
    assert r.returncode == 0, r.stderr
    assert "pi-07: installed demo@1.0.0 into slot b (replaced demo@1.1.0, kept for rollback)" in r.stdout
    assert open_data_dir(dd.root).state().slots["b"].label == "demo@1.0.0"
    assert (tmp_path / "ssh.log").read_text().splitlines()[-1].endswith(" --allow-downgrade; rc=$?; rm -f \"$f\"; exit $rc")
    card = tmp_path / "card"
    card.mkdir()
    r = flash(str(old), "--to", str(card), "--allow-downgrade", env=env)
    assert r.returncode == 0 and f"fieldpack install {old.name} --allow-downgrade" in r.stdout, r.stderr


def test_help_once_with_the_kit_path(env: dict[str, str]) -> None:
    """--help prints the long description once, offers --allow-downgrade, and suggests the fieldpack path that
    the kit's install.sh really creates (PREFIX/venv, PREFIX=/opt/fieldpack as root)."""
    r = flash("--help", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Put a fieldpack bundle on a device") == 1
    assert r.stdout.count("With --trust, the bundle is first verified here") == 1
    assert "--allow-downgrade" in r.stdout and ".venv/bin/fieldpack" not in r.stdout
    kit_sh = (REPO / "builder" / "kit_install.sh").read_text()
    assert "DEFAULT_PREFIX=/opt/fieldpack" in kit_sh and "VENV=$PREFIX/venv" in kit_sh
    assert "DEFAULT_BIN_DIR=/usr/local/bin" in kit_sh
    assert "/opt/fieldpack/venv/bin/fieldpack" in " ".join(r.stdout.split())
    assert "/usr/local/bin/fieldpack" in " ".join(r.stdout.split())


def test_a_folder_that_is_neither_bundle_nor_kit(bundle: Path, env: dict[str, str], tmp_path: Path) -> None:
    folder, card = tmp_path / "demo-out", tmp_path / "card"
    folder.mkdir()
    card.mkdir()
    r = flash(str(folder), "--to", str(card), env=env)
    assert r.returncode == 2
    [line] = r.stderr.strip().splitlines()
    assert line == (f"error: {folder} is a folder, not a .fpk bundle, and holds no kit.json. Fix: pass a .fpk file, "
                    "or a kit folder made by `fieldpack kit`")
    (folder / bundle.name).write_bytes(bundle.read_bytes())
    r = flash(str(folder), "--to", "pi-07", env=env)
    assert r.returncode == 2 and f"Fix: pass the bundle inside it, e.g. {folder / bundle.name}" in r.stderr
    assert list(card.iterdir()) == [] and not (tmp_path / "ssh.log").exists()


def test_bad_target(bundle: Path, env: dict[str, str]) -> None:
    r = flash(str(bundle), "--to", "pi 07:/x", env=env)
    assert r.returncode == 2 and "neither a folder nor user@host" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("FIELDPACK_TEST_BUNDLE"),
                    reason="needs a real built bundle in FIELDPACK_TEST_BUNDLE (the real check loads its model)")
def test_over_ssh_real_cli_real_bundle(bundle: Path, keys: Keys, env: dict[str, str], tmp_path: Path) -> None:
    dd = init_data_dir(tmp_path / "device", [keys.public])
    r = flash(str(bundle), "--to", f"pi-07:{dd.root}", "--trust", str(keys.public),
              "--remote-tmp", str(tmp_path / "remote-tmp"), env=env)
    assert r.returncode == 0, r.stderr
    assert open_data_dir(dd.root).state().slots["a"].label == label_of(bundle)


@pytest.mark.slow
def test_over_ssh_with_a_real_built_bundle(bundle_v1: Path, e2e_keys: Path, env: dict[str, str], tmp_path: Path) -> None:
    """The technician's path end to end: real bundle from the builder, real `fieldpack install` (which loads
    the model and runs the smoke question) on the 'device' behind the fake ssh."""
    dd = init_data_dir(tmp_path / "device", [e2e_keys / "builder.pub"])
    r = flash(str(bundle_v1), "--to", f"pi-07:{dd.root}", "--trust", str(e2e_keys / "builder.pub"),
              "--remote-tmp", str(tmp_path / "remote-tmp"), env=env)
    assert r.returncode == 0, r.stderr
    assert open_data_dir(dd.root).state().slots["a"].label == "riverside@1.0.0"


# --- without --trust: header and size check; the printed hint works ------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "not a bundle", "member missing"])
def test_without_trust_a_damaged_bundle_is_not_copied(bundle: Path, env: dict[str, str], tmp_path: Path,
                                                      damage: str) -> None:
    from tests.shared.factories import Entry, unpack_members, write_raw_bundle

    bad = tmp_path / "bad.fpk"
    if damage == "truncated":
        truncated_copy(bundle, bad, bundle.stat().st_size // 2)
    elif damage == "not a bundle":
        bad.write_bytes(b"PK\x03\x04 a zip file, not a bundle" * 100)
    else:
        manifest, sig, files = unpack_members(bundle, tmp_path / "members")
        entries = [Entry("manifest.json", manifest), Entry("manifest.json.sig", sig)]
        entries += [Entry(n, p) for n, p in files.items() if n != "model.gguf"]
        write_raw_bundle(bad, entries)
    card = tmp_path / "card"
    card.mkdir()
    r = flash(str(bad), "--to", str(card), env=env)
    assert r.returncode == 4, r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "not a complete fieldpack bundle" in line and "nothing was copied" in line and "Fix:" in line
    assert list(card.iterdir()) == []


def test_hint_after_a_relative_folder_works(bundle: Path, env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "card").mkdir()
    r = subprocess.run([sys.executable, str(FLASH), str(bundle), "--to", "./card"], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    [hint] = [ln for ln in r.stdout.splitlines() if ln.startswith("on the device: ")]
    cmd = hint.removeprefix("on the device: ").split("   (")[0]
    cd_part, check_part, install_part = cmd.split(" && ")
    folder = Path(cd_part.removeprefix("cd "))
    assert folder.is_absolute() and folder == (tmp_path / "card").resolve()
    ok = subprocess.run(check_part, shell=True, cwd=folder, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert (folder / install_part.removeprefix("fieldpack install ")).is_file()  # the path it installs exists there


def test_usage_mistakes_are_one_line(bundle: Path, env: dict[str, str], tmp_path: Path) -> None:
    """argparse's own errors in the project's format: one line with the fix, exit 2 (not its usage block)."""
    for args in ([str(bundle)], [str(bundle), "--to", str(tmp_path), "--n-ctx", "many"], ["--bogus"]):
        r = flash(*args, env=env)
        assert r.returncode == 2, r.stderr
        [line] = r.stderr.strip().splitlines()
        assert line.startswith("error: flash: ") and line.endswith("Fix: see `scripts/flash --help`"), line
