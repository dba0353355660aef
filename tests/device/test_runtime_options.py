"""Range checks of the runtime options every caller goes through (device.options)."""

from __future__ import annotations

import pytest

from fieldpack.device.options import MIN_N_CTX, MIN_PROMPT_TOKENS, check_answer_options, check_n_ctx, check_threads
from fieldpack.shared.errors import UsageError


def test_n_ctx_default_and_bounds() -> None:
    assert check_n_ctx(None, default=2048, n_ctx_train=4096) == 2048
    assert check_n_ctx(None, default=2048, n_ctx_train=1024) == 1024  # a default never exceeds training context
    assert check_n_ctx(MIN_N_CTX, default=2048, n_ctx_train=4096) == MIN_N_CTX
    for bad, needle in [(0, "below"), (64, "below"), (4097, "training context of 4096")]:
        with pytest.raises(UsageError, match=needle) as ei:
            check_n_ctx(bad, default=2048, n_ctx_train=4096)
        assert ei.value.exit_code == 2 and "--n-ctx" in str(ei.value) and "Fix:" in str(ei.value)


def test_threads() -> None:
    assert check_threads(None, default=3) == 3 and check_threads(1, default=3) == 1
    for bad in (0, -2):
        with pytest.raises(UsageError, match="--threads"):
            check_threads(bad, default=3)


def test_answer_options() -> None:
    check_answer_options(k=None, max_tokens=None, n_ctx=512)
    check_answer_options(k=1, max_tokens=512 - MIN_PROMPT_TOKENS, n_ctx=512)
    for kw, needle in [(dict(k=0), "--k 0"), (dict(k=5000), "--k 5000"), (dict(max_tokens=0), "--max-tokens 0"),
                       (dict(max_tokens=512), "leaves less than")]:
        args = dict(k=None, max_tokens=None, n_ctx=512) | kw
        with pytest.raises(UsageError, match=needle):
            check_answer_options(**args)
