"""Prompt formats: deciding one at build time, the completion prompt for base models, folding the instructions
into the first user turn for templates without a system role, and template failures as fieldpack errors."""

from __future__ import annotations

import pytest

from fieldpack.device.prompt import Turn, fit_prompt, prompt_renderer
from fieldpack.retrieval.types import Hit
from fieldpack.shared.errors import BuildError, ChatTemplateError
from fieldpack.shared.prompt_format import (
    COMPLETION_STOP,
    COMPLETION_TEMPLATE,
    INSTRUCTIONS,
    ChatTemplate,
    decide_prompt_format,
)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Gemma's shape: system turns refused, turns as <start_of_turn>user / model
NO_SYSTEM = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
             "{{ raise_exception('System role not supported') }}{% endif %}"
             "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
             "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def _hit(i: int, text: str = "The default value of max_connections is 100.") -> Hit:
    return Hit(chunk_id=i, source=f"doc{i}.md", section="Settings", page=None, line_start=3, line_end=4,
               text=text, score=1.0 / (i + 1))


def _words(text: str) -> list[int]:
    return list(range(len(text.split())))


def test_decide_chat_when_template_takes_a_system_turn() -> None:
    assert decide_prompt_format(CHATML, None) == "chat"


def test_decide_chat_no_system_when_template_refuses_it() -> None:
    assert decide_prompt_format(NO_SYSTEM, None, bos_token="<bos>") == "chat-no-system"
    assert decide_prompt_format(NO_SYSTEM, "chat", bos_token="<bos>") == "chat-no-system"


def test_decide_completion_for_base_model_or_when_asked() -> None:
    assert decide_prompt_format(None, None) == "completion"
    assert decide_prompt_format(CHATML, "completion") == "completion"


def test_chat_asked_without_template_is_refused_with_the_fix() -> None:
    with pytest.raises(ChatTemplateError, match="no chat template") as ei:
        decide_prompt_format(None, "chat", origin="model tiny")
    assert isinstance(ei.value, BuildError) and ei.value.exit_code == 5
    assert "--prompt-format completion" in str(ei.value)


@pytest.mark.parametrize("template", [
    "{{ raise_exception('no roles at all') }}",            # refuses every conversation
    "{% for m in messages %}{{ m.content | nosuchfilter }}{% endfor %}",  # does not compile
    "{{ messages[5]['content'].upper() }}",                # fails on our messages (undefined)
])
def test_undecidable_template_is_refused_at_build_with_the_fix(template: str) -> None:
    with pytest.raises(ChatTemplateError) as ei:
        decide_prompt_format(template, None, origin="model broken")
    text = str(ei.value)
    assert "model broken" in text and "--prompt-format completion" in text and "\n" not in text


def test_template_error_is_a_fieldpack_error_not_a_traceback() -> None:
    tmpl = ChatTemplate(NO_SYSTEM, bos_token="<bos>", origin="slot a")
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        tmpl.render([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])


def test_chat_no_system_folds_instructions_into_first_user_turn() -> None:
    tmpl = ChatTemplate(NO_SYSTEM, bos_token="<bos>")
    render = prompt_renderer("chat-no-system", chat=tmpl.render)
    text = render("What is the default?", [_hit(0)], [Turn("earlier question", "earlier answer")])
    first_user = text.split("<start_of_turn>user\n", 1)[1].split("<end_of_turn>", 1)[0]
    assert first_user.startswith(INSTRUCTIONS) and first_user.endswith("earlier question")
    assert text.count(INSTRUCTIONS) == 1 and text.endswith("<start_of_turn>model\n")
    assert "[1] doc0.md § Settings, lines 3-4" in text


def test_completion_prompt_has_sources_question_and_answer_cue() -> None:
    render = prompt_renderer("completion", completion_template=COMPLETION_TEMPLATE)
    hits = [_hit(0), _hit(1, "Each connection costs about 10 MB of memory {not a placeholder}.")]
    text = render("What is the default value of max_connections?", hits, [Turn("Where is the file?", "In /etc [1].")])
    assert text.endswith("Question: What is the default value of max_connections?\nAnswer:")
    assert "[1] doc0.md § Settings, lines 3-4\nThe default value of max_connections is 100." in text
    assert "[2] doc1.md" in text and "{not a placeholder}" in text and "{sources}" not in text
    assert "Cite the sources you use as [1], [2]." in text
    assert text.index("[2] doc1.md") < text.index("Question: Where is the file?\nAnswer: In /etc [1].\n\n"
                                                  "Question: What is the default")


def test_completion_stop_strings_cut_a_base_model_continuation() -> None:
    """What a base model writes after the cue: the answer, then it invents the next question. The stop strings
    (what llama.cpp applies) leave only the answer."""
    continuation = " The default value is 100 [1].\nQuestion: What is the maximum?\nAnswer: 1000"

    def cut(text: str) -> str:
        ends = [i for i in (text.find(s) for s in COMPLETION_STOP) if i >= 0]
        return text[:min(ends)] if ends else text

    assert cut(continuation) == " The default value is 100 [1]."
    assert cut(" 100 [1].\n\n\nThe next chapter") == " 100 [1]."
    assert cut(" first line\nSources:\n[1] more") == " first line"


def test_the_instruction_line_a_base_model_writes_again_is_a_stop() -> None:
    """A trial's answer went on with the template's instruction line; its first 40 characters stop it."""
    from fieldpack.shared.prompt_format import template_echo_stops

    stops = template_echo_stops(COMPLETION_TEMPLATE)
    assert stops == ("Answer the question using the sources ab",)
    answer = " Open valve V-4, then start pump 4 [1].\nAnswer the question using the sources above. Cite the"
    ends = [i for i in (answer.find(s) for s in (*COMPLETION_STOP, *stops)) if i >= 0]
    assert answer[:min(ends)].rstrip() == " Open valve V-4, then start pump 4 [1]."
    assert template_echo_stops("Sources:\n{sources}\nQ: {question}\nA:") == ()  # short or placeholder lines


def test_completion_prompt_fits_the_budget() -> None:
    render = prompt_renderer("completion", completion_template=COMPLETION_TEMPLATE)
    hits = [_hit(i, "word " * 200) for i in range(4)]
    full = len(_words(render("why?", hits, [])))
    p = fit_prompt("why?", hits, [], render=render, tokenize=_words, budget_tokens=full - 50)
    assert len(p.hits) == 3 and len(p.tokens) <= full - 50
