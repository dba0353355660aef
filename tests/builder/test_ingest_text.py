"""Ingest: robust decoding with a per-file report, no control characters in chunks, ligatures folded, chunks
bounded in characters as well as tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldpack.builder.ingest import ingest
from fieldpack.builder.ingest.chunker import MAX_CHARS_PER_TOKEN
from fieldpack.builder.ingest.decode import decode_document
from fieldpack.shared.text import count_controls
from tests.retrieval_fixtures import embedder, minilm_int8  # noqa: F401

RU = "Насос номер три: кавитация разрушает рабочее колесо. Проверьте давление на входе и уровень в баке.\n"
FR = "Le débit de la pompe doit être vérifié à l'arrêt. Pression élevée: fermer la vanne d'isolement.\n"
DE = "Die Pumpe läuft über. Prüfen Sie den Druck am Eingang, öffnen Sie das Ventil langsam und gleichmäßig. "


def _words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("raw,encoding,text,note", [
    (RU.encode("cp1251"), "cp1251", RU.strip(), "guessed cp1251"),
    (FR.encode("cp1252"), "cp1252", FR.strip(), "guessed cp1252"),
    ((DE * 3).encode() + b"\xff Ende.\n", "utf-8", (DE * 3) + "\ufffd Ende.", "1 invalid UTF-8 sequence replaced"),
    ((DE * 3).encode() + b"\xff\xfe Ende.\n", "utf-8", None, "2 invalid UTF-8 sequences replaced"),
    (("Pump three\x01 alarm\x02 code: " + DE).encode(), "utf-8", None, "2 control characters removed"),
    (DE.encode(), "utf-8", DE.strip(), ""),
])
def test_decoding_decides_per_file_and_says_what_it_guessed(raw: bytes, encoding: str, text: str | None,
                                                           note: str) -> None:
    d = decode_document(raw)
    assert d.encoding == encoding and d.note == note
    if text is not None:
        assert d.text.strip() == text
    assert count_controls(d.text) == 0


def test_no_control_characters_in_any_chunk_and_report_per_file(tmp_path: Path) -> None:
    (tmp_path / "ru.txt").write_bytes(RU.encode("cp1251"))
    (tmp_path / "ctl.md").write_bytes(("# Alarms\n\nPump three\x01 alarm\x1f code\x85: " + DE).encode())
    (tmp_path / "plain.md").write_text("# Plain\n\n" + DE)
    r = ingest(tmp_path, count_tokens=_words)
    assert all(count_controls(c.text) == 0 for c in r.chunks)
    notes = {e.path: e.note for e in r.report}
    assert notes == {"ru.txt": "guessed cp1251", "ctl.md": "3 control characters removed", "plain.md": ""}
    from fieldpack.builder.ingest.report import report_table

    cells = [list(col.cells) for col in report_table(r).columns]
    assert "guessed cp1251" in " ".join(str(x) for x in cells[-1])


def test_ligatures_and_full_width_are_folded_on_the_document_side(tmp_path: Path) -> None:
    (tmp_path / "lig.md").write_text("# Con\ufb01guration\n\nSet the \ufb02ag in the con\ufb01guration \uff46\uff49\uff4c\uff45.\n")
    r = ingest(tmp_path, count_tokens=_words)
    (c,) = r.chunks
    assert c.section == "Configuration" and "flag in the configuration file" in c.text


def test_pdf_text_is_folded_too() -> None:
    from fieldpack.builder.ingest.pdf_loader import load_pdf
    from tests.retrieval_fixtures import make_pdf

    # WinAnsi has no ligature glyph; a soft hyphen (0xAD) and a NBSP (0xA0) are in it and PDFs carry them
    sections = load_pdf(make_pdf([["Main\u00adtenance of the\u00a0pump"]]))
    assert sections[0].blocks[0].text == "Maintenance of the pump"


def test_one_token_string_is_still_bounded_in_characters(tmp_path: Path, embedder) -> None:  # noqa: ANN001,F811
    blob = "A" * 20_000  # WordPiece: one [UNK] token
    assert embedder.count_tokens(blob) <= 3
    (tmp_path / "blob.txt").write_text(f"Checksum of the firmware image:\n\n{blob}\n\nEnd of file.\n")
    r = ingest(tmp_path, count_tokens=embedder.count_tokens, chunk_tokens=64, overlap_tokens=8)
    assert "".join(c.text for c in r.chunks).count("A") >= 20_000
    assert max(len(c.text) for c in r.chunks) <= 64 * MAX_CHARS_PER_TOKEN
    assert len(r.chunks) >= 20_000 // (64 * MAX_CHARS_PER_TOKEN)
