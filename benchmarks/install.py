"""Install and cold start: ``device.install`` vs ``sha256sum`` + ``tar -x`` of the same file; process start to
first answer vs a bare llama-cpp-python script.

* Install: :func:`device.install.install_bundle` into a fresh data dir (signature check, per-member sha256 in a
  verify pass, then unpack with a second sha256 pass, fsync of every file and folder, state switch), without
  and with the post-install runtime check (model + embedder load, smoke question, one decode step). Baseline:
  ``sha256sum BUNDLE`` then ``tar -xf BUNDLE -C DIR`` (one hash of the whole file, no fsync). Median of 3,
  alternating, page cache warm for both.
* Cold start: wall time from spawning ``python -m fieldpack ask Q --data-dir D`` to the first byte of the
  answer on stdout (unbuffered) and to exit; baseline: a Python script that imports llama_cpp, loads the same
  GGUF with the same n_ctx/threads and streams the first token of a completion. Median of 3 after one
  discarded run of each (page cache warm, as on a device after install: "cold" is the process, not the disk).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common as C

log = logging.getLogger(__name__)

FAMILY = "install"
QUESTION = "The connection pool is exhausted. What should I do?"

_RAW_SCRIPT = r"""
import sys
import llama_cpp
from fieldpack.shared.llama_backend import llama_cpp_module

Llama = llama_cpp_module(llama_cpp).Llama
llm = Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]),
            n_threads_batch=int(sys.argv[3]), n_batch=512, verbose=False, seed=0)
for chunk in llm.create_completion(sys.argv[4], max_tokens=16, temperature=0.0, stream=True):
    sys.stdout.write(chunk["choices"][0]["text"] or "")
    sys.stdout.flush()
"""


def _first_byte_and_exit(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Spawn ``cmd``; seconds to its first stdout byte and to its exit. Raises RuntimeError on failure."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=C.REPO)
    assert p.stdout is not None
    first = p.stdout.read(1)
    t_first = time.perf_counter()
    _rest, err = p.communicate(timeout=600)
    t_exit = time.perf_counter()
    if p.returncode != 0 or not first:
        raise RuntimeError(f"{cmd[:4]} failed ({p.returncode}): {err.decode(errors='replace')[-2000:]}")
    return t_first - t0, t_exit - t0


def run(out: Path, *, quick: bool = False) -> dict[str, Any]:
    """Run the install/cold-start benchmark; writes ``install.json`` and ``install.png`` into ``out``."""
    from fieldpack.device.install import install_bundle
    from fieldpack.device.runtime import check_slot
    from fieldpack.device.slots import init_data_dir

    info = C.machine_info()
    threads = C.bench_threads()
    b = C.bench_bundle(quick)
    bundle, pub = b["bundle"], b["pub"]
    size = bundle.stat().st_size
    reps = 2 if quick else 3
    ours, ours_checked, base = [], [], []
    work = Path(tempfile.mkdtemp(prefix="bench-install-", dir=C.cache_root()))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        bundle.read_bytes()  # page cache warm for everyone
        for i in range(reps):
            dd = init_data_dir(work / f"dd{i}", [pub])
            _, s = C.timed(lambda: install_bundle(bundle, dd, check=None))
            ours.append(s)
            d = work / f"tar{i}"
            d.mkdir()

            def baseline() -> None:
                subprocess.run(["sha256sum", str(bundle)], check=True, capture_output=True)
                subprocess.run(["tar", "-xf", str(bundle), "-C", str(d)], check=True, capture_output=True)

            _, s = C.timed(baseline)
            base.append(s)
            shutil.rmtree(d)
            if i < reps - 1:
                shutil.rmtree(work / f"dd{i}")
        final_dd = work / "dd-checked"
        dd = init_data_dir(final_dd, [pub])
        _, s = C.timed(lambda: install_bundle(bundle, dd, check=check_slot))
        ours_checked.append(s)

        slot = dd.active_slot_path()
        if slot is None:
            raise RuntimeError(f"install into {final_dd} left no active slot")
        n_ctx = 1024
        ask_cmd = [sys.executable, "-m", "fieldpack", "ask", QUESTION, "--data-dir", str(final_dd),
                   "--max-tokens", "16", "--threads", str(threads), "--n-ctx", str(n_ctx)]
        raw_cmd = [sys.executable, "-c", _RAW_SCRIPT, str(slot / "model.gguf"), str(n_ctx), str(threads), QUESTION]
        cold, raw = [], []
        for i in range(reps + 1):  # run 0 warms the page cache (libraries, model): discarded
            c, r = _first_byte_and_exit(ask_cmd, env), _first_byte_and_exit(raw_cmd, env)
            if i:
                cold.append(c)
                raw.append(r)
        _, py_s = C.timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "family": FAMILY, "quick": quick, "machine": info, "threads": threads, "bundle_bytes": size, "reps": reps,
        "install": {"fieldpack_s": C.median(ours), "fieldpack_runs_s": ours,
                    "fieldpack_with_check_s": ours_checked[0],
                    "sha256sum_tar_s": C.median(base), "sha256sum_tar_runs_s": base,
                    "ratio_fieldpack_over_baseline": C.median(ours) / C.median(base),
                    "fieldpack_mb_per_s": size / C.median(ours) / 1e6, "baseline_mb_per_s": size / C.median(base) / 1e6},
        "cold_start": {"fieldpack_ask_first_byte_s": C.median([c[0] for c in cold]),
                       "fieldpack_ask_exit_s": C.median([c[1] for c in cold]),
                       "raw_llama_first_byte_s": C.median([r[0] for r in raw]),
                       "raw_llama_exit_s": C.median([r[1] for r in raw]),
                       "python_startup_s": py_s,
                       "ratio_first_byte": C.median([c[0] for c in cold]) / C.median([r[0] for r in raw])},
    }
    C.write_result(out, FAMILY, doc, lambda fig: draw(fig, doc), figsize=(10, 3.4))
    return doc


def draw(fig: Any, doc: dict[str, Any]) -> None:
    a, b = fig.subplots(1, 2)
    i = doc["install"]
    a.bar(["fieldpack install", "+ runtime check", "sha256sum + tar -x"],
          [i["fieldpack_s"], i["fieldpack_with_check_s"], i["sha256sum_tar_s"]], color=["#37a", "#59c", "#888"])
    a.set(ylabel="s", title=f"install a {doc['bundle_bytes'] / 2**20:.0f} MiB bundle")
    c = doc["cold_start"]
    b.bar(["fieldpack ask", "raw llama-cpp script"], [c["fieldpack_ask_first_byte_s"], c["raw_llama_first_byte_s"]],
          label="to first answer byte", color=["#37a", "#888"])
    b.bar(["fieldpack ask", "raw llama-cpp script"],
          [c["fieldpack_ask_exit_s"] - c["fieldpack_ask_first_byte_s"], c["raw_llama_exit_s"] - c["raw_llama_first_byte_s"]],
          bottom=[c["fieldpack_ask_first_byte_s"], c["raw_llama_first_byte_s"]], color=["#9bd", "#ccc"],
          label="rest until exit")
    b.set(ylabel="s", title="process start to answer")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)


def summarize(doc: dict[str, Any]) -> list[str]:
    i, c = doc["install"], doc["cold_start"]
    lines = [f"## Install and cold start ({doc['bundle_bytes'] / 2**20:.0f} MiB bundle, median of {doc['reps']})", ""]
    lines += C.md_table(["figure", "fieldpack", "baseline", "ratio"], [
        ["install: verify + unpack (s)", i["fieldpack_s"], i["sha256sum_tar_s"], i["ratio_fieldpack_over_baseline"]],
        ["install incl. runtime check (s)", i["fieldpack_with_check_s"], "–", "–"],
        ["throughput (MB/s)", i["fieldpack_mb_per_s"], i["baseline_mb_per_s"], "–"],
        ["process start to first answer byte (s)", c["fieldpack_ask_first_byte_s"], c["raw_llama_first_byte_s"],
         c["ratio_first_byte"]],
        ["process start to exit (s)", c["fieldpack_ask_exit_s"], c["raw_llama_exit_s"], "–"],
    ])
    return lines + ["", f"Baselines: `sha256sum` + `tar -x` (one hash, no fsync); a bare llama-cpp-python script "
                        f"loading the same GGUF (no embedder, no retrieval). Python startup alone: "
                        f"{C.fmt(c['python_startup_s'])} s.", ""]
