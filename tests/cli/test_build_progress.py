"""Long builder loops report counts (the CLI turns them into a bar with ETA); Ctrl-C names the stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.cli.conftest import fieldpack_exe
from tests.retrieval_fixtures import DEMO_DOCS, embedder, minilm_int8  # noqa: F401


def test_embedding_reports_counts_and_matches_one_call(embedder: Any) -> None:  # noqa: F811
    from fieldpack.builder.index_build import embed_chunks
    from fieldpack.builder.ingest import ingest
    from fieldpack.builder.progress import progress_sink, report

    chunks = ingest(DEMO_DOCS, count_tokens=embedder.count_tokens).chunks
    seen: list[tuple[int, int, str]] = []
    with progress_sink(lambda d, t, u: seen.append((d, t, u))):
        vecs = embed_chunks(chunks, embedder, batch_size=1)  # slices of 8 chunks
    n = len(chunks)
    assert n > 8 and seen[0] == (0, n, "chunks") and seen[-1] == (n, n, "chunks")
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen) and len(seen) == 1 + -(-n // 8)
    whole = embedder.embed([c.embedding_text() for c in chunks], batch_size=1)
    assert vecs.shape == whole.shape and np.allclose(vecs, whole, atol=1e-5)
    report(1, 2, "x")  # no sink outside the block: nothing happens, nothing raises


def _signal_after_first_stage(proc: subprocess.Popen[str], signum: int) -> tuple[int, str]:
    """Send ``signum`` to a build half a second after its first stage finished; its exit status and stderr."""
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:  # off a terminal: one line per finished stage
        lines.append(line)
        if line.startswith("✓ check inputs"):
            time.sleep(0.5)
            proc.send_signal(signum)
            break
    rest = proc.stderr.read()
    return proc.wait(timeout=300), "".join(lines) + rest


@pytest.mark.slow
def test_ctrl_c_names_the_interrupted_stage(tmp_path: Path, tiny_llama_dir: Path) -> None:
    from fieldpack.shared.signing import generate_keypair

    generate_keypair(tmp_path / "keys")
    out = tmp_path / "b.fpk"
    # A shell starts background jobs with SIGINT ignored, and the ignore survives exec: a suite run as `.ci/run &`
    # would hand it to the build, which then cannot be interrupted. The wrapper gives the build SIGINT's default
    # disposition, as a build started from a terminal has, then execs it (same pid).
    reset = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", reset, fieldpack_exe(), "build", "--model", str(tiny_llama_dir),
                             "--docs", str(DEMO_DOCS),
                             "--name", "t", "--sign", str(tmp_path / "keys" / "builder.key"), "-o", str(out),
                             # every stage does real work (a warm build cache finishes in ~1 s, before the signal)
                             "--no-cache"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rc, err = _signal_after_first_stage(proc, signal.SIGINT)
    assert rc == 130, err
    assert ("interrupted during stage '" in err or "interrupted after stage 'check inputs'" in err), err
    assert err.count("interrupted") == 1, err  # the CLI's generic line is not added to the build's own
    assert "no bundle was written" in err
    assert "Traceback" not in err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fieldpack-build-")]


@pytest.mark.slow
def test_sigterm_stops_the_build_and_leaves_nothing(tmp_path: Path, tiny_llama_dir: Path) -> None:
    """`kill` (a supervisor's timeout) used to end the build without its clean-up: a new-user trial found a
    .tmp folder left in the build cache."""
    from fieldpack.shared.signing import generate_keypair

    generate_keypair(tmp_path / "keys")
    out, cache = tmp_path / "b.fpk", tmp_path / "cache"
    proc = subprocess.Popen([fieldpack_exe(), "build", "--model", str(tiny_llama_dir), "--docs", str(DEMO_DOCS),
                             "--name", "t", "--sign", str(tmp_path / "keys" / "builder.key"), "-o", str(out),
                             "--cache-dir", str(cache)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rc, err = _signal_after_first_stage(proc, signal.SIGTERM)
    assert rc == 143, err
    assert "stopped by SIGTERM" in err and "no bundle was written" in err, err
    assert "Traceback" not in err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fieldpack-build-")]
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.name], list(cache.rglob("*"))


def test_a_stage_is_summarised_by_its_steps_and_an_interrupt_names_the_evaluation(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The adapt stage's held-out passes report blocks after the training steps: the bar and an interrupt show
    the pass that runs (a trial's Ctrl-C said 'at 6/6 steps' during the evaluation after them), the finished
    stage's line still gives the steps."""
    from fieldpack.builder.progress import report_evaluation
    from fieldpack.cli.build import _StageProgress

    with _StageProgress() as shown:  # off a terminal (captured): one line per finished stage
        shown.stage("adapt dapt", "start")
        shown.count(8, 8, "steps, loss 3.398, 6 tok/s")
        from fieldpack.builder.progress import progress_sink

        with progress_sink(shown.count):
            report_evaluation(5, 19, "PPL and KLD after training")
        assert shown.counts == (5, 19, "held-out blocks: PPL and KLD after training")
        shown.stage("adapt dapt", "done")
    assert "✓ adapt dapt (8 steps, loss 3.398, 6 tok/s)" in capsys.readouterr().err


def test_off_a_terminal_a_long_stage_prints_its_progress_now_and_then(capsys: pytest.CaptureFixture[str]) -> None:
    """A trial's build to a log file was silent for the 7.5 minutes of its quality stage."""
    import time

    from fieldpack.cli.build import _StageProgress

    with _StageProgress(plain_every_s=0.2) as shown:
        shown.stage("quality", "start")
        shown.count(1, 27, "held-out windows")  # too soon after the start: no line
        time.sleep(0.25)
        shown.count(12, 27, "held-out windows")
        shown.count(13, 27, "held-out windows")  # too soon after the last line
        shown.stage("quality", "done")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("… quality: 12/27 held-out windows, ") and err[0].endswith(" s"), err
    assert err[1].startswith("✓ quality (27 held-out windows)")
