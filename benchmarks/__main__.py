"""``python -m benchmarks {all,quality,retrieval,embedder,generation,install} --out DIR [--quick]``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import FAMILIES

log = logging.getLogger("benchmarks")


def write_summary(out: Path) -> Path:
    """Rewrite ``out/summary.md`` from every ``<family>.json`` present in ``out``."""
    from fieldpack.shared.atomic import atomic_write_text

    lines = ["# fieldpack benchmarks", ""]
    machine = None
    for fam in FAMILIES:
        path = out / f"{fam}.json"
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        machine = machine or doc.get("machine")
        mod = importlib.import_module(f"benchmarks.{fam}")
        lines += mod.summarize(doc)
        if (out / f"{fam}.png").is_file():
            lines += [f"![{fam}]({fam}.png)", ""]
        lines += [f"Run: {doc['machine']['date']}, load average {doc['machine']['loadavg_1m']:.2f} at start"
                  + (", --quick sizes" if doc.get("quick") else "") + ".", ""]
    if machine:
        lines[2:2] = [f"Machine: {machine['cpu']}, {machine['physical_cores']} physical cores, "
                      f"{machine['ram_bytes'] / 2**30:.0f} GiB RAM, Python {machine['python']}; "
                      + ", ".join(f"{k} {v}" for k, v in sorted(machine["versions"].items())) + ".", ""]
    path = out / "summary.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("family", choices=("all", *FAMILIES))
    p.add_argument("--out", type=Path, default=Path("bench"), help="folder for JSON, PNG and summary.md")
    p.add_argument("--quick", action="store_true", help="small sizes (minutes, not tens of minutes)")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("benchmarks").setLevel(logging.INFO)
    a.out.mkdir(parents=True, exist_ok=True)
    failed = []
    if a.family == "all":
        # one fresh process per family: torch, ONNX Runtime and llama.cpp thread pools (two OpenMP users in
        # one process) and allocator state from one family must not skew the next one's figures
        for fam in FAMILIES:
            t0 = time.perf_counter()
            log.info("benchmark %s ...", fam)
            cmd = [sys.executable, "-m", "benchmarks", fam, "--out", str(a.out)] + (["--quick"] if a.quick else [])
            rc = subprocess.run(cmd + (["-v"] if a.verbose else [])).returncode
            if rc != 0:  # one family failing must not lose the others' results
                log.error("benchmark %s failed (exit %d)", fam, rc)
                failed.append(fam)
                continue
            log.info("benchmark %s done in %.0f s", fam, time.perf_counter() - t0)
    else:
        t0 = time.perf_counter()
        importlib.import_module(f"benchmarks.{a.family}").run(a.out, quick=a.quick)
        log.info("benchmark %s done in %.0f s", a.family, time.perf_counter() - t0)
    summary = write_summary(a.out)
    print(f"wrote {summary}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
