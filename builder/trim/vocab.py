"""Which tokens a domain keeps: the vocabulary selection of domain vocabulary trimming.

After Ushio et al., "An Efficient Multilingual Language Model Compression through Vocabulary Trimming" (2023),
adapted to the two tokenizers llama.cpp runs with merges: byte-level BPE (GGUF ``gpt2``: Llama 3, Qwen2) and
SentencePiece-style BPE with byte fallback (GGUF ``llama``: Gemma, Llama 2). Kept:

1. special tokens: CONTROL (except ``<unusedN>`` placeholders), USER_DEFINED (llama.cpp matches them in any
   text before the merges run, so they stay whatever the domain) and UNKNOWN;
2. the byte fallback: the 256 ``<0xXX>`` BYTE tokens (``llama``) or the 256 byte-level base characters
   (``gpt2``), so any text still tokenizes (unknown strings fall back to smaller pieces, then to bytes);
3. every token the documents and the prompt format use (tokenized by llama.cpp itself);
4. the ``keep_general`` most frequent general tokens, frequency taken from the tokenizer's own training
   order: BPE learns merges in corpus-frequency order, so the merge rank (``gpt2``) or the SentencePiece score,
   minus the merge rank (``llama``), ranks tokens by general frequency without a general corpus;
5. the merge closure: every intermediate symbol llama.cpp forms on the way to a kept token.

Why the closure is exact: llama.cpp's BPE/SPM sessions merge the best-ranked adjacent pair (lowest merge rank /
highest score, ties to the left) until none is left. A symbol that ends as one token T was built only from
merges inside T's span, which run in the same order as when T's text is tokenized alone. So tokenizing each kept
token's text alone (:func:`merge_path`) yields the symbols its merges need. A trimmed vocabulary (and merge list)
that holds them offers a subset of the original candidate pairs that still contains every pair the original
run applied, so every kept text tokenizes to the same tokens (``gate.check_trim`` verifies it on held-out text).
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from fieldpack.shared.errors import TrimError, UnsupportedTokenizerError

#: GGUF ``tokenizer.ggml.token_type`` values (``gguf.TokenType``).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_UNUSED_RE = re.compile(r"^(<unused\d+>|\[PAD\d+\])$")
#: Tokenizer models the trimmer handles; anything else is refused by name (see :func:`check_trimmable`).
TRIMMABLE = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE with byte fallback"}
_REFUSED = {"bert": "WordPiece", "t5": "Unigram (T5)", "rwkv": "RWKV", "plamo2": "PLaMo-2", "none": "no tokenizer"}
#: Fewest model tokens of documents the trimmer accepts: the held-out split must give the gate four 256-token
#: windows (1,024 tokens, which split_eval takes from at most half of the chunks) and the vocabulary chosen from
#: the documents must rest on more domain text than the gate checks it on.
MIN_DOC_TOKENS = 2048


@dataclass
class GgufVocab:
    """A GGUF tokenizer as llama.cpp reads it. ``tokens``/``types``/``scores`` per id; ``merges`` (``gpt2``) in
    rank order as ``"left right"``; ``model`` is ``tokenizer.ggml.model``."""

    model: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    _index: dict[str, int] = field(default_factory=dict, repr=False)
    _ranks: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {}
        for i, t in enumerate(self.tokens):
            self._index.setdefault(t, i)  # llama.cpp's token_to_id keeps the first id of a duplicated text
        self._ranks = {}
        for r, m in enumerate(self.merges or ()):
            a, _, b = m.partition(" ")
            self._ranks.setdefault((a, b), r)

    def id_of(self, text: str) -> int | None:
        return self._index.get(text)

    def rank(self, a: str, b: str) -> int | None:
        return self._ranks.get((a, b))


def check_trimmable(model: str, types: Iterable[int], *, source: str) -> None:
    """Refuse, by name and before any work, a tokenizer the trimmer cannot keep exact.

    Raises:
        UnsupportedTokenizerError: WordPiece, Unigram, any model other than ``gpt2``/``llama``, or a SentencePiece
            vocabulary without the 256 byte-fallback tokens (text outside the kept vocabulary could not be encoded).
    """
    hint = "build without --trim-vocab, or use a byte-level BPE or byte-fallback SentencePiece model (Llama, Qwen2, Gemma)"
    if model not in TRIMMABLE:
        kind = _REFUSED.get(model, f"tokenizer model {model!r}")
        raise UnsupportedTokenizerError(f"--trim-vocab cannot trim a {kind} tokenizer ({source})", hint=hint)
    if model == "llama" and sum(1 for t in types if t == BYTE) < 256:
        raise UnsupportedTokenizerError(
            f"--trim-vocab cannot trim a SentencePiece/Unigram tokenizer without byte fallback ({source}): text "
            "outside the kept vocabulary would become <unk>", hint=hint)


@lru_cache(maxsize=1)
def byte_level_alphabet() -> tuple[str, ...]:
    """The 256 characters GPT-2's byte-level BPE maps bytes 0..255 to (``bytes_to_unicode``), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return tuple(chr(table[b]) for b in range(256))


def merge_path(vocab: GgufVocab, text: str) -> list[str]:
    """Every symbol llama.cpp forms while merging ``text`` alone (the final ones included), in merge order.

    ``gpt2``: llama.cpp's ``llm_tokenizer_bpe_session`` on one pre-tokenized word: start from its characters,
    merge the adjacent pair of lowest merge rank (ties: leftmost). ``llama``: ``llm_tokenizer_spm_session``:
    start from UTF-8 characters, merge the adjacent pair whose concatenation is a token of highest score
    (ties: leftmost). ``text`` is a token's text, so no pre-tokenizer split or space escaping applies.
    """
    syms = list(text)
    n = len(syms)
    if n < 2:
        return syms
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    alive = [True] * n
    heap: list[tuple[float, int, int, str]] = []
    bpe = vocab.model == "gpt2"

    def push(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        joined = syms[left] + syms[right]
        if bpe:
            r = vocab.rank(syms[left], syms[right])
            if r is None:
                return
            heapq.heappush(heap, (float(r), left, right, joined))
        else:
            tid = vocab.id_of(joined)
            if tid is None:
                return
            heapq.heappush(heap, (-float(vocab.scores[tid]), left, right, joined))  # type: ignore[index]

    for i in range(n - 1):
        push(i, i + 1)
    formed = list(syms)
    while heap:
        _, left, right, joined = heapq.heappop(heap)
        if not (alive[left] and alive[right]) or nxt[left] != right or syms[left] + syms[right] != joined:
            continue  # stale: one side was merged since
        syms[left] = joined
        alive[right] = False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        formed.append(joined)
        push(prev[left], left)
        push(left, nxt[left])
    return formed


def general_order(vocab: GgufVocab) -> list[int]:
    """NORMAL token ids from most to least frequent in the tokenizer's training corpus, as its merge order
    says: ``gpt2`` by the rank of the merge that makes the token (single characters first), ``llama`` by score
    (highest first). Ties by id."""
    normal = [i for i, t in enumerate(vocab.types) if t == NORMAL]
    if vocab.model == "gpt2":
        made_at: dict[str, int] = {}
        for r, m in enumerate(vocab.merges or ()):
            a, _, b = m.partition(" ")
            made_at.setdefault(a + b, r)
        return sorted(normal, key=lambda i: (made_at.get(vocab.tokens[i], -1 if len(vocab.tokens[i]) == 1 else 1 << 30), i))
    scores = vocab.scores or [0.0] * len(vocab.tokens)
    return sorted(normal, key=lambda i: (-scores[i], i))


@dataclass(frozen=True)
class Selection:
    """The kept ids (ascending: new id = position) and why: counts per reason (a token counts once, under the
    first reason that kept it, in the order special, bytes, domain, general, closure)."""

    keep: list[int]
    reasons: dict[str, int]
    domain_tokens: int  # model tokens in the documents and prompt texts (with repeats)


def select_tokens(vocab: GgufVocab, domain_counts: Counter[int], *, keep_general: int,
                  min_doc_tokens: int = MIN_DOC_TOKENS, general: list[int] | None = None) -> Selection:
    """Choose the kept token ids.

    Args:
        vocab: the untrimmed tokenizer.
        domain_counts: token id -> occurrences in the documents and prompt texts (llama.cpp tokenization).
        keep_general: how many general tokens to keep besides (the first of ``general``).
        min_doc_tokens: fewest domain tokens accepted (the build uses :data:`MIN_DOC_TOKENS`).
        general: token ids, most wanted first (the build: the model's own predicted probability on the documents,
            :func:`builder.trim.predicted_order`); None: :func:`general_order` (the tokenizer's merge order).
            Only NORMAL tokens are taken from it.

    Raises:
        TrimError: fewer than ``min_doc_tokens`` domain tokens.
    """
    total = sum(domain_counts.values())
    if total < min_doc_tokens:
        raise TrimError(f"the documents hold {total:,} model tokens, too few to choose a vocabulary from "
                        f"(--trim-vocab needs at least {min_doc_tokens:,})",
                        hint="add documents, or build without --trim-vocab")
    reasons: dict[str, int] = {}
    kept: set[int] = set()

    def add(reason: str, ids: Iterable[int]) -> None:
        new = {i for i in ids if i not in kept}
        kept.update(new)
        reasons[reason] = reasons.get(reason, 0) + len(new)

    add("special", (i for i, t in enumerate(vocab.types)
                    if t in (CONTROL, USER_DEFINED, UNKNOWN) and not _UNUSED_RE.match(vocab.tokens[i])))
    if vocab.model == "gpt2":
        add("bytes", (i for c in byte_level_alphabet() if (i := vocab.id_of(c)) is not None))
    else:
        add("bytes", (i for i, t in enumerate(vocab.types) if t == BYTE))
    add("domain", domain_counts)
    if general is None:
        ranked = general_order(vocab)
    else:
        ranked = [i for i in general if 0 <= i < len(vocab.types) and vocab.types[i] == NORMAL]
    add("general", ranked[:max(0, keep_general)])
    closure: set[int] = set()
    for i in list(kept):
        if vocab.types[i] != NORMAL:
            continue
        for sym in merge_path(vocab, vocab.tokens[i]):
            j = vocab.id_of(sym)
            if j is not None:
                closure.add(j)
    add("closure", closure)
    return Selection(keep=sorted(kept), reasons=reasons, domain_tokens=total)


def trimmed_merges(vocab: GgufVocab, keep: Iterable[int]) -> list[str]:
    """The merges whose two sides and result are all kept, in their original rank order (``gpt2``)."""
    texts = {vocab.tokens[i] for i in keep}
    out = []
    for m in vocab.merges or ():
        a, _, b = m.partition(" ")
        if a in texts and b in texts and a + b in texts:
            out.append(m)
    return out
