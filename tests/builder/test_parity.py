"""builder.parity: the gate passes real conversions and catches broken ones (real HF model vs real llama.cpp)."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest

import fieldpack.builder.convert.arch as arch_mod
import fieldpack.builder.convert.bpe as tok_mod
from fieldpack.builder.convert import convert_hf_to_gguf
from fieldpack.builder.parity import DEFAULT_PROMPTS, TOLERANCE_BY_FILE_TYPE, check_parity
from fieldpack.builder.quantize import quantize_gguf
from fieldpack.shared.errors import ParityError, UsageError


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("outtype,ftype", [("f32", 0), ("f16", 1)])
def test_real_conversions_pass_the_gate(converted, tiny_dirs, arch: str, outtype: str, ftype: int) -> None:
    report = check_parity(tiny_dirs[arch], converted(arch, outtype).path)
    assert report.passed and report.tokenization_identical and report.top1_flips == 0
    assert report.file_type == ftype and report.tolerance == TOLERANCE_BY_FILE_TYPE[ftype]
    assert report.top1_agreement == 1.0
    assert report.max_abs_logit_diff <= report.tolerance
    assert report.tokens_compared > 300
    if outtype == "f32":  # only summation order differs
        assert report.max_abs_logit_diff < 1e-4
    else:  # F16 rounding is visible but small
        assert 1e-4 < report.max_abs_logit_diff < 3e-2


def test_default_prompts_cover_the_tricky_cases() -> None:
    joined = "".join(DEFAULT_PROMPTS)
    assert "\r\n" in joined and "\t" in joined and "   " in joined
    assert any(ord(c) > 0x1F000 for c in joined)  # emoji
    assert any("\u4e00" <= c <= "\u9fff" for c in joined)  # CJK
    assert "def " in joined and "ü" in joined


def test_tokenization_matches_on_tricky_strings(converted, tiny_dirs) -> None:
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tricky = DEFAULT_PROMPTS + ["", " ", "\n\n\n", "a" * 300, "  x", "x  ", "\ufffd", "ǅ ǈ ǋ", "e\u0301 vs é"]
    for arch in ("llama", "qwen2"):
        tok = AutoTokenizer.from_pretrained(tiny_dirs[arch])
        llm = Llama(str(converted(arch, "f16").path), vocab_only=True, verbose=False)
        try:
            for text in tricky:
                hf = tok(text, add_special_tokens=True)["input_ids"]
                ll = llm.tokenize(text.encode(), add_bos=True, special=False)
                if arch == "qwen2" and text != unicodedata.normalize("NFC", text):
                    # Known llama.cpp limitation: Qwen2's NFC normalizer is not applied. Normalizing the text
                    # first (as the device should) restores identity.
                    assert ll != hf
                    ll = llm.tokenize(unicodedata.normalize("NFC", text).encode(), add_bos=True, special=False)
                assert ll == hf, (arch, text)
        finally:
            llm.close()


def test_spm_style_tokenizer_passes_the_gate(spm_llama_dir: Path, tmp_path: Path) -> None:
    r = convert_hf_to_gguf(spm_llama_dir, tmp_path / "spm.gguf", outtype="f32")
    report = check_parity(spm_llama_dir, r.path)
    assert report.tokenization_identical and report.passed


def test_skipping_the_qk_permutation_fails_the_gate(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(arch_mod, "permute_qk", lambda w, n_head: w)  # the classic conversion bug
    broken = convert_hf_to_gguf(tiny_llama_dir, tmp_path / "broken.gguf", outtype="f32")
    with pytest.raises(ParityError) as info:
        check_parity(tiny_llama_dir, broken.path)
    report = info.value.report
    assert report.tokenization_identical  # the tokenizer is fine ...
    assert report.max_abs_logit_diff > 1.0 and report.top1_flips > 10  # ... the attention is not
    assert "top-1 agreement" in str(info.value)


def test_a_corrupted_tensor_fails_the_gate(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    import gguf

    r = convert_hf_to_gguf(tiny_qwen2_dir, tmp_path / "corrupt.gguf", outtype="f32")
    reader = gguf.GGUFReader(r.path, "r+")
    t = next(t for t in reader.tensors if t.name == "blk.1.attn_v.weight")
    t.data[:] = np.flip(np.array(t.data), axis=0)  # rows in the wrong order, values intact
    del reader
    with pytest.raises(ParityError) as info:
        check_parity(tiny_qwen2_dir, r.path)
    assert info.value.report.max_abs_logit_diff > 0.1


def test_a_wrong_pre_tokenizer_fails_on_tokenization(tiny_qwen2_dir: Path, tmp_path: Path, monkeypatch) -> None:
    # Pretend Qwen2's split regex were GPT-2's (which splits "(valve" and "\n\n" differently). Mapping it to
    # llama-bpe instead would go unnoticed here: it only differs on digit runs, which this vocabulary never merges.
    wrong = {sig: ("gpt-2" if name == "qwen2" else name) for sig, name in tok_mod.KNOWN_PRE_TOKENIZERS.items()}
    monkeypatch.setattr(tok_mod, "KNOWN_PRE_TOKENIZERS", wrong)
    r = convert_hf_to_gguf(tiny_qwen2_dir, tmp_path / "wrongpre.gguf", outtype="f32")
    assert r.tokenizer_pre == "gpt-2"
    with pytest.raises(ParityError) as info:
        check_parity(tiny_qwen2_dir, r.path)
    assert not info.value.report.tokenization_identical
    assert "DIFFERS" in str(info.value)


def test_quantized_file_needs_an_explicit_tolerance(converted, tiny_dirs, tmp_path: Path) -> None:
    q = quantize_gguf(converted("qwen2", "f16").path, tmp_path / "q8.gguf", "Q8_0")
    with pytest.raises(UsageError, match="perplexity_kld"):
        check_parity(tiny_dirs["qwen2"], q.path)
    report = check_parity(tiny_dirs["qwen2"], q.path, logit_atol=1.0, require_top1=False)
    assert report.passed and report.max_abs_logit_diff > 5e-3  # Q8_0 error is visible, and bounded


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 32, "rope_theta": 500000.0},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_is_converted_faithfully(tiny_llama_dir: Path, tmp_path: Path, rope: dict) -> None:
    from tests.builder.conftest import _random_llama

    d = _random_llama(tmp_path / "m", tiny_llama_dir, vocab_size=1024, intermediate=256, hidden=128,
                      extra={"rope_parameters": rope})
    r = convert_hf_to_gguf(d, tmp_path / "rope.gguf", outtype="f32")
    long_prompt = " ".join(DEFAULT_PROMPTS)  # > 100 tokens, well past the 32-token original context
    report = check_parity(d, r.path, prompts=[long_prompt, DEFAULT_PROMPTS[0]])
    assert report.passed and report.tokens_compared > 100
