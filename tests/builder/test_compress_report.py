"""The quality report, apply_compression as the pipeline calls it, and ``fieldpack plan``."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fieldpack.builder.compress.plan import Candidate, Plan, choose, pareto_front, parse_size
from fieldpack.builder.compress.report import SPARSITY_NOTE, QualityRow, format_table, measure_speed
from fieldpack.shared.errors import UsageError


def test_parse_size() -> None:
    assert parse_size("4GiB") == 4 * 2**30
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("4G") == 4 * 2**30
    assert parse_size("8GB") == 8 * 10**9
    assert parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert parse_size("123456") == 123456
    for bad in ("four gigs", "4XB", "0GiB", "", "GiB"):
        with pytest.raises(UsageError):
            parse_size(bad)


def test_pareto_front_and_choice() -> None:
    pts = [(10, 0.0), (6, 0.01), (7, 0.02), (4, 0.05), (4, 0.08), (3, 0.5)]
    assert pareto_front(pts) == [True, True, False, True, False, True]

    def cand(size: int, kld: float, ram: bool, fast: bool) -> Candidate:
        return Candidate(prune="none", quant="Q4_K_M", imatrix=False, gguf_bytes=size, params=1, n_layer=1,
                         kv_cache_bytes=0, memory_bytes=size, ppl=1.0, delta_ppl=0.0, kld_mean=kld,
                         top1_agreement=1.0, decode_tps=1.0, prompt_tps=1.0, fits_ram=ram, fast_enough=fast)

    cands = [cand(10, 0.0, False, True), cand(6, 0.01, True, False), cand(4, 0.05, True, True), cand(3, 0.05, True, True)]
    assert choose(cands) == 3  # best KLD that fits both limits; tie broken by the smaller file
    assert choose([cands[0], cands[1]]) is None
    plan = Plan(candidates=cands, chosen=3, device_ram_bytes=1, min_tokens_per_s=1, n_ctx=1, threads=1, png=None,
                prune_options={"none": {}})
    assert plan.build_flags() == "--quant Q4_K_M"


def test_table_states_that_sparsity_is_stored_densely() -> None:
    row = QualityRow(stage="pruned", method="wanda", sparsity="50%", params=10, gguf_bytes=20, ppl=3.0,
                     delta_ppl=0.5, kld_mean=0.1, top1_agreement=0.9, decode_tps=None, prompt_tps=None)
    text = format_table([row], title="t")
    assert "| pruned | wanda | 50% | 10 | 20 |" in text
    assert SPARSITY_NOTE in text and "neither smaller nor faster in llama.cpp" in SPARSITY_NOTE


def test_measure_speed_generates_through_llama_cpp(converted) -> None:
    sp = measure_speed(converted("llama", "f16").path, n_prompt=32, n_decode=8, threads=1, repeats=1)
    assert sp.n_prompt == 32 and sp.n_decode == 8
    assert sp.prompt_tps > 0 and sp.decode_tps > 0


def tensor_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def test_a_vocab_only_load_prints_no_context_warning(converted, capfd: pytest.CaptureFixture[str]) -> None:
    """A trial's `fieldpack plan` printed llama.cpp's `n_ctx_seq (512) > n_ctx_train (0)` after converting: a
    vocab-only load reads no context length. The tokenizer loads route that to DEBUG; the tokenizer works."""
    from fieldpack.builder.compress.report import fit_eval_ctx
    from fieldpack.builder.llama_eval import vocab_only

    path = converted("llama", "f16").path
    capfd.readouterr()
    llm = vocab_only(path)
    try:
        assert len(llm.tokenize(b"hello world", add_bos=False, special=False)) >= 2
    finally:
        llm.close()
    assert fit_eval_ctx(path, ["a pump trips when the level is low " * 8]) >= 16
    assert "n_ctx_train" not in capfd.readouterr().err


@pytest.mark.slow
def test_apply_compression_reports_and_sparse_gguf_is_not_smaller(tiny_llama_dir, converted, demo_corpus,
                                                                  tmp_path) -> None:
    from fieldpack.builder.compress import apply_compression

    f16 = converted("llama", "f16")
    calib, held = demo_corpus[1:], demo_corpus[:1]
    sizes, paths = {}, {}
    for comp in ({"prune": "wanda", "pattern": "2:4"}, {"prune": "depth"}):
        cfg = SimpleNamespace(compression=dict(comp), seed=0, parity_outtype="f16")
        path, rows = apply_compression(cfg, tiny_llama_dir, f16, calib, held, tmp_path / comp["prune"])
        sizes[comp["prune"]], paths[comp["prune"]] = path.stat().st_size, path
        assert [r["stage"] for r in rows] == ["dense", "pruned"]
        dense, pruned = rows
        assert dense["gguf_bytes"] == f16.size_bytes and dense["kld_mean"] == 0.0
        assert pruned["gguf_bytes"] == path.stat().st_size and pruned["kld_mean"] > 0
        assert pruned["ppl"] > 0 and pruned["decode_tps"] > 0 and pruned["prompt_tps"] > 0
        assert all(isinstance(v, (str, int, float, type(None))) for v in pruned.values())  # flat, manifest-ready
        if comp["prune"] == "wanda":
            assert pruned["achieved_sparsity"] == 0.5 and pruned["note"] == "sparse weights stored densely"
            assert pruned["sparsity"] == "2:4"
        else:
            assert pruned["sparsity"] == "-1 of 2 blocks" and pruned["dropped_blocks"] in ("0", "1")
            assert cfg.compression["drop_layers"] == 1  # resolved default recorded for the recipe
    # 2:4 zeros cost the same tensor bytes in GGUF (the files differ only in metadata such as general.name)
    assert tensor_bytes(paths["wanda"]) == tensor_bytes(f16.path)
    assert abs(sizes["wanda"] - f16.size_bytes) < 1024
    assert tensor_bytes(paths["depth"]) < 0.7 * tensor_bytes(f16.path)


@pytest.mark.slow
def test_plan_command_writes_a_png_and_proposes_what_fits(tiny_llama_dir, tmp_path, capsys) -> None:
    from fieldpack.cli import main

    out = tmp_path / "plan.png"
    argv = ["plan", "--model", str(tiny_llama_dir), "--docs", str(Path(__file__).resolve().parents[2] / "demo" / "docs"),
            "--device-ram", "4GiB", "--min-tokens-per-s", "1", "--threads", "2", "--n-ctx", "512",
            "--quants", "F16,Q8_0,Q4_K_M", "--prunes", "none,depth", "--quantizers", "Q4_0+gptq", "--out", str(out),
            "--json"]
    with pytest.raises(SystemExit) as ex:
        main(argv)
    assert ex.value.code == 0
    import json

    plan = json.loads(capsys.readouterr().out)
    labels = [c["label"] for c in plan["candidates"]]
    assert labels == ["none/F16", "none/Q8_0", "none/Q4_K_M", "none/Q4_K_M+imatrix", "none/Q4_K_M+embd Q4_K",
                      "depth/F16", "depth/Q8_0", "depth/Q4_K_M", "depth/Q4_K_M+imatrix", "depth/Q4_K_M+embd Q4_K",
                      "none/Q4_0+gptq"]
    c = plan["candidates"]
    assert c[0]["kld_mean"] == pytest.approx(0.0, abs=1e-9) and c[0]["pareto"]
    assert c[5]["gguf_bytes"] < c[0]["gguf_bytes"] and c[5]["n_layer"] == 1
    # token_embd/output in Q4_K instead of the mix's Q6_K: a smaller file, measured like the others
    assert c[4]["embd_type"] == "Q4_K" and c[4]["gguf_bytes"] < c[2]["gguf_bytes"] and c[4]["kld_mean"] >= 0
    assert c[10]["quantizer"] == "gptq" and c[10]["n_layer"] == 2 and c[10]["gguf_bytes"] < c[2]["gguf_bytes"]
    chosen = c[plan["chosen"]]
    assert chosen["fits_ram"] and chosen["fast_enough"] and chosen["label"] == "none/F16"  # 4 GiB fits the best
    assert plan["build_flags"] == "--quant F16"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a device too small for any candidate: no proposal, and the text says what to change
    from fieldpack.builder.compress.plan import Plan, format_plan

    cands = [Candidate(**{k: v for k, v in d.items() if k != "label"}) for d in c]
    for x in cands:
        x.fits_ram = False
    text = format_plan(Plan(candidates=cands, chosen=choose(cands), device_ram_bytes=64 * 2**20,
                            min_tokens_per_s=1, n_ctx=512, threads=2, png=None))
    assert "no candidate fits" in text and "raise --device-ram" in text


@pytest.mark.slow
def test_plan_heal_candidates_are_pruned_healed_and_proposed_with_their_flags(tiny_llama_dir, tmp_path) -> None:
    """``--prunes depth,depth+heal``: the healed candidate drops the same blocks, is distilled from the unpruned
    model (closer to it: lower KLD than the unhealed one), and its build flags replay the healing."""
    from fieldpack.builder.compress.plan import make_plan

    plan = make_plan(tiny_llama_dir, Path(__file__).resolve().parents[2] / "demo" / "docs", device_ram_bytes=4 * 2**30,
                     min_tokens_per_s=1, threads=2, n_ctx=512, quants=("Q8_0",), prunes=("depth", "depth+heal"),
                     imatrix_quants=(), embd_quants=(), quantizers=(), heal_steps=8, work_dir=tmp_path / "w")
    by = {c.label: c for c in plan.candidates}
    assert list(by) == ["depth/Q8_0", "depth+heal/Q8_0"]
    depth, healed = by["depth/Q8_0"], by["depth+heal/Q8_0"]
    assert healed.n_layer == depth.n_layer and healed.gguf_bytes == depth.gguf_bytes
    assert healed.kld_mean < depth.kld_mean
    opts = plan.prune_options["depth+heal"]
    assert opts["heal"] == "kd" and opts["heal_steps"] == 8
    assert opts["drop_layers"] == plan.prune_options["depth"]["drop_layers"]
    pick = Plan(candidates=plan.candidates, chosen=1, device_ram_bytes=plan.device_ram_bytes, min_tokens_per_s=1,
                n_ctx=512, threads=2, png=None, prune_options=plan.prune_options)
    flags = pick.build_flags() or ""
    assert "--prune depth" in flags and "--heal kd" in flags and "--heal-steps 8" in flags
    with pytest.raises(UsageError, match="depth\\+heal"):
        make_plan(tiny_llama_dir, tmp_path, device_ram_bytes=2**30, min_tokens_per_s=1, prunes=("heal",), quantizers=())


@pytest.mark.slow
def test_plan_rerun_reuses_its_cached_steps_and_measures_only_new_candidates(tiny_llama_dir, tmp_path) -> None:
    """A trial's plan on a CPU host ran ~20 minutes a candidate and kept nothing between runs. With a cache, a
    rerun with other device limits reuses every step (same figures, new verdicts), and a wider grid measures
    only its new candidates."""
    from fieldpack.builder.compress.plan import make_plan

    docs = Path(__file__).resolve().parents[2] / "demo" / "docs"
    seen: dict[str, list[str]] = {"run": [], "cached": []}

    def plan(quants: tuple[str, ...], ram: int) -> Plan:
        seen["run"].clear()
        seen["cached"].clear()
        return make_plan(tiny_llama_dir, docs, device_ram_bytes=ram, min_tokens_per_s=1, threads=1, n_ctx=512,
                         quants=quants, prunes=("none", "depth"), imatrix_quants=("Q4_K_M",), embd_quants=(),
                         quantizers=(), cache_dir=tmp_path / "cache", on_step=seen["run"].append,
                         on_cached=seen["cached"].append)

    first = plan(("Q8_0", "Q4_K_M"), 4 * 2**30)
    assert len(seen["run"]) == first.steps == 11 and first.steps_cached == 0 and not seen["cached"]
    # docs, 2 bases, 2 imatrices, 2 x 3 measurements (Q8_0, Q4_K_M, Q4_K_M+imatrix); nothing else is kept
    assert sorted(p.parent.name for p in (tmp_path / "cache").glob("*/*")) == \
        ["plan-base"] * 2 + ["plan-docs"] + ["plan-imatrix"] * 2 + ["plan-measure"] * 6
    assert not list((tmp_path / "cache" / "plan-measure").rglob("*.gguf"))  # candidates' GGUFs are not kept

    small = plan(("Q8_0", "Q4_K_M"), 1)  # a device with 1 byte of RAM: same measurements, nothing fits
    assert seen["run"] == [] and len(seen["cached"]) == 11 and small.steps_cached == 11
    key = ("label", "gguf_bytes", "kld_mean", "ppl", "decode_tps")
    assert [[getattr(c, k) for k in key] for c in small.candidates] == \
        [[getattr(c, k) for k in key] for c in first.candidates]
    assert first.chosen is not None and small.chosen is None
    assert small.prune_options["depth"] == first.prune_options["depth"]  # resolved drop_layers comes back too

    wider = plan(("Q8_0", "Q4_K_M", "Q4_0"), 4 * 2**30)
    assert [s.split(":")[0] for s in seen["run"]] == ["measuring none/Q4_0", "measuring depth/Q4_0"]
    assert len(wider.candidates) == 8 and wider.steps_cached == 11


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_plan_stops_on_ctrl_c_or_sigterm_and_leaves_no_temporary_files(tiny_llama_dir, tmp_path, signum,
                                                                       code) -> None:
    """A new-user trial's Ctrl-C was lost in llama.cpp's callbacks (the plan ran on for minutes), and a SIGTERM
    left a 1.1 GB fieldpack-plan-* folder behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # SIGINT's default disposition, as from a terminal (a suite run as `.ci/run &` starts with it ignored; see
    # tests/cli/test_build_progress.py), then exec python -m fieldpack in the same process
    reset = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
             "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    argv = [sys.executable, "-c", reset, "-m", "fieldpack", "plan", "--model", str(tiny_llama_dir), "--docs",
            str(Path(__file__).resolve().parents[2] / "demo" / "docs"), "--device-ram", "4GiB",
            "--min-tokens-per-s", "1", "--threads", "1", "--quants", "F16,Q8_0,Q4_K_M,Q4_0", "--prunes", "none",
            "--imatrix-quants", "", "--embd-quants", "", "--quantizers", "", "--out", str(tmp_path / "plan.png"),
            *(["--no-cache"] if signum == signal.SIGINT else ["--cache-dir", str(tmp_path / "cache")])]
    proc = subprocess.Popen(argv, cwd=Path(__file__).resolve().parents[2], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.DEVNULL, env=dict(os.environ, TMPDIR=str(tmp)))
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("plan: measuring none/F16"):
            if signum == signal.SIGINT:  # --no-cache: the steps run in a temp folder
                assert any(tmp.glob("fieldpack-plan-*"))
            proc.send_signal(signum)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == code, "".join(lines) + rest
    # the signal lands while the tiny model's F16 step runs, or (on a loaded host) just after it finished
    stopped = re.search(r"plan stopped (while|after) measuring none/F16", rest)
    assert stopped, rest
    assert "Traceback" not in rest
    assert not list(tmp.iterdir()) and not (tmp_path / "plan.png").exists()
    if signum == signal.SIGTERM:  # the finished steps stay in the cache, whole; the stopped one left nothing
        assert f"kept in the build cache {tmp_path / 'cache'}" in rest
        done = sorted(p.parent.parent.name for p in (tmp_path / "cache").glob("*/*/record.json"))
        assert done[:2] == ["plan-base", "plan-docs"] and done[2:] in ([], ["plan-measure"]), done
        if stopped[1] == "after":  # a CI run's signal came after the F16 step: its entry is kept, and said so
            assert done[2:] == ["plan-measure"], done
        assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".")]  # no temp entry, no lock
