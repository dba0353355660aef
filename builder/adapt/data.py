"""Training data for adaptation: token blocks of the document chunks (continued pretraining, DAPT; Gururangan et
al. 2020, "Don't Stop Pretraining"), and RAFT examples from a question/answer file (Zhang et al. 2024, "RAFT:
Adapting Language Model to Domain Specific RAG").

* **DAPT blocks**: each text is tokenized, followed by EOS, concatenated, and cut into blocks of ``seq_len`` tokens
  (BOS first when the tokenizer adds one); the tail shorter than a block is dropped. Labels are the inputs
  (next-token loss). Only the *calibration* chunks of the build's eval split are used: the held-out chunks that
  PPL/KLD is measured on are never trained on.
* **RAFT examples**: the prompt is the bundle's own prompt (:class:`~fieldpack.builder.prompt_plan.PromptPlan`
  renders it exactly as the device will) over ``k`` numbered sources: the *oracle* chunk (the chunk of the
  question's ``source`` document that shares most words with the answer) among ``k - 1`` distractor chunks of
  other documents, in a seeded random order; the answer is ``"<answer> [n]"`` citing the oracle's number, then
  the model's EOS/EOT token. A share of examples (``raft_abstain``) carries ``k`` distractors and no oracle; its
  answer is :data:`~fieldpack.shared.prompt_format.ABSTAIN_ANSWER`. Loss only on the answer tokens.

  Two options (off by default) make the examples look like what the device's retrieval puts in the prompt:
  ``hard`` distractors are the chunks of *other* documents that share the most question words (idf-weighted
  word overlap, one per document: the related-but-wrong sources a retriever returns, hard negatives as in dense
  retrieval training) instead of random ones; ``paired`` gives each abstaining question its oracle example too,
  so that the same question is seen with its answer among the sources and without it (same distractors, the
  oracle's place taken by one more distractor), and only the oracle's presence decides between answering and
  abstaining.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldpack.builder.adapt.distill import IGNORE_INDEX
from fieldpack.shared.errors import AdaptationError
from fieldpack.shared.prompt_format import ABSTAIN_ANSWER

log = logging.getLogger(__name__)

QA_FIELDS = ("question", "answer", "source")
_WORD = re.compile(r"\w+", re.UNICODE)
_CITATION = re.compile(r"\s*\[\d+\]")


@dataclass(frozen=True)
class Example:
    """One training sequence: ``input_ids`` and ``labels`` (same length; ``-100`` where there is no loss)."""

    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class QAPair:
    """One line of a ``--qa-train`` file; ``source`` is a document path relative to the docs folder (POSIX)."""

    question: str
    answer: str
    source: str


def texts_sha256(texts: Sequence[str]) -> str:
    """sha256 (hex) of a list of texts (canonical JSON): the data hash the quality report records."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


def _bos_id(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer prepends one to plain text, else None."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if bos is not None and ids and ids[0] == bos else None


def token_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int, *, eos_id: int | None) -> list[Example]:
    """Blocks of ``seq_len`` tokens from ``texts`` (see the module docstring); labels = inputs.

    Args:
        texts: document chunk texts.
        tokenizer: the model's transformers tokenizer.
        seq_len: tokens per block, BOS included.
        eos_id: appended after each text (None: nothing).

    Returns:
        the blocks, in text order (possibly none when the texts hold fewer than ``seq_len`` tokens).
    """
    bos = _bos_id(tokenizer)
    body = seq_len - (1 if bos is not None else 0)
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos_id is not None:
            stream.append(eos_id)
    out = []
    for i in range(0, len(stream) - body + 1, body):
        ids = ([bos] if bos is not None else []) + stream[i:i + body]
        out.append(Example(input_ids=ids, labels=list(ids)))
    return out


def eval_blocks(texts: Sequence[str], tokenizer: Any, seq_len: int) -> list[Example]:
    """Held-out blocks for PPL/KLD: :func:`token_blocks` without EOS; when the texts hold less than one block,
    one block of all their tokens (at least 16).

    Raises:
        AdaptationError: fewer than 16 held-out tokens.
    """
    blocks = token_blocks(texts, tokenizer, seq_len, eos_id=None)
    if blocks:
        return blocks
    ids = tokenizer("\n".join(texts), add_special_tokens=True)["input_ids"]
    if len(ids) < 16:
        raise AdaptationError(f"the held-out chunks hold only {len(ids)} model tokens, too few to measure PPL",
                              hint="add documents (the eval split holds out a share of the chunks)")
    return [Example(input_ids=ids, labels=list(ids))]


def read_qa_file(path: Path, docs_dir: Path | None = None) -> list[QAPair]:
    """Read and check a ``--qa-train`` JSONL file: one ``{"question", "answer", "source"}`` object a line.

    Args:
        path: the JSONL file.
        docs_dir: the docs folder; when given, every ``source`` must be a file under it.

    Raises:
        AdaptationError: the file is missing or empty, a line is not a JSON object, a field is missing or empty
            (file:line and the field named), or a source is not among the documents (named).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise AdaptationError(f"--qa-train {path} cannot be read: {getattr(exc, 'strerror', None) or exc}",
                              hint="give a UTF-8 JSONL file of question, answer, source") from exc
    pairs: list[QAPair] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise AdaptationError(f"--qa-train {path}:{n} is not JSON ({exc.msg})",
                                  hint='write one object a line: {"question": ..., "answer": ..., "source": ...}') from exc
        if not isinstance(row, dict):
            raise AdaptationError(f"--qa-train {path}:{n} is not a JSON object",
                                  hint='write one object a line: {"question": ..., "answer": ..., "source": ...}')
        for f in QA_FIELDS:
            if not isinstance(row.get(f), str) or not row[f].strip():
                raise AdaptationError(f"--qa-train {path}:{n} has no {f!r} (a non-empty string)",
                                      hint=f"give every line {', '.join(QA_FIELDS)}")
        src = row["source"].strip().lstrip("./")
        if docs_dir is not None and not (Path(docs_dir) / src).is_file():
            raise AdaptationError(f"--qa-train {path}:{n}: source {src!r} is not among the documents in {docs_dir}",
                                  hint="give the document's path relative to --docs, e.g. procedures/pumps.md")
        pairs.append(QAPair(question=row["question"].strip(), answer=row["answer"].strip(), source=src))
    if not pairs:
        raise AdaptationError(f"--qa-train {path} holds no questions", hint="add lines of question, answer, source")
    return pairs


def _overlap(a: str, b: str) -> int:
    wa = {w.lower() for w in _WORD.findall(a)}
    return sum(1 for w in {w.lower() for w in _WORD.findall(b)} if w in wa)


def pick_oracle(pair: QAPair, chunks: Sequence[Any]) -> int:
    """Index of the oracle chunk: among the chunks of ``pair.source``, the one sharing most words with the answer
    (ties: with the question, then the first).

    Raises:
        AdaptationError: the source has no indexed chunk (ingest skipped it).
    """
    own = [i for i, c in enumerate(chunks) if c.source == pair.source]
    if not own:
        raise AdaptationError(f"QA source {pair.source!r} has no indexed chunk (ingest skipped or emptied it)",
                              hint="point the question at a document the build indexes, or fix that document")
    return max(own, key=lambda i: (_overlap(chunks[i].text, pair.answer), _overlap(chunks[i].text, pair.question), -i))


def as_source(chunk: Any, chunk_id: int) -> Any:
    """A document chunk as the retrieval ``Hit`` the device puts in its prompt (same citation text)."""
    from fieldpack.retrieval.types import Hit

    return Hit(chunk_id=chunk_id, source=chunk.source, section=chunk.section, page=chunk.page,
               line_start=chunk.line_start, line_end=chunk.line_end, text=chunk.text, score=0.0)


def hard_distractor_ranker(chunks: Sequence[Any]) -> Callable[[str, str], list[int]]:
    """``(question, source) -> chunk indices`` of documents other than ``source``, best first: the chunks sharing
    the most question words, each word weighted by its idf over ``chunks`` (log N/df), one chunk per document.
    Builds the word sets once (``O(total words)``); a query costs one pass over the chunks."""
    import math

    words = [frozenset(_WORD.findall(c.text.lower())) for c in chunks]
    df: dict[str, int] = {}
    for ws in words:
        for w in ws:
            df[w] = df.get(w, 0) + 1
    n = len(chunks)

    def rank(question: str, source: str) -> list[int]:
        q = {w: math.log(n / df[w]) for w in set(_WORD.findall(question.lower())) if w in df}
        scored = sorted(((sum(q.get(w, 0.0) for w in q.keys() & ws), -j) for j, ws in enumerate(words)
                         if chunks[j].source != source and q.keys() & ws), reverse=True)
        seen: set[str] = set()
        out = []
        for _, neg_j in scored:
            j = -neg_j
            if chunks[j].source not in seen:
                seen.add(chunks[j].source)
                out.append(j)
        return out

    return rank


def raft_examples(pairs: Sequence[QAPair], chunks: Sequence[Any], render: Callable[[str, list[Any], list[Any]], str],
                  tokenizer: Any, *, stop_id: int, k: int, abstain_share: float, seed: int,
                  max_len: int, hard: int = 0, paired: bool = False) -> tuple[list[Example], int]:
    """RAFT training examples (see the module docstring).

    Args:
        pairs: the checked QA pairs.
        chunks: the build's document chunks (``ingest`` records: source, section, lines, text).
        render: ``(question, sources, history) -> prompt``: the bundle's prompt renderer.
        tokenizer: the model's transformers tokenizer.
        stop_id: the token that ends an answer (EOT for chat formats when the model has one, else EOS).
        k: sources per prompt (oracle + ``k - 1`` distractors; ``k`` distractors without oracle).
        abstain_share: share of examples without the oracle (answered with the abstention phrase).
        seed: fixes distractors, order and which examples abstain.
        max_len: longest example in tokens (the build gives ``2 * --adapt-seq-len``); longer ones are left out,
            with a warning that counts them and names the ``--adapt-seq-len`` that would keep them all.
        hard: how many of each prompt's distractors are hard ones (:func:`hard_distractor_ranker`; the rest
            random); 0: all random (RAFT's own recipe).
        paired: abstaining questions also get their oracle example (module docstring).

    Returns:
        ``(examples, n_abstain)``.

    Raises:
        AdaptationError: a source without chunks; every example longer than ``max_len``.
    """
    rng = random.Random(seed)
    n_abstain = round(abstain_share * len(pairs))
    abstain = set(rng.sample(range(len(pairs)), n_abstain))
    ranker = hard_distractor_ranker(chunks) if hard > 0 else None
    out: list[Example] = []
    too_long = kept_abstain = 0
    longest = 0  # tokens of the longest example left out

    def add(pair: QAPair, picked: list[int], answer: str) -> bool:
        nonlocal longest
        prompt = render(pair.question, [as_source(chunks[j], j) for j in picked], [])
        prefix = " " if prompt.endswith(":") else ""
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        a_ids = tokenizer(prefix + answer, add_special_tokens=False)["input_ids"] + [stop_id]
        if len(p_ids) + len(a_ids) > max_len:
            longest = max(longest, len(p_ids) + len(a_ids))
            return False
        out.append(Example(input_ids=p_ids + a_ids, labels=[IGNORE_INDEX] * len(p_ids) + a_ids))
        return True

    for i, pair in enumerate(pairs):
        oracle = pick_oracle(pair, chunks)
        others = [j for j, c in enumerate(chunks) if c.source != pair.source] or \
                 [j for j in range(len(chunks)) if j != oracle]
        answer = f"{_CITATION.sub('', pair.answer).strip()}"
        if ranker is None and not paired:  # RAFT's own recipe: random distractors, one example per question
            if i in abstain:
                picked, reply = rng.sample(others, min(k, len(others))), ABSTAIN_ANSWER
            else:
                picked = rng.sample(others, min(k - 1, len(others))) + [oracle]
                rng.shuffle(picked)
                reply = f"{answer} [{picked.index(oracle) + 1}]"
            if add(pair, picked, reply):
                kept_abstain += i in abstain
            else:
                too_long += 1
            continue
        hard_ids = ranker(pair.question, pair.source)[:min(hard, k)] if ranker is not None else []
        pool = [j for j in others if j not in set(hard_ids)]
        distractors = hard_ids + rng.sample(pool, min(k - len(hard_ids), len(pool)))  # the k-th: abstention only
        if i not in abstain or paired:
            picked = distractors[:k - 1] + [oracle]
            rng.shuffle(picked)
            if not add(pair, picked, f"{answer} [{picked.index(oracle) + 1}]"):
                too_long += 1
        if i in abstain:
            picked = list(distractors)
            rng.shuffle(picked)
            if add(pair, picked, ABSTAIN_ANSWER):
                kept_abstain += 1
            else:
                too_long += 1
    fix = (f"raise --adapt-seq-len to {math.ceil(longest / 2)} (examples may be twice its length) or lower "
           "--top-k-chunks (fewer sources per prompt)")
    if not out:
        raise AdaptationError(f"every RAFT example (sources, question and answer) is longer than {max_len} tokens",
                              hint=fix)
    if too_long:
        log.warning("RAFT: %d of %d examples (sources, question and answer) are longer than %d tokens and are left "
                    "out of training. Fix: %s", too_long, too_long + len(out), max_len, fix)
    return out, kept_abstain
