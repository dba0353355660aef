"""Write and read ``.fpk`` bundles (format: :mod:`shared.bundle_format`; manifest: :mod:`shared.manifest`).

Writing (:func:`write_bundle`) goes to a temp file beside the output, is fsynced and renamed: a failure (disk
full, bad key) leaves no partial bundle. Reading (:class:`BundleReader`) validates the archive's structure and
the manifest on open, then checks the signature and every member's sha256 on :meth:`BundleReader.verify`, and
unpacks with the same checks, streaming, in :meth:`BundleReader.extract_to`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.atomic import atomic_writer, fsync_dir
from fieldpack.shared.hashing import hash_file
from fieldpack.shared.errors import (
    BundleFormatError,
    InputNotFoundError,
    IntegrityError,
    ManifestError,
    OutputNotWritableError,
    UnsafeMemberError,
)
from fieldpack.shared.manifest import Manifest, Member, parse_manifest
from fieldpack.shared.signing import PublicKey, sign_manifest, verify_manifest

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes read per step when hashing or copying
ProgressFn = Callable[[int], None]  # called with bytes just processed


def describe_members(files: Mapping[str, Path]) -> list[Member]:
    """Manifest member entries (name, size, sha256) for ``files`` in archive order.

    Args:
        files: archive member name -> local file. Order: :data:`fmt.REQUIRED_MEMBERS` first, then the rest.
    """
    names = [n for n in fmt.REQUIRED_MEMBERS if n in files] + sorted(n for n in files if n not in fmt.REQUIRED_MEMBERS)
    out = []
    for n in names:
        check_member_name(n)
        size, digest = hash_file(files[n])
        out.append(Member(name=n, size=size, sha256=digest))
    return out


def check_member_name(name: str) -> None:
    """Refuse a member name that could escape the folder it is unpacked into.

    Raises:
        UnsafeMemberError: absolute path, ``..`` component, backslash, empty or NUL-containing name.
    """
    if (not name or name.startswith("/") or "\\" in name or "\x00" in name
            or any(part in ("", ".", "..") for part in name.split("/"))
            or posixpath.normpath(name) != name):
        raise UnsafeMemberError(f"archive member {name!r} would escape the install folder",
                                hint="do not install this bundle; rebuild it with `fieldpack build`")


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    ti.mtime = 0  # reproducible archives: the manifest carries the creation time
    ti.uname = ti.gname = "fieldpack"
    return ti


def write_bundle(out_path: Path, manifest: Manifest, files: Mapping[str, Path], signing_key: Path) -> Path:
    """Sign ``manifest`` and write the bundle atomically.

    Args:
        out_path: destination ``.fpk``; its folder must exist and be writable.
        manifest: complete manifest whose ``members`` describe ``files`` exactly (see :func:`describe_members`).
        files: member name -> local file path.
        signing_key: ed25519 private key (PEM) from ``fieldpack keygen``.

    Raises:
        SigningKeyError: the key is missing or of the wrong type (checked before anything is written).
        IntegrityError: a file changed since it was described in the manifest.
        OutputNotWritableError: the output cannot be written or the disk filled up; nothing is left behind.
    """
    out_path = Path(out_path)
    listed = {m.name: m for m in manifest.members}
    if set(listed) != set(files):
        raise ManifestError(f"manifest members {sorted(listed)} differ from files {sorted(files)}",
                            hint="describe the files with describe_members()")
    manifest_bytes = manifest.to_bytes()
    signature = sign_manifest(manifest_bytes, signing_key)
    with atomic_writer(out_path) as raw:
        with tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(_tarinfo(fmt.MANIFEST_NAME, len(manifest_bytes)), io.BytesIO(manifest_bytes))
            tar.addfile(_tarinfo(fmt.SIGNATURE_NAME, len(signature)), io.BytesIO(signature))
            for m in manifest.members:
                if Path(files[m.name]).stat().st_size != m.size:  # shrunk: tarfile would fail as an OSError
                    raise IntegrityError(f"{files[m.name]} changed while the bundle was written",
                                         hint="rebuild the bundle")
                with open(files[m.name], "rb") as fh:
                    hashing = _HashingReader(fh)
                    tar.addfile(_tarinfo(m.name, m.size), hashing)
                if hashing.size != m.size or hashing.hexdigest() != m.sha256:
                    raise IntegrityError(f"{files[m.name]} changed while the bundle was written",
                                         hint="rebuild the bundle")
    log.info("wrote bundle %s (%d bytes)", out_path, out_path.stat().st_size)
    return out_path


class _HashingReader(io.RawIOBase):
    """File wrapper that hashes what is read through it."""

    def __init__(self, fh: io.BufferedReader) -> None:
        self._fh, self._h, self.size = fh, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._h.update(data)
        self.size += len(data)
        return data

    def hexdigest(self) -> str:
        return self._h.hexdigest()


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int
    offset: int  # byte offset of the member's data in the archive


class BundleReader:
    """Open a ``.fpk`` and validate its structure and manifest.

    On open: the file is a tar archive; ``manifest.json`` comes first, the signature second (or the bundle is
    unsigned, which :meth:`verify` refuses); every member is a regular file with a safe relative name; no
    member's data runs past the end of the file (truncation); the manifest parses, has a supported
    ``format_version``, and lists exactly the members present with their sizes.

    Raises (on construction):
        InputNotFoundError: the path is missing, a folder, or unreadable.
        BundleFormatError: not a tar archive, truncated, members out of order, or extra/missing members.
        UnsafeMemberError: a member with an absolute path, ``..``, or a link/device type.
        ManifestError, UnsupportedFormatVersion: see :func:`shared.manifest.parse_manifest`.
        IntegrityError: a member's size differs from the manifest.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            inside = sorted(self.path.glob(f"*{fmt.EXTENSION}"))
            raise InputNotFoundError(f"{self.path} is a folder, not a {fmt.EXTENSION} bundle",
                                     hint=f"pass the bundle inside it, e.g. {inside[0]}" if inside else
                                     f"pass the path of a {fmt.EXTENSION} file")
        if not self.path.is_file():
            raise InputNotFoundError(f"bundle {self.path} does not exist", hint="check the path to the .fpk file")
        try:
            self._file_size = self.path.stat().st_size
            self._fh = open(self.path, "rb")
        except OSError as exc:
            raise InputNotFoundError(f"cannot read bundle {self.path}: {exc.strerror}", hint="check its permissions") from exc
        try:
            self._entries = self._scan()
            self.manifest_bytes = self._read_entry(self._entries[0], fmt.MAX_MANIFEST_BYTES)
            sig = self._entries[1] if len(self._entries) > 1 and self._entries[1].name == fmt.SIGNATURE_NAME else None
            self.signature_bytes = self._read_entry(sig, fmt.MAX_SIGNATURE_BYTES) if sig else None
            self.manifest = parse_manifest(self.manifest_bytes, origin=f"{self.path.name}:{fmt.MANIFEST_NAME}")
            self._check_members()
        except BaseException:
            self._fh.close()
            raise

    # -- structure -------------------------------------------------------------------------------------------
    def _scan(self) -> list[_Entry]:
        self._fh.seek(0)
        try:
            tar = tarfile.open(fileobj=self._fh, mode="r:")
            infos = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BundleFormatError(f"{self.path} is not a fieldpack bundle or is truncated ({exc})",
                                    hint="copy the .fpk again from the build host") from exc
        if not infos:
            raise BundleFormatError(f"{self.path} is an empty archive", hint="pass a bundle made by `fieldpack build`")
        entries = []
        for ti in infos:
            check_member_name(ti.name)
            if not ti.isreg():
                raise UnsafeMemberError(f"archive member {ti.name!r} is a link or special file, not a regular file",
                                        hint="do not install this bundle; rebuild it with `fieldpack build`")
            if ti.offset_data + ti.size > self._file_size:
                raise BundleFormatError(
                    f"{self.path} is truncated: member {ti.name} needs {ti.offset_data + ti.size} bytes, "
                    f"file has {self._file_size}", hint="copy the .fpk again from the build host")
            entries.append(_Entry(ti.name, ti.size, ti.offset_data))
        if entries[0].name != fmt.MANIFEST_NAME:
            raise BundleFormatError(f"{self.path}: first member is {entries[0].name!r}, not {fmt.MANIFEST_NAME}",
                                    hint="pass a bundle made by `fieldpack build`")
        return entries

    def _read_entry(self, e: _Entry, limit: int) -> bytes:
        if e.size > limit:
            raise BundleFormatError(f"{self.path}: {e.name} is {e.size} bytes (limit {limit})",
                                    hint="pass a bundle made by `fieldpack build`")
        self._fh.seek(e.offset)
        data = self._fh.read(e.size)
        if len(data) != e.size:
            raise BundleFormatError(f"{self.path} is truncated inside {e.name}", hint="copy the .fpk again")
        return data

    def _check_members(self) -> None:
        payload = [e for e in self._entries[1:] if e.name != fmt.SIGNATURE_NAME]
        listed = {m.name: m for m in self.manifest.members}
        present = [e.name for e in payload]
        if len(set(present)) != len(present):
            raise BundleFormatError(f"{self.path} has duplicate members", hint="rebuild the bundle")
        extra = sorted(set(present) - set(listed))
        missing = sorted(set(listed) - set(present))
        if extra or missing:
            raise BundleFormatError(
                f"{self.path}: members not matching the manifest (extra: {extra or 'none'}, missing: {missing or 'none'})",
                hint="rebuild the bundle with `fieldpack build`")
        for e in payload:
            if e.size != listed[e.name].size:
                raise IntegrityError(f"{self.path}: member {e.name} is {e.size} bytes, manifest says {listed[e.name].size}",
                                     hint="copy the .fpk again from the build host")
        self._payload = payload

    # -- public ----------------------------------------------------------------------------------------------
    @property
    def signed(self) -> bool:
        """True when the archive carries a signature member (validity is checked by :meth:`verify`)."""
        return self.signature_bytes is not None

    @property
    def payload_bytes(self) -> int:
        """Total size of the payload members (bytes), i.e. what extraction writes."""
        return sum(e.size for e in self._payload)

    def verify_signature(self, trusted: list[PublicKey]) -> PublicKey:
        """Check the manifest's signature. Raises SignatureError; returns the verifying key."""
        return verify_manifest(self.manifest_bytes, self.signature_bytes, trusted)

    def verify(self, trusted: list[PublicKey], on_progress: ProgressFn | None = None) -> PublicKey:
        """Check the signature, then every member's sha256 against the manifest (streaming).

        Raises:
            SignatureError: see :func:`shared.signing.verify_manifest`.
            IntegrityError: a member's sha256 differs (names the member).
        """
        key = self.verify_signature(trusted)
        self.verify_members(on_progress)
        return key

    def verify_members(self, on_progress: ProgressFn | None = None) -> None:
        """Check every member's sha256 against the manifest (streaming; no signature check, so a build host that
        does not hold the devices' trusted keys can still refuse a damaged bundle before sending it anywhere).

        Raises:
            IntegrityError: a member's sha256 differs (names the member).
        """
        for e in self._payload:
            self._copy(e, None, on_progress)

    def extract_to(self, dest: Path, on_progress: ProgressFn | None = None,
                   on_member: Callable[[str], None] | None = None) -> None:
        """Unpack every payload member under ``dest`` (created if needed), checking each sha256 as it streams,
        fsyncing each file and folder. The signature is NOT checked here: call :meth:`verify_signature` first.

        Raises:
            IntegrityError: a member's bytes differ from the manifest; the partial file is removed.
            OutputNotWritableError: ``dest`` cannot be written (disk full, permissions).
        """
        dest = Path(dest)
        _mkdir(dest)
        root = dest.resolve()
        for e in self._payload:
            target = (dest / e.name)
            if root not in target.resolve().parents:
                raise UnsafeMemberError(f"archive member {e.name!r} would escape {dest}", hint="do not install this bundle")
            _mkdir(target.parent)
            if on_member:
                on_member(e.name)
            with atomic_writer(target) as out:
                self._copy(e, out, on_progress)
            fsync_dir(target.parent)
        fsync_dir(dest)

    def _copy(self, e: _Entry, out, on_progress: ProgressFn | None) -> None:
        want = self.manifest.member(e.name)
        h = hashlib.sha256()
        self._fh.seek(e.offset)
        left = e.size
        while left:
            block = self._fh.read(min(_CHUNK, left))
            if not block:
                raise BundleFormatError(f"{self.path} is truncated inside {e.name}", hint="copy the .fpk again")
            h.update(block)
            if out is not None:
                out.write(block)
            left -= len(block)
            if on_progress:
                on_progress(len(block))
        if h.hexdigest() != want.sha256:
            raise IntegrityError(f"member {e.name} of {self.path} does not match its sha256 in the manifest",
                                 hint="the bundle was altered or damaged in transit; copy it again from the build host")

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "BundleReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot create folder {path}: {exc.strerror or exc}",
                                     hint="free space or fix the permissions of that file system") from exc


def open_bundle(path: Path) -> BundleReader:
    """Open and validate a bundle; see :class:`BundleReader` for the errors raised."""
    return BundleReader(path)


__all__ = ["BundleReader", "open_bundle", "write_bundle", "describe_members", "hash_file", "check_member_name"]
