"""Run a QA set against one or more bundles: retrieval quality per mode, answer quality, latency.

For each bundle (a ``.fpk`` file, an installed slot folder, or a device data dir whose active slot is used):

1. open it: a ``.fpk`` is unpacked into a temp folder with every member's sha256 checked as it streams
   (:meth:`shared.bundle.BundleReader.extract_to`), after its signature is checked when trusted keys are given;
   a slot folder has its members re-hashed against its ``manifest.json``;
2. load :class:`device.runtime.Runtime` on it;
3. per answerable question and per retrieval mode (``vector``, ``bm25``, ``hybrid``): top-``k`` chunks,
   the rank of the first chunk matching the question's :class:`~device.evaluate.qa.Target`, and the wall time
   of the call (ms, after one warm-up query per mode);
4. unless ``generate=False``, per question: :meth:`Runtime.answer` with the bundle's defaults.

Metrics (definitions in :mod:`device.evaluate.metrics`; relevance in :mod:`device.evaluate.qa`):

* retrieval, over answerable items, one target per question (repeat hits of the target collapsed):
  ``recall@1/5/10`` (target in the top k), ``mrr`` (reciprocal rank of the target within the top ``k``, 0 if
  absent), ``ndcg@10`` (binary gain, log2 discount); the target is what ``expected_source`` names (a document,
  or ``path#section``). ``page`` holds the page-level figures: the chunk ranking is turned into a page
  ranking (distinct ``source`` values in order of their best chunk, :func:`metrics.page_ranking`), and a page
  is relevant when it is the expected document or one of the item's ``also_ok`` pages. ``section`` holds
  the same figures at section level over the items that name a section (``expected_section`` or ``#``), with ``section.document_level`` the document-level figures of those items;
* ``citation_precision``: over answerable items that were *answered* (not abstained), the share whose answer
  cites, with an in-text marker ``[n]`` (also ``[n, m]``), at least one source ``n`` whose document is the
  expected one. An answer with no marker cites nothing. ``cited_marker_precision`` is the micro share of
  distinct cited markers that point to the expected document; ``context_recall`` the share of answered items
  whose prompt sources (``Answer.sources``) include it;
* ``abstention_accuracy``: over unanswerable items, the share where the system abstained; an answer
  abstains when the runtime's relevance gate refused (``Answer.abstained``) or the generated text declines
  (it contains one of :data:`DECLINE_PHRASES`, case-insensitively); ``false_abstention_rate``: the same
  judgement over answerable items;
* ``gate`` (measured with or without generation, no model run): the share of answerable items the device's
  relevance gate refuses (``refused_answerable``, a floor under ``false_abstention_rate``) and of unanswerable
  ones (``refused_unanswerable``), asked on their own at the bundle's ``min_similarity``
  (:meth:`device.runtime.Runtime.gate`), so the quick retrieval-only run shows the refusals a device will make;
* ``answer_contains_rate``: over answerable items with ``answer_contains`` facts, the share whose answer
  contains all of them (case-insensitive, whitespace collapsed); ``answer_contains_share``: the mean share of
  facts found;
* latency percentiles p50/p95 (ms): retrieval per mode, and for answers the runtime's own retrieval time,
  time to first token (retrieval + prompt eval + first decode) and total.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.errors import InputNotFoundError, IntegrityError, UsageError

from fieldpack.device.evaluate import metrics as M
from fieldpack.device.evaluate.qa import QAItem, QASet, Target, load_qa

log = logging.getLogger(__name__)

#: Retrieval modes of :meth:`device.runtime.Runtime.retrieve`, in report order.
MODES: tuple[str, ...] = ("vector", "bm25", "hybrid")
#: Rank cutoffs reported for recall (those above ``k`` are dropped).
RECALL_CUTOFFS: tuple[int, ...] = (1, 5, 10)
#: nDCG cutoff (capped at ``k``).
NDCG_CUTOFF = 10
#: Lower-cased phrases that make a generated answer count as declining (the prompt asks the model to "say
#: that the documents do not answer it"; the runtime's own refusal says "cannot answer").
DECLINE_PHRASES: tuple[str, ...] = ("cannot answer", "can't answer", "do not answer", "does not answer",
                                    "don't answer", "doesn't answer", "documents do not", "sources do not",
                                    "no relevant information")
#: Format version of the JSON report (bump on an incompatible change).
REPORT_VERSION = 1

_CITE_RE = re.compile(r"\[(\s*\d+(?:\s*[,;]\s*\d+)*\s*)\]")

ProgressFn = Callable[[str, int, int], None]  # (bundle label, questions done, questions total)


@dataclass(frozen=True)
class EvalOptions:
    """What to measure.

    Attributes:
        k: chunks retrieved per mode for the retrieval metrics (>= 1).
        modes: retrieval modes to judge, a subset of :data:`MODES`.
        generate: also run the full answer per question (slow: one generation each).
        trusted_keys: public key files; when given, a ``.fpk``'s signature must verify against one of them.
        answer_k: chunks given to the model when answering; ``None``: the manifest's ``top_k_chunks``.
        max_tokens: answer length cap (tokens); ``None``: the manifest's default.
        n_ctx: context length (tokens); ``None``: the manifest's default.
        threads: llama.cpp / ONNX Runtime threads; ``None``: physical cores.
        workdir: where ``.fpk`` files are unpacked (a temp folder inside it, removed afterwards).
        strict_sources: refuse (UsageError, before any question is asked) a QA set whose ``expected_source``
            names a document the bundle does not hold; otherwise each such item is warned about and scores 0.
        split: judge only the items of this ``split`` (``"dev"`` / ``"unseen"``); ``None``: all items.
    """

    k: int = 10
    modes: tuple[str, ...] = MODES
    generate: bool = True
    trusted_keys: tuple[Path, ...] = ()
    answer_k: int | None = None
    max_tokens: int | None = None
    n_ctx: int | None = None
    threads: int | None = None
    workdir: Path | None = None
    strict_sources: bool = False
    split: str | None = None

    def __post_init__(self) -> None:
        if self.k < 1:
            raise UsageError(f"--k {self.k} is not a positive number of chunks", hint="use e.g. --k 10")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise UsageError(f"unknown retrieval mode(s) {bad or '(none)'}", hint=f"use some of {', '.join(MODES)}")


@dataclass
class QuestionResult:
    """Everything measured for one question on one bundle (JSON-ready via :meth:`to_dict`)."""

    id: str
    question: str
    unanswerable: bool
    target: str | None
    has_section: bool
    retrieval: dict[str, dict[str, Any]] = field(default_factory=dict)
    answer: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    """``{"passes": bool, "best_similarity": float | None}``: the device's relevance gate on this question
    (:meth:`device.runtime.Runtime.gate`), measured without generating."""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "question": self.question, "unanswerable": self.unanswerable, "target": self.target,
                "retrieval": self.retrieval, "gate": self.gate, "answer": self.answer}


@dataclass
class BundleEval:
    """Results of one bundle: identity, aggregate metrics and per-question details."""

    label: str
    path: str
    opened: str
    info: dict[str, Any]
    retrieval: dict[str, dict[str, Any]]
    generation: dict[str, Any] | None
    questions: list[QuestionResult]
    seconds: float
    unmatched_sources: list[str] = field(default_factory=list)
    """``"id: expected_source"`` of items whose expected document is not in this bundle (they score 0)."""
    gate: dict[str, Any] | None = None
    """The relevance gate without generation (:func:`aggregate_gate`)."""

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "path": self.path, "opened": self.opened, "info": self.info,
                "retrieval": self.retrieval, "gate": self.gate, "generation": self.generation,
                "seconds": round(self.seconds, 3),
                "unmatched_sources": self.unmatched_sources, "questions": [q.to_dict() for q in self.questions]}


@dataclass
class EvalReport:
    """One eval run over one QA set and one or more bundles (the JSON report is :meth:`to_dict`)."""

    qa_path: str
    qa_sha256: str
    n_questions: int
    n_unanswerable: int
    options: dict[str, Any]
    bundles: list[BundleEval]
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).replace(microsecond=0).isoformat())

    def to_dict(self) -> dict[str, Any]:
        return {"report_version": REPORT_VERSION, "created_at": self.created_at,
                "qa": {"path": self.qa_path, "sha256": self.qa_sha256, "questions": self.n_questions,
                       "unanswerable": self.n_unanswerable},
                "options": self.options, "bundles": [b.to_dict() for b in self.bundles]}


# --- opening bundles ---------------------------------------------------------------------------------------
def _verify_dir(slot_dir: Path) -> None:
    """Re-hash every member listed in ``slot_dir/manifest.json``. Raises IntegrityError naming the member."""
    from fieldpack.shared.bundle import hash_file

    from fieldpack.device.runtime import read_slot_manifest

    manifest = read_slot_manifest(slot_dir)
    for m in manifest.members:
        try:
            size, digest = hash_file(slot_dir / m.name)
        except OSError as exc:
            raise IntegrityError(f"{slot_dir}: member {m.name} is missing or unreadable ({exc.strerror})",
                                 hint="reinstall the bundle, or evaluate the .fpk file instead") from exc
        if size != m.size or digest != m.sha256:
            raise IntegrityError(f"{slot_dir}: member {m.name} does not match its sha256 in manifest.json",
                                 hint="reinstall the bundle, or evaluate the .fpk file instead")


def open_slot(bundle: Path, scratch: Path, trusted_keys: Sequence[Path] = ()) -> tuple[Path, str]:
    """Make ``bundle`` loadable by :class:`device.runtime.Runtime`.

    Args:
        bundle: a ``.fpk`` file; an unpacked slot folder (holds ``manifest.json``); or a device data dir
            (holds ``state.json``: its active slot is used).
        scratch: an empty folder a ``.fpk`` is unpacked into.
        trusted_keys: public key files; when given, the ``.fpk``'s signature must verify against one of them.

    Returns:
        ``(slot folder, how it was opened: one line for the report)``.

    Raises:
        InputNotFoundError: ``bundle`` does not exist, or is a folder that is neither a slot nor a data dir.
        BundleFormatError, ManifestError, UnsupportedFormatVersion, UnsafeMemberError: not a valid bundle.
        SignatureError: trusted keys given and the signature does not verify.
        IntegrityError: a member's sha256 differs.
        NoActiveBundleError: a data dir with nothing installed.
        SigningKeyError: a trusted key file cannot be read.
    """
    bundle = Path(bundle)
    if bundle.is_dir():
        from fieldpack.device.slots import STATE_FILE, open_data_dir

        if (bundle / STATE_FILE).is_file():
            slot = open_data_dir(bundle).require_active_slot_path()
            _verify_dir(slot)
            return slot, f"active slot {slot.name} of data dir {bundle}, members re-hashed"
        if (bundle / fmt.MANIFEST_NAME).is_file():
            _verify_dir(bundle)
            return bundle, f"slot folder {bundle}, members re-hashed"
        raise InputNotFoundError(f"{bundle} is a folder but neither an installed slot (no {fmt.MANIFEST_NAME}) "
                                 f"nor a device data dir (no {STATE_FILE})",
                                 hint="pass a .fpk file, a slot folder, or a data dir")
    if not bundle.exists():
        raise InputNotFoundError(f"bundle {bundle} does not exist", hint="check the path to the .fpk file")
    from fieldpack.shared.atomic import atomic_write_bytes
    from fieldpack.shared.bundle import BundleReader
    from fieldpack.shared.signing import load_public_key

    keys = [load_public_key(Path(k)) for k in trusted_keys]
    with BundleReader(bundle) as reader:
        how = f"{bundle}: member sha256 checked while unpacking"
        if keys:
            key = reader.verify_signature(keys)
            how += f", signature by {key.key_id} verified"
        else:
            how += ", signature not checked (no --trust)"
        reader.extract_to(scratch)
        atomic_write_bytes(scratch / fmt.MANIFEST_NAME, reader.manifest_bytes)
    return scratch, how


# --- per question --------------------------------------------------------------------------------------------
def cited_numbers(text: str, n_sources: int) -> list[int]:
    """Distinct source numbers cited in ``text`` as ``[n]``, ``[n, m]`` or ``[n; m]``, in order of first
    citation, keeping only 1..n_sources (a marker beyond the sources given cites nothing)."""
    out: list[int] = []
    for m in _CITE_RE.finditer(text):
        for part in re.split(r"[,;]", m.group(1)):
            n = int(part)
            if 1 <= n <= n_sources and n not in out:
                out.append(n)
    return out


def declines(text: str) -> bool:
    """True when a generated answer says the documents do not answer (see :data:`DECLINE_PHRASES`)."""
    t = M.normalize_text(text)
    return any(p in t for p in DECLINE_PHRASES)


def _retrieval_row(rt: Any, item: QAItem, mode: str, k: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    hits = rt.retrieve(item.question, k=k, mode=mode)
    ms = (time.perf_counter() - t0) * 1e3
    row: dict[str, Any] = {"latency_ms": ms, "n_hits": len(hits),
                           "top": [f"{h.source}#{h.section}" if h.section else h.source for h in hits[:3]]}
    if item.target is not None:
        doc = item.target.document()
        row["rank"] = M.first_relevant_rank([item.target.matches(h.source, h.section) for h in hits])
        row["doc_rank"] = M.first_relevant_rank([doc.matches(h.source, h.section) for h in hits])
        row["page_rank"] = M.first_relevant_rank([item.page_matches(p) for p in M.page_ranking([h.source for h in hits])])
    if item.section_target is not None:
        row["section_rank"] = M.first_relevant_rank([item.section_target.matches(h.source, h.section)
                                                     for h in hits])
    return row


def _answer_row(rt: Any, item: QAItem, opts: EvalOptions) -> dict[str, Any]:
    ans = rt.answer(item.question, k=opts.answer_k, max_tokens=opts.max_tokens)
    cited = cited_numbers(ans.text, len(ans.sources))
    row: dict[str, Any] = {
        "text": ans.text,
        "gate_abstained": ans.abstained,
        "abstained": ans.abstained or declines(ans.text),
        "finish_reason": ans.finish_reason,
        "cited": cited,
        "sources": [h.source for h in ans.sources],
        "timings": ans.timings.to_dict(),
    }
    if item.target is not None:
        doc = item.target.document()
        good = [n for n in cited if doc.source_matches(ans.sources[n - 1].source)]
        row["cited_expected"] = bool(good)
        row["cited_relevant"] = len(good)
        row["context_has_expected"] = any(doc.source_matches(h.source) for h in ans.sources)
    if item.answer_contains:
        row["contains_all"] = M.contains_all(ans.text, item.answer_contains)
        row["contains_share"] = M.contains_share(ans.text, item.answer_contains)
    return row


# --- aggregation ---------------------------------------------------------------------------------------------
def _rank_metrics(ranks: list[int | None], k: int) -> dict[str, Any]:
    """Recall@c, MRR and nDCG from first-relevant ranks within the top ``k`` (one target per question)."""
    out: dict[str, Any] = {"n": len(ranks)}
    if not ranks:
        return out
    lists = [[r is not None and i + 1 == r for i in range(k)] for r in ranks]
    for c in sorted({c for c in RECALL_CUTOFFS if c <= k} | {k}):
        out[f"recall@{c}"] = M.mean(M.recall_at_k(rel, c) for rel in lists)
    out["mrr"] = M.mean(M.reciprocal_rank(rel) for rel in lists)
    nd = min(NDCG_CUTOFF, k)
    out[f"ndcg@{nd}"] = M.mean(M.ndcg_at_k(rel, nd, n_relevant=1) for rel in lists)
    out["recall_curve"] = M.recall_curve(ranks, k)
    return out


def aggregate_retrieval(results: Sequence[QuestionResult], mode: str, k: int) -> dict[str, Any]:
    """Metrics of one retrieval mode over the answerable questions of ``results`` (see the module doc)."""
    rows = [q.retrieval[mode] for q in results if mode in q.retrieval]
    judged = [(q, q.retrieval[mode]) for q in results if mode in q.retrieval and not q.unanswerable]
    out = _rank_metrics([r["rank"] for _, r in judged], k)
    page = _rank_metrics([r.get("page_rank") for _, r in judged], k)
    page.pop("recall_curve", None)
    out["page"] = page
    sec = [r["section_rank"] for q, r in judged if q.has_section]
    if sec:
        s = _rank_metrics(sec, k)
        s.pop("recall_curve", None)
        s["document_level"] = _rank_metrics([r["doc_rank"] for q, r in judged if q.has_section], k)
        s["document_level"].pop("recall_curve", None)
        out["section"] = s
    out["latency_ms"] = M.latency_summary([r["latency_ms"] for r in rows])
    return out


def aggregate_gate(results: Sequence[QuestionResult], min_similarity: float | None) -> dict[str, Any]:
    """The device's relevance gate over ``results``, without generation: ``refused_answerable`` (share of
    answerable questions it refuses: the least false abstention a device shows), ``refused_unanswerable`` (share
    of unanswerable ones it refuses: its abstention accuracy before any generated decline), the counts, and the
    bundle's ``min_similarity`` (cosine)."""
    judged = [q for q in results if q.gate is not None]
    answerable = [q for q in judged if not q.unanswerable]
    unans = [q for q in judged if q.unanswerable]
    return {"min_similarity": min_similarity,
            "answerable": len(answerable), "unanswerable": len(unans),
            "refused_answerable": M.rate(not q.gate["passes"] for q in answerable),
            "refused_unanswerable": M.rate(not q.gate["passes"] for q in unans),
            "refused_answerable_ids": [q.id for q in answerable if not q.gate["passes"]]}


def aggregate_generation(results: Sequence[QuestionResult]) -> dict[str, Any]:
    """Answer-quality and latency figures over the questions that were answered (see the module doc)."""
    done = [q for q in results if q.answer is not None]
    answerable = [q for q in done if not q.unanswerable]
    answered = [q for q in answerable if not q.answer["abstained"]]
    unans = [q for q in done if q.unanswerable]
    with_facts = [q for q in answerable if "contains_all" in q.answer]
    n_cited = sum(len(q.answer["cited"]) for q in answered)
    tm = [q.answer["timings"] for q in done]
    generated = [t for q, t in zip(done, tm) if not q.answer["gate_abstained"]]
    return {
        "n": len(done),
        "answerable": len(answerable),
        "answered": len(answered),
        "unanswerable": len(unans),
        "citation_precision": M.rate(q.answer["cited_expected"] for q in answered),
        "cited_marker_precision": (sum(q.answer["cited_relevant"] for q in answered) / n_cited) if n_cited else None,
        "answers_with_citation": M.rate(bool(q.answer["cited"]) for q in answered),
        "context_recall": M.rate(q.answer["context_has_expected"] for q in answered),
        "abstention_accuracy": M.rate(q.answer["abstained"] for q in unans),
        "false_abstention_rate": M.rate(q.answer["abstained"] for q in answerable),
        "gate_abstention_accuracy": M.rate(q.answer["gate_abstained"] for q in unans),
        "answer_contains_rate": M.rate(q.answer["contains_all"] for q in with_facts),
        "answer_contains_share": M.mean(q.answer["contains_share"] for q in with_facts),
        "latency_ms": {
            "retrieval": M.latency_summary([t["retrieval_ms"] for t in tm]),
            "time_to_first_token": M.latency_summary([t["time_to_first_token_ms"] for t in generated]),
            "prompt_eval": M.latency_summary([t["prompt_eval_ms"] for t in generated]),
            "total": M.latency_summary([t["total_ms"] for t in generated]),
        },
        "tokens_per_s": M.mean(t["tokens_per_s"] for t in generated if t["tokens_per_s"] > 0),
        "completion_tokens": M.mean(t["completion_tokens"] for t in generated),
    }


# --- driver --------------------------------------------------------------------------------------------------
def _bundle_info(rt: Any) -> dict[str, Any]:
    m = rt.manifest
    return {"name": m.name, "version": m.version, "model": m.model.source, "architecture": m.model.architecture,
            "parameters": m.model.parameter_count, "file_type": m.model.file_type,
            "embedder": m.embedder.name, "embedder_precision": m.embedder.precision,
            "documents": m.index.documents, "chunks": m.index.chunks, "chunk_tokens": m.index.chunk_tokens,
            "n_ctx": rt.n_ctx, "threads": rt.threads, "top_k_chunks": m.runtime.top_k_chunks,
            "min_similarity": m.runtime.min_similarity}


def evaluate_slot(slot_dir: Path, qa: QASet, opts: EvalOptions, *, path: str = "", opened: str = "",
                  on_progress: ProgressFn | None = None) -> BundleEval:
    """Evaluate the bundle unpacked in ``slot_dir`` on ``qa``.

    Raises:
        RuntimeLoadError: the runtime cannot load the slot. QueryError subclasses do not escape: a question
            the runtime refuses is recorded as abstained with ``error`` set.
    """
    from fieldpack.shared.errors import QueryError

    from fieldpack.device.runtime import Runtime

    t0 = time.perf_counter()
    results: list[QuestionResult] = []
    with Runtime(slot_dir, n_ctx=opts.n_ctx, threads=opts.threads) as rt:
        label = rt.bundle_label
        documents = rt.documents()
        unmatched = [f"{item.id}: {item.target.document().source}" for item in qa.items
                     if item.target is not None and not any(item.target.document().source_matches(d) for d in documents)]
        if unmatched and opts.strict_sources:
            from fieldpack.shared.errors import UsageError

            raise UsageError(f"{len(unmatched)} QA item(s) expect a document that {label} does not hold "
                             f"(first: {unmatched[0]})",
                             hint="fix expected_source in the QA file (paths relative to the docs folder of the "
                                  "build), or evaluate a bundle built with those documents")
        for u in unmatched:  # scores 0; the report's unmatched_sources carries it (the CLI warns once for all)
            log.info("%s: expected_source of item %s is no document of this bundle (it holds %d documents); "
                     "the item scores 0", label, u, len(documents))
        for mode in opts.modes:  # warm-up: first-call costs (page cache, ORT arenas) stay out of the percentiles
            rt.retrieve(qa.items[0].question, k=opts.k, mode=mode)
        total = len(qa.items)
        for i, item in enumerate(qa.items):
            q = QuestionResult(id=item.id, question=item.question, unanswerable=item.unanswerable,
                               target=str(item.target) if item.target else None,
                               has_section=item.section_target is not None)
            for mode in opts.modes:
                q.retrieval[mode] = _retrieval_row(rt, item, mode, opts.k)
            try:
                passes, best = rt.gate(item.question, k=opts.answer_k)
                q.gate = {"passes": passes, "best_similarity": None if best is None else round(best, 4)}
            except QueryError as exc:  # e.g. a question too long for the bundle: refused as in answer()
                q.gate = {"passes": False, "best_similarity": None, "error": str(exc)}
            if opts.generate:
                try:
                    q.answer = _answer_row(rt, item, opts)
                except QueryError as exc:
                    log.warning("%s: question %s refused: %s", label, item.id, exc)
                    q.answer = {"text": "", "gate_abstained": True, "abstained": True, "finish_reason": "error",
                                "error": str(exc), "cited": [], "sources": [], "timings": {
                                    "retrieval_ms": 0.0, "time_to_first_token_ms": 0.0, "prompt_eval_ms": 0.0,
                                    "total_ms": 0.0, "tokens_per_s": 0.0, "completion_tokens": 0},
                                "cited_expected": False, "cited_relevant": 0, "context_has_expected": False}
            results.append(q)
            if on_progress:
                on_progress(label, i + 1, total)
        info = _bundle_info(rt)
    retrieval = {mode: aggregate_retrieval(results, mode, opts.k) for mode in opts.modes}
    generation = aggregate_generation(results) if opts.generate else None
    return BundleEval(label=label, path=path or str(slot_dir), opened=opened, info=info, retrieval=retrieval,
                      generation=generation, questions=results, seconds=time.perf_counter() - t0,
                      unmatched_sources=unmatched, gate=aggregate_gate(results, info.get("min_similarity")))


def evaluate(bundles: Sequence[Path], qa_path: Path, opts: EvalOptions | None = None, *,
             on_progress: ProgressFn | None = None) -> EvalReport:
    """Evaluate each bundle on the QA set at ``qa_path`` (steps and metrics in the module doc).

    Args:
        bundles: ``.fpk`` files, slot folders or data dirs (see :func:`open_slot`); at least one.
        qa_path: the QA JSON Lines file (format in :mod:`device.evaluate.qa`).
        opts: what to measure; default :class:`EvalOptions`.
        on_progress: called after each question with (bundle label, done, total).

    Returns:
        An :class:`EvalReport`, bundles in the order given.

    Raises:
        UsageError: no bundle given, bad options, or a malformed QA file (names the line).
        InputNotFoundError: the QA file or a bundle is missing (checked before any bundle is opened).
        BundleError subclasses: a bundle cannot be trusted (see :func:`open_slot`).
        RuntimeLoadError: a bundle's runtime cannot load.
    """
    opts = opts or EvalOptions()
    if not bundles:
        raise UsageError("no bundle to evaluate", hint="pass one or more .fpk files or installed slot folders")
    qa = load_qa(qa_path).only_split(opts.split)
    for b in bundles:  # fail before the slow part, naming the first missing one
        if not Path(b).exists():
            raise InputNotFoundError(f"bundle {b} does not exist", hint="check the path to the .fpk file")
    evals: list[BundleEval] = []
    for b in bundles:
        with tempfile.TemporaryDirectory(prefix="fieldpack-eval-", dir=opts.workdir) as tmp:
            slot, how = open_slot(Path(b), Path(tmp) / "slot", opts.trusted_keys)
            log.info("evaluating %s (%s) on %d questions", b, how, len(qa.items))
            evals.append(evaluate_slot(slot, qa, opts, path=str(b), opened=how, on_progress=on_progress))
    options = {"k": opts.k, "modes": list(opts.modes), "generate": opts.generate, "answer_k": opts.answer_k,
               "max_tokens": opts.max_tokens, "n_ctx": opts.n_ctx, "threads": opts.threads,
               "signature_checked": bool(opts.trusted_keys), "split": opts.split}
    return EvalReport(qa_path=str(qa.path), qa_sha256=qa.sha256, n_questions=len(qa.items),
                      n_unanswerable=len(qa.unanswerable), options=options, bundles=evals)


__all__ = ["EvalOptions", "EvalReport", "BundleEval", "QuestionResult", "evaluate", "evaluate_slot", "open_slot",
           "aggregate_retrieval", "aggregate_gate", "aggregate_generation", "cited_numbers", "declines", "MODES", "Target"]
