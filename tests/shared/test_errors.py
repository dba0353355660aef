"""shared.errors.first_validation_error: where a schema failure is, in the user's document's terms."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from fieldpack.shared.errors import first_validation_error


class Part(BaseModel):
    text: str


class Message(BaseModel):
    role: str
    content: str | list[Part]


class Body(BaseModel):
    messages: list[Message]
    n_ctx: int = 1


def _first(data: object) -> str:
    with pytest.raises(ValidationError) as ei:
        Body.model_validate(data)
    return first_validation_error(ei.value)


def test_union_member_types_are_not_part_of_the_location() -> None:
    # pydantic reports messages.0.content.str and messages.0.content.list[Part]: the tried types, not places
    assert _first({"messages": [{"role": "user", "content": 5}]}).startswith("messages.0.content: ")
    where = _first({"messages": [{"role": "user", "content": [{"x": 1}]}]}).split(": ")[0]
    assert where.startswith("messages.0.content") and "[" not in where and not where.endswith(".str"), where
    assert _first({"messages": [], "n_ctx": "many"}) == \
        "n_ctx: Input should be a valid integer, unable to parse string as an integer"
    assert first_validation_error(ValueError("plain")) == "plain"
