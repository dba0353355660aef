"""Bytes -> normalised text: encoding detection, BOM, line ends, binary detection.

Order tried: a BOM decides (UTF-8 -> ``utf-8-sig``, UTF-16 LE/BE -> ``utf-16``); else strict ``utf-8``; else,
when the bytes are UTF-8 but for a few invalid sequences (at most 2, or :data:`MAX_UTF8_REPLACED` of the
non-ASCII sequences, and fewer than the valid ones), ``utf-8`` with those bytes replaced by U+FFFD (a legacy codec would
garble every other non-ASCII character of the file); else a legacy encoding guessed by charset-normalizer (a
well-kept detector that tells cp1251 from cp1252, which a fixed cp1252 fallback cannot), falling back to
``cp1252`` then ``latin-1`` (never fails). Files with NUL bytes (and no UTF-16 BOM) or with many control
characters after decoding are binary. :attr:`Decoded.note` says what was guessed or replaced, for the report.

Normalisation: CRLF and lone CR become LF, a leading U+FEFF is dropped, then
:func:`fieldpack.shared.text.normalize_for_search` (NFC, ligatures folded, no C0/C1 control characters). So a file saved with
Windows line ends gives exactly the same text, lines and chunks as the same file with Unix line ends.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from fieldpack.builder.ingest.model import SkipFile
from fieldpack.shared.text import count_controls, normalize_for_search

#: Share of control characters (C0 except tab/LF/CR/FF/VT, plus C1) above which decoded text is binary.
MAX_CONTROL_SHARE = 0.05
#: Smallest charset-normalizer coherence (0..1, how much the text looks like a language) for its guess to win.
MIN_COHERENCE = 0.2
#: Share of a file's non-ASCII byte sequences that may be invalid UTF-8 for it still to be read as UTF-8.
MAX_UTF8_REPLACED = 0.05
_ALLOWED_CONTROLS = {"\t", "\n", "\r", "\f", "\v", "\x1b"}


@dataclass(frozen=True)
class Decoded:
    """Normalised text of a file and how it was stored.

    Attributes:
        text: the text, LF line ends, NFC, no BOM.
        encoding: codec used (``utf-8``, ``utf-8-sig``, ``utf-16``, ``cp1252``, ``latin-1``).
        had_bom: the bytes began with a byte-order mark.
        crlf: the bytes used CRLF or CR line ends.
        note: what was guessed or replaced (``"guessed cp1251"``, ``"3 invalid UTF-8 bytes replaced"``,
            ``"2 control characters removed"``), ``""`` when the file was plain valid text.
    """

    text: str
    encoding: str
    had_bom: bool
    crlf: bool
    note: str = ""


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
    notes: list[str] = []
    if not had_bom:
        encoding, text, note = _decode_unmarked(raw)
        if note:
            notes.append(note)
    if text.startswith("\ufeff"):
        text = text[1:]
    controls = sum(1 for ch in text if _is_control(ch))
    if controls > MAX_CONTROL_SHARE * max(len(text), 1):
        raise SkipFile("binary (control characters)")
    stray = count_controls(text.replace("\r", ""))
    if stray:
        notes.append(f"{stray} control character{'s' if stray != 1 else ''} removed")
    crlf = "\r" in text
    if crlf:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = normalize_for_search(text)  # NFC, ligatures/full-width folded, controls removed (shared.text)
    if not text.strip():
        raise SkipFile("empty")
    return Decoded(text=text, encoding=encoding, had_bom=had_bom, crlf=crlf, note="; ".join(notes))


def _decode_unmarked(raw: bytes) -> tuple[str, str, str]:
    """(encoding, text, note) of bytes without a BOM; see the module docstring for the order."""
    try:
        return "utf-8", raw.decode("utf-8"), ""
    except UnicodeDecodeError:
        pass
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
    valid_multibyte = sum(1 for ch in text if ord(ch) > 0x7F and ch != "\ufffd")
    if valid_multibyte > replaced and replaced <= max(2, MAX_UTF8_REPLACED * (valid_multibyte + replaced)):
        return "utf-8", text, f"{replaced} invalid UTF-8 sequence{'s' if replaced != 1 else ''} replaced"
    guessed = _detect_legacy(raw)
    if guessed is not None:
        return guessed[0], guessed[1], f"guessed {guessed[0]}"
    for encoding in ("cp1252", "latin-1"):
        try:
            return encoding, raw.decode(encoding), f"guessed {encoding}"
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes every byte")  # pragma: no cover


def _detect_legacy(raw: bytes) -> tuple[str, str] | None:
    """charset-normalizer's guess as (codec name, text) where it beats the cp1252 default, else None.

    On short Western text charset-normalizer ranks cp1250/cp775 level with or above cp1252 (measured: a French
    sentence came out as cp1250, ``être`` -> ``ętre``), so its guess is taken only when it recognised a language
    (coherence >= :data:`MIN_COHERENCE`) and cp1252 is not among its candidates with as little chaos: a cp1251
    Russian file, say, which cp1252 would decode without error into mojibake.
    """
    try:
        from charset_normalizer import from_bytes
    except ImportError:
        return None
    matches = list(from_bytes(raw))
    if not matches:
        return None
    best = matches[0]
    if best.encoding in ("utf_8", "ascii", "cp1252") or best.coherence < MIN_COHERENCE:
        return None
    if any(m.encoding == "cp1252" and m.chaos <= best.chaos for m in matches):
        return None
    try:
        text = raw.decode(best.encoding)
    except (UnicodeDecodeError, LookupError):
        return None
    return codecs.lookup(best.encoding).name, text


def _strict(raw: bytes, encoding: str) -> str:
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as exc:
        raise SkipFile(f"decode error ({encoding} BOM but invalid {encoding} at byte {exc.start})") from exc


def _is_control(ch: str) -> bool:
    o = ord(ch)
    return (o < 0x20 and ch not in _ALLOWED_CONTROLS) or o == 0x7F or 0x80 <= o <= 0x9F
