"""Peak memory and time of the distillation loss: chunked (what the trainer runs) against the loss computed whole.

Run from the repository root::

    python -m benchmarks.kd_memory --batch 4 --seq 256 --vocab 262144

Each variant runs in its own process (peak RSS only grows, so one process cannot measure two): it makes random
student logits (with grad) and teacher logits of ``(batch, seq, vocab)`` float32, computes the KD loss at
``alpha`` 1 / ``T`` 1 (the heal's settings), and backpropagates to the student logits. It prints each variant's
peak RSS above the inputs (bytes of memory the loss itself needs), seconds for forward + backward, and the
chunked/whole ratios, measured in the same run. Gemma 3's vocabulary is 262,144 tokens; the build's heal runs
batch 4 x 256 tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _child(variant: str, batch: int, seq: int, vocab: int, threads: int) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    from fieldpack.builder.adapt.distill import kd_loss

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    student = torch.randn(batch, seq, vocab, generator=g).requires_grad_(True)
    teacher = torch.randn(batch, seq, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if variant == "chunked":
        loss = kd_loss(student, teacher, labels, alpha=1.0, temperature=1.0)
    else:  # the plain formula over the whole tensor (what distill.kd_loss computed before it was chunked)
        s, t, m = student[:, :-1], teacher[:, :-1], labels[:, 1:] != -100
        log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
        loss = ((log_pt.exp() * (log_pt - log_ps)).sum(-1) * m).sum() / m.sum()
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"loss": float(loss), "seconds": seconds, "peak_above_inputs_bytes": peak - base}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (the build's heal: 4)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence (the build's heal: 256)")
    ap.add_argument("--vocab", type=int, default=262_144,
                    help="vocabulary size (Gemma 3: 262,144); at shapes of one chunk (2^25 logits) or less the "
                         "checkpointing's fixed cost dominates and the ratios mean nothing")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--child", choices=["whole", "chunked"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(a.child, a.batch, a.seq, a.vocab, a.threads)))
        return 0
    res = {}
    for variant in ("whole", "chunked"):
        out = subprocess.run([sys.executable, "-m", "benchmarks.kd_memory", "--child", variant, "--batch",
                              str(a.batch), "--seq", str(a.seq), "--vocab", str(a.vocab), "--threads",
                              str(a.threads)], check=True, capture_output=True, text=True)
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    logits = a.batch * a.seq * a.vocab * 4
    print(f"KD loss, logits ({a.batch}, {a.seq}, {a.vocab}) float32 = {logits / 2**30:.2f} GiB per tensor")
    print(f"{'variant':8} {'peak above inputs':>18} {'x logits':>9} {'fwd+bwd s':>10} {'loss':>10}")
    for v, r in res.items():
        print(f"{v:8} {r['peak_above_inputs_bytes'] / 2**30:15.2f} GiB {r['peak_above_inputs_bytes'] / logits:9.2f} "
              f"{r['seconds']:10.2f} {r['loss']:10.5f}")
    w, c = res["whole"], res["chunked"]
    print(f"chunked / whole: memory {c['peak_above_inputs_bytes'] / w['peak_above_inputs_bytes']:.3f}x, "
          f"time {c['seconds'] / w['seconds']:.2f}x, |loss difference| {abs(c['loss'] - w['loss']):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
