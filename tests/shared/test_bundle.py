"""The .fpk writer and reader on real archives: round trip, reproducibility, and every reader error class."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import pytest

from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.bundle import BundleReader, check_member_name, write_bundle
from fieldpack.shared.errors import (
    BundleFormatError,
    InputNotFoundError,
    IntegrityError,
    ManifestError,
    SignatureError,
    SigningKeyError,
    UnsafeMemberError,
    UnsupportedFormatVersion,
)
from fieldpack.shared.signing import load_public_key, sign_manifest
from tests.shared.factories import (
    Entry,
    Keys,
    base_bundle,
    flip_byte,
    make_keys,
    make_manifest,
    make_member_files,
    member_data_offset,
    raw_entries,
    rebuild_bundle,
    truncated_copy,
    write_raw_bundle,
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Path:
    return base_bundle(tmp_path_factory.mktemp("bundle"), keys, model_bytes=200_000)


@pytest.fixture(scope="module")
def trusted(keys: Keys) -> list:
    return [load_public_key(keys.public)]


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Fix:" in text, text
    return text


# --- happy path ----------------------------------------------------------------------------------------------
def test_round_trip_verify_and_extract(bundle: Path, trusted: list, tmp_path: Path) -> None:
    with BundleReader(bundle) as r:
        assert r.signed
        assert r.payload_bytes == sum(m.size for m in r.manifest.members)
        seen: list[int] = []
        assert r.verify(trusted, on_progress=seen.append).key_id == trusted[0].key_id
        assert sum(seen) == r.payload_bytes
        order: list[str] = []
        r.extract_to(tmp_path / "out", on_member=order.append)
        assert order == [m.name for m in r.manifest.members]
        for m in r.manifest.members:
            data = (tmp_path / "out" / m.name).read_bytes()
            assert len(data) == m.size and hashlib.sha256(data).hexdigest() == m.sha256
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_archive_layout_is_the_format(bundle: Path) -> None:
    with tarfile.open(bundle, "r:") as tar:
        names = tar.getnames()
        assert all(ti.isreg() and ti.mtime == 0 for ti in tar.getmembers())
    assert names[:2] == [fmt.MANIFEST_NAME, fmt.SIGNATURE_NAME]
    assert set(fmt.REQUIRED_MEMBERS) <= set(names[2:])


def test_write_is_reproducible(tmp_path: Path, keys: Keys) -> None:
    files = make_member_files(tmp_path / "m", seed=7)
    m = make_manifest(files)
    a = write_bundle(tmp_path / "a.fpk", m, files, keys.private)
    b = write_bundle(tmp_path / "b.fpk", m, files, keys.private)
    assert a.read_bytes() == b.read_bytes()


def test_write_refuses_mismatched_files_and_bad_keys(tmp_path: Path, keys: Keys) -> None:
    files = make_member_files(tmp_path / "m")
    m = make_manifest(files)
    with pytest.raises(ManifestError, match="differ from files"):
        write_bundle(tmp_path / "x.fpk", m, {k: v for k, v in files.items() if k != fmt.RECIPE_NAME}, keys.private)
    with pytest.raises(SigningKeyError):
        write_bundle(tmp_path / "x.fpk", m, files, keys.public)
    files[fmt.RECIPE_NAME].write_bytes(b"changed after describing\n")
    with pytest.raises(IntegrityError, match="changed while the bundle was written"):
        write_bundle(tmp_path / "x.fpk", m, files, keys.private)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing half-written left behind


# --- reader errors -------------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError) as ei:
        BundleReader(tmp_path / "nope.fpk")
    _one_line(ei)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 this is a zip" * 40, os.urandom(4096)])
def test_not_a_tar(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "junk.fpk"
    p.write_bytes(content)
    with pytest.raises(BundleFormatError) as ei:
        BundleReader(p)
    _one_line(ei)


@pytest.mark.parametrize("where", ["in-model", "in-manifest", "half", "last-byte"])
def test_truncated(bundle: Path, tmp_path: Path, where: str) -> None:
    with tarfile.open(bundle) as tar:
        last = tar.getmembers()[-1]
    keep = {"in-model": member_data_offset(bundle, fmt.MODEL_NAME) + 1000,
            "in-manifest": member_data_offset(bundle, fmt.MANIFEST_NAME) + 10,
            "half": bundle.stat().st_size // 2,
            "last-byte": last.offset_data + last.size - 1}[where]
    cut = truncated_copy(bundle, tmp_path / "cut.fpk", keep)
    with pytest.raises(BundleFormatError) as ei:
        BundleReader(cut)
    _one_line(ei)


def test_manifest_not_first(bundle: Path, tmp_path: Path) -> None:
    entries = raw_entries(bundle, tmp_path / "m")
    entries[0], entries[2] = entries[2], entries[0]
    with pytest.raises(BundleFormatError, match="first member"):
        BundleReader(write_raw_bundle(tmp_path / "x.fpk", entries))


def test_extra_missing_and_duplicate_members(bundle: Path, tmp_path: Path) -> None:
    entries = raw_entries(bundle, tmp_path / "m")
    with pytest.raises(BundleFormatError, match="extra: \\['notes.txt'\\]"):
        BundleReader(write_raw_bundle(tmp_path / "extra.fpk", entries + [Entry("notes.txt", b"hi")]))
    without = [e for e in entries if e.name != fmt.INDEX_NAME]
    with pytest.raises(BundleFormatError, match="missing: \\['index.sqlite'\\]"):
        BundleReader(write_raw_bundle(tmp_path / "missing.fpk", without))
    dup = entries + [next(e for e in entries if e.name == fmt.RECIPE_NAME)]
    with pytest.raises(BundleFormatError, match="duplicate"):
        BundleReader(write_raw_bundle(tmp_path / "dup.fpk", dup))


def test_oversized_manifest(tmp_path: Path) -> None:
    big = b"{" + b" " * fmt.MAX_MANIFEST_BYTES + b"}"
    with pytest.raises(BundleFormatError, match="limit"):
        BundleReader(write_raw_bundle(tmp_path / "big.fpk", [Entry(fmt.MANIFEST_NAME, big)]))


@pytest.mark.parametrize("entry", [
    Entry("../escape.txt", b"x"),
    Entry("embedder/../../escape.txt", b"x"),
    Entry("/etc/escape.txt", b"x"),
    Entry("evil-link", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
    Entry("hard-link", type=tarfile.LNKTYPE, linkname="model.gguf"),
    Entry("fifo", type=tarfile.FIFOTYPE),
])
def test_members_that_escape_or_are_not_files(bundle: Path, tmp_path: Path, entry: Entry) -> None:
    entries = raw_entries(bundle, tmp_path / "m")
    hostile = write_raw_bundle(tmp_path / "hostile.fpk", entries[:2] + [entry] + entries[2:])
    with tarfile.open(hostile) as tar:  # the archive really carries the hostile name and type
        ti = tar.getmembers()[2]
        assert (ti.name, ti.type) == (entry.name, entry.type)
    with pytest.raises(UnsafeMemberError) as ei:
        BundleReader(hostile)
    _one_line(ei)


@pytest.mark.parametrize("name", ["a/./b", "a//b", "a\\b", "", "x\x00y", ".", "a/"])
def test_member_name_rules(name: str) -> None:
    with pytest.raises(UnsafeMemberError):
        check_member_name(name)
    check_member_name("embedder/model.onnx")


def test_manifest_that_is_not_json(bundle: Path, tmp_path: Path) -> None:
    entries = raw_entries(bundle, tmp_path / "m")
    entries[0] = Entry(fmt.MANIFEST_NAME, b"{oops")
    with pytest.raises(ManifestError):
        BundleReader(write_raw_bundle(tmp_path / "x.fpk", entries))


def test_wrong_format_version_even_when_signed(bundle: Path, tmp_path: Path, keys: Keys) -> None:
    def bump(doc: dict) -> dict:
        return {**doc, "format_version": 3}

    v2 = rebuild_bundle(bundle, tmp_path / "v3.fpk", keys, edit_manifest=bump)
    with pytest.raises(UnsupportedFormatVersion, match="format_version 3") as ei:
        BundleReader(v2)
    _one_line(ei)


def test_member_size_differs_from_manifest(bundle: Path, tmp_path: Path, keys: Keys) -> None:
    def lie(doc: dict) -> dict:
        for m in doc["members"]:
            if m["name"] == fmt.RECIPE_NAME:
                m["size"] += 1
        return doc

    with pytest.raises(IntegrityError, match="recipe.toml"):
        BundleReader(rebuild_bundle(bundle, tmp_path / "x.fpk", keys, edit_manifest=lie))


def test_flipped_byte_fails_verify_and_extract(bundle: Path, tmp_path: Path, trusted: list) -> None:
    bad = flip_byte(bundle, tmp_path / "bad.fpk", fmt.MODEL_NAME, at=150_000)
    with BundleReader(bad) as r:  # structure is fine: sizes match
        r.verify_signature(trusted)  # and so is the signature (it covers the manifest)
        with pytest.raises(IntegrityError, match="model.gguf") as ei:
            r.verify(trusted)
        _one_line(ei)
        with pytest.raises(IntegrityError):
            r.extract_to(tmp_path / "out")
    assert not (tmp_path / "out" / fmt.MODEL_NAME).exists()  # the bad file never appears under its name
    assert not [p for p in (tmp_path / "out").rglob("*.tmp")]


def test_unsigned_opens_but_does_not_verify(bundle: Path, tmp_path: Path, trusted: list) -> None:
    unsigned = rebuild_bundle(bundle, tmp_path / "unsigned.fpk", None)
    with BundleReader(unsigned) as r:
        assert not r.signed
        with pytest.raises(SignatureError, match="unsigned"):
            r.verify(trusted)


def test_untrusted_key(bundle: Path, tmp_path: Path, trusted: list) -> None:
    stranger = make_keys(tmp_path / "stranger")
    foreign = rebuild_bundle(bundle, tmp_path / "foreign.fpk", stranger)
    with BundleReader(foreign) as r:
        with pytest.raises(SignatureError, match="not trusted") as ei:
            r.verify(trusted)
    _one_line(ei)


def test_manifest_edited_after_signing(bundle: Path, tmp_path: Path, keys: Keys, trusted: list) -> None:
    entries = raw_entries(bundle, tmp_path / "m")
    original_sig = entries[1].data
    doc = json.loads(entries[0].data)
    edited = (json.dumps({**doc, "version": "6.6.6"}, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
    assert edited != entries[0].data
    bad = write_raw_bundle(tmp_path / "x.fpk", [Entry(fmt.MANIFEST_NAME, edited), Entry(fmt.SIGNATURE_NAME, original_sig)]
                           + entries[2:])
    with BundleReader(bad) as r:
        with pytest.raises(SignatureError, match="altered"):
            r.verify(trusted)
    # the same edit, properly re-signed, verifies: the check is about the signature, not the edit
    good_sig = sign_manifest(edited, keys.private)
    ok = write_raw_bundle(tmp_path / "y.fpk", [Entry(fmt.MANIFEST_NAME, edited), Entry(fmt.SIGNATURE_NAME, good_sig)]
                          + entries[2:])
    with BundleReader(ok) as r:
        r.verify(trusted)
        assert r.manifest.version == "6.6.6"
