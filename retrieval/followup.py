"""Retrieval for a follow-up question in a conversation ("Does it need a restart?", "And on a standby?").

A follow-up leans on the previous question for its topic, so searched alone it finds the wrong page or nothing
(the relevance gate then refuses it). Searched together with the previous question it finds its page, but the same
joining ruins a self-contained second question (on PostgreSQL's dev questions each put after an unrelated one,
page recall@5 fell from 0.86 to 0.44). So the previous question is joined only when the new message *reads* as a
follow-up (:func:`looks_like_followup`: short, opening with "and"/"what about", or a short sentence that points
back with "it"/"that"/"those"), and only when the message alone is still near the documents (its best cosine at
least :data:`FOLLOWUP_SIMILARITY_SHARE` of the gate's threshold, or made only of words the documents use), so
an off-topic aside ("Nearest pharmacy?") after a real question is still refused rather than answered from the
previous question's pages.

This is the rule-based query reformulation of conversational search (e.g. the TREC CAsT baselines that expand
a turn with the previous utterance: Dalton et al., "CAsT 2019: The Conversational Assistance Track Overview",
2020), chosen because a small on-device model cannot rewrite the question reliably. Measured by
``python -m benchmarks.followups`` on ``benchmarks/qa/followups/postgresql-15.jsonl``; figures in README
("Follow-up questions").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from fieldpack.retrieval.types import Hit

#: A message of at most this many words reads as a follow-up ("In parallel?", "What's the default?").
FOLLOWUP_MAX_WORDS = 6
#: A short message (:data:`FOLLOWUP_MAX_WORDS`) that neither opens with a continuation nor points back reads as a
#: follow-up only with at most this many distinct content words: follow-ups name one or two things ("Is a reload
#: enough?", "What if the copy fails?"), a short question with three names its own topic ("What time is the shift
#: change?", an aside a trial saw joined to a Valgrind question because the manual uses all its words).
FOLLOWUP_MAX_CONTENT_WORDS = 2
#: A message of at most this many words that points back (:data:`BACK_REFERENCES`) reads as a follow-up.
FOLLOWUP_REFERENCE_MAX_WORDS = 14
#: Words that point back to an earlier turn.
BACK_REFERENCES = frozenset({"it", "its", "that", "this", "those", "these", "they", "them", "their", "there",
                             "one", "ones", "then", "such", "same"})
#: Openings that continue the previous turn.
CONTINUATIONS = ("and ", "but ", "so ", "or ", "also ", "then ", "what about ", "how about ")
#: The message alone must reach this share of the gate's ``min_similarity`` (cosine) to be joined with the
#: previous question: 0.42 * 2/3 = 0.28 for the default gate. Chosen on the dev part of the follow-up set
#: (answerable follow-ups alone: 0.25-0.59; off-topic asides: 0.23-0.33).
FOLLOWUP_SIMILARITY_SHARE = 2 / 3

_WORD = re.compile(r"[a-z0-9']+")


def looks_like_followup(message: str) -> bool:
    """Whether ``message`` reads as a follow-up that needs the previous question for its topic.

    True when it opens with one of :data:`CONTINUATIONS`; or has at most :data:`FOLLOWUP_REFERENCE_MAX_WORDS` words
    one of which is in :data:`BACK_REFERENCES`; or has at most :data:`FOLLOWUP_MAX_WORDS` words of which at most
    :data:`FOLLOWUP_MAX_CONTENT_WORDS` distinct ones are content words (:func:`retrieval.search.content_terms`).
    English only. On the dev part of the follow-up set: 18 of 19 follow-ups and none of 39 self-contained
    questions.
    """
    from fieldpack.retrieval.search import content_terms

    text = " ".join(message.lower().split())
    words = _WORD.findall(text)
    if _continues(text):
        return True
    if len(words) <= FOLLOWUP_REFERENCE_MAX_WORDS and points_back(text):
        return True
    return len(words) <= FOLLOWUP_MAX_WORDS and len(content_terms(text)) <= FOLLOWUP_MAX_CONTENT_WORDS


def _continues(message: str) -> bool:
    """Whether ``message`` opens with one of :data:`CONTINUATIONS` ("and ...", "what about ...")."""
    return " ".join(message.lower().split()).startswith(CONTINUATIONS)


def points_back(message: str) -> bool:
    """Whether ``message`` uses one of :data:`BACK_REFERENCES`: it then refers to the earlier turn by its words
    alone, whatever else it asks ("Is it dangerous?", "How long does it take?"). An opening "and" is weaker
    evidence ("And how long does the forklift battery take to charge?" is an aside) and does not count."""
    return any(w in BACK_REFERENCES for w in _WORD.findall(message.lower()))


#: A follow-up chain keeps at most this many of its latest words before the new message: a long run of
#: follow-ups drifts from the first topic, and the embedder reads only its first 256 tokens (a trial's chain
#: had grown to four questions, the newest one last).
MAX_CHAIN_WORDS = 60


def joined_query(previous_question: str, message: str) -> str:
    """The retrieval query for a follow-up: the previous question (or chain; its last :data:`MAX_CHAIN_WORDS`
    words), then the message, one space between."""
    chain = previous_question.split()[-MAX_CHAIN_WORDS:]
    return f"{' '.join(chain)} {' '.join(message.split())}"


def search_in_context(search: Callable[[str], list[Hit]], message: str, previous_question: str | None, *,
                      min_similarity: float,
                      unknown_terms: Callable[[str], Sequence[str]] = lambda _text: ()) -> tuple[list[Hit], str]:
    """Hits for ``message`` and the query that found them.

    Args:
        search: query -> hits (e.g. ``lambda q: retriever.search(q, k=5)``); called once, or twice for a follow-up.
        message: the new user message (already cleaned).
        previous_question: the last answered question of the conversation, or ``None`` at its start.
        min_similarity: the relevance gate's cosine threshold (the bundle's ``runtime.min_similarity``).
        unknown_terms: text -> its content words that occur in no document
            (:meth:`retrieval.search.Retriever.unknown_terms`); default: none are.

    Returns:
        ``(hits, query)``: the message's own hits and ``message``; or, when it :func:`looks_like_followup` and is
        not an aside, the hits of :func:`joined_query` and that query (the gate then judges those hits). A
        message that neither points back nor opens with a continuation keeps its own hits when the gate
        (:func:`retrieval.search.is_relevant`) passes them and refuses the joined ones ("Where are the backups
        stored?" after "What does alarm A-202 mean?" was refused, and is answered alone: a new-user trial). A message
        that :func:`points_back` ("Is it dangerous?") is never an aside. Another short one
        is an aside when it is far from the documents (its own best ``vector_similarity`` below
        ``FOLLOWUP_SIMILARITY_SHARE * min_similarity``) *and* brings a word they never use ("Nearest pharmacy?");
        made of words the documents use ("In parallel?") it joins even when far: in a small document set nothing
        is near such a short message, and most everyday words are missing from it.
    """
    from fieldpack.retrieval.search import is_relevant

    hits = search(message)
    if not previous_question or not looks_like_followup(message):
        return hits, message
    pointing = points_back(message)
    bare = not pointing and not _continues(message)
    if not pointing:
        best = max((h.vector_similarity for h in hits if h.vector_similarity is not None), default=-1.0)
        if best < min_similarity * FOLLOWUP_SIMILARITY_SHARE and unknown_terms(message):
            return hits, message  # an aside away from the documents: judged as asked, not from the last topic
    query = joined_query(previous_question, message)
    joined = search(query)
    if bare and not is_relevant(joined, min_similarity=min_similarity, query=query) \
            and is_relevant(hits, min_similarity=min_similarity, query=message):
        return hits, message  # a short question of its own: joined the gate refuses it, alone it is answered
    return joined, query
