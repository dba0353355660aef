"""Compression options: every bad input is one CompressionConfigError line before heavy work; recipes replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fieldpack.builder.compress import validate_compression
from fieldpack.builder.compress.calibration import CalibrationSet, require_tokens
from fieldpack.builder.compress.options import parse_options, resolve_ffn_width
from fieldpack.shared.errors import CompressionConfigError


def _config_dir(tmp_path: Path, **over) -> Path:
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4, "hidden_size": 256,
           "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
           "max_position_embeddings": 512}
    cfg.update(over)
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("options, words", [
    ({"prune": "wanda", "sparsity": 1.0}, ["sparsity", "outside (0, 1)"]),
    ({"prune": "wanda", "sparsity": 0.0}, ["outside (0, 1)"]),
    ({"prune": "magnitude", "sparsity": -0.2}, ["outside (0, 1)"]),
    ({"prune": "sparsegpt", "pattern": "4:2"}, ["0 < N < M"]),
    ({"prune": "sparsegpt", "pattern": "2:2"}, ["0 < N < M"]),
    ({"prune": "sparsegpt", "pattern": "2-4"}, ["not of the form N:M"]),
    ({"prune": "wanda", "pattern": "2:4", "sparsity": 0.5}, ["both given"]),
    ({"prune": "depth", "sparsity": 0.5}, ["--sparsity applies to"]),
    ({"prune": "wanda", "drop_layers": 1}, ["--drop-layers applies to --prune depth"]),
    ({"prune": "depth", "drop_layers": 0}, ["at least 1"]),
    ({"prune": "width", "ffn_keep": 1.2}, ["outside (0, 1)"]),
    ({"prune": "obs"}, ["not a pruning method", "magnitude"]),
    ({"prune": "wanda", "calib_chunks": 0}, ["--calib-chunks"]),
    ({"imatrix": "wikitext"}, ["--imatrix", "domain"]),
    ({"prune": "wanda", "colour": "blue"}, ["unknown compression option", "colour"]),
])
def test_bad_options_are_one_clear_error(options: dict, words: list[str]) -> None:
    with pytest.raises(CompressionConfigError) as err:
        validate_compression(options)
    line = str(err.value)
    assert "\n" not in line and "Fix:" in line
    for w in words:
        assert w in line


def test_defaults_are_filled_and_pattern_sets_sparsity() -> None:
    assert parse_options({"prune": "wanda"}).sparsity == 0.5
    o = parse_options({"prune": "sparsegpt", "pattern": "4:8"})
    assert o.pattern == (4, 8) and o.target_sparsity == 0.5 and o.sparsity is None
    assert parse_options({"prune": "width"}).ffn_keep == 0.75
    assert parse_options({"imatrix": "domain"}).prune is None
    assert parse_options({"prune": "sparsegpt", "pattern": "2:4"}).to_dict()["pattern"] == "2:4"


def test_model_dependent_checks(tmp_path: Path) -> None:
    d = _config_dir(tmp_path)
    with pytest.raises(CompressionConfigError, match="every decoder block of this 4-block model"):
        validate_compression({"prune": "depth", "drop_layers": 4}, model_dir=d)
    validate_compression({"prune": "depth", "drop_layers": 3}, model_dir=d)
    with pytest.raises(CompressionConfigError, match="leave each MLP empty"):
        validate_compression({"prune": "width", "ffn_keep": 0.02}, model_dir=d)  # 10 channels -> 0 x 32
    with pytest.raises(CompressionConfigError, match="nothing would be pruned"):
        validate_compression({"prune": "width", "ffn_keep": 0.99}, model_dir=d)  # 507 -> 512
    with pytest.raises(CompressionConfigError, match="exceeds the model's 2 KV heads"):
        validate_compression({"prune": "width", "ffn_keep": 0.5, "kv_heads_keep": 3}, model_dir=d)


def test_unprunable_architecture_is_named(tmp_path: Path) -> None:
    d = _config_dir(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(CompressionConfigError, match="cannot prune architecture GPT2LMHeadModel"):
        validate_compression({"prune": "wanda"}, model_dir=d)
    validate_compression({"imatrix": "domain"}, model_dir=d)  # quantization-only options do not need pruning
    q = _config_dir(tmp_path, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(CompressionConfigError, match="cannot remove attention heads of Qwen2ForCausalLM"):
        validate_compression({"prune": "width", "ffn_keep": 0.5, "kv_heads_keep": 1}, model_dir=q)
    validate_compression({"prune": "width", "ffn_keep": 0.5}, model_dir=q)


def test_ffn_width_rounds_to_k_quant_blocks() -> None:
    assert resolve_ffn_width(0.75, 4864) == 3584      # 14.25 blocks of 256 -> 14
    assert resolve_ffn_width(0.5, 512) == 256
    assert resolve_ffn_width(0.75, 512) == 256         # 1.5 blocks: ties go to the smaller width
    assert resolve_ffn_width(0.5, 8960) == 4352        # 17.5 blocks -> 17
    assert resolve_ffn_width(0.5, 1000) == 512         # a K-quant multiple even when the source is not one
    assert resolve_ffn_width(0.15, 512) == 64          # 0.3 blocks of 256 -> falls back to blocks of 32
    assert resolve_ffn_width(0.95, 4096) == 3840


def test_too_small_calibration_set_says_how_many_tokens() -> None:
    import torch

    calib = CalibrationSet(input_ids=torch.zeros((2, 128), dtype=torch.long), n_chunks=4, seq_len=128)
    with pytest.raises(CompressionConfigError) as err:
        require_tokens(calib, 4864, "SparseGPT's Hessian of the widest layer input (4864 columns)")
    msg = str(err.value)
    assert "has 256 tokens" in msg and "needs at least 4864" in msg and "--calib-chunks to about 76" in msg
    require_tokens(calib, 256, "x")  # exactly enough passes


def test_recipe_keeps_and_replays_compression(tmp_path: Path) -> None:
    from fieldpack.builder.config import BuildConfig

    comp = {"prune": "sparsegpt", "pattern": "2:4", "calib_chunks": 64, "imatrix": "domain"}
    cfg = BuildConfig.validated(dict(model="m", docs=tmp_path, name="n", sign=tmp_path / "k", output=tmp_path / "o.fpk",
                                     compression=dict(comp)))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(cfg.recipe_toml())
    again = BuildConfig.from_toml(recipe)
    assert again.compression == comp
    assert validate_compression(again.compression) == validate_compression(comp)


def test_cli_build_rejects_bad_compression_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fieldpack.cli import main

    argv = ["build", "--model", str(tmp_path / "nope"), "--docs", str(tmp_path), "--name", "x", "--sign",
            str(tmp_path / "k"), "-o", str(tmp_path / "x.fpk"), "--prune", "wanda", "--sparsity", "1.5"]
    with pytest.raises(SystemExit) as ex:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2  # a usage mistake, like every wrong option (README)
    assert len(err) == 1 and err[0].startswith("error: --sparsity 1.5 is outside (0, 1)")
