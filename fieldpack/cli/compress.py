"""Compression commands: ``fieldpack plan``. Module-level imports: typer only (the work is in builder.compress)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def plan(
    model: Path = typer.Option(..., "--model", help="local Hugging Face checkpoint folder"),
    docs: Path = typer.Option(..., "--docs", help="folder of the documents the bundle will answer from"),
    exclude: Optional[list[str]] = typer.Option(None, "--exclude", metavar="GLOB", help="glob of files or folders under --docs not "
                                                "to use, as build's --exclude (repeatable)"),
    device_ram: str = typer.Option(..., "--device-ram", help="RAM the device gives fieldpack, e.g. 4GiB, 512MiB"),
    min_tokens_per_s: float = typer.Option(..., "--min-tokens-per-s", help="slowest acceptable decode speed (tokens/s)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="llama.cpp threads for timing (the device's cores)"),
    n_ctx: int = typer.Option(2048, "--n-ctx", min=128, help="context length on the device (tokens), for the KV cache"),
    out: Path = typer.Option(Path("plan.png"), "--out", help="PNG of quality vs size with the Pareto front"),
    quants: str = typer.Option("F16,Q8_0,Q6_K,Q5_K_M,Q4_K_M,Q4_0", "--quants", help="comma-separated quant types"),
    prunes: str = typer.Option("none,depth,width", "--prunes", help="structured pruning candidates: none, depth, "
                               "width, depth+heal, width+heal (+heal: KD from the unpruned model, as --heal kd)"),
    heal_steps: Optional[int] = typer.Option(None, "--heal-steps", min=1,
                                             help="optimizer steps of the +heal candidates (default: the build's)"),
    imatrix_quants: str = typer.Option("Q4_K_M", "--imatrix-quants", help="quant types also tried with a domain imatrix ('' for none)"),
    embd_quants: str = typer.Option("Q4_K_M:Q4_K", "--embd-quants", help="MIX:TYPE pairs also tried with token_embd "
                                    "and output in TYPE (--embd-type/--output-type; '' for none)"),
    quantizers: str = typer.Option("Q4_0+gptq,Q4_K_M+awq", "--quantizers",
                                   help="calibrated candidates TYPE+gptq|awq on the unpruned model ('' for none)"),
    json_out: bool = typer.Option(False, "--json", help="print the plan as JSON"),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="build cache: conversions, pruned bases and "
                                             "measured candidates are kept there and reused by a rerun or a plan "
                                             "stopped half-way (default ~/.cache/fieldpack/build, as build's)"),
    no_cache: bool = typer.Option(False, "--no-cache", help="measure everything again; reuse and keep nothing"),
) -> None:
    """Measure size, memory, quality and speed of compression candidates here; propose the best that fits."""
    import json

    from fieldpack.builder.compress.plan import format_plan, make_plan, parse_size
    from fieldpack.builder.pipeline import quiet_third_party

    quiet_third_party()  # no third-party progress bars or warnings in the plan's output

    def split(s: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in s.split(",") if x.strip())

    from fieldpack.cli.console import console as make_console
    from fieldpack.cli.usage import INTERRUPT_EXIT, explain_interrupt
    from fieldpack.shared.interrupts import SIGTERM_EXIT, interrupts_that_stick

    from fieldpack.builder.stages.cache import default_cache_dir

    err = make_console(stderr=True)
    steps: list[str] = []
    cache = None if no_cache else (cache_dir or default_cache_dir())

    def show(what: str) -> None:
        steps.append(what)
        err.print(f"plan: {what}", markup=False, highlight=False)

    finished: set[str] = set()

    def reused(what: str) -> None:
        steps.append(what)
        finished.add(what)
        err.print(f"plan: {what} (cached)", markup=False, highlight=False)

    try:
        with interrupts_that_stick():
            result = make_plan(model, docs, device_ram_bytes=parse_size(device_ram),
                               min_tokens_per_s=min_tokens_per_s, threads=threads, n_ctx=n_ctx, out_png=out,
                               quants=split(quants), prunes=split(prunes), imatrix_quants=split(imatrix_quants),
                               embd_quants=_pairs(split(embd_quants)), quantizers=split(quantizers),
                               heal_steps=heal_steps, on_step=show, exclude=tuple(exclude or ()),
                               cache_dir=cache, on_cached=reused, on_done=finished.add)
    except (KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, SystemExit) and exc.code != SIGTERM_EXIT:
            raise
        # a signal just after a step finished (its entry kept) stops the plan between steps, not "while" it
        where = (f"{'after' if steps[-1] in finished else 'while'} {steps[-1]}" if steps else "before the first step")
        kept = (f"; the steps it finished are kept in the build cache {cache} and a rerun reuses them"
                if cache is not None else "")
        err.print(f"plan stopped {where}; no plan was written, its temporary files are removed{kept}",
                  markup=False, highlight=False)
        explain_interrupt()
        raise typer.Exit(INTERRUPT_EXIT if isinstance(exc, KeyboardInterrupt) else SIGTERM_EXIT) from None
    if json_out:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(format_plan(result))
        typer.echo(f"wrote {result.png}")
    if cache is not None and result.steps_cached:
        err.print(f"plan: {result.steps_cached} of {result.steps} steps reused from the build cache {cache} "
                  "(speeds as measured then; --no-cache measures everything again)", markup=False, highlight=False)


def _pairs(items: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``("Q4_K_M:Q4_K",)`` -> ``(("Q4_K_M", "Q4_K"),)``. Raises UsageError for an item without one ``:``."""
    from fieldpack.shared.errors import UsageError

    out = []
    for item in items:
        mix, sep, typ = item.partition(":")
        if not sep or not mix or not typ or ":" in typ:
            raise UsageError(f"--embd-quants {item!r} is not MIX:TYPE", hint="write it like Q4_K_M:Q4_K")
        out.append((mix.strip(), typ.strip()))
    return tuple(out)


def register(root: typer.Typer) -> None:
    """Add ``plan`` to the root app."""
    root.command("plan")(plan)
