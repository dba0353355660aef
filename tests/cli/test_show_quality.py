"""`fieldpack inspect`'s quality rows: a sentence of the main figures, or key=value three to a line when a row
lacks a key the sentence needs (every figure stays in --json)."""

from __future__ import annotations

from fieldpack.cli.show import _embedder_gate_line, _parity_line, _quantization_line, quality_figures

QUANT = dict(chunks=4, delta_ppl=0.1887, held_out_chunks=8, kld_mean=0.005283, kld_p99=0.02354, n_ctx=154,
             ppl_ref=21.49, ppl_test=21.68, qtype="Q4_K_M", ratio_to_f16=0.4663, size_bytes=253113856,
             tokens_scored=304, top1_agreement=0.9671)


def test_headlines_carry_the_main_figures() -> None:
    assert quality_figures(QUANT, _quantization_line) == (
        "Q4_K_M: PPL 21.49 -> 21.68 (+0.19), KLD mean 0.0053 (p99 0.0235), top-1 agreement 0.967 over 304 held-out "
        "tokens; 241.4 MiB, 0.47x f16")
    parity = dict(file_type=1, max_abs_logit_diff=0.04664, passed=False, tokenization_identical=True,
                  tokens_compared=284, tolerance=0.1, top1_agreement=0.9965)
    assert quality_figures(parity, _parity_line).startswith("FAILED: top-1 agreement 0.9965, max |Δlogit| 0.0466")
    gate = dict(fp32_bytes=90804669, int8_bytes=23235972, k=1, kept_int8=False, mean_cosine=0.97, min_cosine=0.9,
                recall_at_k=0.5)
    assert quality_figures(gate, _embedder_gate_line).startswith("fp32 kept (int8 failed the gate): mean cosine 0.9700")
    assert quality_figures(gate, _embedder_gate_line).endswith("; 86.6 MiB (fp32 86.6 MiB)")


def test_a_row_without_the_headline_keys_is_listed_three_to_a_line() -> None:
    row = {k: v for k, v in QUANT.items() if k != "kld_p99"} | {"hist": [1, 2]}
    lines = quality_figures(row, _quantization_line).splitlines()
    assert lines[0] == "chunks=4, delta_ppl=0.1887, held_out_chunks=8" and len(lines) == 4
    assert all(line.count("=") <= 3 for line in lines) and "hist" not in "".join(lines)


def test_a_one_line_chunk_is_cited_as_one_line() -> None:
    from fieldpack.retrieval.types import Hit

    def hit(a: int, b: int) -> Hit:
        return Hit(chunk_id=1, source="pumps.md", section="Pump 3", page=None, line_start=a, line_end=b, text="t",
                   score=0.1)

    assert hit(24, 24).citation() == "pumps.md § Pump 3, line 24"
    assert hit(10, 24).citation() == "pumps.md § Pump 3, lines 10-24"
