"""GPTQ onto the Q4_0/Q8_0 grids (builder/compress/gptq.py): the paper's claim on small matrices, the block
layout against gguf's (= llama.cpp's) quantizer, and the written GGUF in llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from fieldpack.builder.compress.gptq import (  # noqa: E402
    BLOCK,
    block_scales,
    gptq_quantize,
    output_error,
    pack_blocks,
    round_to_grid,
)
from fieldpack.shared.errors import CompressionConfigError  # noqa: E402

QT = {"Q4_0": GGMLQuantizationType.Q4_0, "Q8_0": GGMLQuantizationType.Q8_0}


def _correlated_inputs(n: int, cols: int, seed: int) -> "torch.Tensor":
    """``(n, cols)`` activations with correlated features and a few large channels, as in LLM layers."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    x = torch.randn(n, cols, generator=g).matmul(mix)
    x[:, :4] *= 8.0  # outlier channels
    return x


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_gptq_output_error_is_below_rtn_on_the_same_grid(qtype: str) -> None:
    rows, cols = 48, 128
    g = torch.Generator().manual_seed(1)
    W = torch.randn(rows, cols, generator=g)
    X = _correlated_inputs(1024, cols, 2)
    H = 2 * X.t().matmul(X) / X.shape[0]
    res = gptq_quantize(W, H, qtype)
    rtn = torch.from_numpy(dequantize(quantize(W.numpy(), QT[qtype]), QT[qtype]).copy())
    err_gptq = float(((W - res.values).matmul(X.t()) ** 2).sum())
    err_rtn = float(((W - rtn).matmul(X.t()) ** 2).sum())
    print(qtype, err_gptq / err_rtn)
    assert err_gptq < 0.9 * err_rtn
    assert output_error(W, res.values, H) == pytest.approx(err_gptq / float((W.matmul(X.t()) ** 2).sum()), rel=1e-3)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_blocks_dequantize_to_exactly_the_values_gptq_chose(qtype: str) -> None:
    W = torch.randn(8, 96, generator=torch.Generator().manual_seed(3))
    X = _correlated_inputs(256, 96, 4)
    res = gptq_quantize(W, 2 * X.t().matmul(X) / 256, qtype)
    packed = pack_blocks(res.q.numpy(), res.d.numpy(), qtype)
    back = dequantize(packed, QT[qtype])
    assert back.shape == (8, 96)
    assert np.array_equal(back, res.values.numpy())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_packing_rounded_integers_gives_llama_cpp_blocks_byte_for_byte(qtype: str) -> None:
    """Rounding with the identity Hessian's choices (plain RTN on our grid) packs into the same bytes as gguf's
    port of ``quantize_row_q4_0_ref`` / ``q8_0`` (weights away from rounding ties)."""
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(5))
    blocks = W.reshape(16, 2, BLOCK)
    d = torch.stack([block_scales(blocks[:, b], qtype) for b in range(2)], dim=1)  # (16, 2)
    q = torch.cat([round_to_grid(W[:, c], d[:, c // BLOCK], qtype)[0].unsqueeze(1) for c in range(64)], dim=1)
    ours = pack_blocks(q.numpy(), d.numpy(), qtype)
    ref = quantize(W.numpy(), QT[qtype])
    # llama.cpp quantizes with 1/d in fp32 before d is rounded to fp16; agree on all but a rare tie
    assert ours.shape == ref.shape
    assert (ours != ref).mean() < 0.01
    assert np.array_equal(ours.reshape(16, 2, -1)[..., :2], ref.reshape(16, 2, -1)[..., :2])  # the fp16 scales


def test_bad_shapes_and_types_are_refused_by_name() -> None:
    H = torch.eye(40)
    with pytest.raises(CompressionConfigError, match="not a multiple of the 32"):
        gptq_quantize(torch.randn(4, 40), H, "Q4_0")
    with pytest.raises(CompressionConfigError, match="Q4_K_M"):
        gptq_quantize(torch.randn(4, 64), torch.eye(64), "Q4_K_M")


# --- on the tiny models --------------------------------------------------------------------------------------
def _load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _calib(model_dir, corpus, n_chunks=64, seq_len=128):
    from fieldpack.builder.compress.calibration import build_calibration

    return build_calibration(model_dir, corpus, n_chunks=n_chunks, seq_len=seq_len, seed=0)


@pytest.fixture(scope="module")
def gptq_tiny(tiny_llama_dir, converted, demo_corpus, tmp_path_factory):
    """GPTQ Q4_0 of the tiny Llama on the demo documents: (report, RTN QuantResult, GPTQ GGUF path)."""
    from fieldpack.builder.compress.gptq import gguf_blocks, gptq_model
    from fieldpack.builder.convert.patch import replace_tensor_data
    from fieldpack.builder.quantize import quantize_gguf

    work = tmp_path_factory.mktemp("gptq")
    rtn = quantize_gguf(converted("llama", "f16").path, work / "rtn.gguf", "Q4_0")
    rep = gptq_model(_load(tiny_llama_dir), _calib(tiny_llama_dir, demo_corpus).input_ids, "Q4_0", device="cpu")
    out = work / "gptq.gguf"
    replace_tensor_data(rtn.path, out, gguf_blocks(rep, tiny_llama_dir), expect_type="Q4_0")
    return rep, rtn, out


def test_gptq_beats_rtn_layer_by_layer_on_the_tiny_model(gptq_tiny) -> None:
    rep, _, _ = gptq_tiny
    assert rep.matrices == 14  # 2 blocks x q, k, v, o, gate, up, down
    worse = [k for k in rep.rel_error if rep.rel_error[k] >= rep.rtn_rel_error[k]]
    print(f"median GPTQ/RTN output error {rep.error_ratio:.3f}")
    assert not worse and rep.error_ratio < 0.8


def test_gptq_gguf_has_the_rtn_file_layout_and_the_gptq_values(gptq_tiny, tiny_llama_dir) -> None:
    import gguf

    from fieldpack.builder.convert.arch import permute_qk

    rep, rtn, out = gptq_tiny
    a, b = rtn.path.read_bytes(), out.read_bytes()
    assert len(a) == len(b)
    reader = gguf.GGUFReader(out)
    first = min(int(t.data_offset) for t in reader.tensors)
    assert a[:first] == b[:first]  # header, key/values, tensor infos: llama.cpp's, byte for byte
    ref_tensors = {t.name: t for t in gguf.GGUFReader(rtn.path).tensors}
    changed = 0
    for t in reader.tensors:
        same = np.array_equal(np.asarray(t.data), np.asarray(ref_tensors[t.name].data))
        if not t.name.startswith("blk.") or t.tensor_type.name != "Q4_0":
            assert same, t.name  # embeddings, output, norms: llama.cpp's own
        changed += not same
    assert changed == 14
    cfg = rep.results["model.layers.0.self_attn.q_proj"]
    got = {t.name: dequantize(np.asarray(t.data), t.tensor_type) for t in reader.tensors}
    assert np.array_equal(got["blk.0.attn_q.weight"], permute_qk(cfg.values.numpy(), 4))
    assert np.array_equal(got["blk.1.attn_k.weight"],
                          permute_qk(rep.results["model.layers.1.self_attn.k_proj"].values.numpy(), 2))
    assert np.array_equal(got["blk.1.ffn_down.weight"], rep.results["model.layers.1.mlp.down_proj"].values.numpy())


def test_rtn_blocks_repacked_through_the_patcher_give_the_rtn_file_byte_for_byte(gptq_tiny, tmp_path) -> None:
    """Unpack llama.cpp's own Q4_0 integers and scales, pack them with :func:`pack_blocks` and write them with the
    patcher: the file is llama.cpp's, byte for byte (so GPTQ's file differs from it only in the integers)."""
    import gguf

    from fieldpack.builder.convert.patch import replace_tensor_data

    _, rtn, _ = gptq_tiny
    blocks = {}
    for t in gguf.GGUFReader(rtn.path).tensors:
        if t.tensor_type.name != "Q4_0":
            continue
        raw = np.asarray(t.data).reshape(-1, 18)
        d = raw[:, :2].copy().view(np.float16).astype(np.float32)
        q = np.concatenate([raw[:, 2:] & 0x0F, raw[:, 2:] >> 4], axis=1)  # (n_blocks, 32)
        rows = int(t.shape[1])
        blocks[t.name] = pack_blocks(q.reshape(rows, -1), d.reshape(rows, -1), "Q4_0")
    assert blocks
    out = tmp_path / "repacked.gguf"
    replace_tensor_data(rtn.path, out, blocks, expect_type="Q4_0")
    assert out.read_bytes() == rtn.path.read_bytes()


def test_gptq_gguf_runs_in_llama_cpp_closer_to_f16_than_rtn(gptq_tiny, converted, heldout_texts) -> None:
    from fieldpack.builder.llama_eval import perplexity_kld

    _, rtn, out = gptq_tiny
    f16 = converted("llama", "f16").path
    g = perplexity_kld(f16, out, heldout_texts, n_ctx=128)
    r = perplexity_kld(f16, rtn.path, heldout_texts, n_ctx=128)
    print(f"KLD GPTQ {g.kld_mean:.5f} RTN {r.kld_mean:.5f}; ΔPPL {g.delta_ppl:+.4f} {r.delta_ppl:+.4f}")
    assert g.kld_mean < r.kld_mean


# --- AWQ ---------------------------------------------------------------------------------------------------
def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_awq_transformation_keeps_the_logits(arch, tiny_llama_dir, tiny_gemma_dir) -> None:
    """Random scales in [0.5, 2] folded into every group (Gemma's (1 + w) norms, tied embeddings included):
    the transformed float model computes the same logits."""
    from fieldpack.builder.compress.awq import apply_scale, block_groups
    from fieldpack.builder.compress.masks import decoder_layers

    model_dir = tiny_llama_dir if arch == "llama" else tiny_gemma_dir
    model = _load(model_dir)
    ids = torch.randint(4, 200, (2, 48), generator=torch.Generator().manual_seed(0))
    before = _logits(model, ids)
    g = torch.Generator().manual_seed(1)
    n = 0
    for block in decoder_layers(model):
        mods = dict(block.named_modules())
        for _, prev, names in block_groups(block):
            s = 0.5 + 1.5 * torch.rand(mods[names[0]].in_features, generator=g)
            apply_scale(prev, [mods[x] for x in names], s)
            n += 1
    after = _logits(model, ids)
    assert n >= 3 * len(decoder_layers(model))
    scale = before.abs().max()
    assert float((after - before).abs().max() / scale) < 1e-4
    if arch == "gemma3":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


def test_awq_then_q4_k_m_loads_in_llama_cpp(tiny_gemma_dir, demo_corpus, tmp_path) -> None:
    from llama_cpp import Llama

    from fieldpack.builder.compress.quantizers import calibrated_quantize
    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.llama_eval import perplexity_kld

    f16 = convert_hf_to_gguf(tiny_gemma_dir, tmp_path / "f16.gguf")
    res = calibrated_quantize("awq", tiny_gemma_dir, f16.path, demo_corpus, "Q4_K_M", tmp_path / "awq",
                              calib_chunks=64, calib_seq_len=64, device="cpu")
    assert res.quant.qtype == "Q4_K_M" and res.detail["grid"] == "Q4_K"
    llm = Llama(model_path=str(res.quant.path), n_ctx=64, verbose=False)
    try:
        llm.eval(llm.tokenize(b"Check the pump", add_bos=True))
    finally:
        llm.close()
    figs = perplexity_kld(f16.path, res.quant.path, demo_corpus, n_ctx=64)
    assert np.isfinite(figs.kld_mean)


# --- bad input -----------------------------------------------------------------------------------------------
def _config_only(tmp_path, **over):
    import json

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
           "intermediate_size": 512, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 1024}
    cfg.update(over)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_rows_that_do_not_fit_the_block_are_refused_by_name_before_any_work(tmp_path) -> None:
    from fieldpack.builder.compress.quantizers import calibrated_quantize

    model_dir = _config_only(tmp_path, intermediate_size=1000)  # no weights, no tokenizer: nothing is loaded
    with pytest.raises(CompressionConfigError, match="ffn_down has rows of 1000 weights") as e:
        calibrated_quantize("gptq", model_dir, tmp_path / "f16.gguf", ["text"], "Q4_0", tmp_path / "out")
    assert "--quantizer rtn" in e.value.hint


def test_too_few_calibration_tokens_are_refused_with_the_fix(tiny_llama_dir, tmp_path) -> None:
    from fieldpack.builder.compress.quantizers import calibrated_quantize

    with pytest.raises(CompressionConfigError, match=r"GPTQ's Hessian .* needs at least 512") as e:
        calibrated_quantize("gptq", tiny_llama_dir, tmp_path / "missing-f16.gguf",
                            ["Open valve V-12 slowly."], "Q4_0", tmp_path / "out")
    assert "--calib-chunks" in e.value.hint
    assert not (tmp_path / "out" / "model.gguf").exists()


@pytest.mark.parametrize("quantizer, qtype, match", [("gptq", "Q4_K_M", "Q4_0 or Q8_0"), ("awq", "F16", "quantized"),
                                                     ("sq", "Q4_0", "not a quantizer")])
def test_quantizer_and_type_that_do_not_go_together_are_refused(quantizer, qtype, match) -> None:
    from fieldpack.builder.compress.quantizers import check_quantizer

    with pytest.raises(CompressionConfigError, match=match):
        check_quantizer(quantizer, qtype)


# --- fieldpack build --quantizer ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_build_with_gptq_records_rows_beside_rtn_and_replays(tiny_llama_dir, tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    import tomli_w

    from fieldpack.shared.bundle import open_bundle

    repo = Path(__file__).resolve().parents[2]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from fieldpack.cli import main; main()", *args], cwd=repo,
                              capture_output=True, text=True, timeout=1800)

    assert cli("keygen", "--out", str(tmp_path / "keys")).returncode == 0
    common = ["--docs", str(repo / "demo" / "docs"), "--name", "riv", "--sign", str(tmp_path / "keys" / "builder.key")]
    r = cli("build", "--model", str(tiny_llama_dir), *common, "-o", str(tmp_path / "bad.fpk"), "--quant", "Q4_K_M",
            "--quantizer", "gptq")
    assert r.returncode == 2 and "Q4_0 or Q8_0" in r.stderr and "Fix:" in r.stderr  # an option mistake
    assert not (tmp_path / "bad.fpk").exists()
    first = tmp_path / "first.fpk"
    r = cli("build", "--model", str(tiny_llama_dir), *common, "-o", str(first), "--quant", "Q4_0",
            "--quantizer", "gptq", "--calib-chunks", "64", "--cache-dir", str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "quantize Q4_0 (gptq)" in r.stdout + r.stderr
    with open_bundle(first) as b:
        m = b.manifest
    assert m.recipe["build"]["compression"]["quantizer"] == "gptq"
    ref, gptq, rtn, rtn_imx = m.quality.stages
    assert (ref["stage"], gptq["method"], rtn["method"], rtn_imx["method"]) == ("dense", "gptq", "rtn", "rtn + imatrix")
    for row in (gptq, rtn, rtn_imx):
        assert row["kld_mean"] is not None and row["top1_agreement"] is not None and row["delta_ppl"] is not None
        assert row["gguf_bytes"] == gptq["gguf_bytes"]  # same type, same layout
    assert gptq["layer_error_ratio_vs_rtn"] < 1
    print({r["method"]: (r["kld_mean"], r["delta_ppl"], r["top1_agreement"]) for r in (gptq, rtn, rtn_imx)})
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(tomli_w.dumps(m.recipe).encode())
    second = tmp_path / "second.fpk"
    r = cli("build", "--recipe", str(recipe), "-o", str(second), "--no-cache")
    assert r.returncode == 0, r.stderr[-3000:]
    with open_bundle(second) as b:
        m2 = b.manifest
    sha = [next(x.sha256 for x in mm.members if x.name.endswith(".gguf")) for mm in (m, m2)]
    assert sha[0] == sha[1]  # GPTQ replays bit for bit on the CPU
