"""What MQTT adds to an answer, and what a burst of requests gets. Not a test: prints figures, writes JSON.

1. Round trip over loopback Mosquitto versus the same question through the engine directly: time to first
   token and to the final reply (median and p95 over ``--n`` rounds, each one direct answer then one over
   MQTT, so changes in machine load hit both alike). Also the final's transport time: round trip minus the
   engine's own time inside the daemon (what broker, daemon and client add, without the engine running
   slower beside the MQTT threads on a busy machine). Target: < 5 ms added.
2. ``--burst`` requests fired at once at one device with a bounded queue: answered, busy, lost (no final
   reply within ``--burst-timeout`` seconds). Target: 0 lost.

The engine is the real runtime of an installed bundle (``--data-dir``), or by default a local stand-in that
streams ``--tokens`` pieces ``--token-ms`` apart, which isolates the transport cost. The broker is
``--broker`` or a Mosquitto started here on free loopback ports (needs the ``mosquitto`` package).

    .venv/bin/python benchmarks/mqtt_bench.py [--data-dir DIR] [--n 50] [--burst 100] [--out bench/mqtt_bench.json]
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
import json
import logging
import os
from pathlib import Path
import platform
import statistics
import sys
import tempfile
import threading
import time
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fieldpack.device.mqtt import BrokerSettings, DaemonConfig, MqttDaemon, Requester  # noqa: E402
from fieldpack.device.types import Answer, AnswerEngine, Timings  # noqa: E402

QUESTION = "The connection pool is exhausted. What should I do?"


class StandInEngine:
    """Streams ``n_tokens`` fixed pieces ``token_s`` seconds apart; no retrieval, no model. Honours cancel."""

    bundle_label = "bench@0.0.0"

    def __init__(self, n_tokens: int, token_s: float) -> None:
        self.n_tokens, self.token_s = n_tokens, token_s

    def answer(
        self,
        question: str,
        *,
        on_token: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Answer:
        t0 = time.perf_counter()
        pieces = [f" tok{i}" for i in range(self.n_tokens)]
        for piece in pieces:
            if cancel is not None and cancel.is_set():
                break
            if self.token_s:
                time.sleep(self.token_s)
            if on_token is not None:
                on_token(piece)
        total = (time.perf_counter() - t0) * 1000
        timings = Timings(completion_tokens=len(pieces), total_ms=total, decode_ms=total)
        return Answer(question, "".join(pieces), [], False, timings, self.bundle_label)


class _Fixed:
    def __init__(self, engine: AnswerEngine) -> None:
        self.engine = engine

    def get(self) -> AnswerEngine:
        return self.engine

    def close(self) -> None:
        pass


def _summary(values_ms: list[float]) -> dict[str, float]:
    ordered = sorted(values_ms)
    p95 = ordered[max(0, int(round(0.95 * len(ordered))) - 1)]
    return {"median": statistics.median(ordered), "p95": p95, "mean": statistics.fmean(ordered), "n": len(ordered)}


def _direct_once(engine: AnswerEngine) -> tuple[float, float]:
    """(first token, answer) through ``engine.answer`` itself, milliseconds."""
    t0 = time.perf_counter()
    seen: list[float] = []
    engine.answer(QUESTION, on_token=lambda _p: seen.append(time.perf_counter()) if not seen else None)
    end = time.perf_counter()
    return ((seen[0] if seen else end) - t0) * 1000, (end - t0) * 1000


def _mqtt_once(requester: Requester, device: str) -> tuple[float, float, float]:
    """(first partial, final reply, final minus the engine's own time) after publishing the request,
    milliseconds. The last is the transport: broker, daemon dispatch, queue and publishing, client decoding.
    (No such split for the first token: engines report their time to first token from different points.)"""
    pending = requester.submit(QUESTION, device=device)
    final = pending.wait(600)
    if final is None or not final.ok or pending.final_at is None:
        raise RuntimeError(f"request {pending.id} failed: {final}")
    requester.forget(pending)
    end = pending.final_at
    total = (end - pending.sent_at) * 1000
    engine_ms = final.timings.total_ms if final.timings else 0.0
    return ((pending.first_partial_at or end) - pending.sent_at) * 1000, total, total - engine_ms


def paired(engine: AnswerEngine, requester: Requester, device: str, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``n`` rounds of one direct answer then one over MQTT, interleaved so that changes in machine load hit
    both alike. Returns the direct and the MQTT summaries."""
    d_first, d_total, m_first, m_total, m_transport = [], [], [], [], []
    for _ in range(n):
        first, total = _direct_once(engine)
        d_first.append(first)
        d_total.append(total)
        first, total, transport = _mqtt_once(requester, device)
        m_first.append(first)
        m_total.append(total)
        m_transport.append(transport)
    direct = {"first_token_ms": _summary(d_first), "final_ms": _summary(d_total)}
    mqtt = {
        "first_token_ms": _summary(m_first),
        "final_ms": _summary(m_total),
        "final_transport_ms": _summary(m_transport),
    }
    return direct, mqtt


def burst(requester: Requester, device: str, count: int, timeout_s: float) -> dict[str, Any]:
    """Fire ``count`` requests at once; count the final replies by kind."""
    t0 = time.perf_counter()
    pendings = [requester.submit(f"{QUESTION} #{i}", device=device) for i in range(count)]
    deadline = time.monotonic() + timeout_s
    for p in pendings:
        p.wait(max(0.0, deadline - time.monotonic()))
    answered = sum(1 for p in pendings if p.final is not None and p.final.ok)
    busy = sum(1 for p in pendings if p.final is not None and p.final.error is not None and p.final.error.code == "busy")
    other = sum(1 for p in pendings if p.final is not None and not p.final.ok) - busy
    lost = sum(1 for p in pendings if p.final is None)
    busy_ms = [((p.final_at or 0) - p.sent_at) * 1000 for p in pendings if p.final and p.final.error is not None]
    return {
        "requests": count,
        "answered": answered,
        "busy": busy,
        "other_errors": other,
        "lost": lost,
        "wall_s": time.perf_counter() - t0,
        "busy_reply_ms": _summary(busy_ms) if busy_ms else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", help="mqtt://host:port of a running broker (default: start a local Mosquitto)")
    parser.add_argument("--username")
    parser.add_argument("--password-file", type=Path)
    parser.add_argument("--data-dir", type=Path, help="device data dir with an installed bundle (real engine)")
    parser.add_argument("--n", type=int, default=50, help="sequential requests per measurement")
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--burst-timeout", type=float, default=120.0)
    parser.add_argument("--queue-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="stand-in engine: pieces per answer")
    parser.add_argument("--token-ms", type=float, default=0.0, help="stand-in engine: milliseconds per piece")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "mqtt_bench.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    with ExitStack() as stack:
        if args.broker:
            settings = BrokerSettings.from_options(args.broker, username=args.username, password_file=args.password_file)
            broker_desc = settings.url
        else:
            from tests.mqtt_broker import MosquittoBroker  # test helper: real Mosquitto on free loopback ports

            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mqtt-bench-")))
            broker = stack.enter_context(MosquittoBroker(workdir))
            settings = broker.settings()
            broker_desc = f"local mosquitto {settings.url}"
        if args.data_dir:
            from fieldpack.device.provider import ActiveBundleProvider
            from fieldpack.device.slots import open_data_dir

            provider: Any = ActiveBundleProvider(open_data_dir(args.data_dir))
            engine_desc = "runtime"
        else:
            provider = _Fixed(StandInEngine(args.tokens, args.token_ms / 1000))
            engine_desc = f"stand-in ({args.tokens} pieces, {args.token_ms} ms apart)"
        engine = provider.get()
        device = f"bench-{os.getpid()}"
        daemon = MqttDaemon(DaemonConfig(device, queue_size=args.queue_size), provider, settings)
        daemon.start()
        stack.callback(daemon.stop)
        if not daemon.wait_ready(30):
            raise SystemExit(f"daemon did not connect to {settings.url}")
        requester = stack.enter_context(Requester(settings))
        paired(engine, requester, device, 2)  # warm-up (model load, prompt cache, code paths)
        base, mqtt = paired(engine, requester, device, args.n)
        flood = burst(requester, device, args.burst, args.burst_timeout)

    added = {
        key: {stat: mqtt[key][stat] - base[key][stat] for stat in ("median", "p95")} for key in ("first_token_ms", "final_ms")
    }
    report = {
        "benchmark": "mqtt",
        "broker": broker_desc,
        "engine": engine_desc,
        "bundle": engine.bundle_label,
        "host": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "n": args.n,
        "direct": base,
        "mqtt": mqtt,
        "added_ms": added,
        "ratio_final": mqtt["final_ms"]["median"] / max(base["final_ms"]["median"], 1e-9),
        "target_added_ms": 5.0,
        "burst": dict(flood, queue_size=args.queue_size),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, args.out)

    print(f"engine: {engine_desc} [{engine.bundle_label}]   broker: {broker_desc}   n={args.n}")
    print(f"{'':22}{'direct':>12}{'over MQTT':>12}{'added':>10}")
    for key, label in (("first_token_ms", "first token (median)"), ("final_ms", "final (median)")):
        print(f"{label:22}{base[key]['median']:>10.2f}ms{mqtt[key]['median']:>10.2f}ms{added[key]['median']:>8.2f}ms")
        print(f"{'  p95':22}{base[key]['p95']:>10.2f}ms{mqtt[key]['p95']:>10.2f}ms{added[key]['p95']:>8.2f}ms")
    t = mqtt["final_transport_ms"]
    print(f"{'final - engine time':22}{'':>12}{t['median']:>10.2f}ms   p95 {t['p95']:.2f} ms (broker + daemon + client)")
    first_added = added["first_token_ms"]["median"]
    verdict = "OK" if first_added < 5.0 and t["median"] < 5.0 else "ABOVE TARGET"
    print(
        f"MQTT adds {first_added:.2f} ms to the first token and {t['median']:.2f} ms of transport to the final "
        f"reply (median; target < 5 ms: {verdict}); the rest of the final's "
        f"{added['final_ms']['median']:+.2f} ms is the engine running slower beside the MQTT threads"
    )
    f = flood
    print(
        f"burst of {f['requests']} (queue {args.queue_size}): answered {f['answered']}, busy {f['busy']}, "
        f"other errors {f['other_errors']}, lost {f['lost']} (target 0) in {f['wall_s']:.2f} s"
    )
    print(f"wrote {args.out}")
    return 0 if f["lost"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
