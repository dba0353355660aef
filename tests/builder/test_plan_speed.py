"""`fieldpack plan` times each candidate several times and reports the median and the spread; a verdict the
spread could flip is marked."""

from __future__ import annotations

import statistics

from fieldpack.builder.compress.plan import SPEED_REPEATS, Candidate, Plan, format_plan
from fieldpack.builder.compress.report import measure_speed


def _cand(tps: float, lo: float, hi: float) -> Candidate:
    return Candidate(prune="none", quant="Q4_K_M", imatrix=False, gguf_bytes=2**20, params=1, n_layer=1,
                     kv_cache_bytes=0, memory_bytes=2**20, ppl=1.0, delta_ppl=0.0, kld_mean=0.01, top1_agreement=1.0,
                     decode_tps=tps, prompt_tps=1.0, decode_tps_min=lo, decode_tps_max=hi, fits_ram=True,
                     fast_enough=tps >= 10)


def test_table_shows_median_and_spread_and_marks_uncertain_verdicts() -> None:
    steady, shaky = _cand(20.0, 19.0, 21.0), _cand(12.0, 3.8, 13.0)
    plan = Plan(candidates=[steady, shaky], chosen=0, device_ram_bytes=2**30, min_tokens_per_s=10, n_ctx=1, threads=1,
                png=None, prune_options={"none": {}})
    text = format_plan(plan)
    assert "20.0 (19.0-21.0)" in text and "12.0 (3.8-13.0)" in text
    rows = text.splitlines()[1:3]
    assert rows[0].split()[-1] == "yes" and rows[1].split()[-1] == "yes?"  # shaky: median fits, one run did not
    assert f"median of {SPEED_REPEATS} runs" in text and "rerun when it is quiet" in text
    assert not steady.speed_uncertain(10) and shaky.speed_uncertain(10)


def test_median_statistic_keeps_every_run(converted) -> None:  # noqa: ANN001
    sp = measure_speed(converted("llama", "f16").path, n_prompt=32, n_decode=8, threads=1, repeats=3, statistic="median")
    assert len(sp.decode_tps_runs) == 3
    assert sp.decode_tps == statistics.median(sp.decode_tps_runs)
    assert sp.decode_tps_min <= sp.decode_tps <= sp.decode_tps_max
