"""The development QA sets in benchmarks/qa are true to the installed documentation: every expected and also_ok
page exists, every answer_contains fact is in the expected page's text, every absent term of an unanswerable
item is on no page, and every item records its split (dev/unseen, about 60/40)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fieldpack.device.evaluate.qa import load_qa

QA_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "qa"
SETS = {"postgresql-15.jsonl": Path("/usr/share/doc/postgresql-doc-15/html"),
        "sqlite3.jsonl": Path("/usr/share/doc/sqlite3")}


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def page_text(path: Path) -> str:
    """Visible text of an HTML page, lower-cased, whitespace collapsed."""
    p = _Text()
    p.feed(path.read_text(encoding="utf-8", errors="replace"))
    return " ".join(" ".join(p.parts).split()).lower()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SETS))
def test_qa_set_matches_its_documents(name: str) -> None:
    docs = SETS[name]
    if not docs.is_dir():
        pytest.skip(f"{docs} is not installed (scripts/setup.sh --broker installs it)")
    qa = load_qa(QA_DIR / name)
    assert all(i.split in ("dev", "unseen") for i in qa.items)
    unseen = sum(i.split == "unseen" for i in qa.items) / len(qa.items)
    assert 0.3 <= unseen <= 0.5
    assert len(qa.unanswerable) >= 4 and len(qa.answerable) >= 40
    for item in qa.answerable:
        assert item.target is not None
        for page in (item.target.source, *item.also_ok):
            assert (docs / page).is_file(), f"{item.id}: {page} missing"
        text = page_text(docs / item.target.source)
        for fact in item.answer_contains:
            assert fact.lower() in text, f"{item.id}: {fact!r} not in {item.target.source}"
    terms = [t for i in qa.unanswerable for t in i.extra.get("absent_terms", [])]
    assert terms
    pats = [re.compile(r"\b" + re.escape(t.lower()) + r"\b") for t in terms]
    for page in docs.rglob("*.html"):
        text = page_text(page)
        hit = [t for t, p in zip(terms, pats) if p.search(text)]
        assert not hit, f"absent term(s) {hit} occur in {page}"


@pytest.mark.slow
def test_followup_set_matches_its_documents() -> None:
    """benchmarks/qa/followups: 38 follow-ups and 10 asides, half of each unseen, every named page installed."""
    import json

    docs = SETS["postgresql-15.jsonl"]
    if not docs.is_dir():
        pytest.skip(f"{docs} is not installed (scripts/setup.sh --broker installs it)")
    rows = [json.loads(line) for line in (QA_DIR / "followups" / "postgresql-15.jsonl").read_text().splitlines()
            if line.strip()]
    assert len({r["id"] for r in rows}) == len(rows) == 48
    for kind, n in (("answerable", 38), ("offtopic", 10)):
        of_kind = [r for r in rows if r["kind"] == kind]
        assert len(of_kind) == n and sum(r["split"] == "unseen" for r in of_kind) == n // 2
    for r in rows:
        assert (r["expected_source"] is None) == (r["kind"] == "offtopic"), r["id"]
        for page in filter(None, (r["expected_source"], r["first_source"], *r["also_ok"])):
            assert (docs / page).is_file(), f"{r['id']}: {page} missing"
