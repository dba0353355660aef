"""Embedder: fieldpack's ONNX MiniLM-L6 (fp32 and int8, ONNX Runtime) vs sentence-transformers on torch (fp32).

Same sentences (chunks of the Debian handbook, 200 tokens), same batch size (32), same threads. Figures:
sentences/s (median of 3 passes after a warm-up batch), and the cosine between each ONNX embedding and the
torch one of the same sentence (mean and min): the export's fidelity (fp32) and the int8 quantisation loss.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from benchmarks import common as C

log = logging.getLogger(__name__)

FAMILY = "embedder"
BATCH = 32


def _sentences(n: int, count_tokens: Any) -> list[str]:
    from fieldpack.builder.ingest import ingest

    corpus = C.stage_corpus("debian-handbook", C.DEBIAN_HANDBOOK)
    chunks = ingest(corpus.docs, count_tokens=count_tokens, chunk_tokens=200, overlap_tokens=40).chunks
    step = max(1, len(chunks) // n)
    return [c.embedding_text() for c in chunks[::step][:n]]


def _throughput(embed: Any, texts: list[str], passes: int) -> tuple[Any, float]:
    embed(texts[:BATCH])  # warm-up
    times, vecs = [], None
    for _ in range(passes):
        t0 = time.perf_counter()
        vecs = embed(texts)
        times.append(time.perf_counter() - t0)
    return vecs, len(texts) / C.median(times)


def run(out: Path, *, quick: bool = False) -> dict[str, Any]:
    """Run the embedder benchmark; writes ``embedder.json`` and ``embedder.png`` into ``out``."""
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from fieldpack.retrieval.embedder import OnnxEmbedder

    threads = C.bench_threads()
    info = C.machine_info()
    n, passes = (128, 2) if quick else (512, 3)
    exports = {p: C.embedder_export(p) for p in ("fp32", "int8")}
    fp32 = exports["fp32"]
    with OnnxEmbedder(Path(fp32["onnx_path"]), Path(fp32["tokenizer_path"]), max_tokens=int(fp32["max_tokens"]),
                      threads=threads) as e:
        texts = _sentences(n, e.count_tokens)
        mean_tokens = sum(min(e.count_tokens(t) + 2, e.max_tokens) for t in texts) / len(texts)

    torch.set_num_threads(threads)
    st = SentenceTransformer(str(C.minilm_dir()), device="cpu")
    ref, st_rate = _throughput(lambda ts: st.encode(ts, batch_size=BATCH, normalize_embeddings=True,
                                                    convert_to_numpy=True, show_progress_bar=False), texts, passes)
    systems: dict[str, Any] = {"sentence-transformers (torch fp32)": {"sentences_per_s": st_rate,
                                                                      "max_seq_length": st.max_seq_length}}
    for prec, exp in exports.items():
        with OnnxEmbedder(Path(exp["onnx_path"]), Path(exp["tokenizer_path"]), max_tokens=int(exp["max_tokens"]),
                          threads=threads) as e:
            vecs, rate = _throughput(lambda ts: e.embed(ts, batch_size=BATCH), texts, passes)
        cos = np.sum(vecs * ref, axis=1)  # both (n, 384) float32, unit rows
        name = f"fieldpack ONNX {prec}" if exp["precision"] == prec else f"fieldpack ONNX {prec} (gate failed, fp32 kept)"
        systems[name] = {
            "sentences_per_s": rate, "cosine_to_torch_mean": float(cos.mean()), "cosine_to_torch_min": float(cos.min()),
            "onnx_bytes": Path(exp["onnx_path"]).stat().st_size, "max_tokens": exp["max_tokens"],
            "speedup_over_torch": rate / st_rate, "requested": prec}
        log.info("embedder %s: %.1f sentences/s (torch %.1f), cosine mean %.5f", exp["precision"], rate, st_rate,
                 float(cos.mean()))
    doc = {"family": FAMILY, "quick": quick, "machine": info, "threads": threads, "batch": BATCH,
           "sentences": len(texts), "mean_tokens": mean_tokens, "passes": passes, "systems": systems}
    C.write_result(out, FAMILY, doc, lambda fig: draw(fig, doc), figsize=(10, 3.6))
    return doc


def draw(fig: Any, doc: dict[str, Any]) -> None:
    a, b = fig.subplots(1, 2)
    names = list(doc["systems"])
    short = [n.replace("sentence-transformers ", "ST ").replace("fieldpack ", "") for n in names]
    a.bar(short, [doc["systems"][n]["sentences_per_s"] for n in names], color=["#888", "#3a7", "#37a"][:len(names)])
    a.set(ylabel="sentences / s", title=f"throughput ({doc['sentences']} chunks, ~{doc['mean_tokens']:.0f} tokens, "
                                       f"{doc['threads']} threads)")
    onnx = [n for n in names if "cosine_to_torch_mean" in doc["systems"][n]]
    b.bar([s for n, s in zip(names, short) if n in onnx], [doc["systems"][n]["cosine_to_torch_mean"] for n in onnx],
          label="mean")
    b.plot([s for n, s in zip(names, short) if n in onnx], [doc["systems"][n]["cosine_to_torch_min"] for n in onnx],
           "kv", label="min")
    lo = min(doc["systems"][n]["cosine_to_torch_min"] for n in onnx)
    b.set(ylabel="cosine to torch", ylim=(min(0.99, lo - 0.002), 1.0005), title="agreement with sentence-transformers")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)


def summarize(doc: dict[str, Any]) -> list[str]:
    lines = [f"## Embedder ({doc['sentences']} Debian-handbook chunks, ~{doc['mean_tokens']:.0f} tokens, batch "
             f"{doc['batch']}, {doc['threads']} threads)", ""]
    rows = []
    for name, s in doc["systems"].items():
        rows.append([name, s["sentences_per_s"], s.get("speedup_over_torch", 1.0), s.get("cosine_to_torch_mean"),
                     s.get("cosine_to_torch_min"), s.get("onnx_bytes")])
    lines += C.md_table(["system", "sentences/s", "× torch", "cosine mean", "cosine min", "ONNX bytes"], rows)
    return lines + [""]
