"""shared.text: the folding both sides apply to documents and questions; protocol requests go through it."""

from __future__ import annotations

import json

import pytest

from fieldpack.shared import errors, protocol
from fieldpack.shared.text import clean_question, count_controls, is_control, normalize_for_search

CONTROLS = [chr(o) for o in [*range(0x00, 0x09), 0x0B, 0x0C, 0x0D, *range(0x0E, 0x20), *range(0x7F, 0xA0)]]


@pytest.mark.parametrize("ch", CONTROLS, ids=[f"U+{ord(c):04X}" for c in CONTROLS])
def test_every_c0_c1_control_is_removed(ch: str) -> None:
    assert is_control(ch)
    out = normalize_for_search(f"pump{ch}three\nline\ttab")
    assert ch not in out and count_controls(out) == 0
    assert out.split() == ["pump", "three", "line", "tab"] and "\n" in out and "\t" in out


def test_compatibility_forms_that_matter_for_search() -> None:
    assert normalize_for_search("con\ufb01guration \ufb02ag o\ufb00set e\ufb03cient") == "configuration flag offset efficient"
    assert normalize_for_search("\uff30\uff55\uff4d\uff50 \uff13") == "Pump 3"  # full-width
    assert normalize_for_search("max\u00a0connections\u202fpool") == "max connections pool"
    assert normalize_for_search("main\u00adtenance re\u200bstart \ufeffvalve") == "maintenance restart valve"
    # meaning-carrying compatibility characters stay
    assert normalize_for_search("10 m\u00b2, \u00bd turn, 5\u00b0C") == "10 m\u00b2, \u00bd turn, 5\u00b0C"
    assert normalize_for_search("cafe\u0301") == "caf\u00e9"  # NFC


@pytest.mark.parametrize("raw,clean", [("What is cavitation\x00", "What is cavitation"),
                                        ("\x00What\x1bis\x7f cavitation\x85?", "What is cavitation ?"),
                                        ("  con\ufb01gure \n the pool ", "configure the pool")])
def test_clean_question(raw: str, clean: str) -> None:
    assert clean_question(raw) == clean


def _payload(question: str) -> bytes:
    return json.dumps({"v": 1, "type": "request", "id": "r1", "question": question}).encode()


def test_mqtt_request_question_cleaned_at_the_boundary() -> None:
    req = protocol.decode_request(_payload("What is cavitation\u0000"))
    assert req.question == "What is cavitation"
    with pytest.raises(errors.EmptyQuestionError):
        protocol.decode_request(_payload("\u0000\u0001 \u0085"))


def test_no_fix_hint_names_a_source_file_of_fieldpack() -> None:
    """Fix hints speak of the user's commands and files, never of fieldpack's own modules."""
    import ast
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    own = re.compile(r"\b(?:builder|device|shared|retrieval|fieldpack)/[\w/]+\.py\b")
    found = []
    for folder in ("builder", "device", "shared", "retrieval", "fieldpack"):
        for path in (repo / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.keyword) and node.arg == "hint":
                    text = " ".join(n.value for n in ast.walk(node.value)
                                    if isinstance(n, ast.Constant) and isinstance(n.value, str))
                    if own.search(text):
                        found.append(f"{path.relative_to(repo)}:{node.value.lineno}")
    assert not found, found
