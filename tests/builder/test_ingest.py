"""builder.ingest: loaders, decoding edge cases, structure-following chunking, report, errors.

Most tests count tokens as whitespace words (exact and model-free); the demo-docs test uses the real MiniLM
tokenizer through the device embedder.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from pathlib import Path

import pytest

from fieldpack.builder.ingest import Chunk, IngestResult, ingest, report_table, report_to_dict
from fieldpack.shared.errors import InputNotFoundError, NoDocumentsError, UsageError
from tests.retrieval_fixtures import DEMO_DOCS, embedder, make_pdf, minilm_int8  # noqa: F401


def words(text: str) -> int:
    return len(text.split())


def run(folder: Path, **kw: int) -> IngestResult:
    return ingest(folder, count_tokens=words, **kw)


def write(folder: Path, name: str, data: str | bytes) -> Path:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return p


def entry(result: IngestResult, path: str):  # noqa: ANN201 - FileReport
    (found,) = [r for r in result.report if r.path == path]
    return found


def lines_of(text: str) -> list[str]:
    return text.split("\n")


# --- decoding --------------------------------------------------------------------------------------------------
def test_empty_binary_and_unsupported_files_are_reported_not_indexed(tmp_path: Path) -> None:
    write(tmp_path, "ok.md", "# Title\n\nSome real text here.\n")
    write(tmp_path, "empty.md", "")
    write(tmp_path, "blank.txt", " \n\t\n")
    write(tmp_path, "nul.txt", b"abc\x00\x01\x02def" * 10)
    write(tmp_path, "noise.txt", bytes(range(1, 32)) * 20)
    write(tmp_path, "image.xyz", b"whatever")
    write(tmp_path, "Makefile", "all:\n")
    write(tmp_path, ".hidden.md", "# secret\n\ntext\n")
    write(tmp_path, ".git/config.md", "# not walked\n\ntext\n")
    r = run(tmp_path)
    assert [c.source for c in r.chunks] == ["ok.md"]
    reasons = {e.path: (e.status, e.reason) for e in r.report}
    assert reasons == {
        ".hidden.md": ("skipped", "hidden file"),
        "Makefile": ("skipped", "unsupported extension (none)"),
        "blank.txt": ("skipped", "empty"),
        "empty.md": ("skipped", "empty"),
        "image.xyz": ("skipped", "unsupported extension .xyz"),
        "noise.txt": ("skipped", "binary (control characters)"),
        "nul.txt": ("skipped", "binary (NUL bytes)"),
        "ok.md": ("indexed", ""),
    }
    assert [e.path for e in r.report] == sorted(e.path for e in r.report)


def test_legacy_encodings_bom_and_utf16_are_decoded_and_recorded(tmp_path: Path) -> None:
    text = "Caf\u00e9 \u201cquotes\u201d \u2013 na\u00efve \u20ac5 price.\n"
    write(tmp_path, "cp.txt", text.encode("cp1252"))
    write(tmp_path, "bom.txt", codecs.BOM_UTF8 + text.encode("utf-8"))
    write(tmp_path, "u16.txt", text.encode("utf-16"))  # BOM + UTF-16 LE: NUL bytes, yet text
    write(tmp_path, "latin.txt", b"Caf\xe9 ol\xe9 \x81 end of line.\n")  # 0x81 is undefined in cp1252
    write(tmp_path, "plain.txt", text.encode("utf-8"))
    r = run(tmp_path)
    by = {c.source: c for c in r.chunks}
    for name in ("cp.txt", "bom.txt", "u16.txt", "plain.txt"):
        assert by[name].text == text.strip(), name
    assert by["latin.txt"].text.startswith("Caf\u00e9 ol\u00e9")
    enc = {e.path: (e.encoding, e.had_bom) for e in r.report}
    assert enc == {
        "bom.txt": ("utf-8-sig", True),
        "cp.txt": ("cp1252", False),
        "latin.txt": ("latin-1", False),
        "plain.txt": ("utf-8", False),
        "u16.txt": ("utf-16", True),
    }
    # Same content, same digest, however it was stored.
    assert by["cp.txt"].doc_sha256 == by["bom.txt"].doc_sha256 == by["plain.txt"].doc_sha256


def test_crlf_cr_and_lf_give_identical_chunks(tmp_path: Path) -> None:
    doc = (
        "# Pumps\n\n## Start\n\nOpen valve V-40.\nThen start pump 4 from panel P-2.\n\n```\nstart --pump 4\n\n"
        "check --flow\n```\n\n## Stop\n\n" + " ".join(f"Sentence {i} about stopping." for i in range(40)) + "\n"
    )
    results = {}
    for style, eol in (("lf", "\n"), ("crlf", "\r\n"), ("cr", "\r")):
        d = tmp_path / style
        write(d, "doc.md", doc.replace("\n", eol).encode())
        results[style] = run(d, chunk_tokens=30, overlap_tokens=8)
    assert results["lf"].chunks == results["crlf"].chunks == results["cr"].chunks
    assert len(results["lf"].chunks) > 3
    assert [entry(results[s], "doc.md").crlf for s in ("lf", "crlf", "cr")] == [False, True, True]


# --- Markdown ---------------------------------------------------------------------------------------------------
def test_markdown_sections_lines_and_code_fence_kept_whole(tmp_path: Path) -> None:
    fence = "```bash\n# not a heading\nsudo systemctl restart historian-reports\n\nexit 0\n```"
    doc = "\n".join(
        [
            "---",
            "title: front matter is dropped",
            "---",
            "# Historian",  # line 4
            "",
            "Intro words one two three four five six seven eight nine ten.",  # line 6
            "",
            "## Pool exhausted",  # line 8
            "",
            "Filler sentence number one is here. Filler sentence number two is here too.",  # line 10
            "",
            fence,  # lines 12-17
            "",
            "Setext heading",
            "--------------",
            "",
            "After the setext heading.",  # line 22
        ]
    )
    write(tmp_path, "db.md", doc)
    r = run(tmp_path, chunk_tokens=20, overlap_tokens=0)
    assert [(c.section, c.line_start, c.line_end) for c in r.chunks] == [
        ("Historian", 6, 6),
        ("Historian > Pool exhausted", 10, 10),
        ("Historian > Pool exhausted", 12, 17),
        ("Historian > Setext heading", 22, 22),
    ]
    assert r.chunks[2].text == fence  # the fence fits the budget alone: never split, never merged past budget
    assert all("front matter" not in c.text for c in r.chunks)
    # Cited lines really hold the chunk's first and last lines.
    src = lines_of(doc)
    for c in r.chunks:
        assert src[c.line_start - 1].strip() == c.text.split("\n")[0].strip()
        assert src[c.line_end - 1].strip() == c.text.split("\n")[-1].strip()


def test_code_fence_larger_than_budget_is_split_by_lines_only(tmp_path: Path) -> None:
    body = [f"    step_{i} --flag value{i}" for i in range(30)]  # 3 words per line, indented
    doc = "# Script\n\n```\n" + "\n".join(body) + "\n```\n"
    write(tmp_path, "s.md", doc)
    r = run(tmp_path, chunk_tokens=20, overlap_tokens=0)
    assert len(r.chunks) > 3
    assert all(c.n_tokens <= 20 for c in r.chunks)
    got = [ln for c in r.chunks for ln in c.text.split("\n") if ln.startswith("    step_")]
    assert got == body  # every line once, in order, indentation intact


def test_long_paragraph_splits_by_sentences_with_bounded_overlap(tmp_path: Path) -> None:
    sentences = [f"Sentence {i} says something about pump {i}." for i in range(60)]  # 7 words each
    write(tmp_path, "t.txt", " ".join(sentences))
    r = run(tmp_path, chunk_tokens=50, overlap_tokens=15)
    assert len(r.chunks) >= 9
    seen: list[str] = []
    for prev, cur in zip(r.chunks, r.chunks[1:]):
        shared = [s for s in sentences if s in prev.text and s in cur.text]
        assert 1 <= len(shared) <= 2  # 15-token overlap = at most two 7-word sentences
        assert cur.text.startswith(shared[0])
    for c in r.chunks:
        assert c.n_tokens <= 50
        seen += [s for s in sentences if s in c.text]
    assert sorted(set(seen), key=sentences.index) == sentences  # nothing lost, order kept


def test_single_giant_sentence_is_hard_split_under_budget(tmp_path: Path) -> None:
    write(tmp_path, "g.txt", " ".join(f"w{i}" for i in range(500)) + " " + "x" * 5000)
    r = run(tmp_path, chunk_tokens=64, overlap_tokens=0)
    assert all(c.n_tokens <= 64 for c in r.chunks)
    assert " ".join(c.text for c in r.chunks).split()[:500] == [f"w{i}" for i in range(500)]


# --- HTML, PDF, CSV, text --------------------------------------------------------------------------------------------
HTML = """<!DOCTYPE html>
<html><head><title>Ignored title</title><style>p { color: red }</style></head>
<body>
<nav><a href="/">Home</a> navigation words</nav>
<ul class="docnav"><li>Prev</li><li>Next</li></ul>
<h1>Sand filters</h1>
<p>Each filter is backwashed at 2.0 m head loss &amp; after 72&nbsp;h.</p>
<script>var hidden = "script text";</script>
<h2>Backwash <code>cycle</code></h2>
<p>Air scour
   for three minutes.</p>
<pre>
valve open V-1
    wait 180
valve close V-1
</pre>
<table><tr><th>Filter</th><th>Meter</th></tr><tr><td>1</td><td>T-11</td></tr></table>
</body></html>
"""


def test_html_sections_drop_boilerplate_keep_pre(tmp_path: Path) -> None:
    write(tmp_path, "f.html", HTML)
    r = run(tmp_path, chunk_tokens=200)
    text = "\n".join(c.text for c in r.chunks)
    for junk in ("Ignored title", "color: red", "navigation words", "Prev", "script text"):
        assert junk not in text
    assert {c.section for c in r.chunks} == {"Sand filters", "Sand filters > Backwash cycle"}
    first = r.chunks[0]
    assert first.text == "Each filter is backwashed at 2.0 m head loss & after 72 h."  # NBSP collapsed too
    assert first.line_start == first.line_end == 7
    second = r.chunks[1].text
    assert "Air scour for three minutes." in second
    assert "valve open V-1\n    wait 180\nvalve close V-1" in second  # pre whitespace kept
    assert "Filter Meter" in second and "1 T-11" in second


def test_html_permalink_anchors_stay_out_of_section_names(tmp_path: Path) -> None:
    """A trial's Apache manual cited "Log Files > Log Rotation ¶": the heading's permalink anchor was in the path."""
    write(tmp_path, "logs.html", "<html><body><h1>Log Files</h1><p>Where the logs go.</p>"
          '<h2><a name="rotation" id="rotation">Log Rotation</a> <a title="Permanent link" href="#rotation" '
          'class="permalink">&para;</a></h2><p>Rotate them with rotatelogs.</p>'
          '<h2>Piped Logs<a class="headerlink" href="#piped">¶</a></h2><p>Pipe them to a program.</p>'
          "<h2>Virtual Hosts ¶</h2><p>One log per host.</p></body></html>")
    r = run(tmp_path, chunk_tokens=200)
    assert [c.section for c in r.chunks] == ["Log Files", "Log Files > Log Rotation", "Log Files > Piped Logs",
                                             "Log Files > Virtual Hosts"]
    assert not any("¶" in c.text for c in r.chunks)


def test_pdf_pages_sections_and_citations(tmp_path: Path) -> None:
    pdf = make_pdf(
        [
            ["Pump maintenance", "Check the seal every week.", "Replace it when it drips steadily."],
            ["2.1 Valves", "Valve V-31 must be fully open before start."],
            [],  # a page without text is skipped
        ]
    )
    write(tmp_path, "manual.pdf", pdf)
    write(tmp_path, "broken.pdf", b"%PDF-1.4\nthis is not really a pdf\n")
    r = run(tmp_path)
    assert [(c.page, c.section, c.line_start) for c in r.chunks] == [
        (1, "Pump maintenance", None),
        (2, "2.1 Valves", None),
    ]
    assert "Replace it when it drips steadily." in r.chunks[0].text
    assert entry(r, "manual.pdf").encoding == "binary"
    bad = entry(r, "broken.pdf")
    assert bad.status == "skipped" and bad.reason.startswith("unreadable PDF")
    assert r.chunks[0].doc_sha256 == hashlib.sha256(pdf).hexdigest()


def test_csv_rows_rendered_with_headers_and_grouped(tmp_path: Path) -> None:
    write(
        tmp_path,
        "alarms.csv",
        'code,alarm,first action\nA-1,"Pressure high, pump 3",Check V-31\n\nA-2,"Two\nline alarm",Call ops\n',
    )
    write(tmp_path, "meters.tsv", "meter\tunit\nFM-4\tm3/h\n")
    r = run(tmp_path)
    by = {c.source: c for c in r.chunks}
    assert by["alarms.csv"].section == "alarms"
    assert by["alarms.csv"].text == (
        "code: A-1; alarm: Pressure high, pump 3; first action: Check V-31\n\n"
        "code: A-2; alarm: Two line alarm; first action: Call ops"
    )
    assert (by["alarms.csv"].line_start, by["alarms.csv"].line_end) == (2, 5)  # quoted newline: 2 lines
    assert by["meters.tsv"].text == "meter: FM-4; unit: m3/h"


def test_csv_groups_rows_under_budget(tmp_path: Path) -> None:
    rows = "\n".join(f"R{i},value {i}" for i in range(40))
    write(tmp_path, "t.csv", "id,val\n" + rows + "\n")
    r = run(tmp_path, chunk_tokens=20, overlap_tokens=0)
    assert len(r.chunks) > 5 and all(c.n_tokens <= 20 for c in r.chunks)
    assert sum(c.text.count("id: R") for c in r.chunks) == 40  # each row exactly once without overlap
    assert all(c.text.count("id: R") == c.text.count("val: value") for c in r.chunks)  # rows never split


def test_plain_text_caps_and_underlined_headings(tmp_path: Path) -> None:
    write(tmp_path, "h.txt", "SHIFT HANDOVER\n\nFirst paragraph.\n\nDetails\n=======\n\nSecond one.\n")
    r = run(tmp_path)
    assert [(c.section, c.text, c.line_start) for c in r.chunks] == [
        ("SHIFT HANDOVER", "First paragraph.", 3),
        ("Details", "Second one.", 8),
    ]


# --- folder-level behaviour -----------------------------------------------------------------------------------------
def test_nothing_indexable_names_the_folder_and_what_was_found(tmp_path: Path) -> None:
    write(tmp_path, "a.bin", b"\x00\x01")
    write(tmp_path, "b.md", "")
    with pytest.raises(NoDocumentsError) as err:
        run(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "2 file(s)" in msg and "1 empty" in msg and "1 unsupported extension" in msg
    assert "Fix:" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoDocumentsError, match="empty"):
        run(empty)


def test_missing_folder_file_instead_of_folder_and_bad_budget(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="does not exist"):
        run(tmp_path / "nope")
    f = write(tmp_path, "x.md", "# x\n\ny\n")
    with pytest.raises(InputNotFoundError, match="not a docs folder"):
        run(f)
    with pytest.raises(UsageError):
        run(tmp_path, chunk_tokens=10, overlap_tokens=10)
    with pytest.raises(UsageError):
        run(tmp_path, chunk_tokens=0, overlap_tokens=0)


def test_symlink_escaping_the_folder_is_skipped(tmp_path: Path) -> None:
    outside = write(tmp_path, "outside/secret.md", "# secret\n\nkey material\n")
    docs = tmp_path / "docs"
    write(docs, "in.md", "# in\n\ntext\n")
    (docs / "link.md").symlink_to(outside)
    r = run(docs)
    assert entry(r, "link.md").reason == "symlink outside the docs folder"
    assert all("key material" not in c.text for c in r.chunks)


def test_report_forms_are_json_and_rich(tmp_path: Path) -> None:
    write(tmp_path, "a.md", "# A\n\ntext\n")
    write(tmp_path, "b.xyz", "?")
    r = run(tmp_path)
    d = report_to_dict(r)
    assert json.loads(json.dumps(d)) == d
    assert (d["indexed"], d["skipped"], d["chunks"], d["tokens"]) == (1, 1, 1, 1)
    assert report_to_dict(r.report[1])["reason"] == "unsupported extension .xyz"
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(report_table(r))
    out = console.export_text()
    assert "a.md" in out and "unsupported extension .xyz" in out and "1 indexed, 1 skipped" in out


def test_demo_docs_with_the_real_tokenizer(embedder) -> None:  # noqa: ANN001,F811
    r = ingest(DEMO_DOCS, count_tokens=embedder.count_tokens, chunk_tokens=60, overlap_tokens=10)
    assert len(r.indexed) == 7 and not r.skipped
    assert all(0 < c.n_tokens <= 60 for c in r.chunks)
    assert all(c.n_tokens == embedder.count_tokens(c.text) for c in r.chunks)
    again = ingest(DEMO_DOCS, count_tokens=embedder.count_tokens, chunk_tokens=60, overlap_tokens=10)
    assert again == r  # deterministic
    pool = [c for c in r.chunks if c.section.endswith("Connection pool exhausted")]
    assert pool and pool[0].source == "database.md" and pool[0].line_start == 7
    assert "sudo systemctl restart historian-reports" in "\n".join(c.text for c in pool)
    assert isinstance(r.chunks[0], Chunk) and r.chunks[0].embedding_text().startswith(r.chunks[0].section)


# --- --exclude -------------------------------------------------------------------------------------------------
def _tree_for_exclude(root: Path) -> None:
    write(root, "guide.md", "# Guide\n\nStart the pump.\n")
    write(root, "html/release-15.html", "<h1>Release 15</h1><p>Changes.</p>")
    write(root, "html/pumps.html", "<h1>Pumps</h1><p>Prime the pump.</p>")
    write(root, "html/old/pumps-2019.html", "<h1>Pumps 2019</h1><p>Old way.</p>")
    write(root, "archive/notes.txt", "old notes about pumps\n")
    write(root, "NEWS.txt", "1.2: fixed the pump page\n")


def test_exclude_name_folder_and_path_patterns(tmp_path: Path) -> None:
    from fieldpack.builder.ingest.exclude import Excludes

    _tree_for_exclude(tmp_path)
    r = ingest(tmp_path, count_tokens=words,
               exclude=Excludes.parse(["release-*.html", "archive", "html/old/", "NEWS.txt"]))
    assert sorted({c.source for c in r.chunks}) == ["guide.md", "html/pumps.html"]
    reasons = {e.path: e.reason for e in r.report if e.status == "skipped"}
    assert reasons == {
        "html/release-15.html": "excluded by --exclude 'release-*.html'",
        "archive/notes.txt": "excluded by --exclude 'archive'",
        "html/old/pumps-2019.html": "excluded by --exclude 'html/old/'",
        "NEWS.txt": "excluded by --exclude 'NEWS.txt'",
    }
    assert {e.path: e.size_bytes for e in r.report}["NEWS.txt"] == len("1.2: fixed the pump page\n")


def test_exclude_matching_is_case_sensitive_and_anchored_per_part(tmp_path: Path) -> None:
    from fieldpack.builder.ingest.exclude import Excludes

    ex = Excludes.parse(["pumps.html", "html/*.html", "old"])
    assert ex.match("html/pumps.html") == "pumps.html"
    assert ex.match("other/x.html") is None            # 'html/*.html' is anchored at the docs folder
    assert ex.match("html/sub/x.html") == "html/*.html"  # '*' crosses folders in a pattern with '/'
    assert ex.match("a/old/b.md") == "old" and ex.match("a/older/b.md") is None
    assert ex.match("PUMPS.HTML") is None               # case-sensitive everywhere, so a recipe replays alike
    assert not Excludes.parse(None) and not Excludes.parse([])


def test_an_exclude_that_matches_nothing_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fieldpack.builder.ingest.exclude import Excludes

    _tree_for_exclude(tmp_path)
    with caplog.at_level("WARNING", logger="fieldpack.builder.ingest.pipeline"):
        r = ingest(tmp_path, count_tokens=words, exclude=Excludes.parse(["relase-*.html", "NEWS.txt"]))
    warned = [rec.getMessage() for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warned) == 1 and "'relase-*.html' matches no file" in warned[0], warned
    assert "html/release-15.html" in {c.source for c in r.chunks}


def test_excluding_every_document_says_so(tmp_path: Path) -> None:
    from fieldpack.builder.ingest.exclude import Excludes

    _tree_for_exclude(tmp_path)
    with pytest.raises(NoDocumentsError) as err:
        ingest(tmp_path, count_tokens=words, exclude=Excludes.parse(["*"]))
    assert "all skipped (6 excluded by --exclude)" in str(err.value)
    assert "narrow the --exclude patterns" in str(err.value)


@pytest.mark.parametrize("bad", ["", "  ", "/", "/abs/*.md", "../other", "a/../b", "win\\path"])
def test_a_pattern_that_cannot_name_a_path_under_docs_is_refused(bad: str) -> None:
    from fieldpack.builder.ingest.exclude import Excludes

    with pytest.raises(UsageError) as err:
        Excludes.parse(["ok.md", bad])
    assert "--exclude" in str(err.value) and "Fix:" in str(err.value)
    assert repr(bad) in str(err.value) or not bad.strip()  # (the one-line message folds blanks)
