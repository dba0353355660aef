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
