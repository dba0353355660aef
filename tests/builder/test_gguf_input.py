"""GGUF input: the header reader, inspect_gguf, and `fieldpack build --model x.gguf` refusing bad files in one
line (build family exit code 5), before heavy work, leaving nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fieldpack.builder.convert import convert_hf_to_gguf
from fieldpack.builder.gguf_header import read_gguf_header
from fieldpack.builder.gguf_input import check_gguf_build, inspect_gguf, is_gguf_path, requantize_requested
from fieldpack.shared.errors import (
    CompressionConfigError,
    ModelLoadError,
    UnknownQuantTypeError,
    UnsupportedArchitectureError,
)
from tests.conftest import DEMO_DOCS, run_cli


@pytest.fixture(scope="module")
def gemma_f16(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_hf_to_gguf(tiny_gemma_dir, tmp_path_factory.mktemp("gi") / "tiny-gemma.gguf").path


@pytest.fixture(scope="module")
def llama_q4(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fieldpack.builder.quantize import quantize_gguf

    d = tmp_path_factory.mktemp("gq")
    f16 = convert_hf_to_gguf(tiny_llama_dir, d / "f16.gguf").path
    return quantize_gguf(f16, d / "tiny-llama-Q4_K_M.gguf", "Q4_K_M").path


def test_header_reader_agrees_with_gguf_reader(gemma_f16: Path) -> None:
    import gguf

    ref = gguf.GGUFReader(gemma_f16)
    head = read_gguf_header(gemma_f16, arrays={"tokenizer.ggml.tokens"})
    assert set(head.kv) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key in ("general.architecture", "gemma3.attention.sliding_window", "gemma3.rope.freq_base_swa",
                "tokenizer.ggml.tokens", "tokenizer.ggml.add_bos_token"):
        assert head.kv[key] == ref.fields[key].contents(), key
    assert head.kv["tokenizer.ggml.scores"] == len(ref.fields["tokenizer.ggml.scores"].contents())  # skipped
    assert [(t.name, t.type_name, t.n_elements) for t in head.tensors] == \
        [(t.name, t.tensor_type.name, int(t.n_elements)) for t in ref.tensors]
    assert head.data_start == ref.data_offset and head.data_end == gemma_f16.stat().st_size


def test_inspect_describes_a_gemma_gguf(gemma_f16: Path, tiny_gemma_dir: Path) -> None:
    info = inspect_gguf(gemma_f16)
    m = info.model
    assert (info.file_type, info.quantized) == ("F16", False)
    assert (m.architecture, m.n_layer, m.n_embd, m.head_dim, m.n_head_kv) == ("gemma3", 4, 64, 32, 2)
    assert (m.bos_id, m.eos_id, m.eot_id, m.add_bos) == (2, 1, 5, True)
    assert m.stop_strings == ["<end_of_turn>", "<eos>"] and m.chat_template is None
    assert m.parameter_count == convert_hf_to_gguf(tiny_gemma_dir, gemma_f16.with_name("again.gguf")).parameter_count


def test_inspect_describes_a_quantized_llama_gguf(llama_q4: Path) -> None:
    info = inspect_gguf(llama_q4)
    assert (info.file_type, info.quantized) == ("Q4_K_M", True)
    assert info.model.chat_template and "<|im_start|>" in info.model.chat_template
    assert info.model.stop_strings[0] == "<|im_end|>" and "Q4_K" in info.model.tensor_types
    assert is_gguf_path(llama_q4) and not is_gguf_path(llama_q4.parent)
    assert not requantize_requested(None, info) and not requantize_requested("q4_k_m", info)
    assert requantize_requested("Q4_0", info)


def test_build_checks_refuse_options_that_do_not_fit_a_gguf(llama_q4: Path) -> None:
    with pytest.raises(CompressionConfigError, match="GGUF"):
        check_gguf_build(llama_q4, None, compression=True)
    with pytest.raises(UnknownQuantTypeError, match="IQ1"):
        check_gguf_build(llama_q4, "IQ1_S", compression=False)
    assert check_gguf_build(llama_q4, "Q4_K_M", compression=False) == llama_q4


def _write_gguf(path: Path, *, arch: str, tokenizer: bool) -> Path:
    import gguf

    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    if tokenizer:
        w.add_tokenizer_model("llama")
        w.add_token_list(["<unk>", "<s>", "</s>"])
        w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", np.zeros((3, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_inspect_refuses_bad_files(tmp_path: Path, gemma_f16: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(gemma_f16.read_bytes()[: gemma_f16.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        inspect_gguf(cut)
    with pytest.raises(UnsupportedArchitectureError, match="'not-a-model'"):
        inspect_gguf(_write_gguf(tmp_path / "arch.gguf", arch="not-a-model", tokenizer=True))
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        inspect_gguf(_write_gguf(tmp_path / "notok.gguf", arch="llama", tokenizer=False))
    with pytest.raises(ModelLoadError, match="llama.cpp cannot load"):  # a tokenizer, but no usable model
        inspect_gguf(_write_gguf(tmp_path / "empty.gguf", arch="llama", tokenizer=True))


@pytest.mark.parametrize("case,needle", [("truncated", "truncated"), ("arch", "not-a-model"),
                                         ("no tokenizer", "no tokenizer")])
def test_cli_refuses_bad_gguf_in_one_line(tmp_path: Path, gemma_f16: Path, case: str, needle: str) -> None:
    from fieldpack.shared.signing import generate_keypair

    generate_keypair(tmp_path / "keys")
    if case == "truncated":
        bad = tmp_path / "model.gguf"
        bad.write_bytes(gemma_f16.read_bytes()[:100_000])
    else:
        bad = _write_gguf(tmp_path / "model.gguf", arch="not-a-model" if case == "arch" else "llama",
                          tokenizer=case != "no tokenizer")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = run_cli("build", "--model", str(bad), "--docs", str(DEMO_DOCS), "--name", "t",
                "--sign", str(tmp_path / "keys" / "builder.key"), "-o", str(out_dir / "b.fpk"), timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 5, r.stderr[-2000:]
    assert lines[-1].startswith("error: ") and str(bad) in lines[-1] and needle in lines[-1], lines[-1]
    assert list(out_dir.iterdir()) == []
