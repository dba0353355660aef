"""Everyday device operations on real (synthetic-member) signed bundles: repair a damaged active slot, refuse a
downgrade or another bundle name, list/remove slots, trust keys, status summary, inspect's signature status.
Library calls and the installed ``fieldpack`` command (tests.cli.conftest.run_cli)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fieldpack.device.install import check_upgrade, install_bundle, remove_slot, rollback
from fieldpack.device.install import status as device_status
from fieldpack.device.slots import DataDir, init_data_dir
from fieldpack.shared.errors import ActiveSlotError, DowngradeError, NoActiveBundleError, SlotCheckError
from tests.cli.conftest import assert_one_line_error, run_cli
from tests.shared.factories import Keys, flip_byte, make_bundle, make_keys

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("other-keys"))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bundles")
    return {
        "v1": make_bundle(d / "v1.fpk", keys, model_bytes=60_000, seed=1, version="1.9.0"),
        "v2": make_bundle(d / "v2.fpk", keys, model_bytes=50_000, seed=2, version="1.10.0"),
        "other": make_bundle(d / "other.fpk", keys, model_bytes=40_000, seed=3, name="other", version="5.0.0"),
    }


@pytest.fixture()
def dd(tmp_path: Path, keys: Keys) -> DataDir:
    return init_data_dir(tmp_path / "device", [keys.public])


def _damage(dd: DataDir, member: str = "model.gguf", *, truncate: bool = False) -> None:
    path = dd.active_slot_path() / member
    data = bytearray(path.read_bytes())
    if truncate:
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))


def test_version_and_name_rules() -> None:
    check_upgrade("demo@1.9.0", "demo", "1.10.0")  # PEP 440, not string order
    check_upgrade("demo@1.0.0", "demo", "1.0.0")  # a rebuild of the same version
    check_upgrade("demo@nightly-a", "demo", "nightly-b")  # not comparable: only the name is checked
    for old, name, version, needle in [("demo@1.10.0", "demo", "1.9.0", "older"), ("demo@1.0.0", "other", "2.0.0", "another bundle")]:
        with pytest.raises(DowngradeError, match=needle) as ei:
            check_upgrade(old, name, version)
        assert "--allow-downgrade" in str(ei.value) and ei.value.exit_code == 6


def test_downgrade_and_name_change_refused_unless_allowed(dd: DataDir, bundles: dict[str, Path]) -> None:
    install_bundle(bundles["v2"], dd, check=None)
    for b in ("v1", "other"):
        with pytest.raises(DowngradeError):
            install_bundle(bundles[b], dd, check=None)
        assert device_status(dd)["active"]["label"] == "demo@1.10.0"  # nothing changed
    res = install_bundle(bundles["v1"], dd, check=None, allow_downgrade=True)
    assert res.changed and "replaced demo@1.10.0" in res.message
    r = run_cli("install", str(bundles["v2"]), "--data-dir", str(dd.root), "--bogus")  # CLI has the flag
    assert_one_line_error(r, 2, "--bogus")
    assert "--allow-downgrade" in run_cli("install", "-h").stdout


@pytest.mark.parametrize("truncate", [False, True], ids=["flipped byte", "truncated"])
def test_damaged_active_slot_is_shown_verified_and_repaired(dd: DataDir, bundles: dict[str, Path], truncate: bool) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    install_bundle(bundles["v2"], dd, check=None)
    r = run_cli("verify", "--installed", "--data-dir", str(dd.root))
    assert r.returncode == 0 and r.stdout.startswith("OK demo@1.10.0"), r.stderr
    _damage(dd, truncate=truncate)
    r = run_cli("verify", "--installed", "--data-dir", str(dd.root))
    assert_one_line_error(r, 4, "model.gguf", "fieldpack install")
    st = device_status(dd)
    if truncate:  # the cheap status check sees sizes, not contents
        assert "model.gguf" in st["active"]["damage"]
        r = run_cli("status", "--data-dir", str(dd.root))
        assert "DAMAGED" in r.stdout and "model.gguf" in r.stdout
    res = install_bundle(bundles["v2"], dd, check=None)  # the same bundle again: repair, not "nothing to do"
    assert res.changed and res.message.startswith("repaired demo@1.10.0")
    r = run_cli("verify", "--installed", "--data-dir", str(dd.root))
    assert r.returncode == 0, r.stderr
    assert device_status(dd)["active"]["damage"] is None
    noop = install_bundle(bundles["v2"], dd, check=None)
    assert not noop.changed and "nothing to do" in noop.message


def test_a_damaged_copy_of_the_active_bundle_is_refused_not_nothing_to_do(dd: DataDir, bundles: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    """A trial flipped a byte in a copy of the active bundle and `install` said "nothing to do", exit 0: a flash
    script would call that file good. The file is verified whole first; the device is left as it was."""
    from fieldpack.shared import bundle_format as fmt

    install_bundle(bundles["v2"], dd, check=None)
    before = _snapshot(dd.root)
    bad = flip_byte(bundles["v2"], tmp_path / "copy.fpk", fmt.MODEL_NAME, at=1234)
    r = run_cli("install", str(bad), "--data-dir", str(dd.root))
    assert_one_line_error(r, 4, "model.gguf")
    assert _snapshot(dd.root) == before


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` -> (inode, bytes): detects any write or rename."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def run_module_install(bundle: Path, dd: DataDir) -> subprocess.CompletedProcess[str]:
    """``python -m fieldpack.device.install --no-check BUNDLE --data-dir D`` in a child process (synthetic models
    cannot pass the runtime's check, which ``fieldpack install`` always runs)."""
    return subprocess.run([sys.executable, "-m", "fieldpack.device.install", "--no-check", str(bundle),
                           "--data-dir", str(dd.root)], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _active_damaged_with_previous(dd: DataDir, bundles: dict[str, Path]) -> None:
    """The trial's device: slot a = demo@1.9.0 active (damaged), slot b = demo@1.10.0 previous (healthy)."""
    install_bundle(bundles["v1"], dd, check=None)
    install_bundle(bundles["v2"], dd, check=None)
    rollback(dd)
    assert dd.active_slot() == "a" and dd.state().previous == "b"
    _damage(dd)


def test_repair_keeps_the_previous_bundle_for_rollback(dd: DataDir, bundles: dict[str, Path]) -> None:
    """Repairing the damaged active slot rewrites that slot; the healthy previous bundle stays untouched."""
    _active_damaged_with_previous(dd, bundles)
    before_b = _snapshot(dd.slot_path("b"))
    r = run_module_install(bundles["v1"], dd)  # the install entry point, as a technician runs it
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("repaired demo@1.9.0 in slot a") and "demo@1.10.0 kept for rollback" in r.stdout
    state = dd.state()
    assert (state.active, state.previous) == ("a", "b")
    assert dd.verify_slot("a").label == "demo@1.9.0"
    assert _snapshot(dd.slot_path("b")) == before_b  # the rollback target was never written
    assert rollback(dd).label == "demo@1.10.0"
    dd.verify_slot("b")


def test_repair_without_previous_uses_the_empty_slot(dd: DataDir, bundles: dict[str, Path]) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    _damage(dd)
    res = install_bundle(bundles["v1"], dd, check=None)
    assert (res.slot, res.previous) == ("b", None) and "reinstalled into slot b" in res.message
    assert dd.verify_slot("b").label == "demo@1.9.0" and dd.state().slots["a"] is None


def test_failed_repair_keeps_the_previous_bundle_and_says_so(dd: DataDir, bundles: dict[str, Path]) -> None:
    _active_damaged_with_previous(dd, bundles)
    before_b = _snapshot(dd.slot_path("b"))

    def check(slot: Path, manifest) -> None:
        raise RuntimeError("llama_load_model_from_file failed")

    with pytest.raises(SlotCheckError) as ei:
        install_bundle(bundles["v1"], dd, check=check)
    text = str(ei.value)
    assert "\n" not in text and "Fix:" in text and "no bundle is active now" in text
    assert "demo@1.10.0 is kept for rollback" in text and "fieldpack rollback --data-dir" in text
    state = dd.state()
    assert (state.active, state.previous, state.slots["a"]) == (None, "b", None)
    assert list(dd.slot_path("a").iterdir()) == [] and _snapshot(dd.slot_path("b")) == before_b
    with pytest.raises(NoActiveBundleError, match="fieldpack rollback"):  # what ask/serve/verify now say
        dd.require_active_slot_path()
    assert_one_line_error(run_cli("verify", "--installed", "--data-dir", str(dd.root)), 6, "demo@1.10.0",
                          "fieldpack rollback")
    res = install_bundle(bundles["v1"], dd, check=None)  # the retry lands beside the kept bundle
    assert (res.slot, res.previous) == ("a", "demo@1.10.0") and dd.state().previous == "b"
    assert _snapshot(dd.slot_path("b")) == before_b


def test_a_folder_given_as_the_bundle(dd: DataDir, bundles: dict[str, Path], tmp_path: Path) -> None:
    """`fieldpack install demo-out`: the folder is named as a folder (not "does not exist"), with a fix that
    names a bundle inside it when there is one; nothing is written."""
    folder = tmp_path / "demo-out"
    folder.mkdir()
    r = run_cli("install", str(folder), "--data-dir", str(dd.root))
    line = assert_one_line_error(r, 2, f"{folder} is a folder, not a .fpk bundle", "pass the path of a .fpk file")
    assert "does not exist" not in line
    (folder / "riverside-ops-1.0.0.fpk").write_bytes(bundles["v1"].read_bytes())
    r = run_cli("install", str(folder), "--data-dir", str(dd.root))
    assert_one_line_error(r, 2, f"Fix: pass the bundle inside it, e.g. {folder / 'riverside-ops-1.0.0.fpk'}")
    assert_one_line_error(run_cli("inspect", str(folder)), 2, "is a folder, not a .fpk bundle")
    assert dd.state().active is None and not any(dd.slot_path("a").iterdir())


def test_status_summary_list_and_remove(dd: DataDir, bundles: dict[str, Path]) -> None:
    install_bundle(bundles["v1"], dd, check=None)
    install_bundle(bundles["v2"], dd, check=None)
    r = run_cli("status", "--data-dir", str(dd.root))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "{" not in out and "active: demo@1.10.0 in slot" in out and "previous: demo@1.9.0" in out
    assert "documents" in out and "chunks" in out and "memory at n_ctx" in out and "trusted keys:" in out
    js = json.loads(run_cli("status", "--data-dir", str(dd.root), "--json").stdout)
    assert js["active"]["label"] == "demo@1.10.0" and js["active"]["bundle"]["version"] == "1.10.0"
    lines = run_cli("list", "--data-dir", str(dd.root)).stdout.splitlines()
    assert any("demo@1.10.0  active" in ln for ln in lines) and any("demo@1.9.0  previous" in ln for ln in lines)
    assert_one_line_error(run_cli("remove", "demo@1.10.0", "--data-dir", str(dd.root)), 6, "active")  # device
    assert_one_line_error(run_cli("remove", "nope@1", "--data-dir", str(dd.root)), 2, "nope@1", "fieldpack list")
    r = run_cli("remove", "demo@1.9.0", "--data-dir", str(dd.root))
    assert r.returncode == 0 and "removed demo@1.9.0" in r.stdout, r.stderr
    assert device_status(dd)["previous"] is None
    assert any("(empty)" in ln for ln in run_cli("list", "--data-dir", str(dd.root)).stdout.splitlines())
    empty = next(s for s in ("a", "b") if s != dd.active_slot())
    r = run_cli("remove", empty, "--data-dir", str(dd.root))  # a trial read "removed (nothing recorded)"
    assert r.returncode == 0 and f"slot {empty} holds no bundle; nothing to remove" in r.stdout, r.stdout
    (dd.slot_path(empty) / "model.gguf.part").write_bytes(b"x")  # what a failed install may leave
    r = run_cli("remove", empty, "--data-dir", str(dd.root))
    assert "its leftover files are removed" in r.stdout and not any(dd.slot_path(empty).iterdir())
    with pytest.raises(ActiveSlotError):
        remove_slot(dd, dd.active_slot())


def test_trust_add_list_remove(dd: DataDir, keys: Keys, other_keys: Keys) -> None:
    from fieldpack.shared.signing import load_public_key

    mine, other = load_public_key(keys.public).key_id, load_public_key(other_keys.public).key_id
    d = str(dd.root)
    assert mine in run_cli("trust", "list", "--data-dir", d).stdout
    r = run_cli("trust", "add", str(other_keys.public), "--data-dir", d)
    assert r.returncode == 0 and "now trusted; 2 trusted key(s)" in r.stdout, r.stderr
    r = run_cli("trust", "add", str(other_keys.public), "--data-dir", d)
    assert "already trusted; 2 trusted key(s)" in r.stdout
    assert {k["key_id"] for k in json.loads(run_cli("trust", "list", "--json", "--data-dir", d).stdout)} == {mine, other}
    assert_one_line_error(run_cli("trust", "remove", "0123456789abcdef", "--data-dir", d), 2, "trust list")
    r = run_cli("trust", "remove", other, "--data-dir", d)
    assert r.returncode == 0 and "1 trusted key(s)" in r.stdout
    assert_one_line_error(run_cli("trust", "remove", mine, "--data-dir", d), 2, "only trusted key")
    r = run_cli("device", "init", "--data-dir", d, "--trust", str(other_keys.public))  # the count it prints is right
    assert r.stdout.startswith(f"kept {d} ") and "trusts 2 key(s), 1 of them new" in r.stdout  # not "initialised"
    r = run_cli("device", "init", "--data-dir", d, "--trust", str(other_keys.public))
    assert "trusts 2 key(s), 0 of them new" in r.stdout
    fresh = str(dd.root.parent / "fresh-dd")
    r = run_cli("device", "init", "--data-dir", fresh, "--trust", str(other_keys.public))
    assert r.returncode == 0 and r.stdout.startswith(f"initialised {fresh};") and "trusts 1 key(s)" in r.stdout


def test_removing_the_key_of_the_active_bundle_says_so(dd: DataDir, bundles: dict[str, Path], keys: Keys,
                                                      other_keys: Keys) -> None:
    from fieldpack.shared.signing import load_public_key

    d = str(dd.root)
    install_bundle(bundles["v1"], dd, check=None)
    run_cli("trust", "add", str(other_keys.public), "--data-dir", d)
    r = run_cli("trust", "remove", load_public_key(other_keys.public).key_id, "--data-dir", d)
    assert r.returncode == 0 and "note:" not in r.stderr  # signs nothing installed
    run_cli("trust", "add", str(other_keys.public), "--data-dir", d)
    r = run_cli("trust", "remove", load_public_key(keys.public).key_id, "--data-dir", d)
    assert r.returncode == 0 and "1 trusted key(s)" in r.stdout
    assert "note: the active demo@1.9.0 is signed by this key" in r.stderr, r.stderr


def test_inspect_signature_status(bundles: dict[str, Path], keys: Keys, other_keys: Keys, tmp_path: Path) -> None:
    b = str(bundles["v1"])
    r = run_cli("inspect", b, "--trust", str(keys.public))
    assert r.returncode == 0 and "valid signature" in r.stdout, r.stderr
    r = run_cli("inspect", b, "--trust", str(other_keys.public))
    assert_one_line_error(r, 4, "signer not trusted")
    assert "signer not trusted" in r.stdout and "INVALID" not in r.stdout
    r = run_cli("inspect", b, "--json", "--trust", str(other_keys.public))
    assert r.returncode == 4 and json.loads(r.stdout)["signature"]["status"] == "signer_not_trusted"
    doc = json.loads(run_cli("inspect", b, "--json").stdout)
    assert doc["signature"]["status"] == "not_checked" and doc["name"] == "demo"
    from fieldpack.shared import bundle_format as fmt
    from tests.shared.factories import Entry, unpack_members, write_raw_bundle

    manifest, sig, files = unpack_members(bundles["v1"], tmp_path / "members")
    altered = manifest.replace(b'"1.9.0"', b'"9.9.9"')
    assert altered != manifest and sig is not None
    bad = write_raw_bundle(tmp_path / "altered.fpk", [Entry(fmt.MANIFEST_NAME, altered), Entry(fmt.SIGNATURE_NAME, sig),
                                                      *[Entry(n, p) for n, p in files.items()]])
    r = run_cli("inspect", str(bad), "--json", "--trust", str(keys.public))
    assert r.returncode == 4 and json.loads(r.stdout)["signature"]["status"] == "invalid"
    r = run_cli("inspect", str(bad), "--trust", str(keys.public))
    assert_one_line_error(r, 4, "INVALID", "get a fresh copy")  # the key is trusted: trusting it is no fix
    assert "only if you know it" not in r.stderr
    r = run_cli("inspect", b, "--trust", str(other_keys.public))
    assert "only if you know it" in r.stderr  # another signer: trusting its key is the fix, if it is known
