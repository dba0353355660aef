"""Domain adaptation on the real model: LoRA continued pretraining (DAPT) and prune -> KD heal, Gemma 3 270M.

Run from the repository root (CPU; keep it short on a shared host)::

    python -m benchmarks.adapt --model PATH/TO/gemma3-270m-hf --steps 40 --heal-steps 40 --threads 2

Prints, against the unadapted model measured in the same run:

* **DAPT**: held-out PPL on the PostgreSQL documents (chunks the training never saw: the build's own
  :func:`~fieldpack.builder.stages.quant.split_eval`) and PPL on general text outside the domain (Debian
  handbook pages), before and after, as ratios (goal: domain <= 0.85, general <= 1.05);
* **heal**: PPL of the dense model, after dropping ``--drop`` of its blocks (ShortGPT block influence, the
  builder's :func:`~fieldpack.builder.compress.structured.prune_depth`) and after KD healing from the dense model;
  the share of the PPL lost to pruning that healing recovered (goal >= 0.6), and the steps it took.

Without ``--model``, the HF checkpoint the tests cache (``$FIELDPACK_TEST_CACHE/gemma3-270m-hf-*/model``) is used.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import DEBIAN_HANDBOOK, POSTGRES_DOCS, REPO

log = logging.getLogger("benchmarks.adapt")


def html_chunks(folder: Path, *, every: int, max_pages: int, chars: int = 1200) -> list[str]:
    """Plain-text chunks (~``chars`` characters, paragraph-aligned) of every ``every``-th HTML page of ``folder``
    (sorted), through the builder's own HTML loader."""
    from fieldpack.builder.ingest.html_loader import load_html

    pages = sorted(folder.rglob("*.html"))[::every][:max_pages]
    out: list[str] = []
    for p in pages:
        buf = ""
        for sec in load_html(p.read_text(encoding="utf-8", errors="replace")):
            for b in sec.blocks:
                buf = f"{buf}\n\n{b.text}" if buf else b.text
                if len(buf) >= chars:
                    out.append(buf)
                    buf = ""
        if len(buf) > 200:
            out.append(buf)
    return out


def find_model() -> Path:
    """The Gemma 3 270M HF checkpoint the tests cache."""
    root = Path(os.environ.get("FIELDPACK_TEST_CACHE", REPO / ".fieldpack-cache" / "tests"))
    found = sorted(root.glob("gemma3-270m-hf-*/model"))
    if not found:
        sys.exit(f"no Gemma 3 270M HF checkpoint under {root}: pass --model (see tests/conftest.py gemma_hf_dir)")
    return found[-1]


def run_dapt(model_dir: Path, a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fieldpack.builder.adapt import AdaptOptions, adapt_model
    from fieldpack.builder.adapt.data import eval_blocks, texts_sha256, token_blocks
    from fieldpack.builder.adapt.train import evaluate
    from fieldpack.builder.stages.quant import split_eval

    domain = html_chunks(POSTGRES_DOCS, every=a.every, max_pages=a.pages)
    general = html_chunks(DEBIAN_HANDBOOK, every=3, max_pages=12)
    calib, held = split_eval(domain, 0.1, 64, 0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    train = token_blocks(calib, tok, a.seq_len, eos_id=tok.eos_token_id)
    held_b = eval_blocks(held, tok, a.seq_len)[:a.eval_blocks]
    gen_b = eval_blocks(general, tok, a.seq_len)[:a.eval_blocks]
    log.info("DAPT: %d domain chunks (%d train blocks), %d held-out blocks, %d general blocks of %d tokens",
             len(domain), len(train), len(held_b), len(gen_b), a.seq_len)
    gen_before = evaluate(model, gen_b, threads=a.threads).ppl
    opts = AdaptOptions(method="dapt", steps=a.steps, batch_size=a.batch, seq_len=a.seq_len, lr=a.lr,
                        lora_r=a.lora_r, threads=a.threads, max_epochs=100)
    merged, rep = adapt_model(model, tok, train, held_b, opts, seed=0, method="dapt",
                              train_sha256=texts_sha256(calib), held_out_sha256=texts_sha256(held))
    gen_after = evaluate(merged, gen_b, threads=a.threads).ppl
    return dict(steps=rep.steps, tokens=rep.tokens, seconds=round(rep.seconds, 1),
                tokens_per_s=round(rep.tokens_per_s, 1), loss_first=round(rep.loss_first, 4),
                loss_last=round(rep.loss_last, 4), domain_ppl_before=round(rep.ppl_before, 3),
                domain_ppl_after=round(rep.ppl_after, 3), domain_ratio=round(rep.ppl_after / rep.ppl_before, 4),
                general_ppl_before=round(gen_before, 3), general_ppl_after=round(gen_after, 3),
                general_ratio=round(gen_after / gen_before, 4), held_out_tokens=rep.eval_tokens)


def run_heal(model_dir: Path, a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fieldpack.builder.adapt import heal_pruned
    from fieldpack.builder.compress.structured import prune_depth
    from fieldpack.builder.stages.quant import split_eval

    domain = html_chunks(POSTGRES_DOCS, every=a.every, max_pages=a.pages)
    calib, held = split_eval(domain, 0.1, 64, 0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    student = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    n_layer = student.config.num_hidden_layers
    ids = torch.tensor([tok("\n\n".join(calib[:8]))["input_ids"][:a.seq_len * 4]]).reshape(4, -1)
    with torch.no_grad():
        pr = prune_depth(student, a.drop, ids, device="cpu")
    log.info("pruned blocks %s of %d", pr.dropped_blocks, n_layer)
    held_cut = held  # eval_blocks inside heal_pruned cut these into seq_len blocks
    healed, rep = heal_pruned(student, model_dir, calib, held_cut, steps=a.heal_steps, seq_len=a.seq_len, seed=0,
                              batch_size=a.batch, lora_r=a.lora_r, threads=a.threads, max_epochs=100,
                              lr=a.heal_lr)
    return dict(dropped=f"{a.drop} of {n_layer}", blocks=pr.dropped_blocks, steps=rep.steps, tokens=rep.tokens,
                seconds=round(rep.seconds, 1), dense_ppl=round(rep.teacher_ppl, 3),
                pruned_ppl=round(rep.ppl_before, 3), healed_ppl=round(rep.ppl_after, 3),
                pruned_ratio=round(rep.ppl_before / rep.teacher_ppl, 4),
                healed_ratio=round(rep.ppl_after / rep.teacher_ppl, 4),
                recovered=round(rep.recovered, 4) if rep.recovered is not None else None,
                kld_before=round(rep.teacher_kld_before, 4), kld_after=round(rep.teacher_kld_after, 4))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--part", choices=("dapt", "heal", "both"), default="both")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--heal-steps", type=int, default=40)
    p.add_argument("--drop", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--heal-lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pages", type=int, default=120, help="PostgreSQL pages read")
    p.add_argument("--every", type=int, default=8, help="take every n-th PostgreSQL page")
    p.add_argument("--eval-blocks", type=int, default=6)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(a.threads)
    model_dir = a.model or find_model()
    res: dict[str, Any] = {"model": str(model_dir), "args": {k: str(v) for k, v in vars(a).items()}}
    t0 = time.perf_counter()
    if a.part in ("dapt", "both"):
        res["dapt"] = run_dapt(model_dir, a)
        print("DAPT", json.dumps(res["dapt"]), flush=True)
    if a.part in ("heal", "both"):
        res["heal"] = run_heal(model_dir, a)
        print("HEAL", json.dumps(res["heal"]), flush=True)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    if a.out:
        from fieldpack.shared.atomic import atomic_write_text

        atomic_write_text(a.out, json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
