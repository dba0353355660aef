"""The adaptation training path on a GPU: LoRA DAPT, then depth pruning and KD healing from the unpruned model,
on a randomly initialised Gemma-3-270M-shaped model, with tokens/s on CUDA against the same steps on the CPU.

Run from the repository root (needs only torch, transformers, peft, accelerate, numpy, pydantic; no weights, no
Debian documents: the text is the repository's own, byte-tokenized)::

    python3 -m benchmarks.adapt_gpu                          # CUDA (exits 2 with one line when there is none)
    python3 -m benchmarks.adapt_gpu --device cpu --steps 2   # smoke test on a CPU

What runs is the builder's code (:func:`fieldpack.builder.adapt.adapt_model`: PEFT LoRA, the transformers
Trainer, the KD loss, held-out PPL/KLD, the merge; :func:`~fieldpack.builder.compress.structured.prune_depth`).
With 10 steps or more it asserts the DAPT and heal losses fall (mean of the last tenth of the steps below the
first tenth) and that healing moves the pruned model towards the unpruned one (KL falls); it prints one JSON line per phase and a
summary with ``cuda_vs_cpu`` (tokens/s ratio for the same batch shape).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.adapt_gpu")

#: Gemma 3 270M's shape (google/gemma-3-270m config.json).
GEMMA3_270M = dict(vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=512, max_position_embeddings=32_768, tie_word_embeddings=True)
#: ids 0..2 are pad / eos / bos; a byte b is token b + 3
PAD, EOS, BOS, BYTE0 = 0, 1, 2, 3


def _ensure_fieldpack() -> None:
    """Import ``fieldpack.*`` from this checkout when the package is not installed (a bare GPU machine):
    the folders at the top of the repository are its subpackages (pyproject.toml's package-dir)."""
    try:
        import fieldpack.builder.adapt  # noqa: F401
        return
    except ImportError:
        pass
    for name, folder in (("fieldpack", "fieldpack"), ("fieldpack.shared", "shared"), ("fieldpack.builder", "builder"),
                         ("fieldpack.retrieval", "retrieval")):
        spec = importlib.util.spec_from_file_location(name, REPO / folder / "__init__.py",
                                                      submodule_search_locations=[str(REPO / folder)])
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)


class ByteTokenizer:
    """What the training code needs of a tokenizer: pad and EOS ids (text is byte-encoded here)."""

    pad_token_id = PAD
    eos_token_id = EOS


def repo_text() -> str:
    """The repository's own prose and code (README, demo documents, builder sources), a few hundred KB."""
    parts = [REPO / "README.md", *sorted((REPO / "demo" / "docs").rglob("*.*")), *sorted((REPO / "builder").rglob("*.py")),
             *sorted((REPO / "shared").rglob("*.py"))]
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in parts if p.is_file())


def byte_blocks(text: str, seq_len: int) -> list[Any]:
    """``Example`` blocks of ``seq_len`` byte tokens (BOS first), labels = inputs."""
    from fieldpack.builder.adapt.data import Example

    ids = [BYTE0 + b for b in text.encode("utf-8")]
    body = seq_len - 1
    return [Example(input_ids=[BOS] + ids[i:i + body], labels=[BOS] + ids[i:i + body])
            for i in range(0, len(ids) - body + 1, body)]


def make_model(seed: int, layers: int) -> Any:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    pattern = ["sliding_attention"] * 5 + ["full_attention"]
    cfg = Gemma3TextConfig(**{**GEMMA3_270M, "num_hidden_layers": layers},
                           layer_types=[pattern[i % 6] for i in range(layers)],
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
                           pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(cfg).eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--steps", type=int, default=40, help="DAPT steps, and heal steps, on --device")
    p.add_argument("--cpu-steps", type=int, default=2, help="the same DAPT steps timed on the CPU (0: skip)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 8 on cuda, 1 on cpu)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 512 on cuda, 128 on cpu)")
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--drop", type=int, default=4, help="blocks removed before healing")
    p.add_argument("--lr", type=float, default=1e-3)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print(f"error: CUDA is not available to torch {torch.__version__} (cuda build: {torch.version.cuda}). "
              "Fix: run on a host with a CUDA GPU and a CUDA build of torch, or pass --device cpu", file=sys.stderr)
        return 2
    _ensure_fieldpack()
    from fieldpack.builder.adapt import AdaptOptions, adapt_model
    from fieldpack.builder.adapt.lora import attach_lora
    from fieldpack.builder.adapt.train import train
    from fieldpack.builder.compress.structured import prune_depth

    batch = a.batch or (8 if a.device == "cuda" else 1)
    seq = a.seq_len or (512 if a.device == "cuda" else 128)
    threads = os.cpu_count() or 1
    t_start = time.perf_counter()
    blocks = byte_blocks(repo_text(), seq)
    train_b, held = blocks[:-4], blocks[-4:]
    tok = ByteTokenizer()
    base = make_model(0, a.layers)
    dev = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    print(json.dumps({"phase": "setup", "device": dev, "torch": torch.__version__, "batch": batch, "seq_len": seq,
                      "train_blocks": len(train_b), "params": sum(x.numel() for x in base.parameters())}), flush=True)
    opts = AdaptOptions(method="dapt", steps=a.steps, batch_size=batch, seq_len=seq, lr=a.lr, lora_r=16,
                        threads=threads, max_epochs=1000)

    # 1. DAPT (LoRA, next-token loss) on the device
    dense, rep = adapt_model(copy.deepcopy(base), tok, train_b, held, opts, seed=0, method="dapt",
                             train_sha256="-", held_out_sha256="-", device=a.device)
    print(json.dumps({"phase": "dapt", "steps": rep.steps, "tokens": rep.tokens, "seconds": round(rep.seconds, 2),
                      "tokens_per_s": round(rep.tokens_per_s, 1), "loss_first": round(rep.loss_first, 4),
                      "loss_last": round(rep.loss_last, 4), "ppl_before": round(rep.ppl_before, 2),
                      "ppl_after": round(rep.ppl_after, 2)}), flush=True)
    check = a.steps >= 10  # fewer steps (a smoke test) are too few for a loss trend
    assert not check or rep.loss_last < rep.loss_first, f"DAPT loss did not fall: {rep.loss_first:.4f} -> {rep.loss_last:.4f}"

    # 2. prune -> heal: drop blocks by ShortGPT influence, distil from the unpruned (DAPT-merged) model
    student = copy.deepcopy(dense)
    calib = torch.tensor([b.input_ids for b in train_b[:4]])
    with torch.no_grad():
        pr = prune_depth(student, a.drop, calib, device=a.device)
    student.to("cpu")
    hopts = AdaptOptions(teacher=Path("dense"), steps=a.steps, batch_size=batch, seq_len=seq, lr=a.lr,
                         lora_r=16, kd_alpha=1.0, kd_temperature=1.0, threads=threads, max_epochs=1000)
    _, hrep = adapt_model(student, tok, train_b, held, hopts, seed=0, method="heal-kd", teacher_model=dense,
                          train_sha256="-", held_out_sha256="-", device=a.device)
    print(json.dumps({"phase": "heal", "dropped": pr.dropped_blocks, "steps": hrep.steps, "tokens": hrep.tokens,
                      "seconds": round(hrep.seconds, 2), "tokens_per_s": round(hrep.tokens_per_s, 1),
                      "loss_first": round(hrep.loss_first, 4), "loss_last": round(hrep.loss_last, 4),
                      "dense_ppl": round(hrep.teacher_ppl, 2), "pruned_ppl": round(hrep.ppl_before, 2),
                      "healed_ppl": round(hrep.ppl_after, 2), "recovered": hrep.recovered,
                      "kld_before": round(hrep.teacher_kld_before, 4), "kld_after": round(hrep.teacher_kld_after, 4)}),
          flush=True)
    assert not check or hrep.loss_last < hrep.loss_first, f"heal loss did not fall: {hrep.loss_first:.4f} -> {hrep.loss_last:.4f}"
    assert not check or hrep.teacher_kld_after < hrep.teacher_kld_before, "healing did not move the student towards the teacher"

    # 3. the same DAPT steps on the CPU, same batch shape
    summary: dict[str, Any] = {"phase": "summary", "device": dev, "dapt_tokens_per_s": round(rep.tokens_per_s, 1),
                               "heal_tokens_per_s": round(hrep.tokens_per_s, 1)}
    if a.device == "cuda" and a.cpu_steps > 0:
        peft_cpu = attach_lora(copy.deepcopy(base), r=16, alpha=32)
        cpu = train(peft_cpu, train_b, steps=a.cpu_steps, batch_size=batch, lr=a.lr, seed=0, pad_id=PAD,
                    device="cpu", threads=threads, label="dapt-cpu")
        summary.update(cpu_steps=cpu.steps, cpu_threads=threads, cpu_tokens_per_s=round(cpu.tokens_per_s, 1),
                       cuda_vs_cpu=round(rep.tokens_per_s / cpu.tokens_per_s, 1))
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
