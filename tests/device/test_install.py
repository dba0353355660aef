"""A/B install, rollback and status on real signed bundles (tests/shared/factories.py) in real data dirs.

Every refusal is checked three ways: the right error class, a one-line message with a fix, and the data dir
byte-for-byte as it was (the active bundle — and the rollback target — untouched).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fieldpack.device import resources
from fieldpack.device.install import clean_leftovers, install_bundle, rollback, status
from fieldpack.device.resources import ResourceProbe, check_feasibility, ram_needed
from fieldpack.shared.kv_cache import kv_cache_bytes
from fieldpack.device.slots import (
    ENV_DATA_DIR,
    SLOT_RECORD_FILE,
    DataDir,
    default_data_dir,
    init_data_dir,
    open_data_dir,
)
from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.bundle import BundleReader
from fieldpack.shared.errors import (
    BundleFormatError,
    DeviceError,
    FieldpackError,
    InputNotFoundError,
    InstallInProgressError,
    InsufficientResourcesError,
    IntegrityError,
    NoPreviousBundleError,
    NotInitializedError,
    SignatureError,
    SigningKeyError,
    SlotCheckError,
    UnsafeMemberError,
    UnsupportedFormatVersion,
    UsageError,
)
from fieldpack.shared.manifest import Manifest
from tests.shared.factories import (
    N_CTX,
    Entry,
    Keys,
    base_bundle,
    flip_byte,
    kv_bytes,
    make_bundle,
    make_keys,
    member_data_offset,
    raw_entries,
    rebuild_bundle,
    truncated_copy,
    write_raw_bundle,
)

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bundles")
    return {
        "v1": base_bundle(d, keys, model_bytes=300_000, seed=1),
        "v2": make_bundle(d / "v2.fpk", keys, model_bytes=200_000, seed=2, version="2.0.0"),
        "v3": make_bundle(d / "v3.fpk", keys, model_bytes=100_000, seed=3, version="3.0.0"),
    }


@pytest.fixture()
def dd(tmp_path: Path, keys: Keys) -> DataDir:
    return init_data_dir(tmp_path / "device", [keys.public])


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` (except the lock file) -> (inode, sha256): detects any write or rename."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "install.lock":
            out[str(p.relative_to(root))] = (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Fix:" in text, text
    return text


def label_of(bundle: Path) -> str:
    with BundleReader(bundle) as r:
        return r.manifest.label


# --- data dir ------------------------------------------------------------------------------------------------
def test_init_layout_state_and_trust(dd: DataDir, keys: Keys) -> None:
    assert (dd.root / "slots" / "a").is_dir() and (dd.root / "slots" / "b").is_dir()
    state = dd.state()
    assert (state.active, state.previous, state.slots) == (None, None, {"a": None, "b": None})
    [key] = dd.trusted_keys()
    assert (dd.root / "trust" / f"{key.key_id}.pub").read_bytes() == keys.public.read_bytes()
    assert dd.active_slot_path() is None
    assert json.loads(dd.state_path.read_bytes())["schema"] == 1


def test_init_is_idempotent_and_adds_keys(dd: DataDir, keys: Keys, bundles: dict[str, Path],
                                          tmp_path: Path) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    other = make_keys(tmp_path / "other")
    again = init_data_dir(dd.root, [other.public])
    assert again.state().active == "a"  # re-init keeps what is installed
    assert len(again.trusted_keys()) == 2
    assert init_data_dir(dd.root, []).state().active == "a"  # keys already trusted: none needed


def test_init_refuses_without_keys_or_with_bad_ones(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(UsageError, match="no trusted key") as ei:
        init_data_dir(tmp_path / "d1", [])
    one_line(ei.value)
    with pytest.raises(SigningKeyError):
        init_data_dir(tmp_path / "d2", [keys.private])  # the private key by mistake
    assert not (tmp_path / "d2").exists()  # validated before anything was written


def test_not_initialised(tmp_path: Path, bundles: dict[str, Path]) -> None:
    with pytest.raises(NotInitializedError, match="fieldpack device init") as ei:
        open_data_dir(tmp_path / "blank")
    assert str(tmp_path / "blank") in one_line(ei.value)
    with pytest.raises(NotInitializedError):
        install_bundle(bundles["v1"], tmp_path / "blank", check=None)
    assert not (tmp_path / "blank").exists()


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_DATA_DIR, str(tmp_path / "env"))
    assert default_data_dir() == tmp_path / "env"
    monkeypatch.delenv(ENV_DATA_DIR)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".local" / "share" / "fieldpack"


def test_damaged_state_is_a_device_error(dd: DataDir) -> None:
    dd.state_path.write_text('{"schema": 1, "active": "c"}')
    with pytest.raises(DeviceError, match="damaged") as ei:
        dd.state()
    one_line(ei.value)


# --- install / rollback --------------------------------------------------------------------------------------
def test_first_install(dd: DataDir, bundles: dict[str, Path]) -> None:
    phases: list[tuple[str, int, int]] = []
    res = install_bundle(bundles["v1"], dd, check=None, on_progress=lambda *a: phases.append(a))
    assert res.changed and res.slot == "a" and res.previous is None
    assert res.label == label_of(bundles["v1"]) and res.slot_path == dd.root / "slots" / "a"
    assert dd.active_slot_path() == res.slot_path
    manifest = dd.verify_slot("a")  # every member re-hashed from disk
    assert (res.slot_path / fmt.MANIFEST_NAME).read_bytes() == BundleReader(bundles["v1"]).manifest_bytes
    assert (res.slot_path / fmt.SIGNATURE_NAME).is_file()
    record = json.loads((res.slot_path / SLOT_RECORD_FILE).read_text())
    assert record["complete"] is True and record["label"] == manifest.label
    total = res.payload_bytes
    assert [p for p in phases if p[0] == "verify"][-1][1:] == (total, total)
    assert [p for p in phases if p[0] == "unpack"][-1][1:] == (total, total)
    assert phases.index(next(p for p in phases if p[0] == "unpack")) > phases.index(phases[0])
    s = status(dd)
    assert s["active"]["label"] == res.label and s["active"]["complete"] and s["previous"] is None
    assert s["active"]["size_bytes"] >= total


def test_upgrade_rollback_and_roll_forward(dd: DataDir, bundles: dict[str, Path]) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    before_a = snapshot(dd.root / "slots" / "a")
    res = install_bundle(bundles["v2"], dd, check=None)
    assert (res.slot, res.label, res.previous) == ("b", "demo@2.0.0", label_of(bundles["v1"]))
    assert snapshot(dd.root / "slots" / "a") == before_a  # the active slot was never written
    st = status(dd)
    assert st["active"]["label"] == "demo@2.0.0" and st["previous"]["label"] == label_of(bundles["v1"])

    back = rollback(dd)
    assert (back.slot, back.label, back.previous) == ("a", label_of(bundles["v1"]), "demo@2.0.0")
    assert dd.active_slot_path() == dd.root / "slots" / "a"
    assert snapshot(dd.root / "slots" / "a") == before_a
    forward = rollback(dd)
    assert (forward.slot, forward.label) == ("b", "demo@2.0.0")

    # a third bundle replaces the older of the two; the one it replaces as active becomes previous
    res3 = install_bundle(bundles["v3"], dd, check=None)
    assert (res3.slot, res3.previous) == ("a", "demo@2.0.0")
    dd.verify_slot("a")
    dd.verify_slot("b")


def test_same_bundle_is_a_noop(dd: DataDir, bundles: dict[str, Path]) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    before = snapshot(dd.root)
    res = install_bundle(bundles["v1"], dd, check=lambda *_: pytest.fail("check must not run for a no-op"))
    assert not res.changed and "already active" in res.message and res.slot == "a"
    assert snapshot(dd.root) == before


def test_rollback_without_previous(dd: DataDir, bundles: dict[str, Path]) -> None:
    with pytest.raises(NoPreviousBundleError) as ei:
        rollback(dd)
    one_line(ei.value)
    assert f"--data-dir {dd.root}" in str(ei.value)  # the fix names this data dir (a device may have several)
    install_bundle(bundles["v1"], dd, check=None)
    with pytest.raises(NoPreviousBundleError):
        rollback(dd)
    install_bundle(bundles["v2"], dd, check=None)
    (dd.root / "slots" / "a" / SLOT_RECORD_FILE).unlink()  # previous slot damaged: not a rollback target
    before = snapshot(dd.root)
    with pytest.raises(NoPreviousBundleError):
        rollback(dd)
    assert snapshot(dd.root) == before and dd.active_slot() == "b"


def test_check_runs_on_the_new_slot_before_it_is_active(dd: DataDir, bundles: dict[str, Path]) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    seen: list[tuple[Path, Manifest, str | None]] = []

    def check(slot: Path, manifest: Manifest) -> None:
        assert (slot / fmt.MODEL_NAME).stat().st_size == manifest.member(fmt.MODEL_NAME).size
        assert (slot / fmt.MANIFEST_NAME).is_file()
        seen.append((slot, manifest, dd.active_slot()))

    install_bundle(bundles["v2"], dd, check=check)
    [(slot, manifest, active_during)] = seen
    assert slot == dd.root / "slots" / "b" and manifest.version == "2.0.0" and active_during == "a"


@pytest.mark.parametrize("exc", [SlotCheckError("smoke question did not retrieve pump.md", hint="rebuild"),
                                 RuntimeError("llama_load_model_from_file failed")])
def test_failed_check_keeps_the_active_bundle(dd: DataDir, bundles: dict[str, Path], exc: Exception) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    before_a = snapshot(dd.root / "slots" / "a")

    def check(slot: Path, manifest: Manifest) -> None:
        raise exc

    with pytest.raises(SlotCheckError) as ei:
        install_bundle(bundles["v2"], dd, check=check)
    text = one_line(ei.value)
    assert "demo@2.0.0" in text and f"{label_of(bundles['v1'])} stays active" in text
    assert str(exc).split(".")[0] in text
    assert dd.active_slot() == "a" and snapshot(dd.root / "slots" / "a") == before_a
    assert list((dd.root / "slots" / "b").iterdir()) == []  # the failed copy is gone
    assert install_bundle(bundles["v2"], dd, check=None).changed  # and the next install works


def test_leftovers_of_an_interrupted_install_are_cleaned(dd: DataDir, bundles: dict[str, Path]) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    junk = dd.root / "slots" / "b" / "embedder"
    junk.mkdir(parents=True)
    (junk / ".model.onnx.abc.tmp").write_bytes(b"half")
    (dd.root / ".state.json.xyz.tmp").write_bytes(b"{")
    state = clean_leftovers(dd, dd.state())
    assert state.active == "a"
    assert list((dd.root / "slots" / "b").iterdir()) == [] and not list(dd.root.glob(".*.tmp"))
    dd.verify_slot("a")


# --- refusals ------------------------------------------------------------------------------------------------
def _hostile(bundle: Path, out: Path, entry: Entry) -> Path:
    entries = raw_entries(bundle, out.parent / f"{out.stem}.members")
    return write_raw_bundle(out, entries[:2] + [entry] + entries[2:])


BAD = {
    "unsigned": (SignatureError, lambda b, d, k: rebuild_bundle(b, d / "x.fpk", None)),
    "untrusted-key": (SignatureError, lambda b, d, k: rebuild_bundle(b, d / "x.fpk", make_keys(d / "stranger"))),
    "flipped-byte": (IntegrityError, lambda b, d, k: flip_byte(b, d / "x.fpk", fmt.MODEL_NAME, at=1234)),
    "flipped-byte-last-member": (IntegrityError, lambda b, d, k: flip_byte(b, d / "x.fpk", fmt.RECIPE_NAME)),
    "truncated": (BundleFormatError, lambda b, d, k: truncated_copy(b, d / "x.fpk", b.stat().st_size // 2)),
    "wrong-version": (UnsupportedFormatVersion,
                      lambda b, d, k: rebuild_bundle(b, d / "x.fpk", k, edit_manifest=lambda m: {**m, "format_version": 9})),
    "dotdot-member": (UnsafeMemberError, lambda b, d, k: _hostile(b, d / "x.fpk", Entry("../x", b"pwned"))),
    "absolute-member": (UnsafeMemberError, lambda b, d, k: _hostile(b, d / "x.fpk", Entry("/tmp/x", b"pwned"))),
    "symlink-member": (UnsafeMemberError, lambda b, d, k: _hostile(
        b, d / "x.fpk", Entry("model.gguf.link", type=tarfile.SYMTYPE, linkname="/etc/passwd"))),
    "missing-file": (InputNotFoundError, lambda b, d, k: d / "not-there.fpk"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_bundle_is_refused_and_nothing_changes(case: str, dd: DataDir, bundles: dict[str, Path],
                                                   keys: Keys, tmp_path: Path) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    install_bundle(bundles["v2"], dd, check=None)  # now b active, a is the rollback target
    err_cls, make = BAD[case]
    work = tmp_path / "bad"
    work.mkdir()
    bad = make(bundles["v3"], work, keys)
    before = snapshot(dd.root)
    with pytest.raises(err_cls) as ei:
        install_bundle(bad, dd, check=lambda *_: pytest.fail("check must not run"))
    one_line(ei.value)
    assert snapshot(dd.root) == before  # active AND rollback target untouched
    assert rollback(dd).label == label_of(bundles["v1"])


def test_not_enough_disk(dd: DataDir, bundles: dict[str, Path]) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    before = snapshot(dd.root)
    probe = ResourceProbe(free_disk=lambda p: 3 * MIB)
    with pytest.raises(InsufficientResourcesError, match=r"needs 16\.\d MiB, 3\.0 MiB free") as ei:
        install_bundle(bundles["v2"], dd, check=None, probe=probe)
    assert "disk" in one_line(ei.value) and str(dd.root) in str(ei.value)
    assert snapshot(dd.root) == before


def test_not_enough_ram_as_the_manifest_claims(dd: DataDir, keys: Keys, bundles: dict[str, Path],
                                               tmp_path: Path) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    huge = make_bundle(tmp_path / "huge.fpk", keys, seed=9, version="9", weights_bytes=1 << 50)  # 1 PiB
    before = snapshot(dd.root)
    with pytest.raises(InsufficientResourcesError, match=r"RAM .* needs 1073741824\.\d MiB, \d+\.\d MiB available"):
        install_bundle(huge, dd, check=None)  # real RAM of this machine
    assert snapshot(dd.root) == before


def test_ram_needed_follows_n_ctx(dd: DataDir, bundles: dict[str, Path]) -> None:
    manifest = BundleReader(bundles["v2"]).manifest
    total = manifest.runtime.memory.total_bytes
    assert ram_needed(manifest) == ram_needed(manifest, N_CTX) == total
    big_ctx = N_CTX * 1024
    assert ram_needed(manifest, big_ctx) == total - kv_bytes(N_CTX) + kv_bytes(big_ctx)
    probe = ResourceProbe(free_disk=lambda p: 10**12, available_ram=lambda: total + 1)
    with pytest.raises(InsufficientResourcesError, match=f"n_ctx={big_ctx}"):
        install_bundle(bundles["v2"], dd, check=None, n_ctx=big_ctx, probe=probe)
    assert dd.active_slot() is None
    assert install_bundle(bundles["v2"], dd, check=None, n_ctx=N_CTX // 2, probe=probe).changed


def test_kv_cache_formula() -> None:
    # Llama-3.2-1B: 16 layers, 32 heads, 8 KV heads, n_embd 2048 -> 32 KiB per token in f16
    assert kv_cache_bytes(1, n_layer=16, n_head_kv=8, head_dim=64) == 32 * 1024
    assert kv_cache_bytes(4096, n_layer=16, n_head_kv=8, head_dim=64) == 128 * MIB


def test_disk_check_counts_the_slot_it_will_free(dd: DataDir, bundles: dict[str, Path]) -> None:
    manifest = BundleReader(bundles["v1"]).manifest
    need = resources.disk_needed(300_000)
    probe = ResourceProbe(free_disk=lambda p: need - 1000, available_ram=lambda: 10**12)
    with pytest.raises(InsufficientResourcesError):
        check_feasibility(manifest, 300_000, dd.root, probe=probe)
    assert check_feasibility(manifest, 300_000, dd.root, reclaimable_bytes=1000, probe=probe).disk_free == need


def test_resource_fallbacks_without_psutil(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with_psutil = resources.available_ram_bytes()
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    st = os.statvfs(tmp_path)
    assert abs(resources.free_disk_bytes(tmp_path) - st.f_bavail * st.f_frsize) < 64 * MIB
    ram = resources.available_ram_bytes()
    assert ram > 0 and abs(ram - with_psutil) < max(256 * MIB, with_psutil // 10)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        1000 kB\nMemFree:          100 kB\nMemAvailable:     512 kB\n")
    assert resources._meminfo_available(meminfo) == 512 * 1024
    meminfo.write_text("MemTotal: 1000 kB\n")
    assert resources._meminfo_available(meminfo) is None


def test_second_install_at_the_same_time(dd: DataDir, bundles: dict[str, Path]) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid())\n"
         "print('locked', flush=True); sys.stdin.read()\n",
         str(dd.lock_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(dd.root)
        with pytest.raises(InstallInProgressError, match=f"pid {holder.pid}") as ei:
            install_bundle(bundles["v2"], dd, check=None)
        one_line(ei.value)
        with pytest.raises(InstallInProgressError):
            rollback(dd)
        assert snapshot(dd.root) == before
    finally:
        holder.kill()
        holder.wait()
    assert install_bundle(bundles["v2"], dd, check=None).changed  # the kernel dropped the dead holder's lock


def test_module_entry_point(dd: DataDir, bundles: dict[str, Path], tmp_path: Path, keys: Keys) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "fieldpack.device.install", "--no-check", "--data-dir", str(dd.root)]
    ok = subprocess.run(cmd + [str(bundles["v1"])], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"installed {label_of(bundles['v1'])} into slot a"
    bad = rebuild_bundle(bundles["v2"], tmp_path / "unsigned.fpk", None)
    fail = subprocess.run(cmd + [str(bad)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert fail.returncode == SignatureError.exit_code
    assert fail.stderr.strip().splitlines()[-1].startswith("error: bundle is unsigned")


def test_errors_are_fieldpack_errors_only(dd: DataDir, tmp_path: Path) -> None:
    junk = tmp_path / "junk.fpk"
    junk.write_bytes(b"\x00" * 10)
    with pytest.raises(FieldpackError):
        install_bundle(junk, dd, check=None)
    assert dd.state().active is None


def test_data_dir_that_trusts_no_key(dd: DataDir, bundles: dict[str, Path]) -> None:
    for key in (dd.root / "trust").iterdir():
        key.unlink()
    with pytest.raises(SignatureError, match="trusts no builder key") as ei:
        install_bundle(bundles["v1"], dd, check=None)
    assert "fieldpack device init" in one_line(ei.value)
    assert dd.state().active is None


def test_bundle_altered_between_verify_and_unpack(dd: DataDir, bundles: dict[str, Path], tmp_path: Path) -> None:
    """Time-of-check/time-of-use: the unpack re-hashes what it writes, so a bundle changed on disk after the
    verify pass is still refused, and the half-written slot is emptied at once."""
    install_bundle(bundles["v1"], dd, check=None)
    before_a = snapshot(dd.root / "slots" / "a")
    victim = tmp_path / "victim.fpk"
    victim.write_bytes(bundles["v2"].read_bytes())
    offset = member_data_offset(victim, fmt.MODEL_NAME) + 10

    def tamper(phase: str, done: int, total: int) -> None:
        if phase == "verify" and done == total:
            with open(victim, "r+b") as fh:
                fh.seek(offset)
                fh.write(b"\xff\xff")

    with pytest.raises(IntegrityError, match="model.gguf"):
        install_bundle(victim, dd, check=None, on_progress=tamper)
    assert dd.active_slot() == "a" and snapshot(dd.root / "slots" / "a") == before_a
    assert list((dd.root / "slots" / "b").iterdir()) == []


def test_write_failure_during_unpack(dd: DataDir, keys: Keys, tmp_path: Path, bundles: dict[str, Path]) -> None:
    """A real write error mid-unpack (RLIMIT_FSIZE makes writes past 1 MiB fail with EFBIG, as a full disk
    would with ENOSPC): one-line error, the active bundle untouched, the partial slot emptied."""
    install_bundle(bundles["v1"], dd, check=None)
    big = make_bundle(tmp_path / "big.fpk", keys, model_bytes=3 << 20, seed=5, version="5")
    before_a = snapshot(dd.root / "slots" / "a")
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
            "from fieldpack.device.install import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, "--no-check", "--data-dir", str(dd.root), str(big)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == UsageError.exit_code, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: cannot write ") and "model.gguf" in line and "Fix:" in line
    assert dd.active_slot() == "a" and snapshot(dd.root / "slots" / "a") == before_a
    assert list((dd.root / "slots" / "b").iterdir()) == []
    assert install_bundle(big, dd, check=None).changed
