"""``fieldpack build`` with compression: the bundle records the stage rows and the exact (resolved) options,
and ``--recipe`` replays them to the same model bytes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from fieldpack.cli import main; main()", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=1800)


@pytest.mark.slow
def test_build_with_compression_records_and_replays_its_recipe(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import tomli_w

    from fieldpack.shared.bundle import open_bundle

    r = _cli("keygen", "--out", str(tmp_path / "keys"))
    assert r.returncode == 0, r.stderr
    first = tmp_path / "first.fpk"
    r = _cli("build", "--model", str(tiny_llama_dir), "--docs", str(REPO / "demo" / "docs"), "--name", "riv",
             "--sign", str(tmp_path / "keys" / "builder.key"), "-o", str(first), "--prune", "depth",
             "--imatrix", "domain")
    assert r.returncode == 0, r.stderr[-3000:]
    with open_bundle(first) as b:
        m1 = b.manifest
    comp = m1.recipe["build"]["compression"]
    assert comp == {"prune": "depth", "drop_layers": 1, "imatrix": "domain", "calib_chunks": 128,
                    "calib_seq_len": 256}  # defaults resolved: the recipe says exactly what was done
    dense, pruned = m1.quality.stages
    assert dense["stage"] == "dense" and pruned["stage"] == "pruned" and pruned["sparsity"] == "-1 of 2 blocks"
    assert pruned["gguf_bytes"] < dense["gguf_bytes"]
    assert m1.model.n_layer == 1  # the manifest describes the model that ships, not the unpruned one
    assert m1.model.parameter_count < 1_705_216

    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(tomli_w.dumps(m1.recipe).encode())
    second = tmp_path / "second.fpk"
    r = _cli("build", "--recipe", str(recipe), "-o", str(second), "--no-cache")  # recomputed, not reused
    assert r.returncode == 0, r.stderr[-3000:]
    with open_bundle(second) as b:
        m2 = b.manifest
    assert m2.recipe["build"]["compression"] == comp
    model1 = next(x for x in m1.members if x.name.endswith(".gguf"))
    model2 = next(x for x in m2.members if x.name.endswith(".gguf"))
    assert model1.sha256 == model2.sha256  # pruning, imatrix and quantization replay bit for bit
