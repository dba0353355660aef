"""``fieldpack eval``: judge one or more bundles on a QA set (retrieval per mode, answers, latency).

Calls :func:`device.evaluate.evaluate` and renders its report: a rich table on stdout, ``--json`` and
``--html`` files. Device-side only (no torch); imports happen inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer


def _check_writable(path: Optional[Path], option: str) -> None:
    from fieldpack.shared.errors import OutputNotWritableError

    if path is None:
        return
    parent = path.expanduser().resolve().parent
    if not parent.is_dir():
        raise OutputNotWritableError(f"{option} {path}: folder {parent} does not exist",
                                     hint=f"create it or choose another {option} path")
    if path.is_dir():
        raise OutputNotWritableError(f"{option} {path} is a folder", hint=f"give {option} a file name")


def _f(v: Any, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def print_report(doc: dict[str, Any], console: Any = None) -> None:
    """Print an eval report (``EvalReport.to_dict()``) with rich: per bundle a retrieval table (one row per
    mode), then one answers table with a column per bundle."""
    from rich import box
    from rich.table import Table

    from fieldpack.cli.console import console as make_console

    c = console or make_console()
    k = doc["options"]["k"]
    cuts = [f"recall@{x}" for x in (1, 5, 10) if x <= k]
    nd = f"ndcg@{min(10, k)}"
    n = doc["qa"]["questions"] - doc["qa"]["unanswerable"]
    for b in doc["bundles"]:
        t = Table(title=f"{b['label']}: retrieval, {n} answerable question{'' if n == 1 else 's'}, k={k}, latency ms",
                  box=box.SIMPLE_HEAD, title_justify="left")
        for col in ["mode", *[x.replace("recall", "R") for x in cuts], "MRR", nd.replace("ndcg", "nDCG"),
                    "page R@5", "page MRR", "sec R@5", "p50", "p95"]:
            t.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)
        for mode, r in b["retrieval"].items():
            t.add_row(mode, *[_f(r.get(x)) for x in cuts], _f(r.get("mrr")), _f(r.get(nd)),
                      _f(r.get("page", {}).get("recall@5")), _f(r.get("page", {}).get("mrr")),
                      _f(r.get("section", {}).get("recall@5")),
                      _f(r["latency_ms"]["p50"], 1), _f(r["latency_ms"]["p95"], 1))
        c.print(t)
        g = b.get("gate")
        if g and (g["answerable"] or g["unanswerable"]):
            ids = g["refused_answerable_ids"]
            c.print(f"relevance gate (cosine >= {_f(g['min_similarity'], 2)}, no model run): refuses "
                    f"{len(ids)} of {g['answerable']} answerable" + (f" ({', '.join(ids[:8])}"
                                                                     f"{', ...' if len(ids) > 8 else ''})" if ids else "")
                    + (f", {round((g['refused_unanswerable'] or 0) * g['unanswerable'])} of {g['unanswerable']} "
                       "unanswerable" if g["unanswerable"] else ""), markup=False, highlight=False)
    gens = [(b["label"], b["generation"]) for b in doc["bundles"] if b.get("generation")]
    if not gens:
        return
    t = Table(title="answers", box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("metric", no_wrap=True)
    for label, _ in gens:
        t.add_column(label, justify="right")

    def lat(g: dict[str, Any], stage: str) -> str:
        x = g["latency_ms"][stage]
        return f"{_f(x['p50'], 0)} / {_f(x['p95'], 0)}"

    for name, get in [
        ("citation precision", lambda g: _f(g["citation_precision"])),
        ("context recall", lambda g: _f(g["context_recall"])),
        ("answer contains all facts", lambda g: _f(g["answer_contains_rate"])),
        ("abstention accuracy", lambda g: _f(g["abstention_accuracy"])),
        ("false abstention rate", lambda g: _f(g["false_abstention_rate"])),
        ("first token ms p50 / p95", lambda g: lat(g, "time_to_first_token")),
        ("total ms p50 / p95", lambda g: lat(g, "total")),
        ("decode tokens/s", lambda g: _f(g["tokens_per_s"], 1)),
    ]:
        t.add_row(name, *[get(g) for _, g in gens])
    c.print(t)


def eval_cmd(
    bundles: list[Path] = typer.Argument(..., help=".fpk file(s), installed slot folder(s) or device data dir(s)"),
    qa: Path = typer.Option(..., "--qa", help="QA set: JSON Lines with question, expected_source[#section], "
                                              "answer_contains, unanswerable"),
    html: Optional[Path] = typer.Option(None, "--html", help="write a self-contained HTML report here"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="write the full JSON report here"),
    k: int = typer.Option(10, "--k", min=1, max=100, help="chunks retrieved per mode for recall/MRR/nDCG"),
    no_generate: bool = typer.Option(False, "--no-generate", help="retrieval metrics only (no answers)"),
    trust: list[Path] = typer.Option([], "--trust", help="public key(s): also check each .fpk's signature"),
    modes: str = typer.Option("vector,bm25,hybrid", "--modes", help="comma-separated retrieval modes"),
    answer_k: Optional[int] = typer.Option(None, "--answer-k", min=1, max=100, help="chunks given to the model (default: bundle's)"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="answer length cap (tokens)"),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", min=128, help="context length (tokens)"),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="threads (default: physical cores)"),
    split: Optional[str] = typer.Option(None, "--split", help="only the items of this split of a development set "
                                                             "(dev or unseen)"),
    strict: bool = typer.Option(False, "--strict", help="fail (exit 2) when an expected_source names no document "
                                                        "of a bundle"),
) -> None:
    """Evaluate bundle(s) on a QA set: recall@1/5/10, MRR, nDCG@10 per retrieval mode (chunk level, and page level
    counting also_ok pages); citation precision,
    abstention, answer facts; latency p50/p95."""
    from fieldpack.device.evaluate.report import MATPLOTLIB_MISSING, report_json, write_html, write_json
    from fieldpack.device.evaluate.run import EvalOptions, evaluate

    _check_writable(html, "--html")
    _check_writable(json_out, "--json")
    opts = EvalOptions(k=k, modes=tuple(m.strip() for m in modes.split(",") if m.strip()),
                       generate=not no_generate, trusted_keys=tuple(trust), answer_k=answer_k,
                       max_tokens=max_tokens, n_ctx=n_ctx, threads=threads,
                       strict_sources=strict, split=split)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fieldpack.cli.console import console as make_console

    err = make_console(stderr=True)
    if not err.is_terminal:  # no live display into a pipe or file: stderr stays for the one-line error
        report = evaluate(list(bundles), qa, opts)
    else:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=err, transient=True) as progress:
            tasks: dict[str, Any] = {}

            def on_progress(label: str, done: int, total: int) -> None:
                if label not in tasks:
                    tasks[label] = progress.add_task(f"eval {label}", total=total)
                progress.update(tasks[label], completed=done)

            report = evaluate(list(bundles), qa, opts, on_progress=on_progress)
    doc = report.to_dict()
    unmatched = [(b["label"], u) for b in doc["bundles"] for u in b.get("unmatched_sources", [])]
    if unmatched:
        err.print(f"warning: {len(unmatched)} QA item(s) name an expected_source that is no document of the bundle "
                  f"and score 0: " + "; ".join(f"{lab} {u}" for lab, u in unmatched[:10]), markup=False, highlight=False)
    if json_out == Path("-"):
        typer.echo(report_json(doc), nl=False)
    else:
        print_report(doc)
        if json_out is not None:
            write_json(doc, json_out)
            err.print(f"wrote {json_out}")
    if html is not None:
        drawn = write_html(doc, html)
        err.print(f"wrote {html}" + ("" if drawn else f" ({MATPLOTLIB_MISSING})"))


def register(root: typer.Typer) -> None:
    """Add ``fieldpack eval`` to the root app."""
    root.command("eval")(eval_cmd)
