"""Gemma 3 conversion: a tiny random Gemma 3 (fast) and the real Gemma 3 270M (slow), both through the parity gate.

Every Gemma-specific piece the converter writes (RMSNorm ``w + 1``, the sliding-window layer pattern, the
local RoPE base) is broken on purpose once and must make the gate fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fieldpack.builder.convert.gemma3 as gemma3_mod
from fieldpack.builder.convert import convert_hf_to_gguf
from fieldpack.builder.convert.arch import read_hparams
from fieldpack.builder.parity import DEFAULT_PROMPTS, GELU_TOLERANCE, check_parity
from fieldpack.shared.errors import ParityError, UnsupportedArchitectureError


def _fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: np.array(t.data) for t in reader.tensors}


@pytest.fixture(scope="module")
def tiny_f32(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    return convert_hf_to_gguf(tiny_gemma_dir, tmp_path_factory.mktemp("g") / "tiny-gemma-f32.gguf", outtype="f32")


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_tiny_gemma3_passes_the_gate(tiny_gemma_dir: Path, tmp_path: Path, outtype: str) -> None:
    r = convert_hf_to_gguf(tiny_gemma_dir, tmp_path / f"g-{outtype}.gguf", outtype=outtype)
    report = check_parity(tiny_gemma_dir, r.path)
    assert report.passed and report.tokenization_identical and report.top1_flips == 0
    assert report.tolerance == GELU_TOLERANCE and report.tokens_compared > 300
    assert report.max_abs_logit_diff < 0.05


def test_tiny_gemma3_writes_what_llama_cpp_gemma3_expects(tiny_gemma_dir: Path, tiny_f32) -> None:
    from safetensors.numpy import load_file

    kv, tensors = _fields(tiny_f32.path)
    cfg = json.loads((tiny_gemma_dir / "config.json").read_text())
    assert kv["general.architecture"] == "gemma3" and tiny_f32.architecture == "gemma3"
    assert kv["gemma3.attention.sliding_window"] == 8
    assert kv["gemma3.rope.freq_base"] == 1_000_000.0 and kv["gemma3.rope.freq_base_swa"] == 20_000.0
    assert list(kv["gemma3.attention.sliding_window_pattern"]) == [True, True, False, True]
    assert kv["gemma3.attention.key_length"] == 32 and kv["gemma3.embedding_length"] == 64  # head_dim != n_embd/n_head
    assert "output.weight" not in tensors  # tied embeddings
    hf = load_file(str(tiny_gemma_dir / "model.safetensors"))
    for hf_name, gguf_name in [("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
                               ("model.layers.1.self_attn.q_norm.weight", "blk.1.attn_q_norm.weight"),
                               ("model.layers.2.pre_feedforward_layernorm.weight", "blk.2.ffn_norm.weight"),
                               ("model.layers.3.post_feedforward_layernorm.weight", "blk.3.post_ffw_norm.weight"),
                               ("model.layers.0.post_attention_layernorm.weight", "blk.0.post_attention_norm.weight"),
                               ("model.norm.weight", "output_norm.weight")]:
        np.testing.assert_array_equal(tensors[gguf_name], hf[hf_name] + np.float32(1.0))
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj.weight"])
    # SentencePiece-style vocabulary: byte pieces, Gemma's special ids, <end_of_turn> as EOT, BOS added, no prefix
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert kv["tokenizer.ggml.model"] == "llama"
    assert types[tokens.index("<0x41>")] == 6 and types[tokens.index("<end_of_turn>")] == 3
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (2, 1)
    assert kv["tokenizer.ggml.eot_token_id"] == tokens.index("<end_of_turn>") == 5
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_space_prefix"] is False
    assert tiny_f32.stop_strings == ["<end_of_turn>", "<eos>"]
    assert len(tokens) == cfg["vocab_size"]


def _default_pattern_only(config: dict, n_layer: int) -> list[bool]:
    return gemma3_mod.default_pattern(n_layer)


@pytest.mark.parametrize("broken", ["norm w instead of w+1", "default sliding pattern", "one RoPE base"])
def test_each_gemma3_specific_is_needed(tiny_gemma_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        broken: str) -> None:
    if broken.startswith("norm"):
        monkeypatch.setattr(gemma3_mod, "NORM_SHIFT", 0.0)
    elif broken.startswith("default"):
        monkeypatch.setattr(gemma3_mod, "sliding_layers", _default_pattern_only)
    else:
        real = gemma3_mod.rope_bases
        monkeypatch.setattr(gemma3_mod, "rope_bases", lambda c: (real(c)[0], real(c)[0], real(c)[2]))
    r = convert_hf_to_gguf(tiny_gemma_dir, tmp_path / "broken.gguf", outtype="f32")
    with pytest.raises(ParityError) as err:
        check_parity(tiny_gemma_dir, r.path)
    assert err.value.report.tokenization_identical  # the model is wrong, not the tokenizer
    assert err.value.report.max_abs_logit_diff > 10 * GELU_TOLERANCE


@pytest.mark.parametrize("change,what", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"query_pre_attn_scalar": 100}, "query_pre_attn_scalar"),
    ({"use_bidirectional_attention": True}, "bidirectional"),
])
def test_gemma3_variants_llama_cpp_computes_differently_are_refused(tiny_gemma_dir: Path, change: dict,
                                                                    what: str) -> None:
    cfg = json.loads((tiny_gemma_dir / "config.json").read_text()) | change
    with pytest.raises(UnsupportedArchitectureError, match=what):
        read_hparams(cfg, "Gemma3ForCausalLM", source="tiny")


def test_gemma3_conditional_generation_text_part_is_read(tiny_gemma_dir: Path) -> None:
    text = json.loads((tiny_gemma_dir / "config.json").read_text())
    hp = read_hparams({"architectures": ["Gemma3ForConditionalGeneration"], "text_config": text,
                       "vision_config": {"hidden_size": 1152}}, "Gemma3ForConditionalGeneration", source="x")
    assert (hp.gguf_arch, hp.n_embd, hp.head_dim, hp.sliding_window) == ("gemma3", 64, 32, 8)
    assert gemma3_mod.text_tensor_name("model.language_model.layers.0.mlp.up_proj.weight") == \
        "model.layers.0.mlp.up_proj.weight"
    assert gemma3_mod.text_tensor_name("language_model.model.norm.weight") == "model.norm.weight"
    assert gemma3_mod.text_tensor_name("model.vision_tower.encoder.x.weight") is None


# --- the real model (slow) ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f16", "f32"])
def test_real_gemma3_270m_passes_the_gate(gemma_hf_dir: Path, tmp_path: Path, outtype: str) -> None:
    r = convert_hf_to_gguf(gemma_hf_dir, tmp_path / f"gemma-{outtype}.gguf", outtype=outtype)
    assert (r.architecture, r.n_layer, r.n_embd, r.vocab_size) == ("gemma3", 18, 640, 262_144)
    assert r.eot_id == 106 and r.bos_id == 2 and r.add_bos
    report = check_parity(gemma_hf_dir, r.path)
    assert report.passed and report.tokenization_identical and report.top1_flips == 0
    assert report.top1_agreement >= 0.99 and report.tokens_compared > 250


@pytest.mark.slow
def test_real_gemma3_with_a_broken_norm_convention_fails(gemma_hf_dir: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemma3_mod, "NORM_SHIFT", 0.0)
    r = convert_hf_to_gguf(gemma_hf_dir, tmp_path / "broken.gguf", outtype="f16")
    with pytest.raises(ParityError) as err:
        check_parity(gemma_hf_dir, r.path, prompts=DEFAULT_PROMPTS[:3])
    assert err.value.report.tokenization_identical and err.value.report.max_abs_logit_diff > 1.0


# --- compression ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{"prune": "depth", "drop_layers": 1}, {"prune": "width", "ffn_keep": 0.5}])
def test_structured_pruning_accepts_gemma3(tiny_gemma_dir: Path, options: dict) -> None:
    from fieldpack.builder.compress import validate_compression

    assert validate_compression(options, model_dir=tiny_gemma_dir).prune == options["prune"]


@pytest.mark.parametrize("options", [{"prune": "wanda", "sparsity": 0.5}, {"prune": "magnitude", "sparsity": 0.5},
                                     {"prune": "width", "ffn_keep": 0.5, "kv_heads_keep": 1}])
def test_mask_and_head_pruning_refuse_gemma3_by_name(tiny_gemma_dir: Path, options: dict) -> None:
    from fieldpack.builder.compress import validate_compression
    from fieldpack.shared.errors import CompressionConfigError

    with pytest.raises(CompressionConfigError, match="Gemma3ForCausalLM") as err:
        validate_compression(options, model_dir=tiny_gemma_dir)
    assert "\n" not in str(err.value) and "Fix:" in str(err.value)


def test_domain_imatrix_quantizes_gemma3(tiny_f32, demo_corpus: list[str], tmp_path: Path) -> None:
    from fieldpack.builder.compress import compute_imatrix
    from fieldpack.builder.quantize import quantize_gguf, read_imatrix

    imatrix = compute_imatrix(tiny_f32.path, demo_corpus, tmp_path / "imatrix.gguf")
    data = read_imatrix(imatrix)
    assert "blk.0.ffn_down.weight" in data and "blk.3.attn_q.weight" in data
    q = quantize_gguf(tiny_f32.path, tmp_path / "q.gguf", "Q8_0", imatrix=imatrix)
    assert q.imatrix_entries == len(data) and q.tensor_types.get("Q8_0", 0) > 0
