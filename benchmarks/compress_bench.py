"""Compression: pruning x quantization grid on the tiny test model, as ratios to the dense F16 of the same run.

Grid: {none, wanda 50%, sparsegpt 2:4, depth 25%, width 25%} x {F16, Q8_0, Q4_K_M, Q4_K_M + domain imatrix}.
Model: the tiny Llama of the compression tests (2 blocks, hidden 256, MLP 512, GQA 4/2), trained on the
calibration chunks of PostgreSQL 15's backup/WAL/vacuum/replication chapters; quality is measured on the 40
held-out chunks it never saw. Every row: GGUF bytes and size ratio, PPL, ΔPPL, mean KLD and top-1 agreement vs the
dense F16 (llama-perplexity's method), and llama.cpp prompt/decode tokens/s with decode as a ratio to the dense F16
timed in the same run (its median over a timing at the start and one at the end, the machine being shared;
best of 5 runs of 128 prompt + 128 decode tokens each, 1 thread by default, see :func:`run`).

On a 2-block model "depth 25%" can only drop one block (50% of the blocks), and "width 25%" (``ffn_keep`` 0.75)
rounds the MLP to 256 of 512 channels so K-quants still apply; the rows record what was actually removed.

Run: ``python -m benchmarks.compress_bench --out bench/ [--quick]``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common as C

log = logging.getLogger(__name__)

FAMILY = "compress_bench"
PRUNES: list[tuple[str, dict[str, Any] | None]] = [
    ("none", None),
    ("wanda 50%", {"prune": "wanda", "sparsity": 0.5}),
    ("sparsegpt 2:4", {"prune": "sparsegpt", "pattern": "2:4"}),
    ("depth 25%", {"prune": "depth"}),
    ("width 25%", {"prune": "width", "ffn_keep": 0.75}),
]
QUANTS = ("F16", "Q8_0", "Q4_K_M", "Q4_K_M+imatrix")


def test_model() -> tuple[Path, list[str], list[str]]:
    """The compression tests' tiny Llama and its (calibration, held-out) chunks, from the shared test cache."""
    from tests.builder import test_compress_fixtures as F

    calib, held = F.split_chunks(F.chunk_texts(F.pg_docs_dir()), n_eval=40)
    return F.trained_model("pg-llama", "llama", calib, F.PG_STEPS), calib, held


def run(out: Path, *, quick: bool = False, threads: int = 1) -> dict[str, Any]:
    """Measure the grid; write ``compress_bench.json`` / ``.png`` into ``out``. ``quick``: 12 held-out chunks.

    ``threads``: llama.cpp threads for timing. 1 by default: on the 2 shared cores of the build machine, a
    2-thread llama.cpp decode of this tiny model swings between ~4 and ~10,000 tokens/s with the other
    processes' scheduling (its threads wait for each other every matrix), which makes ratios meaningless.
    """
    from fieldpack.builder.compress import prune_checkpoint, validate_compression
    from fieldpack.builder.compress.imatrix import compute_imatrix_gguf
    from fieldpack.builder.compress.report import SPARSITY_NOTE, fit_eval_ctx, gguf_params, measure_speed
    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.llama_eval import perplexity_kld
    from fieldpack.builder.quantize import quantize_gguf

    info = C.machine_info()
    model_dir, calib, held = test_model()
    if quick:
        held = held[:12]
    work = Path(tempfile.mkdtemp(prefix="fieldpack-compress-bench-"))
    try:
        f16 = convert_hf_to_gguf(model_dir, work / "dense-f16.gguf")
        n_ctx = fit_eval_ctx(f16.path, held, 256)
        def speed(path: Path) -> Any:
            return measure_speed(path, threads=threads, n_prompt=128, n_decode=128, repeats=5)

        dense_speed = [speed(f16.path)]
        rows: list[dict[str, Any]] = []
        for label, options in PRUNES:
            detail: dict[str, Any] = {}
            if options is None:
                base = f16.path
            else:
                opts = validate_compression(options, model_dir=model_dir)
                _, conv, detail, _ = prune_checkpoint(model_dir, opts, calib, work / label.split()[0])
                base = conv.path
            imx = None
            for q in QUANTS:
                qt = q.split("+")[0]
                if q.endswith("+imatrix") and imx is None:
                    imx = compute_imatrix_gguf(base, calib, Path(base).with_suffix(".imatrix"), n_ctx=256).path
                if qt == "F16":
                    path = Path(base)
                else:
                    path = quantize_gguf(base, Path(base).with_name(f"{Path(base).stem}-{q.replace('+', '-')}.gguf"),
                                         qt, imatrix=imx if q.endswith("+imatrix") else None, nthread=threads).path
                figs = perplexity_kld(f16.path, path, held, n_ctx=n_ctx)
                sp = speed(path)
                rows.append({"prune": label, "quant": q, "params": gguf_params(path), "gguf_bytes": path.stat().st_size,
                             "ppl": figs.ppl_test, "delta_ppl": figs.delta_ppl, "kld_mean": figs.kld_mean,
                             "kld_p99": figs.kld_p99, "top1_agreement": figs.top1_agreement,
                             "decode_tps": sp.decode_tps, "prompt_tps": sp.prompt_tps,
                             **{k: v for k, v in detail.items() if k != "device"}})
                log.info("%s %s: %d bytes, ΔPPL %+.3f, KLD %.4f, %.0f tok/s", label, q, rows[-1]["gguf_bytes"],
                         figs.delta_ppl, figs.kld_mean, sp.decode_tps)
        dense_speed.append(speed(f16.path))
        ref_decode = statistics.median([s.decode_tps for s in dense_speed])
        ref_prompt = statistics.median([s.prompt_tps for s in dense_speed])
        for r in rows:
            r["size_ratio"] = r["gguf_bytes"] / f16.size_bytes
            r["decode_ratio"] = r["decode_tps"] / ref_decode
            r["prompt_ratio"] = r["prompt_tps"] / ref_prompt
        by = {(r["prune"], r["quant"]): r for r in rows}
        imatrix_effect = {p: {"delta_ppl": (by[(p, "Q4_K_M")]["delta_ppl"], by[(p, "Q4_K_M+imatrix")]["delta_ppl"]),
                              "kld_mean": (by[(p, "Q4_K_M")]["kld_mean"], by[(p, "Q4_K_M+imatrix")]["kld_mean"])}
                          for p, _ in PRUNES}
        doc = {"family": FAMILY, "quick": quick, "machine": info, "threads": threads, "model": str(model_dir),
               "held_out_chunks": len(held), "calib_chunks": len(calib), "n_ctx": n_ctx,
               "dense_f16": {"gguf_bytes": f16.size_bytes, "params": f16.parameter_count,
                             "decode_tps": [s.decode_tps for s in dense_speed],
                             "prompt_tps": [s.prompt_tps for s in dense_speed]},
               "rows": rows, "imatrix_effect": imatrix_effect, "note": SPARSITY_NOTE}
        C.write_result(out, FAMILY, doc, lambda fig: draw(fig, doc), figsize=(11.0, 4.2))
        return doc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def draw(fig: Any, doc: dict[str, Any]) -> None:
    """Left: KLD vs size ratio per variant; right: decode speed ratio per variant."""
    ax1, ax2 = fig.subplots(1, 2)
    markers = {"F16": "s", "Q8_0": "o", "Q4_K_M": "^", "Q4_K_M+imatrix": "v"}
    colours = dict(zip([p for p, _ in PRUNES], ["black", "tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for r in doc["rows"]:
        ax1.scatter(r["size_ratio"], max(r["kld_mean"], 1e-6), marker=markers[r["quant"]], color=colours[r["prune"]])
    for p, c in colours.items():
        ax1.scatter([], [], color=c, label=p)
    for q, m in markers.items():
        ax1.scatter([], [], marker=m, color="grey", label=q)
    ax1.set_yscale("log")
    ax1.set_xlabel("GGUF size / dense F16")
    ax1.set_ylabel("mean KLD vs dense F16 (nats/token)")
    ax1.legend(fontsize=7)
    labels = [f"{r['prune']}\n{r['quant']}" for r in doc["rows"]]
    ax2.bar(range(len(labels)), [r["decode_ratio"] for r in doc["rows"]],
            color=[colours[r["prune"]] for r in doc["rows"]])
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
    ax2.set_ylabel("decode tokens/s / dense F16")


def summarize(doc: dict[str, Any]) -> list[str]:
    """Markdown lines for ``summary.md``."""
    d = doc["dense_f16"]
    lines = [f"## Compression: pruning x quantization on the tiny test model ({d['params']:,} params, dense F16 "
             f"{d['gguf_bytes']:,} bytes, {doc['held_out_chunks']} held-out chunks, {doc['threads']} threads)", ""]
    lines += C.md_table(
        ["prune", "quant", "GGUF bytes", "size ×F16", "PPL", "ΔPPL", "KLD", "top-1", "decode ×F16", "prompt ×F16"],
        [[r["prune"], r["quant"], r["gguf_bytes"], r["size_ratio"], r["ppl"], r["delta_ppl"], r["kld_mean"],
          r["top1_agreement"], r["decode_ratio"], r["prompt_ratio"]] for r in doc["rows"]])
    eff = doc["imatrix_effect"]
    lines += ["", "Domain imatrix on Q4_K_M (ΔPPL, KLD without -> with): " + "; ".join(
        f"{p}: {C.fmt(v['delta_ppl'][0])} -> {C.fmt(v['delta_ppl'][1])}, {C.fmt(v['kld_mean'][0])} -> "
        f"{C.fmt(v['kld_mean'][1])}" for p, v in eff.items()), "", f"Note: {doc['note']}", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads for timing (default 1, see run())")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    doc = run(args.out, quick=args.quick, threads=args.threads)
    print("\n".join(summarize(doc)))


if __name__ == "__main__":
    main()
