"""The domain imatrix: computed through llama.cpp like llama-imatrix, equal to the mean squared layer inputs of
the Hugging Face model on the same tokens, read by the quantizer, and measured on Q4_K_M's quality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fieldpack.builder.compress import compute_imatrix
from fieldpack.builder.compress.imatrix import compute_imatrix_gguf
from fieldpack.builder.quantize import quantize_gguf, read_imatrix
from tests.builder.test_compress_fixtures import pg_corpus, pg_llama  # noqa: F401  (fixtures)

#: GGUF weight name -> Hugging Face module whose input it multiplies (tiny Llama, 2 blocks).
_HF_INPUT = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}


def _hf_mean_squares(model_dir: Path, windows: list[list[int]]) -> dict[str, np.ndarray]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    count = {"n": 0}
    hooks = []
    for i, blk in enumerate(model.model.layers):
        for gg, hf in _HF_INPUT.items():
            mod = blk.get_submodule(hf)
            name = f"blk.{i}.{gg}.weight"

            def hook(m, args, out, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x * x).sum(0)

            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for w in windows:
            model(input_ids=torch.tensor([w]))
            count["n"] += len(w)
    for h in hooks:
        h.remove()
    return {k: (v / count["n"]).float().numpy() for k, v in sums.items()}


def test_imatrix_matches_the_mean_squared_inputs_of_every_linear(tiny_llama_dir, converted, demo_corpus,
                                                                 tmp_path) -> None:
    from llama_cpp import Llama

    f16 = converted("llama", "f16")
    out = tmp_path / "imatrix.dat"
    res = compute_imatrix_gguf(f16.path, demo_corpus, out, n_ctx=128)
    data = read_imatrix(out)
    assert res.entries == len(data) == 14  # every matrix of both blocks, the last block's MLP included
    assert set(data) == {f"blk.{i}.{g}.weight" for i in range(2) for g in _HF_INPUT}
    # the same windows through the HF model (token ids from llama.cpp's tokenizer, BOS first as llama-imatrix)
    llm = Llama(model_path=str(f16.path), vocab_only=True, verbose=False)
    stream = llm.tokenize("\n\n".join(demo_corpus).encode(), add_bos=False, special=False)
    bos = llm.token_bos()
    llm.close()
    windows = [[bos] + list(stream[c * 128 + 1:(c + 1) * 128]) for c in range(res.chunks)]
    ref = _hf_mean_squares(tiny_llama_dir, windows)
    for name, v in data.items():
        np.testing.assert_allclose(v, ref[name], rtol=0.03, atol=1e-3 * float(ref[name].mean()), err_msg=name)


def test_quantizer_uses_the_imatrix(converted, demo_corpus, tmp_path) -> None:
    f16 = converted("llama", "f16")
    imx = compute_imatrix(f16.path, demo_corpus, tmp_path / "imatrix.dat", n_ctx=128)
    with_imx = quantize_gguf(f16.path, tmp_path / "imx.gguf", "Q4_K_M", imatrix=imx)
    plain = quantize_gguf(f16.path, tmp_path / "plain.gguf", "Q4_K_M")
    assert with_imx.imatrix_entries == 14 and plain.imatrix_entries == 0
    assert with_imx.size_bytes == plain.size_bytes and with_imx.sha256 != plain.sha256  # same types, other rounding


def _weighted_errors(f16_path: Path, q_path: Path, weights: dict[str, np.ndarray]) -> dict[str, float]:
    """Per tensor: sum_ij weights[j] * (w_ij - q_ij)^2, ``w`` the F16 weights, ``q`` the dequantized ones (the
    objective llama.cpp's imatrix-aware quantizers minimise, weights = mean squared input of each column)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ref = {t.name: t for t in GGUFReader(f16_path).tensors}
    out = {}
    for t in GGUFReader(q_path).tensors:
        if t.name in weights:
            w = dequantize(ref[t.name].data, ref[t.name].tensor_type).astype(np.float64)
            q = dequantize(t.data, t.tensor_type).astype(np.float64)
            out[t.name] = float((((w - q) ** 2) * weights[t.name][None, :]).sum())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q4_0"])
def test_domain_imatrix_lowers_the_error_held_out_inputs_see(pg_llama, pg_corpus, tmp_path, qtype) -> None:  # noqa: F811
    """The imatrix of the calibration chunks makes every matrix's rounding error smaller where the HELD-OUT chunks'
    inputs are large (error weighted by the held-out imatrix), on every tensor.

    This is the layer-wise claim the imatrix makes and it holds robustly (measured: 0.93x at Q4_K_M, 0.87x at Q4_0,
    14/14 tensors). End-to-end held-out KLD on this 2-block, 256-wide toy is printed but not asserted: it moves
    by a few percent either way with the type (measured: Q4_K_M KLD 0.0126 -> 0.0129, Q4_0 0.0184 -> 0.0176,
    Q5_K_M 0.0038 -> 0.0037), the noise of a model this small; benchmarks/compress_bench.py gives the figures on
    the real model.
    """
    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.llama_eval import perplexity_kld

    calib, held = pg_corpus
    f16 = convert_hf_to_gguf(pg_llama, tmp_path / "f16.gguf")
    imx = compute_imatrix(f16.path, calib, tmp_path / "imatrix.dat", n_ctx=256)
    held_weights = read_imatrix(compute_imatrix(f16.path, held, tmp_path / "held.dat", n_ctx=256))
    errors, figs = {}, {}
    for name, im in (("plain", None), ("imatrix", imx)):
        q = quantize_gguf(f16.path, tmp_path / f"{name}.gguf", qtype, imatrix=im)
        errors[name] = _weighted_errors(f16.path, q.path, held_weights)
        figs[name] = perplexity_kld(f16.path, q.path, held, n_ctx=256)
    ratio = sum(errors["imatrix"].values()) / sum(errors["plain"].values())
    print(qtype, f"held-out-weighted error ratio {ratio:.3f};",
          {k: (round(v.delta_ppl, 4), round(v.kld_mean, 5)) for k, v in figs.items()})
    assert len(errors["plain"]) == 14
    worse = [n for n in errors["plain"] if errors["imatrix"][n] >= errors["plain"][n]]
    assert not worse, f"the domain imatrix did not lower the held-out-weighted error of {worse}"
    assert ratio < 0.97
