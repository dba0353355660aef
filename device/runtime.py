"""The device runtime: one owner for the native resources of an installed bundle, and the answering path.

:class:`Runtime` owns exactly three native handles, loaded once and closed together on :meth:`Runtime.close`
(or when the daemon swaps bundles): the llama.cpp model/context (``llama_cpp.Llama``), the ONNX Runtime
session of the embedder, and the SQLite connection of the index (inside :class:`retrieval.search.Retriever`).

Answering (:meth:`Runtime.answer`): embed the question with the bundle's ONNX embedder; hybrid retrieval
(sqlite-vec cosine kNN + FTS5 BM25, fused by reciprocal rank fusion); abstain without generating when nothing
is relevant enough; otherwise build a prompt in the bundle's prompt format (chat template, chat template without
system role, or plain completion for base models) inside ``n_ctx - max_tokens`` tokens (:mod:`device.prompt`), and generate greedily with llama.cpp, streaming, stopping at the model's EOS/EOT
(llama.cpp's end-of-generation set) and the manifest's stop strings.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fieldpack.device.options import MIN_PROMPT_TOKENS, check_answer_options, check_n_ctx, check_threads
from fieldpack.device.prompt import ABSTAIN_TEXT, NO_ROOM_TEXT, Turn, fit_prompt, prompt_renderer
from fieldpack.device.types import Answer, Timings
from fieldpack.retrieval.types import Hit
from fieldpack.shared import bundle_format as fmt
from fieldpack.shared.errors import EmptyQuestionError, MaxTokensError, RuntimeLoadError, SlotCheckError
from fieldpack.shared.manifest import Manifest, parse_manifest
from fieldpack.shared.prompt_format import template_echo_stops
from fieldpack.shared.protocol import MAX_QUESTION_CHARS
from fieldpack.shared.text import clean_question

log = logging.getLogger(__name__)



def physical_cores() -> int:
    """Physical CPU cores (llama.cpp decode is memory-bound; SMT siblings do not help). Falls back to logical/1."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
        if n:
            return int(n)
    except ImportError:  # psutil is optional on the device
        pass
    return max(1, os.cpu_count() or 1)


def read_slot_manifest(slot_dir: Path) -> Manifest:
    """Parse ``slot_dir/manifest.json`` (written there by the installer). Raises RuntimeLoadError."""
    path = Path(slot_dir) / fmt.MANIFEST_NAME
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RuntimeLoadError(f"installed bundle in {slot_dir} has no readable manifest ({exc.strerror})",
                               hint="reinstall the bundle with `fieldpack install`") from exc
    return parse_manifest(data, origin=str(path))


def _closest(hits: Sequence[Hit]) -> Hit | None:
    """The hit with the best ``vector_similarity`` (cosine to the searched query), ``None`` when no hit has one."""
    return max((h for h in hits if h.vector_similarity is not None),
               key=lambda h: float(h.vector_similarity or 0.0), default=None)


def stop_strings(rt: Any) -> list[str]:
    """Where answers of a bundle end: the manifest's ``runtime.stop`` strings, and for the ``completion`` format
    also its template's instruction lines (:func:`shared.prompt_format.template_echo_stops`), which bundles built
    before the build recorded them lack. ``rt``: the manifest's ``runtime`` section."""
    echo = template_echo_stops(rt.completion_template or "") if rt.prompt_format == "completion" else ()
    return [*rt.stop, *(s for s in echo if s not in rt.stop)]


class Runtime:
    """Loaded bundle: model + embedder + index, and the answering path.

    Args:
        slot_dir: folder of an installed bundle (an A/B slot) holding the manifest and members.
        n_ctx: context length in tokens; default the manifest's ``runtime.n_ctx``.
        threads: llama.cpp threads; default the physical cores.
        verbose: pass llama.cpp's own logging through.

    Raises:
        RuntimeLoadError: a member is missing or llama.cpp / ONNX Runtime / SQLite cannot open it.
    """

    def __init__(self, slot_dir: Path, *, n_ctx: int | None = None, threads: int | None = None,
                 verbose: bool = False) -> None:
        self.slot_dir = Path(slot_dir)
        self.manifest = read_slot_manifest(self.slot_dir)
        self.n_ctx = check_n_ctx(n_ctx, default=self.manifest.runtime.n_ctx, n_ctx_train=self.manifest.model.n_ctx_train)
        self.threads = check_threads(threads, default=physical_cores())
        self._lock = threading.Lock()
        self._llm: Any = None
        self._embedder: Any = None
        self._retriever: Any = None
        try:
            self._load(verbose)
        except BaseException:
            self.close()
            raise

    # -- lifetime ----------------------------------------------------------------------------------------------
    def _load(self, verbose: bool) -> None:
        from fieldpack.retrieval.embedder import OnnxEmbedder
        from fieldpack.retrieval.search import Retriever

        t0 = time.perf_counter()
        emb = self.manifest.embedder
        try:
            self._embedder = OnnxEmbedder(self.slot_dir / fmt.EMBEDDER_NAME, self.slot_dir / fmt.EMBEDDER_TOKENIZER_NAME,
                                          max_tokens=emb.max_tokens, threads=self.threads)
            self._retriever = Retriever(self.slot_dir / fmt.INDEX_NAME, self._embedder)
        except Exception as exc:  # foreign errors from onnxruntime/apsw: translate here, once
            if isinstance(exc, RuntimeLoadError):
                raise
            raise RuntimeLoadError(f"cannot open the embedder or index in {self.slot_dir}: {exc}",
                                   hint="reinstall the bundle") from exc
        ad = self.manifest.adapter  # format 2 (--ship-adapter): the LoRA applied on top of the base model
        self._llm = load_llama(self.slot_dir / fmt.MODEL_NAME, n_ctx=self.n_ctx, threads=self.threads, verbose=verbose,
                               lora_path=self.slot_dir / ad.member if ad is not None else None,
                               lora_scale=ad.scale if ad is not None else 1.0)
        m, rt = self.manifest.model, self.manifest.runtime
        self._bos_text = self._token_text(m.bos_id) if m.bos_id is not None else ""
        self._chat: Any = None
        if rt.prompt_format != "completion":
            chat_template = self._llm.metadata.get("tokenizer.chat_template")
            if not chat_template:
                raise RuntimeLoadError(f"model in {self.slot_dir} has no chat template but the bundle's prompt "
                                       f"format is {rt.prompt_format}", hint="rebuild the bundle with --prompt-format completion")
            from fieldpack.shared.prompt_format import ChatTemplate

            self._chat = self._translate_template_error(
                lambda: ChatTemplate(chat_template, bos_token=self._bos_text, eos_token=self._token_text(m.eos_id),
                                     origin=f"the bundle in {self.slot_dir}"))
        self._render_prompt = prompt_renderer(rt.prompt_format, chat=self._chat.render if self._chat else None,
                                              completion_template=rt.completion_template)
        self._stop = stop_strings(rt)
        self._add_bos = str(self._llm.metadata.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
        log.info("loaded %s from %s in %.0f ms (n_ctx=%d, threads=%d)", self.bundle_label, self.slot_dir,
                 (time.perf_counter() - t0) * 1e3, self.n_ctx, self.threads)

    def close(self) -> None:
        """Release the model, the ONNX session and the database connection (idempotent)."""
        for name in ("_retriever", "_embedder"):
            obj = getattr(self, name, None)
            if obj is not None:
                try:
                    obj.close()
                finally:
                    setattr(self, name, None)
        if getattr(self, "_llm", None) is not None:
            self._llm.close()
            self._llm = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- accessors ---------------------------------------------------------------------------------------------
    @property
    def bundle_label(self) -> str:
        """``name@version`` of the loaded bundle."""
        return self.manifest.label

    @property
    def model_label(self) -> str:
        """``"<source> <architecture> <file type>"``, e.g. ``"qwen2.5-0.5b-instruct qwen2 Q4_K_M"``."""
        m = self.manifest.model
        return f"{m.source} {m.architecture} {m.file_type}"

    @property
    def llama(self) -> Any:
        """The owned ``llama_cpp.Llama`` (for benchmarks comparing against raw llama-cpp-python)."""
        return self._llm

    def _token_text(self, token_id: int) -> str:
        return self._llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def tokenize_prompt(self, text: str) -> list[int]:
        """Prompt text -> token ids, parsing special tokens; adds BOS only if the template did not."""
        add_bos = self._add_bos and not (self._bos_text and text.startswith(self._bos_text))
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    @property
    def has_chat_template(self) -> bool:
        """True when :meth:`render` works: the bundle prompts through the model's chat template (False for the
        ``completion`` prompt format of a base model)."""
        return self._chat is not None

    def render(self, messages: list[dict[str, str]]) -> str:
        """Render chat messages with the model's own chat template, generation prompt appended.

        Raises:
            UsageError: the bundle has no chat template (completion format; see :attr:`has_chat_template`).
            RuntimeLoadError: the template fails.
        """
        if self._chat is None:
            from fieldpack.shared.errors import UsageError

            raise UsageError(f"bundle {self.bundle_label} has no chat template (prompt format completion), so it "
                             "cannot run chat messages", hint="send a raw prompt, or build the bundle from a "
                             "checkpoint with a chat template")
        return self._translate_template_error(lambda: self._chat.render(messages))

    def render_prompt(self, question: str, hits: Sequence[Hit], history: Sequence[Turn] = ()) -> str:
        """The whole prompt in the bundle's prompt format (see :mod:`device.prompt`).

        Raises:
            RuntimeLoadError: the chat template fails while rendering (a fieldpack error, never a traceback).
        """
        return self._translate_template_error(lambda: self._render_prompt(question, hits, history))

    def _translate_template_error(self, fn: Callable[[], Any]) -> Any:
        from fieldpack.shared.errors import ChatTemplateError

        try:
            return fn()
        except ChatTemplateError as exc:
            raise RuntimeLoadError(f"{exc.message} (prompt format {self.manifest.runtime.prompt_format})",
                                   hint="rebuild the bundle with --prompt-format completion, or with a checkpoint "
                                        "whose chat template works") from exc

    # -- answering ---------------------------------------------------------------------------------------------
    def full_text(self, hit: Hit) -> str:
        """The whole stored text of ``hit``'s chunk (an answer's best source may have been shortened to fit)."""
        return self._retriever.chunk_texts([hit.chunk_id]).get(hit.chunk_id, hit.text)

    def documents(self) -> list[str]:
        """The document paths the bundle's index holds (for checking a QA set's ``expected_source``)."""
        return self._retriever.sources()

    def retrieve(self, question: str, *, k: int | None = None, mode: str = "hybrid") -> list[Hit]:
        """Top-``k`` chunks for ``question`` (default k from the manifest). See retrieval.search.Retriever."""
        return self._retriever.search(question, k=k or self.manifest.runtime.top_k_chunks, mode=mode)

    def gate(self, question: str, *, k: int | None = None) -> tuple[bool, float | None]:
        """What :meth:`answer` decides before generating, without generating: ``(passes, best_similarity)``.
        ``passes`` is False when the relevance gate (:func:`retrieval.search.is_relevant` at the manifest's
        ``min_similarity``) would refuse ``question`` asked on its own; ``best_similarity`` is the best cosine
        among its ``k`` hits (None without hits). Used by ``fieldpack eval --no-generate`` to report the refusals
        a device will make, with no model run."""
        q = clean_question(question or "")
        with self._lock:
            hits, query = self._retrieve_in_context(q, (), k=k)
        best = _closest(hits)
        return self._relevant(hits, query), None if best is None else best.vector_similarity

    def _relevant(self, hits: Sequence[Hit], query: str) -> bool:
        """The relevance gate at the manifest's ``min_similarity`` (:func:`retrieval.search.is_relevant`): the one
        decision :meth:`answer` and :meth:`gate` share."""
        from fieldpack.retrieval.search import is_relevant

        return is_relevant(hits, min_similarity=self.manifest.runtime.min_similarity, query=query)

    def _refusal(self, hits: Sequence[Hit]) -> dict[str, Any]:
        """``extra["gate"]`` of a refused question, a :class:`shared.protocol.GateInfo`: the closest passage's
        citation and cosine and the gate's threshold, so an operator can tell a question the documents do not
        cover from one asked in other words (a new-user trial saw only the refusal). Empty without hits."""
        from fieldpack.shared.protocol import GateInfo

        best = _closest(hits)
        if best is None:
            return {}
        cosine = math.floor(float(best.vector_similarity or 0.0) * 1000) / 1000  # never reads as reaching the gate
        return {"gate": GateInfo(closest=best.citation(), closest_cosine=cosine,
                                 threshold_cosine=float(self.manifest.runtime.min_similarity))}

    def _retrieve_in_context(self, question: str, history: Sequence[Turn], *, k: int | None) -> tuple[list[Hit], str]:
        """Hits for ``question`` and the query that found them: the question alone, or the last question joined
        with it when it reads as a follow-up (:func:`retrieval.followup.search_in_context`)."""
        from fieldpack.retrieval.followup import search_in_context

        return search_in_context(lambda query: self.retrieve(query, k=k), question,
                                 (history[-1].search_query or history[-1].question) if history else None,
                                 min_similarity=self.manifest.runtime.min_similarity,
                                 unknown_terms=self._retriever.unknown_terms)

    def search_query(self, question: str, previous: str | None, *, k: int | None = None) -> str:
        """What ``question`` is searched with after a turn searched with ``previous`` (``None``: none): the question
        itself, or the two joined when it reads as a follow-up (:func:`retrieval.followup.search_in_context`;
        one or two searches). For rebuilding a conversation's chain from messages that do not carry it."""
        q = clean_question(question or "")
        history = [Turn(question=previous, answer="")] if previous else []
        with self._lock:
            return self._retrieve_in_context(q, history, k=k)[1] if q else q

    def _check_cap_leaves_the_best_source(self, question: str, hits: Sequence[Hit], max_tokens: int) -> None:
        """Refuse a caller's answer cap that would force the best source to be cut: the prompt builder halves a
        source that does not fit, which kept the A-101/A-102 rows of the alarm table and dropped A-202, so the model
        answered wrongly with a citation (a new-user trial, ``--max-tokens 1900`` at n_ctx 2048). Cost: one render
        and tokenize. Nothing is refused when the best source alone cannot fit at any cap (the bundle's n_ctx).

        Raises:
            MaxTokensError: naming the largest cap that leaves the question and its best source whole.
        """
        if not hits:
            return
        need = len(self.tokenize_prompt(self.render_prompt(question, hits[:1], ())))
        allowed = self.n_ctx - need
        if max_tokens > allowed >= 1:
            raise MaxTokensError(max_tokens, allowed, f"leaves {self.n_ctx - max_tokens} of n_ctx {self.n_ctx} tokens "
                                 f"for the prompt, but the question with its best source needs {need}",
                                 cli_hint=f"use --max-tokens {allowed} or less, or raise --n-ctx")

    def answer(self, question: str, *, on_token: Callable[[str], None] | None = None,
               cancel: threading.Event | None = None, history: Sequence[Turn] = (),
               k: int | None = None, max_tokens: int | None = None, extra_stop: Sequence[str] = ()) -> Answer:
        """Answer ``question`` from the bundle's documents, streaming text pieces to ``on_token``.

        Args:
            question: the user's question (stripped; 1..MAX_QUESTION_CHARS characters).
            on_token: called with each new piece of answer text (valid UTF-8, stop strings removed).
            cancel: when set, generation stops before the next token (``finish_reason="cancelled"``).
            history: earlier turns to keep if the budget allows (oldest dropped first).
            k: number of chunks to retrieve (default: manifest ``runtime.top_k_chunks``).
            max_tokens: answer length cap (default: manifest ``runtime.max_tokens``).
            extra_stop: stop strings in addition to the manifest's (EOS/EOT tokens always stop).

        Raises:
            EmptyQuestionError: the question is empty or whitespace.
            QuestionTooLongError: the question alone does not fit ``n_ctx - max_tokens`` tokens.
            MaxTokensError: a given ``max_tokens`` leaves less than the question with its best source whole
                (``max_tokens=None`` never: then the builder's cap holds and a too-long source is cut).
        """
        # NFC: llama.cpp does not apply a tokenizer's Unicode normalizer (Qwen2's is NFC), so normalise here
        q = clean_question(question or "")
        if not q:
            raise EmptyQuestionError("the question is empty", hint="ask a question in words")
        if len(q) > MAX_QUESTION_CHARS:
            from fieldpack.shared.errors import QuestionTooLongError

            raise QuestionTooLongError(f"the question has {len(q)} characters (limit {MAX_QUESTION_CHARS})",
                                       hint="ask a shorter question")
        rt = self.manifest.runtime
        check_answer_options(k=k, max_tokens=max_tokens, n_ctx=self.n_ctx)
        explicit_cap = max_tokens is not None
        max_tokens = int(max_tokens if max_tokens is not None else min(rt.max_tokens, self.n_ctx - MIN_PROMPT_TOKENS))
        with self._lock:
            t0 = time.perf_counter()
            hits, query = self._retrieve_in_context(q, history, k=k)
            t_retrieved = time.perf_counter()
            retrieval_ms = (t_retrieved - t0) * 1e3
            context = {"retrieval_query": query} if query != q else {}  # a follow-up searched with the last question
            if not self._relevant(hits, query):
                if on_token:
                    on_token(ABSTAIN_TEXT)
                return Answer(question=q, text=ABSTAIN_TEXT, sources=[], abstained=True,
                              timings=Timings(retrieval_ms=retrieval_ms, total_ms=retrieval_ms),
                              bundle=self.bundle_label, finish_reason="abstained",
                              extra={**context, **self._refusal(hits)})
            if explicit_cap:
                self._check_cap_leaves_the_best_source(q, hits, max_tokens)
            built = fit_prompt(q, hits, history, render=self.render_prompt, tokenize=self.tokenize_prompt,
                               budget_tokens=self.n_ctx - max_tokens)
            if not built.hits:  # not even a trimmed source fits beside the question: do not answer ungrounded
                if on_token:
                    on_token(NO_ROOM_TEXT)
                return Answer(question=q, text=NO_ROOM_TEXT, sources=[], abstained=True,
                              timings=Timings(retrieval_ms=retrieval_ms, total_ms=retrieval_ms),
                              bundle=self.bundle_label, finish_reason="abstained",
                              extra={"reason": "no source fits the context", **context})
            # a completion-format prompt ends in "Answer:", which the model continues with a space or newline
            text, finish, gen = self._generate(built.tokens, max_tokens, on_token, cancel, extra_stop,
                                               strip_leading=self.manifest.runtime.prompt_format == "completion",
                                               stop_loops=True)
            if finish == "looped":  # cut to the loop's first copy: an end of answer like EOS, said in extra
                finish, context = "stop", {**context, "stopped_repeating": True}
            total_ms = (time.perf_counter() - t0) * 1e3
            timings = Timings(retrieval_ms=retrieval_ms, prompt_tokens=len(built.tokens),
                              prompt_eval_ms=gen["prompt_eval_ms"],
                              time_to_first_token_ms=retrieval_ms + gen["first_token_ms"],
                              completion_tokens=gen["n_tokens"], decode_ms=gen["decode_ms"],
                              tokens_per_s=gen["tokens_per_s"], total_ms=total_ms)
            return Answer(question=q, text=text, sources=built.hits, abstained=False, timings=timings,
                          bundle=self.bundle_label, finish_reason=finish, extra=context)

    def generate(self, tokens: list[int], *, max_tokens: int, on_token: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None, extra_stop: Sequence[str] = ()) -> tuple[str, str, Timings]:
        """Ungrounded greedy generation from prompt ``tokens`` (e.g. :meth:`tokenize_prompt` of :meth:`render`).

        Same decoding, stop set and streaming as :meth:`answer`, without retrieval. The text is the raw
        continuation of the prompt: its leading whitespace is kept (``"1, 2, 3, 4,"`` continues ``" 5, 6,"``).
        Returns ``(text, finish_reason, timings)``; ``finish_reason`` is ``"stop"``, ``"length"`` or
        ``"cancelled"``.
        """
        with self._lock:
            t0 = time.perf_counter()
            text, finish, gen = self._generate(list(tokens), int(max_tokens), on_token, cancel, extra_stop)
            return text, finish, Timings(prompt_tokens=len(tokens), prompt_eval_ms=gen["prompt_eval_ms"],
                                         time_to_first_token_ms=gen["first_token_ms"],
                                         completion_tokens=gen["n_tokens"], decode_ms=gen["decode_ms"],
                                         tokens_per_s=gen["tokens_per_s"], total_ms=(time.perf_counter() - t0) * 1e3)

    def embed(self, texts: list[str]) -> tuple[Any, int]:
        """The bundle's sentence embeddings of ``texts``: ``(len(texts), dimension) float32`` unit rows, and the
        number of embedder tokens they held."""
        with self._lock:
            return self._embedder.embed(texts), sum(self._embedder.count_tokens(t) for t in texts)

    def passage(self, chunk_id: int) -> Hit | None:
        """The indexed chunk ``chunk_id`` (a cited source) with its citation fields, or ``None`` if absent."""
        with self._lock:
            return self._retriever.chunk(chunk_id)

    def _generate(self, tokens: list[int], max_tokens: int, on_token: Callable[[str], None] | None,
                  cancel: threading.Event | None, extra_stop: Sequence[str] = (), *,
                  strip_leading: bool = False, stop_loops: bool = False) -> tuple[str, str, dict[str, float]]:
        """Greedy streaming generation. Returns (text, finish_reason, figures in ms / tokens).

        ``strip_leading``: drop the whitespace before the first visible piece (an answer after ``"Answer:"``);
        off for a raw continuation, whose leading space is part of the text. ``stop_loops``: stop when the text
        ends in three copies of one block (:class:`device.repetition.LoopGuard`; finish ``"looped"``, the text
        cut to the first copy; the copies were already streamed).
        """
        from fieldpack.device.repetition import LoopGuard

        import llama_cpp

        llm = self._llm
        llama_cpp.llama_perf_context_reset(llm.ctx)
        t0 = time.perf_counter()
        first = None
        pieces: list[str] = []
        finish = "stop"
        n_chunks = 0
        loops = LoopGuard() if stop_loops else None
        stream = llm.create_completion(tokens, max_tokens=max_tokens, temperature=0.0, top_k=1, top_p=1.0,
                                       min_p=0.0, repeat_penalty=1.0, stop=[*self._stop, *extra_stop],
                                       stream=True)
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                piece = choice.get("text") or ""
                if not pieces and strip_leading:
                    piece = piece.lstrip()
                n_chunks += 1
                if piece:
                    if first is None:
                        first = time.perf_counter()
                    pieces.append(piece)
                    if on_token:
                        on_token(piece)
                    if loops is not None and loops.feed(piece):
                        finish = "looped"
                        break
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                if cancel is not None and cancel.is_set():
                    finish = "cancelled"
                    break
        finally:
            close = getattr(stream, "close", None)
            if close:
                close()
        t_end = time.perf_counter()
        perf = llama_cpp.llama_perf_context(llm.ctx)
        n_eval = int(perf.n_eval)
        decode_ms = float(perf.t_eval_ms)
        # each generated token is evaluated when the next is asked for; a run cut at max_tokens never evaluates its
        # last one (at EOS the unevaluated token is the EOS, which is not output), so count it here
        n_tokens = n_eval + 1 if finish == "length" and pieces else n_eval
        figures = {
            "prompt_eval_ms": float(perf.t_p_eval_ms),
            "first_token_ms": ((first or t_end) - t0) * 1e3,
            "n_tokens": n_tokens,
            "decode_ms": decode_ms,
            "tokens_per_s": (n_eval / (decode_ms / 1e3)) if decode_ms > 0 else 0.0,
        }
        return (loops.text() if loops is not None and loops.looped else "".join(pieces)), finish, figures

    # -- post-install check ------------------------------------------------------------------------------------
    def smoke_check(self) -> None:
        """The installer's check: dimensions agree and the manifest's smoke question retrieves its source.

        Raises:
            SlotCheckError: embedder dimension differs from the manifest/index, or the smoke question's expected
                source is not among the top ``k`` hits.
        """
        emb_dim = self._embedder.dimension
        if emb_dim != self.manifest.embedder.dimension:
            raise SlotCheckError(f"embedder dimension {emb_dim} != manifest {self.manifest.embedder.dimension}",
                                 hint="rebuild the bundle")
        idx_dim = self._retriever.stats().get("dimension")
        if idx_dim is not None and int(idx_dim) != emb_dim:
            raise SlotCheckError(f"index dimension {idx_dim} != embedder dimension {emb_dim}", hint="rebuild the bundle")
        smoke = self.manifest.smoke
        hits = self.retrieve(smoke.question, k=smoke.k)
        sources = [h.source for h in hits]
        if smoke.expected_source not in sources:
            raise SlotCheckError(
                f"smoke question {smoke.question!r} retrieved {sources}, not {smoke.expected_source}",
                hint="the index does not match its documents; rebuild the bundle")
        # the real prompt (the bundle's prompt format over the smoke question's own hits) renders and fits, and
        # one decode step proves the model runs, not only loads
        built = fit_prompt(smoke.question, hits[:self.manifest.runtime.top_k_chunks], [], render=self.render_prompt,
                           tokenize=self.tokenize_prompt, budget_tokens=self.n_ctx - 1)
        self._llm.create_completion(built.tokens, max_tokens=1, temperature=0.0)


def forget_unsafe_prefix(llm: Any, tokens: Sequence[int]) -> bool:
    """Make llama-cpp-python's prompt-prefix reuse safe with a sliding-window KV cache. A :func:`load_llama` model
    calls it at the start of every ``generate`` (so of every ``create_completion``) by itself.

    ``Llama.generate`` keeps the KV cells of the longest common prefix of the last sequence and the next prompt
    and evaluates only the rest. :func:`load_llama` sizes the sliding-window (SWA) layers' cache of Gemma 2/3 to
    the window (``swa_full=False``, llama.cpp PR 13194): those layers keep only about the last ``n_swa`` +
    ``n_ubatch`` positions. When the last sequence ran past the reused prefix by more than that, the cells the new
    tokens must attend to are gone, and llama-cpp-python reuses the prefix anyway: the answer is computed on a
    broken cache, silently (measured on Gemma 3 270M: a 1,700-token prompt, then one sharing its first 100
    tokens, gave another greedy continuation than a fresh context). llama.cpp's own server checks the same
    condition (``llama_memory_seq_pos_min`` against the reused length minus ``n_swa``, tools/server) and
    reprocesses the prompt; so does this: ``Llama.reset()``, so that the whole prompt is evaluated afresh.

    Args:
        llm: a ``llama_cpp.Llama``.
        tokens: the prompt about to be completed (token ids).

    Returns:
        True when the cached prefix was dropped; False when the model has no sliding window, nothing is cached,
        no prefix is shared, or every cell the reuse needs is still there.
    """
    import llama_cpp

    n_swa = int(llama_cpp.llama_model_n_swa(llm.model))
    if n_swa <= 0 or llm.n_tokens == 0:
        return False
    shared = 0
    for a, b in zip(llm._input_ids, tokens):  # the prefix Llama.generate will reuse (same rule, 0.3.36)
        if a != b:
            break
        shared += 1
    reuse = shared - 1 if shared == len(tokens) else shared
    if reuse <= 0:
        return False
    pos_min = int(llama_cpp.llama_memory_seq_pos_min(llama_cpp.llama_get_memory(llm.ctx), 0))
    if pos_min <= max(0, reuse - n_swa):
        return False
    log.debug("KV prefix of %d tokens not reusable (sliding window %d, oldest cached position %d): re-evaluating",
              reuse, n_swa, pos_min)
    llm.reset()
    return True


@functools.cache
def _guarded(llama_class: type) -> type:
    """``llama_class`` (``llama_cpp.Llama``) with :func:`forget_unsafe_prefix` run before each ``generate`` that
    may reuse a cached prefix (``reset=True``, what ``create_completion`` uses)."""

    class GuardedLlama(llama_class):  # type: ignore[misc, valid-type]
        def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Any:
            if kwargs.get("reset", True):
                forget_unsafe_prefix(self, tokens)
            return super().generate(tokens, *args, **kwargs)

    return GuardedLlama


def load_llama(gguf_path: Path, *, n_ctx: int, threads: int, verbose: bool = False, lora_path: Path | None = None,
               lora_scale: float = 1.0) -> Any:
    """Open a GGUF with llama-cpp-python (CPU), with a LoRA adapter GGUF applied at ``lora_scale`` when
    ``lora_path`` is given (llama-cpp-python then turns mmap off: the model is read into anonymous memory).
    ``n_ctx`` in tokens. A model with sliding-window attention layers (Gemma 2/3) gets their KV cache sized to
    the window, not to ``n_ctx`` (``swa_full=False``; Gemma 3 270M at n_ctx 2048: 36 -> 21 MiB of KV cache); the
    returned ``Llama`` runs :func:`forget_unsafe_prefix` before each generation, so that prefix reuse stays
    correct for every caller. Raises RuntimeLoadError naming the file."""
    try:
        import llama_cpp

        from fieldpack.shared.llama_backend import llama_cpp_module

        Llama = _guarded(llama_cpp_module(llama_cpp).Llama)
    except ImportError as exc:
        raise RuntimeLoadError("llama-cpp-python is not installed", hint="pip install 'fieldpack[device]'") from exc
    if not Path(gguf_path).is_file():
        raise RuntimeLoadError(f"model file {gguf_path} is missing", hint="reinstall the bundle")
    lora: dict[str, Any] = {}
    if lora_path is not None:
        if not Path(lora_path).is_file():
            raise RuntimeLoadError(f"LoRA adapter file {lora_path} is missing", hint="reinstall the bundle")
        lora = dict(lora_path=str(lora_path), lora_scale=lora_scale)
    try:
        return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                     n_batch=min(512, n_ctx), verbose=verbose, seed=0, swa_full=False, **lora)
    except (ValueError, RuntimeError, OSError) as exc:
        what = f"{gguf_path} with adapter {lora_path}" if lora_path is not None else str(gguf_path)
        raise RuntimeLoadError(f"llama.cpp cannot load {what}: {exc}", hint="reinstall or rebuild the bundle") from exc


def check_slot(slot_dir: Path, manifest: Manifest) -> None:
    """Post-unpack check used by the installer: open everything at a small n_ctx, then :meth:`Runtime.smoke_check`.

    Raises:
        SlotCheckError: anything fails (wraps RuntimeLoadError and friends with the slot named).
    """
    from fieldpack.shared.errors import FieldpackError

    try:
        with Runtime(slot_dir, n_ctx=min(manifest.runtime.n_ctx, 512)) as rt:
            rt.smoke_check()
    except SlotCheckError:
        raise
    except FieldpackError as exc:
        raise SlotCheckError(f"installed bundle failed its check: {exc.message}", hint=exc.hint) from exc
