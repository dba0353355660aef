"""Depth and width pruning: the right blocks/channels/heads go, the smaller checkpoint is consistent, and its
GGUF is smaller, passes the parity gate, loads in llama.cpp and generates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fieldpack.builder.compress.calibration import build_calibration
from fieldpack.builder.compress.structured import block_influence, prune_depth, prune_width


def _load(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[:2]).logits


@pytest.fixture(scope="module")
def calib_ids(tiny_llama_dir: Path, demo_corpus: list[str]) -> torch.Tensor:
    return build_calibration(tiny_llama_dir, demo_corpus, n_chunks=100, seq_len=128).input_ids


def test_block_influence_is_zero_for_an_identity_block_and_that_block_is_dropped(tiny_llama_dir, calib_ids) -> None:
    model = _load(tiny_llama_dir)
    blk = model.model.layers[0]
    blk.self_attn.o_proj.weight.data.zero_()  # attention and MLP add nothing: the block passes its input through
    blk.mlp.down_proj.weight.data.zero_()
    bi = block_influence(model, calib_ids, device="cpu")
    assert bi[0] == pytest.approx(0.0, abs=1e-6) and bi[1] > 0.01
    before = _logits(model, calib_ids)
    rep = prune_depth(model, 1, calib_ids, device="cpu")
    assert rep.dropped_blocks == [0]
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1
    assert model.model.layers[0].self_attn.layer_idx == 0
    torch.testing.assert_close(_logits(model, calib_ids), before, rtol=1e-4, atol=1e-4)
    assert rep.params_after < rep.params_before


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_width_removes_the_dead_channels_and_heads_exactly(arch, tiny_dirs, calib_ids) -> None:
    model = _load(tiny_dirs[arch])
    n_head, n_kv, hd = 4, 2, 64
    g = torch.Generator().manual_seed(0)
    dead_ch = []
    for blk in model.model.layers:
        dead = torch.randperm(512, generator=g)[:256]  # channels whose output weights are zero
        blk.mlp.down_proj.weight.data[:, dead] = 0.0
        dead_ch.append(set(dead.tolist()))
        # GQA group 1 = KV head 1 and query heads 2, 3: zero what those query heads write out
        blk.self_attn.o_proj.weight.data[:, 2 * hd:4 * hd] = 0.0
    before = _logits(model, calib_ids)
    rep = prune_width(model, 256, calib_ids, kv_heads_keep=1, device="cpu")
    assert (rep.ffn_after, rep.kv_heads_after) == (256, 1)
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (256, 2, 1, hd)
    for blk in model.model.layers:
        a = blk.self_attn
        assert a.q_proj.weight.shape == (2 * hd, 256) and a.k_proj.weight.shape == (hd, 256)
        assert a.o_proj.weight.shape == (256, 2 * hd) and blk.mlp.down_proj.weight.shape == (256, 256)
        if arch == "qwen2":
            assert a.q_proj.bias.shape == (2 * hd,) and a.v_proj.bias.shape == (hd,)
    # only channels and heads that contributed nothing were removed: the function is unchanged
    torch.testing.assert_close(_logits(model, calib_ids), before, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("arch, options", [
    ("llama", {"prune": "depth", "drop_layers": 1}),
    ("qwen2", {"prune": "depth"}),
    ("qwen2", {"prune": "width", "ffn_keep": 0.5}),
    ("llama", {"prune": "width", "ffn_keep": 0.5, "kv_heads_keep": 1}),
])
def test_pruned_checkpoint_converts_loads_and_generates(arch, options, tiny_dirs, converted, demo_corpus,
                                                        tmp_path) -> None:
    import json

    from llama_cpp import Llama

    from fieldpack.builder.compress import prune_checkpoint, validate_compression
    from fieldpack.builder.quantize import quantize_gguf

    dense = converted(arch, "f16")
    opts = validate_compression(options, model_dir=tiny_dirs[arch])
    pruned_dir, conv, detail, resolved = prune_checkpoint(tiny_dirs[arch], opts, demo_corpus, tmp_path)
    assert detail["parity_top1"] >= 0.99  # the parity gate passed (it raises otherwise; near-ties may differ)
    assert conv.size_bytes < dense.size_bytes
    cfg = json.loads((pruned_dir / "config.json").read_text())
    if options["prune"] == "depth":
        assert resolved["drop_layers"] == 1 and cfg["num_hidden_layers"] == conv.n_layer == 1
    else:
        assert cfg["intermediate_size"] == 256
    assert (pruned_dir / "tokenizer.json").is_file() and (pruned_dir / "fieldpack_compression.json").is_file()
    q = quantize_gguf(conv.path, tmp_path / "q4km.gguf", "Q4_K_M")
    # a 256-wide MLP keeps K-quants; only an attention output narrower than 256 falls back
    assert all(f.tensor.endswith("attn_output.weight") for f in q.fallbacks)
    for path in (conv.path, q.path):
        llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, seed=0)
        try:
            out = llm.create_completion("Check the pump", max_tokens=8, temperature=0.0)
        finally:
            llm.close()
        assert out["usage"]["completion_tokens"] >= 1


def test_gemma3_depth_pruning_keeps_each_blocks_attention_kind_through_llama_cpp(tiny_gemma_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """Dropping block 0 of the tiny Gemma 3 (sliding, sliding, full, sliding) moves the global-attention block from
    index 2 to 1: the saved ``layer_types``, our converter's per-layer sliding-window pattern and llama.cpp must
    agree, which the parity gate (HF logits vs llama.cpp logits) checks; and the mask methods are refused by name."""
    import json

    from transformers import AutoModelForCausalLM

    from fieldpack.builder.compress import validate_compression
    from fieldpack.builder.compress.structured import drop_blocks, save_checkpoint
    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.parity import check_parity
    from fieldpack.shared.errors import CompressionConfigError

    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    types = list(model.config.layer_types)
    assert types.index("full_attention") == 2
    drop_blocks(model, [0])
    out = save_checkpoint(model, tiny_gemma_dir, tmp_path / "pruned", dtype=torch.float32)
    saved = json.loads((Path(out) / "config.json").read_text())
    assert saved["num_hidden_layers"] == len(types) - 1 and saved["layer_types"] == types[1:]
    gguf = convert_hf_to_gguf(Path(out), tmp_path / "pruned.gguf", outtype="f32").path
    report = check_parity(Path(out), gguf)
    assert report.passed, report
    validate_compression({"prune": "depth", "drop_layers": 1}, model_dir=tiny_gemma_dir)
    with pytest.raises(CompressionConfigError, match="--prune wanda does not support Gemma3ForCausalLM"):
        validate_compression({"prune": "wanda", "sparsity": 0.5}, model_dir=tiny_gemma_dir)
