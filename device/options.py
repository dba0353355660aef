"""Range checks for the runtime options a user gives (``--n-ctx``, ``--threads``, ``--k``, ``--max-tokens``).

Every caller (CLI, MQTT daemon, eval) reaches them through :class:`device.runtime.Runtime`, so a 0 or a context
the model was never trained for is refused in one line (:class:`UsageError`, exit 2) instead of being silently
replaced by the default or failing deep inside llama.cpp.
"""

from __future__ import annotations

from fieldpack.shared.errors import MaxTokensError, UsageError

#: Smallest context (tokens) a bundle can run with; the builder's ``n_ctx`` floor is the same.
MIN_N_CTX = 128
#: Tokens of the context that must stay for the prompt (instructions, question, at least one source).
MIN_PROMPT_TOKENS = 64
#: Most chunks one question may retrieve.
MAX_K = 100


def check_n_ctx(n_ctx: int | None, *, default: int, n_ctx_train: int) -> int:
    """The context length to run (tokens): ``n_ctx`` or ``default``, within ``[MIN_N_CTX, n_ctx_train]``."""
    if n_ctx is None:
        return min(default, n_ctx_train)
    if n_ctx < MIN_N_CTX:
        raise UsageError(f"--n-ctx {n_ctx} is below {MIN_N_CTX} tokens", hint=f"use --n-ctx {MIN_N_CTX} or more")
    if n_ctx > n_ctx_train:
        raise UsageError(f"--n-ctx {n_ctx} is above the model's training context of {n_ctx_train} tokens",
                         hint=f"use --n-ctx {n_ctx_train} or less")
    return n_ctx


def check_threads(threads: int | None, *, default: int) -> int:
    """llama.cpp threads: ``threads`` (at least 1) or ``default``."""
    if threads is None:
        return default
    if threads < 1:
        raise UsageError(f"--threads {threads} is below 1", hint="use --threads 1 or more, or leave it out")
    return threads


def check_answer_options(*, k: int | None, max_tokens: int | None, n_ctx: int) -> None:
    """``k`` in ``[1, MAX_K]``; ``max_tokens`` at least 1 and leaving ``MIN_PROMPT_TOKENS`` of ``n_ctx``."""
    if k is not None and not 1 <= k <= MAX_K:
        raise UsageError(f"--k {k} is outside 1..{MAX_K}", hint="retrieve between 1 and 100 chunks, e.g. --k 5")
    if max_tokens is not None:
        if max_tokens < 1:
            raise UsageError(f"--max-tokens {max_tokens} is below 1", hint="use --max-tokens 1 or more")
        room = n_ctx - MIN_PROMPT_TOKENS
        if max_tokens > room:
            raise MaxTokensError(max_tokens, room, f"leaves less than {MIN_PROMPT_TOKENS} of n_ctx {n_ctx} tokens "
                                 "for the question and sources",
                                 cli_hint=f"use --max-tokens {room} or less, or raise --n-ctx")
