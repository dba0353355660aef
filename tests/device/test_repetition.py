"""device.repetition: loops are found at the third copy and cut to the first; ordinary answers never are."""

from __future__ import annotations

import pytest

from fieldpack.device.repetition import LoopGuard, repeating_tail

LOOP = "Yes, it is. " + "The tool is not designed to run in this manner. " * 5


def _stream(text: str, step: int = 3) -> LoopGuard:
    g = LoopGuard()
    for i in range(0, len(text), step):
        if g.feed(text[i:i + step]):
            break
    return g


def test_a_sentence_loop_stops_at_the_third_copy_and_keeps_the_first() -> None:
    g = _stream(LOOP)
    assert g.looped
    assert g.text() == "Yes, it is. The tool is not designed to run in this manner."


@pytest.mark.parametrize("step", range(1, 12))
def test_the_cut_ends_at_the_sentence_whatever_the_piece_boundaries(step: int) -> None:
    """Detected at the third copy of a rotated block, the cut had left "... in the memory.\nThe error detection
    system" (a trial) or dropped the final period; it now keeps one whole sentence, for any streaming step."""
    sentence = "The error detection system is used to detect errors in the memory.\n"
    g = _stream(" To suppress errors, use a suppression file.\n" + sentence * 5, step=step)
    assert g.looped
    assert g.text() == " To suppress errors, use a suppression file.\n" + sentence.rstrip()


def test_a_loop_on_the_citation_string_is_found() -> None:
    g = _stream("Attach a debugger [1] [1] [1] [1] [1] [1] [1] [1] [1] [1]", step=2)
    assert g.looped and g.text().startswith("Attach a debugger [1]")


@pytest.mark.parametrize("answer", [
    "Run VACUUM ANALYZE readings; on HIST-1 during the night shift [1].",
    "1. Stop pump 3. 2. Close valve V-12. 3. Open the bypass. 4. Restart pump 3 [2].",
    "| alarm | meaning |\n|---|---|\n| A-201 | low flow |\n| A-202 | chlorine gas |",
    "Wait...... then check again. Check the filter, check the pump, check the valve.",
    "No.",
])
def test_ordinary_answers_are_not_loops(answer: str) -> None:
    g = _stream(answer)
    assert not g.looped and g.text() == answer


def test_repeating_tail_period_and_limits() -> None:
    assert repeating_tail("abc" * 7) is None               # 21 characters: not three blocks of the minimum 8
    assert repeating_tail("abc" * 12) == 9                 # a short pattern loops in blocks of a multiple of it
    assert repeating_tail("x" + "check it. " * 3) == 10
    assert repeating_tail("x" + "check it. " * 2) is None   # two copies are not a loop yet
    assert repeating_tail("--------. " * 4) is None         # punctuation only


def test_the_runtime_stops_a_looping_answer_and_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runtime._generate with the loop guard on, over a stream that loops (no model at hand here loops on
    demand: the demo's Gemma 3 270M answers and the tiny test models did not, 11 questions tried)."""
    from types import SimpleNamespace

    import llama_cpp

    from fieldpack.device.runtime import Runtime

    pieces = ["Yes, it is. "] + ["The tool is ", "not designed ", "to run this way. "] * 10
    closed = []

    class Stream:
        def __iter__(self):  # noqa: ANN204
            for p in pieces:
                yield {"choices": [{"text": p, "finish_reason": None}]}
            yield {"choices": [{"text": "", "finish_reason": "length"}]}

        def close(self) -> None:
            closed.append(True)

    llm = SimpleNamespace(ctx=None, model=None, n_tokens=0, create_completion=lambda *a, **k: Stream())
    monkeypatch.setattr(llama_cpp, "llama_perf_context_reset", lambda ctx: None)
    monkeypatch.setattr(llama_cpp, "llama_perf_context",
                        lambda ctx: SimpleNamespace(n_eval=12, t_eval_ms=100.0, t_p_eval_ms=10.0))
    rt = Runtime.__new__(Runtime)
    rt._llm = llm
    rt.manifest = SimpleNamespace(runtime=SimpleNamespace(stop=[]))
    rt._stop = []
    shown: list[str] = []
    text, finish, _ = rt._generate([1, 2, 3], 256, shown.append, None, stop_loops=True)
    assert finish == "looped" and closed
    assert text == "Yes, it is. The tool is not designed to run this way."
    assert "".join(shown).count("to run this way.") == 3  # streamed up to the third copy, then stopped

    text, finish, _ = rt._generate([1, 2, 3], 256, None, None, stop_loops=False)  # raw continuations: as asked
    assert finish == "length" and text == "".join(pieces)
