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


def test_pdf_split_words_are_rejoined_from_the_documents_own_words(tmp_path: Path) -> None:
    """Justified lines (kerned runs) and letter-spaced headings come out of the text layer with spaces inside
    words; words whole elsewhere in the same PDF rejoin them, real two-word phrases stay, and the build says so."""
    from fieldpack.builder.ingest.pdf_loader import load_pdf
    from tests.retrieval_fixtures import make_pdf

    k = -300
    pdf = make_pdf([
        [
            "Check the configuration of the pump before the flag is set.",
            "Write the log into the file system; the file system keeps it there.",
            "This pump restarts when the pressure drops. Open the setup page and the log file; turn it up slowly.",
        ],
        [
            ["T", k, "h", k, "i", k, "s", k, "p", k, "u", k, "m", k, "p"],
            ["Edit the con", k, "fi", k, "guration and set the fl", k, "ag when the pressure drops."],
            ["Set up the pump and go to the file", k, "system menu, to set", k, "up the alarm.", k, "The", k, "re is one."],
        ],
    ])
    page2 = load_pdf(pdf)[1].blocks[0].text
    assert "T h i s" not in page2 and "This pump" in page2
    assert "configuration" in page2 and "flag when" in page2
    # real phrases stay even where the document spells them whole too ("setup"): each part is a word on its own there
    assert "the file system menu" in page2 and "Set up the pump" in page2 and "to set up the alarm" in page2
    assert "There is one" in page2

    (tmp_path / "manual.pdf").write_bytes(pdf)
    r = ingest(tmp_path, count_tokens=_words)
    (entry,) = r.report
    assert "split words rejoined" in entry.note and "1 letter-spaced runs" in entry.note
    assert any("configuration" in c.text for c in r.chunks if c.page == 2)


def test_one_token_string_is_still_bounded_in_characters(tmp_path: Path, embedder) -> None:  # noqa: ANN001,F811
    blob = "A" * 20_000  # WordPiece: one [UNK] token
    assert embedder.count_tokens(blob) <= 3
    (tmp_path / "blob.txt").write_text(f"Checksum of the firmware image:\n\n{blob}\n\nEnd of file.\n")
    r = ingest(tmp_path, count_tokens=embedder.count_tokens, chunk_tokens=64, overlap_tokens=8)
    assert "".join(c.text for c in r.chunks).count("A") >= 20_000
    assert max(len(c.text) for c in r.chunks) <= 64 * MAX_CHARS_PER_TOKEN
    assert len(r.chunks) >= 20_000 // (64 * MAX_CHARS_PER_TOKEN)
