"""Build cache: ``fieldpack build`` from an empty cache vs a rebuild after a docs-only change vs an unchanged
rebuild, all through the CLI (process start to exit, what a user waits for), on the demo documents.

The baseline is the cold build measured in the same run; the figure of merit is the docs-only rebuild's wall
time as a share of it (the model stages — embedder export and int8 gate, convert, parity, quantize — are
reused; ingest, index, smoke question, eval split and PPL/KLD rerun).

``run(out, quick)`` uses the benchmark checkpoint; :func:`measure` takes any model folder (the README's
figures use the tests' tiny Llama).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common as C

FAMILY = "build_cache"
DEMO_DOCS = Path(__file__).resolve().parents[1] / "demo" / "docs"
EXTRA_SECTION = ("\n\n## Sludge blanket alarm\n\nWhen the clarifier's sludge blanket alarm sounds, start the "
                 "standby scraper drive and log the blanket depth every fifteen minutes.\n")


def _build(model: Path, docs: Path, key: Path, out: Path, cache: Path) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "fieldpack", "build", "--model", str(model), "--docs", str(docs), "--name", "bench",
           "--sign", str(key), "-o", str(out), "--cache-dir", str(cache)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"fieldpack build failed: {r.stderr[-2000:]}")
    return seconds, r.stdout


def measure(model: Path, work: Path) -> dict[str, Any]:
    """Cold build, docs-only rebuild and unchanged rebuild of ``model`` over the demo docs, in ``work``
    (seconds, wall, each a fresh ``python -m fieldpack build`` process)."""
    from fieldpack.shared.signing import generate_keypair

    key, _ = generate_keypair(work / "keys")
    cache = work / "cache"
    docs = work / "docs"
    shutil.copytree(DEMO_DOCS, docs)
    cold, cold_out = _build(model, docs, key, work / "cold.fpk", cache)
    target = sorted(docs.glob("*.md"))[0]
    target.write_text(target.read_text(encoding="utf-8") + EXTRA_SECTION, encoding="utf-8")
    docs_only, docs_out = _build(model, docs, key, work / "docs.fpk", cache)
    unchanged, _ = _build(model, docs, key, work / "same.fpk", cache)
    stages = next((ln for ln in docs_out.splitlines() if ln.startswith("stage seconds:")), "")
    return {"cold_s": cold, "docs_only_s": docs_only, "unchanged_s": unchanged,
            "ratio_docs_only_over_cold": docs_only / cold, "ratio_unchanged_over_cold": unchanged / cold,
            "docs_only_stages": stages,
            "cold_stages": next((ln for ln in cold_out.splitlines() if ln.startswith("stage seconds:")), "")}


def run(out: Path, *, quick: bool = False) -> dict[str, Any]:
    """Run the build-cache benchmark; writes ``build_cache.json`` and ``build_cache.png`` into ``out``."""
    info = C.machine_info()
    model = C.bench_checkpoint(quick)
    work = Path(tempfile.mkdtemp(prefix="bench-build-", dir=C.cache_root()))
    try:
        figures = measure(model, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {"family": FAMILY, "quick": quick, "machine": info, "model": model.name, **figures}
    C.write_result(out, FAMILY, doc, lambda fig: draw(fig, doc), figsize=(6, 3.2))
    return doc


def draw(fig: Any, doc: dict[str, Any]) -> None:
    ax = fig.subplots(1, 1)
    ax.bar(["cold build", "docs-only rebuild", "unchanged rebuild"],
           [doc["cold_s"], doc["docs_only_s"], doc["unchanged_s"]], color=["#888", "#37a", "#59c"])
    ax.set(ylabel="s (wall, process start to exit)", title="fieldpack build with the stage cache")
    ax.grid(axis="y", alpha=0.3)


def summarize(doc: dict[str, Any]) -> list[str]:
    lines = ["## Build cache (demo docs, `fieldpack build` wall time)", ""]
    lines += C.md_table(["build", "seconds", "ratio to cold"], [
        ["cold (empty cache)", doc["cold_s"], 1.0],
        ["docs-only change", doc["docs_only_s"], doc["ratio_docs_only_over_cold"]],
        ["unchanged", doc["unchanged_s"], doc["ratio_unchanged_over_cold"]],
    ])
    return lines + ["", f"Docs-only rebuild, {doc['docs_only_stages']}.", ""]


if __name__ == "__main__":
    root = Path(tempfile.mkdtemp(prefix="bench-build-"))
    try:
        print(measure(Path(sys.argv[1]), root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
