"""HTTP API overhead: time to first token and decode rate over HTTP vs the Runtime in-process, and vs
llama-cpp-python's own OpenAI server (``llama_cpp.server``) on the same GGUF, in one run.

Three ways to the same greedy generation of the same prompt (a fresh suffix per repetition, so no path gets a
prompt-cache hit the others do not), interleaved, median of ``reps``:

* ``runtime``: ``Runtime.generate`` in this process (what ``fieldpack ask`` runs), first piece via ``on_token``;
* ``fieldpack_http``: ``POST /v1/completions`` with ``stream: true`` on our server (uvicorn, loopback) in its
  own process, as llama_cpp.server runs in its own (the difference is the HTTP path: queue, event loop, SSE);
* ``llama_cpp_server``: the same request to ``python -m llama_cpp.server`` on the same GGUF, n_ctx and threads.

Also grounded: ``/v1/ask`` streamed vs ``Runtime.answer`` (retrieval + prompt + generation).
TTFT is wall time from sending the request to the first text piece the client reads; tok/s is text pieces
after the first over the time after the first (each SSE event is one token in all three servers).

``python -m benchmarks http_api --out bench/`` (the bench bundle), or
``python -m benchmarks.http_api --slot DIR`` for an installed slot (e.g. the tests' tiny-model bundle).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
import socket
import subprocess
import sys
import time
from typing import Any, Callable

from benchmarks import common as C
from fieldpack.shared.llama_backend import llama_server_command

log = logging.getLogger(__name__)

PROMPT = "The operator checks the raw water pumps at the start of every shift and"
QUESTION = "The connection pool is exhausted. What should I do?"


class _SameRuntime:
    """Engine provider handing out one already-loaded Runtime (closed by the benchmark, not the server)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime

    def get(self) -> Any:
        return self.runtime

    def close(self) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stream(client: Any, url: str, body: dict[str, Any], text_of: Callable[[dict[str, Any]], str]) -> tuple[float, float, int]:
    """POST ``body`` with streaming; returns (TTFT ms, tok/s after the first piece, pieces)."""
    t0 = time.perf_counter()
    first = last = None
    pieces = 0
    with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            if text_of(json.loads(line[6:])):
                last = time.perf_counter()
                first = first or last
                pieces += 1
    return _figures(t0, first, last, pieces)


def _figures(t0: float, first: float | None, last: float | None, pieces: int) -> tuple[float, float, int]:
    if first is None or last is None:
        return float("nan"), float("nan"), 0
    rate = (pieces - 1) / (last - first) if pieces > 1 and last > first else float("nan")
    return (first - t0) * 1e3, rate, pieces


def _direct(call: Callable[[Callable[[str], None]], Any]) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    stamps: list[float] = []
    call(lambda piece: stamps.append(time.perf_counter()) if piece else None)
    return _figures(t0, stamps[0] if stamps else None, stamps[-1] if stamps else None, len(stamps))


def _completion_text(chunk: dict[str, Any]) -> str:
    return "".join(c.get("text") or "" for c in chunk.get("choices", []))


def serve_slot(slot: Path, port: int, threads: int) -> None:
    """Our server on an unpacked bundle, in its own process (as llama_cpp.server runs in its own), until killed."""
    import threading

    from fieldpack.device.http.engine import LocalEngineHost
    from fieldpack.device.http.server import HttpConfig, HttpServer
    from fieldpack.device.runtime import Runtime

    host = LocalEngineHost(_SameRuntime(Runtime(slot, threads=threads)), queue_size=4)
    host.start()
    HttpServer(host, HttpConfig(port=port)).start_in_thread()
    threading.Event().wait()


def _start_server(cmd: list[str], port: int) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=C.REPO)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[2]} exited; for llama_cpp.server: pip install 'llama-cpp-python[server]'")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"{cmd[2]} did not start within 300 s")
        time.sleep(0.2)


def measure(slot: Path, *, reps: int, max_tokens: int, threads: int) -> dict[str, Any]:
    """Run the comparison on the bundle unpacked in ``slot``; figures in ms and tokens/s (medians)."""
    import httpx

    from fieldpack.device.runtime import Runtime
    from fieldpack.shared import bundle_format as fmt

    rt = Runtime(slot, threads=threads)
    port = _free_port()
    ours, ours_url = _start_server([sys.executable, "-c", "import sys; from benchmarks.http_api import serve_slot; "
                                    "serve_slot(__import__('pathlib').Path(sys.argv[1]), int(sys.argv[2]), "
                                    "int(sys.argv[3]))", str(slot), str(port), str(threads)], port)
    port = _free_port()
    theirs, theirs_url = _start_server(llama_server_command(
        sys.executable, "--model", str(slot / fmt.MODEL_NAME), "--n_ctx", str(rt.n_ctx), "--n_threads", str(threads),
        "--n_threads_batch", str(threads), "--port", str(port), "--host", "127.0.0.1"), port)
    rows: dict[str, list[tuple[float, float, int]]] = {k: [] for k in
                                                        ("runtime", "fieldpack_http", "llama_cpp_server",
                                                         "runtime_answer", "fieldpack_ask")}
    try:
        with httpx.Client(timeout=600) as client:
            warm = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0.0}
            client.post(ours_url + "/v1/completions", json=warm)
            client.post(theirs_url + "/v1/completions", json=warm)
            for i in range(reps):
                prompt = f"{PROMPT} (shift {i + 1})"
                body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "top_k": 1, "stream": True}
                tokens = rt.tokenize_prompt(prompt)
                rows["runtime"].append(_direct(lambda on: rt.generate(tokens, max_tokens=max_tokens, on_token=on)))
                rows["fieldpack_http"].append(_stream(client, ours_url + "/v1/completions", body, _completion_text))
                rows["llama_cpp_server"].append(_stream(client, theirs_url + "/v1/completions", body,
                                                        _completion_text))
                question = f"{QUESTION} ({i + 1})"
                rows["runtime_answer"].append(_direct(lambda on: rt.answer(question, on_token=on,
                                                                           max_tokens=max_tokens)))
                rows["fieldpack_ask"].append(_stream(client, ours_url + "/v1/ask",
                                                     {"question": question, "stream": True, "max_tokens": max_tokens},
                                                     lambda ev: ev.get("text", "") if ev.get("type") == "token" else ""))
    finally:
        for proc in (ours, theirs):
            proc.terminate()
            proc.wait(30)
        rt.close()
    res: dict[str, Any] = {}
    for name, values in rows.items():
        res[name] = {"ttft_ms": C.median([v[0] for v in values]), "tokens_per_s": C.median([v[1] for v in values]),
                     "pieces": C.median([float(v[2]) for v in values])}
    r, h, l = res["runtime"], res["fieldpack_http"], res["llama_cpp_server"]
    res["ratios"] = {
        "http_added_ttft_ms": h["ttft_ms"] - r["ttft_ms"],
        "http_over_runtime_tokens_per_s": h["tokens_per_s"] / r["tokens_per_s"],
        "fieldpack_http_over_llama_cpp_server_ttft": h["ttft_ms"] / l["ttft_ms"],
        "fieldpack_http_over_llama_cpp_server_tokens_per_s": h["tokens_per_s"] / l["tokens_per_s"],
        "ask_added_ttft_ms": res["fieldpack_ask"]["ttft_ms"] - res["runtime_answer"]["ttft_ms"],
    }
    res.update(reps=reps, max_tokens=max_tokens, threads=threads, n_ctx=rt.n_ctx, slot=str(slot))
    return res


def run(out: Path, *, quick: bool = False) -> dict[str, Any]:
    """Benchmark family entry: the bench bundle; writes ``http_api.json``."""
    doc = measure(C.bench_slot(quick), reps=3 if quick else 7, max_tokens=64 if quick else 128,
                  threads=C.bench_threads())
    doc.update(machine=C.machine_info(), quick=quick)
    C.write_result(out, "http_api", doc, None)
    return doc


def summarize(doc: dict[str, Any]) -> list[str]:
    """Markdown lines for ``summary.md``."""
    rows = [[name, doc[name]["ttft_ms"], doc[name]["tokens_per_s"]] for name in
            ("runtime", "fieldpack_http", "llama_cpp_server", "runtime_answer", "fieldpack_ask")]
    q = doc["ratios"]
    return [f"## HTTP API ({doc['reps']} reps, {doc['max_tokens']} max tokens, {doc['threads']} threads)", "",
            *C.md_table(["path", "TTFT ms (median)", "tok/s (median)"], rows), "",
            f"HTTP adds {C.fmt(q['http_added_ttft_ms'])} ms to the first token over the Runtime; tok/s ratio "
            f"{C.fmt(q['http_over_runtime_tokens_per_s'])}. Against llama_cpp.server on the same GGUF: TTFT ratio "
            f"{C.fmt(q['fieldpack_http_over_llama_cpp_server_ttft'])}, tok/s ratio "
            f"{C.fmt(q['fieldpack_http_over_llama_cpp_server_tokens_per_s'])}. /v1/ask adds "
            f"{C.fmt(q['ask_added_ttft_ms'])} ms over Runtime.answer.", ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.http_api", description=__doc__.splitlines()[0])
    p.add_argument("--slot", type=Path, help="an unpacked bundle (a device slot); default: the bench bundle")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path, help="also write the figures here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    slot = a.slot or C.bench_slot(True)
    doc = measure(slot, reps=a.reps, max_tokens=a.max_tokens, threads=a.threads or C.bench_threads())
    print("\n".join(summarize(doc)))
    if a.json:
        a.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
