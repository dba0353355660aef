"""Generation: ``Runtime.answer`` vs raw llama-cpp-python ``create_completion`` on the same GGUF, prompt and
threads; decode speed vs the memory-bandwidth bound; time to first token split into its parts.

Model: the bench decoder (:func:`benchmarks.common.bench_checkpoint`: Llama layout, random weights, EOS/EOT
never chosen so every generation runs to ``max_tokens``) built into a Q4_K_M bundle by the real pipeline.

* Same prompt: for each question, the raw baseline gets the exact token list ``Runtime.answer`` built
  (:func:`device.prompt.fit_prompt` over the hits it retrieved), and the same sampling (greedy) and stop strings.
  Both stream; each runs on its own ``llama_cpp.Llama`` of the same file, n_ctx, n_batch and threads, ours in
  this process, then the baseline in a child process (:func:`raw_worker`) over the same prompt list, then ours
  again (medians over both passes of ours, so a drift of the machine's load hits both sides alike).
* Decode tokens/s, wall clock: ``tokens / (generation wall time - llama.cpp prompt-eval time)``, where ours'
  generation wall time is ``Answer.timings.total_ms - retrieval_ms`` (so prompt building counts against us) and
  the raw one is the streamed call's; also llama.cpp's own perf counters (``n_eval / t_eval``). Each question is run ``repeats`` times; the ratio
  ours/raw is the ratio of the medians over all runs (target >= 0.97).
* Bandwidth bound: bytes of weights read per generated token (every tensor of the GGUF except the token
  embedding table, of which one row is read) over a measured memory copy bandwidth (numpy, 256 MiB, bytes
  read + written per second: the STREAM "copy" convention). KV cache traffic is left out (short contexts).
* TTFT split (ours, first run of each question: a repeated prompt reuses llama.cpp's KV cache): retrieval (embed + search), prompt eval (llama.cpp perf counter), and the rest until the
  first piece (prompt building, first decode step, streaming).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from benchmarks import common as C

log = logging.getLogger(__name__)

FAMILY = "generation"
QUESTIONS = [
    "The connection pool is exhausted. What should I do?",
    "Pump 3 pressure alarm: what are the next steps?",
    "When is a sand filter backwashed?",
    "How do I respond to a low chlorine residual alarm?",
    "What happens during a shift handover?",
    "What does cavitation sound like and how do I fix it?",
]


def weight_bytes_per_token(gguf_path: Path) -> dict[str, int]:
    """Bytes of weights a decode step reads: all tensors except ``token_embd.weight`` (one row is gathered),
    unless the model has no ``output.weight`` (tied embeddings: the table is read whole as the output layer)."""
    from gguf import GGUFReader

    r = GGUFReader(str(gguf_path))
    sizes = {t.name: int(t.n_bytes) for t in r.tensors}
    total = sum(sizes.values())
    embd = sizes.get("token_embd.weight", 0)
    tied = "output.weight" not in sizes
    return {"total_tensor_bytes": total, "token_embd_bytes": embd, "tied_output": int(tied),
            "bytes_per_token": total if tied else total - embd}


def _stream(call: Any) -> tuple[float, float, float, list[str]]:
    """Run a streaming generation; (t_start, t_first_piece, t_end, pieces)."""
    pieces: list[str] = []
    t_first = None
    t0 = time.perf_counter()
    for piece in call():
        if piece and t_first is None:
            t_first = time.perf_counter()
        pieces.append(piece)
    t_end = time.perf_counter()
    return t0, t_first or t_end, t_end, pieces


def raw_worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The baseline, run in its own process: plain ``llama_cpp.Llama`` + streamed ``create_completion`` of each
    prompt (token ids) in ``spec["prompts"]``, greedy, same stop strings. Per prompt: tokens, wall times (s),
    llama.cpp perf counters (ms)."""
    import llama_cpp

    from fieldpack.shared.llama_backend import llama_cpp_module

    llama_cpp_module(llama_cpp)

    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=spec["n_ctx"], n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], n_batch=min(512, spec["n_ctx"]), verbose=False, seed=0)
    out = []
    try:
        llm.create_completion("warm up", max_tokens=8)
        for tokens in spec["prompts"]:
            llama_cpp.llama_perf_context_reset(llm.ctx)

            def call(tokens: list[int] = tokens) -> Any:
                for chunk in llm.create_completion(tokens, max_tokens=spec["max_tokens"], temperature=0.0, top_k=1,
                                                   top_p=1.0, min_p=0.0, repeat_penalty=1.0, stop=spec["stop"],
                                                   stream=True):
                    yield chunk["choices"][0].get("text") or ""

            r0, r1, r2, _ = _stream(call)
            perf = llama_cpp.llama_perf_context(llm.ctx)
            out.append({"tokens": int(perf.n_eval), "wall_s": r2 - r0, "first_piece_s": r1 - r0,
                        "prompt_eval_ms": float(perf.t_p_eval_ms), "eval_ms": float(perf.t_eval_ms)})
    finally:
        llm.close()
    return out


def run(out: Path, *, quick: bool = False) -> dict[str, Any]:
    """Run the generation benchmark; writes ``generation.json`` and ``generation.png`` into ``out``.

    Ours runs in this process, the raw baseline in a child process afterwards on the very same prompt tokens
    (two llama.cpp contexts in one process share one OpenMP pool and stalled each other on this machine).
    """
    import json
    import subprocess
    import sys
    import tempfile

    from fieldpack.device.prompt import fit_prompt
    from fieldpack.device.runtime import Runtime

    threads = C.bench_threads()
    info = C.machine_info()
    # FIELDPACK_BENCH_SLOT: an installed bundle's slot folder (e.g. a real model's) instead of the bench decoder
    import os

    slot = Path(os.environ["FIELDPACK_BENCH_SLOT"]) if os.environ.get("FIELDPACK_BENCH_SLOT") else C.bench_slot(quick)
    max_tokens = 64 if quick else 128
    questions = QUESTIONS[:3] if quick else QUESTIONS
    repeats = 2 if quick else 3
    with Runtime(slot, threads=threads) as rt:
        n_ctx = rt.n_ctx
        stop = list(rt.manifest.runtime.stop)
        rt.answer(questions[0], max_tokens=8)  # warm-up (page cache, thread pools)

        def ours_pass(tag: str) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            for q in [q for _ in range(repeats) for q in questions]:
                first: list[float] = []

                def on_token(piece: str) -> None:
                    if piece and not first:
                        first.append(time.perf_counter())

                t0 = time.perf_counter()
                ans = rt.answer(q, max_tokens=max_tokens, on_token=on_token)
                t2 = time.perf_counter()
                t1 = first[0] if first else t2
                if ans.abstained:
                    log.warning("generation: %r abstained; skipped", q)
                    continue
                tm = ans.timings
                built = fit_prompt(ans.question, ans.sources, [], render=rt.render_prompt, tokenize=rt.tokenize_prompt,
                                   budget_tokens=n_ctx - max_tokens)
                out.append({
                    "question": q, "pass": tag, "repeat": sum(1 for r in out if r["question"] == q),
                    "prompt": list(built.tokens),
                    "prompt_tokens": tm.prompt_tokens, "same_prompt": len(built.tokens) == tm.prompt_tokens,
                    "ours": {"tokens": tm.completion_tokens,
                             # generation wall time less llama.cpp's prompt eval: decode + sampling + streaming +
                             # prompt building (counted against us). Not timed from the first piece: text held
                             # back while it could still start a stop string arrives late.
                             "decode_tps_wall": tm.completion_tokens / ((tm.total_ms - tm.retrieval_ms
                                                                          - tm.prompt_eval_ms) / 1e3),
                             "first_piece_to_end_s": t2 - t1,
                             "decode_tps_perf": tm.tokens_per_s, "total_ms": tm.total_ms,
                             "retrieval_ms": tm.retrieval_ms, "prompt_eval_ms": tm.prompt_eval_ms,
                             "ttft_ms": tm.time_to_first_token_ms, "ttft_wall_ms": (t1 - t0) * 1e3,
                             "rest_to_first_token_ms": tm.time_to_first_token_ms - tm.retrieval_ms
                             - tm.prompt_eval_ms},
                })
                log.info("generation %s %r: ours %.1f tok/s", tag, q, out[-1]["ours"]["decode_tps_wall"])
            return out

        # ours, then the baseline, then ours again: a drift of the machine's load hits both sides alike
        rows = ours_pass("A")
        prompts = [r.pop("prompt") for r in rows]
        with tempfile.TemporaryDirectory() as tmp:
            spec_path = Path(tmp) / "raw.json"
            spec_path.write_text(json.dumps({"gguf": str(slot / "model.gguf"), "n_ctx": n_ctx, "threads": threads,
                                             "max_tokens": max_tokens, "stop": stop, "prompts": prompts}))
            r = subprocess.run([sys.executable, "-m", "benchmarks.generation", "--raw", str(spec_path)],
                               cwd=C.REPO, capture_output=True, text=True, timeout=3600)
            if r.returncode != 0:
                raise RuntimeError(f"raw llama-cpp-python baseline failed:\n{r.stderr[-3000:]}")
            raws = json.loads(r.stdout.strip().splitlines()[-1])
        rows_b = ours_pass("B")
        for row in rows_b:
            row.pop("prompt")
    for row, raw in zip(rows, raws):
        perf_tps = raw["tokens"] / (raw["eval_ms"] / 1e3) if raw["eval_ms"] > 0 else 0.0
        row["raw"] = {"tokens": raw["tokens"],
                      "decode_tps_wall": raw["tokens"] / (raw["wall_s"] - raw["prompt_eval_ms"] / 1e3),
                      "decode_tps_perf": perf_tps, "prompt_eval_ms": raw["prompt_eval_ms"],
                      "ttft_wall_ms": raw["first_piece_s"] * 1e3, "total_ms": raw["wall_s"] * 1e3}
        row["ratio_decode_wall"] = row["ours"]["decode_tps_wall"] / row["raw"]["decode_tps_wall"]
        row["ratio_decode_perf"] = row["ours"]["decode_tps_perf"] / perf_tps if perf_tps else None
    bw = C.memory_bandwidth()
    wb = weight_bytes_per_token(slot / "model.gguf")
    bound = bw["bytes_per_s"] / wb["bytes_per_token"]

    rows += rows_b

    def med(side: str, key: str) -> float:
        return C.median([r[side][key] for r in rows if side in r and r[side][key] is not None])

    ours_tps, raw_tps = med("ours", "decode_tps_wall"), med("raw", "decode_tps_wall")
    first = [r for r in rows if r["repeat"] == 0 and r["pass"] == "A"]
    doc = {
        "family": FAMILY, "quick": quick, "machine": info, "threads": threads, "n_ctx": n_ctx,
        "max_tokens": max_tokens, "repeats": repeats, "model": {"gguf_bytes": (slot / "model.gguf").stat().st_size, **wb,
                                             "shape": C.BENCH_SHAPES["quick" if quick else "full"], "quant": "Q4_K_M"},
        "memory_bandwidth": bw, "bandwidth_bound_tps": bound,
        "summary": {
            "ours_decode_tps": ours_tps, "raw_decode_tps": raw_tps, "ratio_decode_wall": ours_tps / raw_tps,
            "ratio_decode_perf": med("ours", "decode_tps_perf") / med("raw", "decode_tps_perf"),
            "ratio_decode_wall_per_run_p50": C.percentile([r["ratio_decode_wall"] for r in rows if "raw" in r], 50),
            "ours_decode_tps_perf": med("ours", "decode_tps_perf"), "raw_decode_tps_perf": med("raw", "decode_tps_perf"),
            "ours_share_of_bound": ours_tps / bound, "raw_share_of_bound": raw_tps / bound,
            # first runs only: llama-cpp-python reuses the KV cache of a repeated prompt prefix
            "ttft_ms_p50": C.percentile([r["ours"]["ttft_ms"] for r in first], 50),
            "ttft_split_ms_p50": {k: C.percentile([r["ours"][k] for r in first], 50)
                                  for k in ("retrieval_ms", "prompt_eval_ms", "rest_to_first_token_ms")},
            "raw_ttft_wall_ms_p50": C.percentile([r["raw"]["ttft_wall_ms"] for r in first], 50),
            "prompt_tokens_p50": C.percentile([r["prompt_tokens"] for r in first], 50),
        },
        "questions": rows,
    }
    C.write_result(out, FAMILY, doc, lambda fig: draw(fig, doc), figsize=(10, 3.8))
    return doc


def draw(fig: Any, doc: dict[str, Any]) -> None:
    a, b = fig.subplots(1, 2)
    s = doc["summary"]
    a.bar(["Runtime.answer", "raw llama-cpp", "bandwidth bound"],
          [s["ours_decode_tps"], s["raw_decode_tps"], doc["bandwidth_bound_tps"]], color=["#37a", "#888", "#ccc"])
    a.set(ylabel="tokens / s", title=f"decode ({doc['threads']} threads, Q4_K_M, "
                                     f"{doc['model']['bytes_per_token'] / 2**20:.0f} MiB weights/token)")
    sp = s["ttft_split_ms_p50"]
    left = 0.0
    for key, label in (("retrieval_ms", "retrieval"), ("prompt_eval_ms", "prompt eval"),
                       ("rest_to_first_token_ms", "first decode + prompt build")):
        b.barh(["ours"], [sp[key]], left=left, label=label)
        left += sp[key]
    b.barh(["raw"], [s["raw_ttft_wall_ms_p50"]], color="#888", label="raw (prompt eval + first decode)")
    b.set(xlabel="ms (p50)", title=f"time to first token, ~{s['prompt_tokens_p50']:.0f} prompt tokens")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3)


def summarize(doc: dict[str, Any]) -> list[str]:
    s, m = doc["summary"], doc["model"]
    sp = s["ttft_split_ms_p50"]
    lines = [f"## Generation ({m['quant']} bench model {m['gguf_bytes'] / 2**20:.0f} MiB, {doc['threads']} threads, "
             f"{doc['max_tokens']} tokens per answer; medians of {len(doc['questions'])} runs of ours, "
             f"{sum(1 for r in doc['questions'] if 'raw' in r)} of raw)", ""]
    lines += C.md_table(["figure", "Runtime.answer", "raw llama-cpp-python", "ours / raw"], [
        ["decode tok/s (wall)", s["ours_decode_tps"], s["raw_decode_tps"], s["ratio_decode_wall"]],
        ["decode tok/s (llama.cpp perf)", s["ours_decode_tps_perf"], s["raw_decode_tps_perf"], s["ratio_decode_perf"]],
        ["share of bandwidth bound", s["ours_share_of_bound"], s["raw_share_of_bound"], "–"],
    ])
    lines += ["", f"Bandwidth bound: {doc['memory_bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s copy bandwidth / "
                  f"{m['bytes_per_token'] / 2**20:.1f} MiB weights per token = {doc['bandwidth_bound_tps']:.0f} tok/s. "
                  f"Time to first token p50 {C.fmt(s['ttft_ms_p50'])} ms = retrieval {C.fmt(sp['retrieval_ms'])} + "
                  f"prompt eval {C.fmt(sp['prompt_eval_ms'])} + first decode/prompt build "
                  f"{C.fmt(sp['rest_to_first_token_ms'])} ms (raw: {C.fmt(s['raw_ttft_wall_ms_p50'])} ms without "
                  f"retrieval).", ""]
    return lines


def _main() -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m benchmarks.generation")
    p.add_argument("--raw", type=Path, required=True, help="internal: run the raw baseline from a spec file")
    a = p.parse_args()
    print(json.dumps(raw_worker(json.loads(a.raw.read_text()))))


if __name__ == "__main__":
    _main()
