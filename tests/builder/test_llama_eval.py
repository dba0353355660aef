"""Loading GGUFs for evaluation: llama.cpp's load-time notes stay off the user's terminal, and a file llama.cpp
cannot load is one error that carries llama.cpp's own cause."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldpack.builder.convert import convert_hf_to_gguf
from fieldpack.builder.llama_eval import open_gguf
from fieldpack.shared.errors import ModelLoadError


@pytest.fixture(scope="module")
def tiny_gemma_gguf(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_hf_to_gguf(tiny_gemma_dir, tmp_path_factory.mktemp("gguf") / "g.gguf", outtype="f16").path


def test_loading_gemma_prints_no_llama_cpp_notes(tiny_gemma_gguf: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The demo's build printed `llama_kv_cache_iswa: using full-size SWA cache (ref: ...)` three times (parity and
    quality load Gemma 3 with a full-size sliding-window cache)."""
    capfd.readouterr()
    with open_gguf(tiny_gemma_gguf, n_ctx=64) as llm:
        assert len(llm.tokenize(b"pump", add_bos=False, special=False)) >= 1
    assert "llama_" not in capfd.readouterr().err


def test_an_imatrix_of_gemma_prints_no_llama_cpp_notes(tiny_gemma_gguf: Path, tmp_path: Path,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    """`fieldpack plan` printed llama.cpp's `load: control-looking token ...` and `using full-size SWA cache`
    lines at each imatrix, which loads the model through llama.cpp's C API (not ``Llama``)."""
    from fieldpack.builder.compress.imatrix import compute_imatrix_gguf

    capfd.readouterr()
    text = "Check the pump seal and the valve before the shift. " * 40
    res = compute_imatrix_gguf(tiny_gemma_gguf, [text], tmp_path / "imatrix.gguf", n_ctx=64)
    assert res.path.is_file()
    err = capfd.readouterr().err
    assert "llama_" not in err and "load:" not in err, err


def test_a_truncated_gguf_is_one_error_with_llama_cpps_cause(tiny_gemma_gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gemma_gguf.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"cannot load .*cut\.gguf.*\(llama\.cpp: gguf_init_from_\w+: failed") as e:
        with open_gguf(bad, n_ctx=64):
            pass
    assert "\n" not in str(e.value) and "re-convert" in str(e.value)


def test_a_load_inside_a_log_capture_does_not_deadlock(tiny_gemma_gguf: Path) -> None:
    """The quality stage captures llama.cpp's log around its evaluation loads, which capture it again: the first
    CI of the quiet loads hung there on a non-reentrant lock. Nested captures share the callback and both lists get
    the lines."""
    import threading

    from fieldpack.builder.llama_eval import capture_llama_log

    seen: dict[str, list[str]] = {}

    def nested() -> None:
        with capture_llama_log() as outer:
            with open_gguf(tiny_gemma_gguf, n_ctx=64):
                pass
            seen["outer"] = list(outer)

    t = threading.Thread(target=nested, daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "a nested llama.cpp log capture deadlocked"
    assert any("SWA" in line for line in seen["outer"]), seen
    with capture_llama_log():  # the lock is free again
        pass
