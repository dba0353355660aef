"""``fieldpack build --adapt ...``: the adapt stage in a real build of the tiny Llama (adapted checkpoint ->
converter -> parity gate -> quantize -> quality), its rows in the manifest and ``fieldpack inspect``, the recipe
replay to the same bytes, prune -> heal, and the one-line refusals of bad input (no bundle written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import DEMO_DOCS, run_cli

ADAPT_FLAGS = ("--adapt", "dapt", "--adapt-steps", "6", "--adapt-seq-len", "64", "--lora-r", "4")


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fieldpack.shared.signing import generate_keypair

    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d)
    return d


def _build(tiny_llama_dir: Path, keys: Path, out: Path, *extra: str):
    return run_cli("build", "--model", str(tiny_llama_dir), "--docs", str(DEMO_DOCS), "--name", "riverside",
                   "--sign", str(keys / "builder.key"), "-o", str(out), "--n-ctx", "1024", *extra, timeout=900)


@pytest.mark.parametrize("flags,needle,code", [
    # a wrong option (value or combination) is a usage mistake: exit 2, as README promises for every command
    (("--adapt", "raft"), "--adapt raft needs training questions", 2),
    (("--adapt", "lora"), "--adapt 'lora' is not an adaptation method", 2),
    (("--heal", "kd"), "--heal applies to --prune depth|width", 2),
    (("--adapt-steps", "3"), "adaptation options without --adapt or --distill-from", 2),
    # inputs that cannot work for the build (a teacher, a QA file, too little text): the build family, exit 5
    (("--adapt", "dapt", "--distill-from", "GEMMA"), "another tokenizer", 5),
    (("--adapt", "raft", "--qa-train", "QA"), "is not among the documents", 5),
    (("--adapt", "dapt", "--adapt-steps", "100000"), "too few for 100000 steps", 5),
])
def test_bad_adaptation_input_is_one_line_and_no_bundle(tiny_llama_dir: Path, tiny_gemma_dir: Path, keys: Path,
                                                        tmp_path: Path, flags: tuple[str, ...], needle: str,
                                                        code: int) -> None:
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "q?", "answer": "a", "source": "not-a-doc.md"}) + "\n")
    flags = tuple(str(tiny_gemma_dir) if f == "GEMMA" else str(qa) if f == "QA" else f for f in flags)
    out = tmp_path / "b.fpk"
    r = _build(tiny_llama_dir, keys, out, *flags)
    assert r.returncode == code, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert needle in last and "Fix:" in last, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not out.exists()
    assert not list(tmp_path.glob(".fieldpack-build-*"))


@pytest.fixture(scope="module")
def adapted(tiny_llama_dir: Path, keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("adapt-build") / "adapted.fpk"
    r = _build(tiny_llama_dir, keys, out, *ADAPT_FLAGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "adapt dapt" in r.stderr
    return out


@pytest.mark.slow
def test_adapted_build_records_the_run_and_inspect_shows_it(adapted: Path) -> None:
    from fieldpack.shared.bundle import open_bundle

    with open_bundle(adapted) as b:
        m = b.manifest
    (row,) = m.quality.adaptation
    assert row["method"] == "dapt" and row["steps"] == 6 and row["tokens"] > 0 and row["seconds"] > 0
    assert row["ppl_before"] > 0 and row["ppl_after"] > 0 and len(row["train_sha256"]) == 64
    assert m.quality.parity["passed"] is True  # the merged checkpoint went through the gate
    assert m.recipe["build"]["adapt"]["method"] == "dapt" and m.recipe["build"]["adapt"]["steps"] == 6
    r = run_cli("inspect", str(adapted))
    assert r.returncode == 0 and "adaptation" in r.stdout and "dapt" in r.stdout, r.stdout


@pytest.mark.slow
def test_adapted_recipe_replays_to_the_same_bytes(adapted: Path, tmp_path: Path) -> None:
    import tomli_w

    from fieldpack.shared.bundle import open_bundle

    with open_bundle(adapted) as b:
        m1 = b.manifest
    recipe = tmp_path / "recipe.toml"
    recipe.write_bytes(tomli_w.dumps(m1.recipe).encode())
    out = tmp_path / "replay.fpk"
    r = run_cli("build", "--recipe", str(recipe), "-o", str(out), "--no-cache", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    with open_bundle(out) as b:
        m2 = b.manifest
    # the adapted, converted, quantized model is the same bytes (the embedder export is not this test's subject)
    assert {x.name: x.sha256 for x in m1.members}["model.gguf"] == {x.name: x.sha256 for x in m2.members}["model.gguf"]
    assert m2.quality.adaptation[0]["train_sha256"] == m1.quality.adaptation[0]["train_sha256"]
    assert {**m2.recipe["build"], "output": ""} == {**m1.recipe["build"], "output": ""}


@pytest.mark.slow
def test_prune_then_heal_recovers_part_of_the_loss(tiny_llama_dir: Path, demo_corpus: list[str], tmp_path: Path) -> None:
    """Depth-prune the tiny llama by 1 of 2 blocks, then KD-heal from the unpruned model: held-out PPL falls
    toward the teacher's, and the healed checkpoint passes the parity gate (inside prune_checkpoint)."""
    from fieldpack.builder.compress import prune_checkpoint
    from fieldpack.builder.compress.options import parse_options
    from fieldpack.builder.stages.quant import split_eval

    calib, held = split_eval(demo_corpus, 0.2, 64, 0)
    opts = parse_options({"prune": "depth", "drop_layers": 1, "heal": "kd", "heal_steps": 20, "calib_seq_len": 64})
    _, conv, detail, resolved = prune_checkpoint(tiny_llama_dir, opts, calib, tmp_path, held_out_texts=held)
    heal = detail["heal"]
    assert resolved["heal"] == "kd" and resolved["heal_steps"] == 20
    assert heal["method"] == "heal-kd" and heal["steps"] == 20
    assert heal["ppl_after"] < heal["ppl_before"] and heal["teacher_ppl"] < heal["ppl_before"]
    assert heal["recovered"] > 0 and heal["teacher_kld_after"] < heal["teacher_kld_before"]
    assert detail["parity_top1"] > 0.9
