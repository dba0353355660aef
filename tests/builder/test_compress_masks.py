"""Masks: exact sparsity and pattern; Wanda and SparseGPT against the papers' definitions on hand-sized layers;
block-by-block pruning of a trained tiny model, where Wanda and SparseGPT must beat magnitude pruning."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from fieldpack.builder.compress.masks import (
    InputStats,
    magnitude_mask,
    matrix_mask,
    nm_mask,
    prune_with_masks,
    row_mask,
    sparsegpt_prune,
    wanda_mask,
)
from tests.builder.test_compress_fixtures import pg_corpus, pg_llama  # noqa: F401  (fixtures)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    s = InputStats(x.shape[1], need_hessian=True, device="cpu")
    s.add(x[: len(x) // 2])
    s.add(x[len(x) // 2:])  # two batches: the running average must equal 2 X^T X / n
    return s.hessian


def test_running_hessian_is_two_xtx_over_n() -> None:
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    s = InputStats(6, need_hessian=True, device="cpu")
    for part in x.split(7):
        s.add(part)
    torch.testing.assert_close(s.hessian, 2 * x.T @ x / 50, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.norm, x.norm(dim=0), rtol=1e-6, atol=1e-6)
    assert s.n == 50


def test_nm_mask_prunes_exactly_m_minus_n_per_group() -> None:
    g = torch.Generator().manual_seed(1)
    for n, m in ((2, 4), (4, 8), (1, 4)):
        scores = torch.rand(16, 64, generator=g)
        mask = nm_mask(scores, (n, m))
        groups = mask.reshape(16, 64 // m, m)
        assert bool((groups.sum(-1) == m - n).all())
        kept_min = torch.where(groups, torch.inf, scores.reshape(16, -1, m)).min(-1).values
        pruned_max = torch.where(groups, scores.reshape(16, -1, m), -torch.inf).max(-1).values
        assert bool((pruned_max <= kept_min).all())  # the lowest scores of each group went


def test_row_and_matrix_masks_have_exact_counts() -> None:
    scores = torch.rand(8, 40, generator=torch.Generator().manual_seed(2))
    assert bool((row_mask(scores, 0.3).sum(1) == 12).all())
    assert int(matrix_mask(scores, 0.3).sum()) == int(320 * 0.3)


def test_wanda_scores_weight_times_input_norm_per_output_row() -> None:
    # Wanda, Eq. 1: S_ij = |W_ij| * ||X_j||_2, compared within each output row.
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5],
                      [0.1, 0.2, -0.3, 0.4]])
    x = torch.tensor([[4.0, 1.0, 1.0, 10.0]])  # one token: ||X_j||_2 = |x_j|
    norm = x.norm(dim=0)
    mask = wanda_mask(w, norm, sparsity=0.5)
    # row 0 scores [4, 2, 3, 5]: prune columns 1 and 2; row 1 scores [0.4, 0.2, 0.3, 4]: prune 1 and 2
    assert mask.tolist() == [[False, True, True, False], [False, True, True, False]]
    # magnitude (layer-wise) removes the 4 smallest |w| wherever they are: all of row 1
    assert magnitude_mask(w, sparsity=0.5).tolist() == [[False, False, False, False], [True, True, True, True]]
    # N:M uses the same score inside each group of M
    assert wanda_mask(w, norm, pattern=(1, 2)).tolist() == [[False, True, True, False], [False, True, True, False]]


def test_sparsegpt_with_identity_hessian_is_magnitude_pruning_without_updates() -> None:
    # H = I: no correlations, so OBS saliency is w^2 and the compensation update is zero.
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    new_w, mask = sparsegpt_prune(w, torch.eye(32), sparsity=0.5, blocksize=8, percdamp=0.0)
    for b in range(0, 32, 8):
        torch.testing.assert_close(mask[:, b:b + 8], matrix_mask(w[:, b:b + 8].abs(), 0.5))
    torch.testing.assert_close(new_w[~mask], w[~mask])
    assert bool((new_w[mask] == 0).all())


def test_sparsegpt_obs_update_is_the_least_squares_reconstruction() -> None:
    # Pruning the leading columns with the sequential OBS updates of SparseGPT (with lazy batches across
    # blocks) must give the exact least-squares fit of the kept columns: min ||W X - W' X||^2 with W'_P = 0.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(200, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g, dtype=torch.float64)
    w = torch.randn(3, 10, generator=g, dtype=torch.float64)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[:, :4] = True
    h = 2 * x.T @ x / len(x)
    new_w, _ = sparsegpt_prune(w.float(), h.float(), mask=mask, blocksize=3, percdamp=0.0)
    keep = x[:, 4:]
    exact = torch.linalg.lstsq(keep, x @ w.T).solution.T  # (3, 6)
    torch.testing.assert_close(new_w[:, 4:].double(), exact, rtol=2e-3, atol=2e-3)
    assert bool((new_w[:, :4] == 0).all())


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern: tuple[int, int] | None) -> None:
    g = torch.Generator().manual_seed(5)
    # correlated features of uneven scale, in no particular column order
    mix = torch.randn(64, 64, generator=g) * torch.linspace(0.1, 3.0, 64)[torch.randperm(64, generator=g)]
    x = torch.randn(512, 64, generator=g) @ mix
    w = torch.randn(32, 64, generator=g)
    kw = {"pattern": pattern} if pattern else {"sparsity": 0.5}
    h = _hessian(x)
    sg_w, sg_mask = sparsegpt_prune(w, h, blocksize=16, **kw)

    def err(w2: torch.Tensor) -> float:
        return float(((x @ w.T - x @ w2.T) ** 2).mean())

    mag = w * ~magnitude_mask(w, **kw)
    wan = w * ~wanda_mask(w, x.norm(dim=0), **kw)
    assert err(sg_w) < err(wan) < err(mag)
    if pattern:
        assert bool((sg_mask.reshape(32, 16, 4).sum(-1) == 2).all())
    else:
        assert int(sg_mask.sum()) == 32 * 64 // 2


# ---------------------------------------------------------------------------------------------- tiny model


def _windows(model_dir, texts, seq_len=128):
    from fieldpack.builder.compress.calibration import build_calibration

    return build_calibration(model_dir, texts, n_chunks=10_000, seq_len=seq_len, seed=0).input_ids


def _ppl(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        losses = [model(input_ids=r.unsqueeze(0), labels=r.unsqueeze(0)).loss.item() for r in ids]
    return math.exp(sum(losses) / len(losses))


@pytest.fixture(scope="module")
def pruned_models(pg_llama, pg_corpus):  # noqa: F811
    """Dense and pruned copies of the PG tiny Llama, with held-out perplexities (torch, same windows)."""
    from transformers import AutoModelForCausalLM

    calib, held = pg_corpus
    calib_ids = _windows(pg_llama, calib)[:48]  # 48 x 128 = 6,144 tokens, well above the 512-wide down_proj
    held_ids = _windows(pg_llama, held)
    dense = AutoModelForCausalLM.from_pretrained(pg_llama, dtype=torch.float32).eval()
    out = {"dense": (dense, None, _ppl(dense, held_ids))}
    for method in ("magnitude", "wanda", "sparsegpt"):
        for name, kw in (("50%", {"sparsity": 0.5}), ("2:4", {"pattern": (2, 4)})):
            m = copy.deepcopy(dense)
            rep = prune_with_masks(m, method, input_ids=calib_ids, device="cpu", **kw)
            out[f"{method} {name}"] = (m, rep, _ppl(m, held_ids))
    print({k: round(v[2], 3) for k, v in out.items()})
    return out


@pytest.mark.slow
def test_masks_on_the_model_have_exact_sparsity_and_pattern(pruned_models) -> None:
    for key, (model, rep, _) in pruned_models.items():
        if rep is None:
            continue
        assert rep.matrices == 14  # 2 blocks x (q, k, v, o, gate, up, down)
        for block in model.model.layers:
            for name, lin in block.named_modules():
                if not isinstance(lin, torch.nn.Linear):
                    continue
                zero = lin.weight == 0
                if key.endswith("2:4"):
                    groups = zero.reshape(lin.out_features, -1, 4).sum(-1)
                    assert bool((groups >= 2).all()), (key, name)
                    assert int(zero.sum()) == lin.weight.numel() // 2, (key, name)
                elif key.startswith("wanda"):
                    assert bool((zero.sum(1) == lin.in_features // 2).all()), (key, name)  # per output row
                else:
                    assert int(zero.sum()) == lin.weight.numel() // 2, (key, name)
        # embeddings, norms and the LM head stay dense
        assert int((model.lm_head.weight == 0).sum()) == 0
        assert int((model.model.embed_tokens.weight == 0).sum()) == 0


@pytest.mark.slow
def test_wanda_and_sparsegpt_beat_magnitude_at_50_percent(pruned_models) -> None:
    ppl = {k: v[2] for k, v in pruned_models.items()}
    assert ppl["magnitude 50%"] > ppl["dense"]
    assert ppl["sparsegpt 50%"] < ppl["magnitude 50%"]
    assert ppl["wanda 50%"] < ppl["magnitude 50%"]
    assert ppl["sparsegpt 2:4"] < ppl["magnitude 2:4"]
