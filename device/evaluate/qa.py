"""The QA set an eval runs on: a JSON Lines file, one question per line, and how a hit is judged relevant.

Line format (the one of ``shared/qa/README.md``)::

    {"id": "dh-001", "question": "...", "expected_source": "apt.html",
     "expected_section": "6.1.6. Caching Proxy for Debian Packages",      (optional)
     "answer_contains": ["apt-cacher-ng", "approx"],                      (optional)
     "also_ok": ["sect.apt-get.html"],                                    (optional)
     "split": "dev",                                                       (optional: "dev" or "unseen")
     "unanswerable": false}                                               (optional, default false)

``expected_source`` is a document path relative to the docs folder the bundle was built from, optionally with
a section after ``#`` (``"database.md#Connection pool exhausted"``): it is the item's :attr:`QAItem.target`,
what the primary retrieval metrics judge. ``expected_section`` (or the ``#`` part) also makes a
:attr:`QAItem.section_target`, judged by the section-level metrics only. Unanswerable items carry no
``expected_source``. ``also_ok`` lists other documents that answer the question just as well: the page-level
metrics (:meth:`QAItem.page_matches`) count them as correct, the chunk-level ones judge ``expected_source``
only. ``split`` marks the item as part of a development set's tuning part (``"dev"``) or its held-out part
(``"unseen"``); ``fieldpack eval --split`` selects one. Blank lines and lines starting with ``//`` are skipped.

Relevance (what :meth:`Target.matches` decides for one retrieved chunk):

* source: the hit's ``source`` equals the expected path, or ends with ``"/" + path`` (a bundle built from a
  parent folder of the one the QA set names), compared as POSIX paths, case-sensitively;
* section (only when the target has one): after case-folding and collapsing whitespace, the expected
  section is a prefix of the hit's heading path (``"A > B > C"``) or of one of its tails at a ``" > "``
  boundary (``"B > C"``, ``"C"``). So ``"Pumps"`` and ``"Pumps > Cavitation"`` both match
  ``"Pumps > Cavitation"``, and ``"6.1.6. Caching Proxy"`` matches ``"6. APT > 6.1. sources > 6.1.6. Caching
  Proxy for Debian Packages"``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fieldpack.shared.errors import InputNotFoundError, UsageError

from fieldpack.device.evaluate.metrics import normalize_text

SECTION_SEP = " > "
#: Values of an item's ``split``: the part of a development set parameters may be tuned on, and the held-out one.
SPLITS: tuple[str, ...] = ("dev", "unseen")


@dataclass(frozen=True)
class Target:
    """What a question expects retrieval to find: a document, optionally narrowed to a section."""

    source: str
    section: str | None = None

    @classmethod
    def parse(cls, spec: str, section: str | None = None) -> "Target":
        """``"path"`` or ``"path#section"``; an explicit ``section`` argument wins over the ``#`` part."""
        path, _, frag = spec.partition("#")
        path = path.strip()
        while path.startswith("./"):
            path = path[2:]
        sec = section if section else (frag or None)
        return cls(source=path, section=" ".join(sec.split()) if sec else None)

    def source_matches(self, source: str) -> bool:
        """True when a hit's ``source`` names this document (equal, or ends with ``"/" + path``)."""
        return source == self.source or source.endswith("/" + self.source)

    def section_matches(self, section: str) -> bool:
        """True when no section is expected, or the expected one prefixes the hit's heading path or a tail."""
        if not self.section:
            return True
        want = normalize_text(self.section)
        parts = [normalize_text(p) for p in section.split(SECTION_SEP)]
        return any(SECTION_SEP.join(parts[i:]).startswith(want) for i in range(len(parts)))

    def matches(self, source: str, section: str) -> bool:
        """Relevance of one hit: :meth:`source_matches` and :meth:`section_matches`."""
        return self.source_matches(source) and self.section_matches(section)

    def document(self) -> "Target":
        """The same target without its section (document-level relevance)."""
        return Target(self.source)

    def __str__(self) -> str:
        return f"{self.source}#{self.section}" if self.section else self.source


@dataclass(frozen=True)
class QAItem:
    """One question of the QA set.

    Attributes:
        id: the item's ``id`` (``"line-N"`` when the line has none).
        question: the question text.
        target: what ``expected_source`` names (a document, or ``path#section``); ``None`` when ``unanswerable``.
        section_target: the document narrowed to ``expected_section`` (or the ``#`` part), ``None`` if neither.
        answer_contains: short facts a correct answer contains (compared case-insensitively, whitespace
            collapsed; see :func:`device.evaluate.metrics.contains_all`).
        unanswerable: the documents do not answer it; abstaining is the correct behaviour.
        line: 1-based line number in the file.
    """

    id: str
    question: str
    target: Target | None
    section_target: Target | None = None
    answer_contains: tuple[str, ...] = ()
    unanswerable: bool = False
    line: int = 0
    also_ok: tuple[str, ...] = ()
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def page_matches(self, source: str) -> bool:
        """Page-level relevance of a hit's ``source``: the expected document or one of ``also_ok``
        (each compared as :meth:`Target.source_matches`); always False for an unanswerable item."""
        if self.target is None:
            return False
        return any(Target.parse(p).source_matches(source) for p in (self.target.source, *self.also_ok))


@dataclass(frozen=True)
class QASet:
    """A loaded QA file: its items, path and sha256 (hex, of the file bytes: recorded in every report)."""

    path: Path
    sha256: str
    items: tuple[QAItem, ...]

    @property
    def answerable(self) -> list[QAItem]:
        return [i for i in self.items if not i.unanswerable]

    @property
    def unanswerable(self) -> list[QAItem]:
        return [i for i in self.items if i.unanswerable]

    def only_split(self, split: str | None) -> "QASet":
        """The items of one ``split`` (``"dev"`` or ``"unseen"``); ``None``: this set unchanged.

        Raises:
            UsageError: an unknown split, or no item of the set carries it.
        """
        if split is None:
            return self
        if split not in SPLITS:
            raise UsageError(f"unknown split {split!r}", hint=f"use one of {', '.join(SPLITS)}")
        items = tuple(i for i in self.items if i.split == split)
        if not items:
            raise UsageError(f"QA file {self.path} has no item with \"split\": \"{split}\"",
                             hint="mark items with a split, or evaluate the whole set (no --split)")
        return QASet(path=self.path, sha256=self.sha256, items=items)


def _bad(path: Path, line: int, what: str, hint: str) -> UsageError:
    return UsageError(f"QA file {path} line {line}: {what}", hint=hint)


def _parse_line(path: Path, n: int, obj: Any) -> QAItem:
    fmt_hint = ('each line is one JSON object like {"id": "q1", "question": "...", "expected_source": '
                '"doc.md", "answer_contains": ["..."]} or {"question": "...", "unanswerable": true}')
    if not isinstance(obj, dict):
        raise _bad(path, n, f"expected a JSON object, got {type(obj).__name__}", fmt_hint)
    q = obj.get("question")
    if not isinstance(q, str) or not q.strip():
        raise _bad(path, n, "missing or empty \"question\"", fmt_hint)
    unans = obj.get("unanswerable", False)
    if not isinstance(unans, bool):
        raise _bad(path, n, "\"unanswerable\" must be true or false", fmt_hint)
    contains = obj.get("answer_contains", [])
    if isinstance(contains, str):
        contains = [contains]
    if not isinstance(contains, list) or not all(isinstance(c, str) and c.strip() for c in contains):
        raise _bad(path, n, "\"answer_contains\" must be a list of non-empty strings", fmt_hint)
    src = obj.get("expected_source")
    sec = obj.get("expected_section")
    if sec is not None and not isinstance(sec, str):
        raise _bad(path, n, "\"expected_section\" must be a string", fmt_hint)
    target: Target | None = None
    section_target: Target | None = None
    if unans:
        if src:
            raise _bad(path, n, "an unanswerable item has an \"expected_source\"",
                       "drop expected_source, or set unanswerable to false")
    else:
        if not isinstance(src, str) or not src.strip() or src.strip().startswith("#"):
            raise _bad(path, n, "answerable item without a document path in \"expected_source\"",
                       'give "expected_source": "path/in/docs.md" (optionally "#section"), or "unanswerable": true')
        target = Target.parse(src)
        section = sec or target.section
        section_target = Target(target.source, " ".join(section.split())) if section else None
    also = obj.get("also_ok", [])
    if isinstance(also, str):
        also = [also]
    if not isinstance(also, list) or not all(isinstance(a, str) and a.strip() for a in also):
        raise _bad(path, n, "\"also_ok\" must be a list of document paths", fmt_hint)
    if unans and also:
        raise _bad(path, n, "an unanswerable item has \"also_ok\" pages", "drop also_ok, or set unanswerable to false")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise _bad(path, n, f"\"split\" is {split!r}", f"use one of {', '.join(SPLITS)}, or leave it out")
    item_id = obj.get("id")
    known = {"id", "question", "expected_source", "expected_section", "answer_contains", "unanswerable",
             "also_ok", "split"}
    return QAItem(id=str(item_id) if item_id is not None else f"line-{n}", question=" ".join(q.split()),
                  target=target, section_target=section_target, answer_contains=tuple(contains), unanswerable=unans, line=n,
                  also_ok=tuple(Target.parse(a).source for a in also), split=split,
                  extra={k: v for k, v in obj.items() if k not in known})


def load_qa(path: Path) -> QASet:
    """Read and validate a QA JSON Lines file.

    Raises:
        InputNotFoundError: the file is missing or unreadable.
        UsageError: a line is not JSON, not an object, lacks a question, has an answerable item without
            ``expected_source``, repeats an ``id``, or the file holds no item; the message names the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputNotFoundError(f"QA file {path} does not exist",
                                 hint='pass --qa a JSON Lines file, one question a line: {"id": "q1", "question": "...", '
                                      '"expected_source": "path/in/docs.md"} (see `fieldpack eval --help`)') from exc
    except OSError as exc:
        raise InputNotFoundError(f"cannot read QA file {path}: {exc.strerror}", hint="check its permissions") from exc
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(f"QA file {path} is not UTF-8 (byte {exc.start})", hint="save it as UTF-8") from exc
    items: list[QAItem] = []
    seen: dict[str, int] = {}
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("//"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(path, n, f"not valid JSON ({exc.msg} at column {exc.colno})",
                       "write one JSON object per line, with double-quoted keys and strings") from exc
        item = _parse_line(path, n, obj)
        if item.id in seen:
            raise _bad(path, n, f"id {item.id!r} already used on line {seen[item.id]}", "give each item its own id")
        seen[item.id] = n
        items.append(item)
    if not items:
        raise UsageError(f"QA file {path} holds no questions", hint="add one JSON object per line")
    return QASet(path=path, sha256=hashlib.sha256(data).hexdigest(), items=tuple(items))
