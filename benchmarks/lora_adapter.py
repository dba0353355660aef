"""What shipping LoRA as a GGUF adapter costs on the device, against merging it: Gemma 3 270M Q4_K_M base + an
r=16 LoRA adapter on every attention/MLP linear (:func:`fieldpack.builder.adapt.lora_gguf.export_lora_gguf`) vs the
same adapter merged into the weights and quantized to Q4_K_M (what ``fieldpack build --adapt`` ships today).

``python -m benchmarks.lora_adapter --out DIR [--repeats 3] [--threads 1]``

Measured per setting in a fresh process each (interleaved, ``--repeats`` times, medians): load seconds
(``Llama(...)`` until ready), resident memory after the decode (anonymous and file-backed, bytes) and the file bytes a device must receive,
prompt and decode tokens/s (128-token prompt, 32 decoded tokens, greedy). The adapter's values do not change its cost,
so it is the freshly attached LoRA with ``B`` drawn at random (as after training), seeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import statistics
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("benchmarks.lora_adapter")

METRICS = ("load_s", "rss_anon_bytes", "rss_file_bytes", "prompt_tps", "decode_tps")


def _rss() -> dict[str, int]:
    """This process's resident memory (bytes): anonymous (``RssAnon``: cannot be dropped under memory pressure
    without swap) and file-backed (``RssFile``: mmapped model pages, dropped and re-read by the kernel)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) * 1024
    return out


def _measure(model: str, lora: str | None, threads: int, q: Any) -> None:
    """Child process: load, then time a prompt and a greedy decode; put a dict on ``q``."""
    import llama_cpp

    from fieldpack.shared.llama_backend import llama_cpp_module

    Llama = llama_cpp_module(llama_cpp).Llama

    rss0 = _rss()
    t0 = time.perf_counter()
    llm = Llama(model_path=model, lora_path=lora, n_ctx=512, n_threads=threads, n_threads_batch=threads,
                verbose=False, seed=0)
    load_s = time.perf_counter() - t0
    prompt = list(range(1000, 1128))
    t1 = time.perf_counter()
    llm.eval(prompt)
    t2 = time.perf_counter()
    for _ in range(32):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    t3 = time.perf_counter()
    rss = _rss()  # after the decode: every weight has been touched
    q.put({"load_s": load_s, "rss_anon_bytes": rss["RssAnon"] - rss0["RssAnon"],
           "rss_file_bytes": rss["RssFile"] - rss0["RssFile"], "prompt_tps": 128 / (t2 - t1),
           "decode_tps": 32 / (t3 - t2), "mmap": lora is None})
    llm.close()


def measure(model: Path, lora: Path | None, threads: int) -> dict[str, Any]:
    """One fresh-process measurement (see :func:`_measure`)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(str(model), str(lora) if lora else None, threads, q))
    p.start()
    out = q.get(timeout=600)
    p.join()
    return out


def prepare(out: Path) -> tuple[Path, Path, Path, dict[str, Any]]:
    """(base Q4_K_M, merged Q4_K_M, adapter GGUF, adapter facts), cached in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.adapt import find_model
    from fieldpack.builder.adapt.lora import attach_lora, merge_lora
    from fieldpack.builder.adapt.lora_gguf import export_lora_gguf
    from fieldpack.builder.compress.structured import save_checkpoint
    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.quantize import quantize_gguf

    model_dir = find_model()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    peft = attach_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), r=16, alpha=32)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.01)
    ad = export_lora_gguf(peft, model_dir, out / "adapter-f16.gguf", outtype="f16")
    save_checkpoint(merge_lora(peft), model_dir, out / "merged-hf", dtype=torch.float32)
    ggufs = {}
    for name, src in (("base", model_dir), ("merged", out / "merged-hf")):
        f16 = convert_hf_to_gguf(src, out / f"{name}-f16.gguf", outtype="f16").path
        ggufs[name] = quantize_gguf(f16, out / f"{name}-Q4_K_M.gguf", "Q4_K_M").path
        f16.unlink()
    return ggufs["base"], ggufs["merged"], ad.path, {"rank": ad.rank, "alpha": ad.alpha, "tensors": ad.tensors,
                                                     "bytes": ad.size_bytes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    base, merged, adapter, facts = prepare(a.out)
    runs: dict[str, list[dict[str, Any]]] = {"merged": [], "base+adapter": []}
    for _ in range(a.repeats):
        runs["merged"].append(measure(merged, None, a.threads))
        runs["base+adapter"].append(measure(base, adapter, a.threads))
    res: dict[str, Any] = {"adapter": facts, "threads": a.threads, "repeats": a.repeats,
                           "file_bytes": {"merged": merged.stat().st_size,
                                          "base+adapter": base.stat().st_size + adapter.stat().st_size}}
    for k, rs in runs.items():
        res[k] = {m: statistics.median(r[m] for r in rs) for m in METRICS}
    res["ratio_adapter_over_merged"] = {m: round(res["base+adapter"][m] / res["merged"][m], 3)
                                        for m in METRICS if res["merged"][m]}
    (a.out / "lora_adapter.json").write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
