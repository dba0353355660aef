"""Bytes -> normalised text: encoding detection, BOM, line ends, binary detection.

Order tried: a BOM decides (UTF-8 -> ``utf-8-sig``, UTF-16 LE/BE -> ``utf-16``); else strict ``utf-8``, then
``cp1252`` (Windows "ANSI", a superset of latin-1's printable range), then ``latin-1`` (never fails). Files
with NUL bytes (and no UTF-16 BOM) or with many control characters after decoding are binary.

Normalisation: CRLF and lone CR become LF, Unicode NFC, a leading U+FEFF is dropped. So a file saved with
Windows line ends gives exactly the same text, lines and chunks as the same file with Unix line ends.
"""

from __future__ import annotations

import codecs
import unicodedata
from dataclasses import dataclass

from fieldpack.builder.ingest.model import SkipFile

#: Share of control characters (C0 except tab/LF/CR/FF/VT, plus C1) above which decoded text is binary.
MAX_CONTROL_SHARE = 0.05
_ALLOWED_CONTROLS = {"\t", "\n", "\r", "\f", "\v", "\x1b"}


@dataclass(frozen=True)
class Decoded:
    """Normalised text of a file and how it was stored.

    Attributes:
        text: the text, LF line ends, NFC, no BOM.
        encoding: codec used (``utf-8``, ``utf-8-sig``, ``utf-16``, ``cp1252``, ``latin-1``).
        had_bom: the bytes began with a byte-order mark.
        crlf: the bytes used CRLF or CR line ends.
    """

    text: str
    encoding: str
    had_bom: bool
    crlf: bool


def decode_document(raw: bytes) -> Decoded:
    """Decode and normalise a text document.

    Raises:
        SkipFile: ``"empty"`` (no bytes or whitespace only), ``"binary (NUL bytes)"``,
            ``"binary (control characters)"``, or ``"decode error (...)"`` for a BOM-marked file whose bytes
            do not decode in that encoding.
    """
    if not raw.strip():
        raise SkipFile("empty")
    had_bom = False
    if raw.startswith(codecs.BOM_UTF8):
        encoding, had_bom = "utf-8-sig", True
        text = _strict(raw, encoding)
    elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding, had_bom = "utf-16", True
        text = _strict(raw, encoding)
    elif b"\x00" in raw:
        raise SkipFile("binary (NUL bytes)")
    else:
        for encoding in ("utf-8", "cp1252"):
            try:
                text = raw.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
        else:
            encoding, text = "latin-1", raw.decode("latin-1")  # maps every byte: never fails
    if text.startswith("\ufeff"):
        text = text[1:]
    controls = sum(1 for ch in text if _is_control(ch))
    if controls > MAX_CONTROL_SHARE * max(len(text), 1):
        raise SkipFile("binary (control characters)")
    crlf = "\r" in text
    if crlf:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", text)
    if not text.strip():
        raise SkipFile("empty")
    return Decoded(text=text, encoding=encoding, had_bom=had_bom, crlf=crlf)


def _strict(raw: bytes, encoding: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise SkipFile(f"decode error ({encoding} BOM but invalid {encoding} at byte {exc.start})") from exc


def _is_control(ch: str) -> bool:
    o = ord(ch)
    return (o < 0x20 and ch not in _ALLOWED_CONTROLS) or o == 0x7F or 0x80 <= o <= 0x9F
