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


def test_a_truncated_gguf_is_one_error_with_llama_cpps_cause(tiny_gemma_gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gemma_gguf.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"cannot load .*cut\.gguf.*\(llama\.cpp: gguf_init_from_\w+: failed") as e:
        with open_gguf(bad, n_ctx=64):
            pass
    assert "\n" not in str(e.value) and "re-convert" in str(e.value)
