"""Eval reports: the JSON document and a self-contained HTML page comparing bundles side by side.

The HTML page has no external reference: CSS is inline and the plots are PNGs embedded as base64 ``data:``
URIs, so it can be mailed or opened on an offline laptop. Plots need matplotlib, which is optional on a
device: without it the page is still written, with every table, and a visible note saying the plots were
left out and how to get them (``pip install matplotlib``). matplotlib is used through its object API
(``Figure`` + Agg canvas), never ``pyplot``, so no global backend state is touched.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fieldpack.shared.atomic import atomic_write_text

from fieldpack.device.evaluate.run import EvalReport

log = logging.getLogger(__name__)

MATPLOTLIB_MISSING = ("plots left out: matplotlib is not installed (pip install matplotlib, or "
                      "pip install 'fieldpack[bench]'); every figure is still in the tables")


def report_json(report: EvalReport | dict[str, Any]) -> str:
    """The report as indented JSON text (UTF-8 safe, non-ASCII kept)."""
    doc = report.to_dict() if isinstance(report, EvalReport) else report
    return json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n"


def write_json(report: EvalReport | dict[str, Any], path: Path) -> Path:
    """Write :func:`report_json` to ``path`` (temp file, fsync, rename). Raises OutputNotWritableError."""
    atomic_write_text(Path(path), report_json(report))
    return Path(path)


# --- plots ---------------------------------------------------------------------------------------------------
def matplotlib_available() -> bool:
    """True when matplotlib can be imported (plots are drawn only then)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _png(draw: Callable[[Any], None], width: float = 7.0, height: float = 3.2) -> str:
    """Draw on a fresh ``Figure`` and return the PNG as a base64 string."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _grouped_bars(ax: Any, groups: list[str], series: dict[str, list[float | None]], ylabel: str,
                  ylim: tuple[float, float] | None = None) -> None:
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, vals) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)


def build_plots(doc: dict[str, Any]) -> dict[str, str]:
    """The report's plots as ``{title: base64 PNG}``. Requires matplotlib (ImportError otherwise)."""
    bundles = doc["bundles"]
    labels = [b["label"] for b in bundles]
    modes = list(doc["options"]["modes"])
    k = int(doc["options"]["k"])
    plots: dict[str, str] = {}

    def quality(fig: Any) -> None:
        axes = fig.subplots(1, 2)
        for ax, metric in zip(axes, ("recall@5" if k >= 5 else f"recall@{k}", "mrr")):
            series = {lab: [b["retrieval"][m].get(metric) for m in modes] for lab, b in zip(labels, bundles)}
            _grouped_bars(ax, modes, series, metric, (0, 1))
            ax.set_title(f"{metric} by retrieval mode", fontsize=9)

    plots["retrieval quality"] = _png(quality)

    def curves(fig: Any) -> None:
        ax = fig.subplots()
        for lab, b in zip(labels, bundles):
            for m in modes:
                curve = b["retrieval"][m].get("recall_curve") or []
                if curve:
                    ax.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3,
                            label=f"{m}" if len(bundles) == 1 else f"{lab} {m}")
        ax.set_xlabel("k (chunks retrieved)")
        ax.set_ylabel("recall@k")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("recall@k curve", fontsize=9)

    plots["recall@k"] = _png(curves)

    def latency(fig: Any) -> None:
        ax = fig.subplots()
        series: dict[str, list[float | None]] = {}
        for lab, b in zip(labels, bundles):
            for q in ("p50", "p95"):
                name = q if len(bundles) == 1 else f"{lab} {q}"
                series[name] = [b["retrieval"][m]["latency_ms"].get(q) for m in modes]
        _grouped_bars(ax, modes, series, "ms")
        ax.set_title("retrieval latency per query", fontsize=9)

    plots["retrieval latency"] = _png(latency)

    gen = [b.get("generation") for b in bundles]
    if any(gen):
        def answers(fig: Any) -> None:
            ax1, ax2 = fig.subplots(1, 2)
            names = ["citation_precision", "context_recall", "answer_contains_rate", "abstention_accuracy",
                     "false_abstention_rate"]
            short = ["citation\nprecision", "context\nrecall", "contains\nall", "abstention\naccuracy",
                     "false\nabstention"]
            series = {lab: [(g or {}).get(n) for n in names] for lab, g in zip(labels, gen)}
            _grouped_bars(ax1, short, series, "share", (0, 1))
            ax1.tick_params(axis="x", labelsize=7)
            ax1.set_title("answer quality", fontsize=9)
            stages = ["retrieval", "time_to_first_token", "total"]
            series2 = {}
            for lab, g in zip(labels, gen):
                for q in ("p50", "p95"):
                    name = q if len(bundles) == 1 else f"{lab} {q}"
                    series2[name] = [((g or {}).get("latency_ms", {}).get(s) or {}).get(q) for s in stages]
            _grouped_bars(ax2, ["retrieval", "first token", "total"], series2, "ms")
            ax2.set_title("answer latency", fontsize=9)

        plots["answers"] = _png(answers, width=9.0)
    return plots


# --- HTML ----------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:80em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right;vertical-align:top}
th:first-child,td:first-child{text-align:left}
.l{text-align:left;display:block}th{background:#f2f2f2}
.note{background:#fff4d6;border:1px solid #e0c060;padding:.5em 1em}
.miss{color:#b00}.hit{color:#070}
img{max-width:100%;border:1px solid #eee;margin:.4em 0}
code{font-size:.95em}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return _e(v)


def _table(header: list[str], rows: list[list[str]], raw: bool = False) -> str:
    head = "".join(f"<th>{h if raw else _e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _retrieval_tables(doc: dict[str, Any]) -> str:
    bundles = doc["bundles"]
    modes = doc["options"]["modes"]
    parts = []
    metric_keys: list[str] = []
    for b in bundles:
        for m in modes:
            for key, v in b["retrieval"][m].items():
                if (key.startswith(("recall@", "ndcg@")) or key == "mrr") and key not in metric_keys:
                    metric_keys.append(key)
    header = ["metric"] + [f"{b['label']} · {m}" for b in bundles for m in modes]
    rows = []
    for key in metric_keys:
        rows.append([_e(key)] + [_fmt(b["retrieval"][m].get(key)) for b in bundles for m in modes])
    for key in ("recall@1", "recall@5", "mrr"):
        if any(key in b["retrieval"][m].get("page", {}) for b in bundles for m in modes):
            rows.append([f"page {key}"] + [_fmt(b["retrieval"][m].get("page", {}).get(key))
                                            for b in bundles for m in modes])
    for q in ("p50", "p95"):
        rows.append([f"latency {q} (ms)"] + [_fmt(b["retrieval"][m]["latency_ms"].get(q), 1)
                                             for b in bundles for m in modes])
    rows.append(["questions judged"] + [_fmt(b["retrieval"][m].get("n")) for b in bundles for m in modes])
    parts.append(_table(header, rows))
    if any("section" in b["retrieval"][m] for b in bundles for m in modes):
        rows = []
        for key in ("recall@1", "recall@5", "mrr"):
            rows.append([f"section {key}"] + [_fmt(b["retrieval"][m].get("section", {}).get(key))
                                               for b in bundles for m in modes])
            rows.append([f"same items, document {key}"] +
                        [_fmt(b["retrieval"][m].get("section", {}).get("document_level", {}).get(key))
                         for b in bundles for m in modes])
        rows.append(["items with a section"] + [_fmt(b["retrieval"][m].get("section", {}).get("n"))
                                                for b in bundles for m in modes])
        parts.append("<p>Section level: a hit counts only when its heading path matches the expected "
                     "section (prefix of the path or of a tail).</p>" + _table(header, rows))
    gated = [b for b in bundles if b.get("gate")]
    if gated:
        rows = [["refused, answerable (false abstention floor)"] + [_fmt(b["gate"]["refused_answerable"]) for b in gated],
                ["refused, unanswerable (abstention)"] + [_fmt(b["gate"]["refused_unanswerable"]) for b in gated],
                ["answerable refused"] + [_e(", ".join(b["gate"]["refused_answerable_ids"]) or "none") for b in gated],
                ["min similarity (cosine)"] + [_fmt(b["gate"]["min_similarity"], 2) for b in gated]]
        parts.append("<p>Relevance gate: what the device refuses before running the model, each question asked on "
                     "its own.</p>" + _table(["gate"] + [_e(b["label"]) for b in gated], rows, raw=True))
    return "".join(parts)


_GEN_ROWS = [
    ("citation_precision", "citation precision"), ("cited_marker_precision", "cited marker precision"),
    ("answers_with_citation", "answers citing a source"), ("context_recall", "context recall"),
    ("answer_contains_rate", "answer contains all facts"), ("answer_contains_share", "facts found (mean share)"),
    ("abstention_accuracy", "abstention accuracy (unanswerable)"),
    ("gate_abstention_accuracy", "… by the retrieval gate alone"),
    ("false_abstention_rate", "false abstention rate (answerable)"), ("tokens_per_s", "decode tokens/s"),
    ("completion_tokens", "completion tokens (mean)"), ("answered", "answerable items answered"),
]


def _generation_table(doc: dict[str, Any]) -> str:
    bundles = [b for b in doc["bundles"] if b.get("generation")]
    if not bundles:
        return "<p>Answers were not generated (<code>--no-generate</code>).</p>"
    rows = [[_e(name)] + [_fmt(b["generation"].get(key)) for b in bundles] for key, name in _GEN_ROWS]
    for stage in ("retrieval", "prompt_eval", "time_to_first_token", "total"):
        for q in ("p50", "p95"):
            rows.append([f"{stage.replace('_', ' ')} {q} (ms)"] +
                        [_fmt((b["generation"]["latency_ms"].get(stage) or {}).get(q), 1) for b in bundles])
    return _table(["metric"] + [b["label"] for b in bundles], rows)


def _questions_table(doc: dict[str, Any]) -> str:
    bundles = doc["bundles"]
    modes = doc["options"]["modes"]
    header = ["id", "question", "target"] + [f"{b['label']} {m} rank" for b in bundles for m in modes]
    if any(b.get("generation") for b in bundles):
        header += [f"{b['label']} answer" for b in bundles]
    rows = []
    for i, q0 in enumerate(bundles[0]["questions"]):
        row = [_e(q0["id"]), f'<span class="l">{_e(q0["question"][:140])}</span>',
               _e(q0["target"] or "(unanswerable)")]
        for b in bundles:
            q = b["questions"][i]
            for m in modes:
                r = q["retrieval"].get(m, {})
                if q["unanswerable"]:
                    row.append("")
                else:
                    rank = r.get("rank")
                    row.append(f'<span class="{"hit" if rank else "miss"}">{rank or "miss"}</span>')
        if any(b.get("generation") for b in bundles):
            for b in bundles:
                a = b["questions"][i].get("answer")
                if not a:
                    row.append("")
                    continue
                bits = ["abstained" if a["abstained"] else f"cites {a['cited'] or 'nothing'}"]
                if "contains_all" in a:
                    bits.append("facts ✓" if a["contains_all"] else "facts ✗")
                row.append(f'<span title="{_e(a["text"][:500])}">{_e(", ".join(bits))}</span>')
        rows.append(row)
    return _table(header, rows)


def render_html(report: EvalReport | dict[str, Any], *, plots: bool = True) -> tuple[str, bool]:
    """Render the self-contained HTML page.

    Args:
        report: the eval report (or its :meth:`EvalReport.to_dict`).
        plots: draw plots when matplotlib is importable.

    Returns:
        ``(html text, whether plots are included)``; when matplotlib is missing the page carries
        :data:`MATPLOTLIB_MISSING` as a visible note.
    """
    doc = report.to_dict() if isinstance(report, EvalReport) else report
    labels = ", ".join(b["label"] for b in doc["bundles"])
    out = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>fieldpack eval: {_e(labels)}</title>"
           f"<style>{_CSS}</style></head><body>",
           f"<h1>fieldpack eval: {_e(labels)}</h1>",
           f"<p>QA set <code>{_e(doc['qa']['path'])}</code> (sha256 {_e(doc['qa']['sha256'][:16])}…): "
           f"{doc['qa']['questions']} questions, {doc['qa']['unanswerable']} unanswerable. "
           f"k = {doc['options']['k']}. Generated {_e(doc['created_at'])}.</p>"]
    rows = []
    for b in doc["bundles"]:
        i = b["info"]
        rows.append([_e(b["label"]), _e(i.get("model")), _e(i.get("file_type")), _fmt(i.get("parameters")),
                     _fmt(i.get("documents")), _fmt(i.get("chunks")),
                     _e(f"{i.get('embedder')} ({i.get('embedder_precision')})"), _fmt(b["seconds"], 1),
                     f'<span class="l">{_e(b["opened"])}</span>'])
    out.append("<h2>Bundles</h2>" + _table(["bundle", "model", "quant", "parameters", "documents", "chunks",
                                             "embedder", "eval s", "opened"], rows))
    drawn = False
    if plots:
        if matplotlib_available():
            figs = build_plots(doc)
            drawn = True
        else:
            log.warning(MATPLOTLIB_MISSING)
            figs = {}
            out.append(f'<p class="note">{_e(MATPLOTLIB_MISSING)}</p>')
    else:
        figs = {}
    out.append("<h2>Retrieval</h2><p>Relevance is judged per question against its expected document "
               "(and section, when the target names one); repeat hits of the same target count once. "
               "recall@k: target within the top k; MRR: 1/rank of the target within the top k; nDCG: binary "
               "gain, log2 discount (Järvelin &amp; Kekäläinen 2002).</p>")
    out.append(_retrieval_tables(doc))
    for title in ("retrieval quality", "recall@k", "retrieval latency"):
        if title in figs:
            out.append(f'<img alt="{_e(title)}" src="data:image/png;base64,{figs[title]}">')
    out.append("<h2>Answers</h2><p>Citation precision: among answerable questions that were answered, the share "
               "whose answer cites (with a [n] marker) a source from the expected document. Abstention accuracy: "
               "share of unanswerable questions where the system abstained (relevance gate or a declining "
               "answer). Facts: <code>answer_contains</code> compared case-insensitively, whitespace "
               "collapsed.</p>")
    out.append(_generation_table(doc))
    if "answers" in figs:
        out.append(f'<img alt="answers" src="data:image/png;base64,{figs["answers"]}">')
    out.append("<h2>Per question</h2><details><summary>show</summary>" + _questions_table(doc) + "</details>")
    out.append("</body></html>\n")
    return "".join(out), drawn


def write_html(report: EvalReport | dict[str, Any], path: Path, *, plots: bool = True) -> bool:
    """Write :func:`render_html` to ``path`` atomically. Returns whether plots are included.

    Raises:
        OutputNotWritableError: ``path`` cannot be written.
    """
    text, drawn = render_html(report, plots=plots)
    atomic_write_text(Path(path), text)
    return drawn
