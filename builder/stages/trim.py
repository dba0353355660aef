"""The ``trim vocab`` stage (``--trim-vocab``): the F16/F32 GGUF cut to the documents' vocabulary
(:mod:`fieldpack.builder.trim`), gated against the untrimmed one on the held-out chunks
(:func:`~fieldpack.builder.trim.gate.check_trim`), with its quality-report row.

It sits between the dense model (convert, or compress when it ran) and ``quantize``: the trimmed F16 is what
gets quantized, and the reference of the quality stage (its ΔPPL/KLD are quantization's alone; the trim's own
cost is this stage's row). Bytes are the F16 file's here; the manifest's quantization figures give the shipped
size.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fieldpack.builder.stages.base import Input, Stage, StageInputs, StageRecord

log = logging.getLogger(__name__)

ROW_STAGE = "vocabulary trim"


class TrimInputs(StageInputs):
    source: Input  # untrimmed F16/F32 GGUF
    chunks: Input  # chunks.jsonl of ingest: every document chunk (the vocabulary is chosen from all of them)
    split: Input  # split.json: the held-out chunks the gate checks on
    keep_general: int
    n_ctx: int  # gate window (tokens)
    measure_speed: bool = True


class TrimRecord(StageRecord):
    """``gguf``: the trimmed GGUF; ``keep``: untrimmed id of each trimmed id; ``row``: the quality-report row
    (``manifest.quality.stages``); ``gate``: the gate's figures; ``reasons``: kept tokens per reason."""

    gguf: Path
    vocab_size: int
    keep: list[int]
    reasons: dict[str, int]
    gate: dict[str, Any]
    row: dict[str, Any]

    def trimmed(self) -> Input:
        return self.input_for(self.gguf)


def run_trim(inputs: TrimInputs, out_dir: Path) -> TrimRecord:
    """Trim, gate, measure. Raises UnsupportedTokenizerError, TrimError (too few documents, gate failed)."""
    import dataclasses

    from fieldpack.builder.stages.docs import _read_chunks
    from fieldpack.builder.stages.quant import load_split
    from fieldpack.builder.trim import trim_gguf
    from fieldpack.builder.trim.gate import check_trim

    texts = [c.text for c in _read_chunks(inputs.chunks.path)]
    calib, held_out = load_split(inputs.split.path)
    # general tokens by the model's own predictions on calibration chunks (the gate's held-out ones stay unseen)
    res = trim_gguf(inputs.source.path, out_dir / "trimmed.gguf", texts, keep_general=inputs.keep_general,
                    general_texts=calib)
    gate = check_trim(inputs.source.path, res.file.path, res.keep, held_out, n_ctx=inputs.n_ctx)
    f = res.file
    row: dict[str, Any] = dict(stage=ROW_STAGE, keep_general=inputs.keep_general, vocab_before=f.vocab_before,
                               vocab_after=f.vocab_after, gguf_bytes_before=f.source_bytes, gguf_bytes_after=f.size_bytes,
                               bytes_ratio=round(f.size_bytes / f.source_bytes, 4), kld_mean=gate.kld_mean,
                               top1_agreement=gate.top1_agreement, removed_mass=gate.removed_mass,
                               tokenization_identical=gate.tokenization_identical,
                               ood_round_trip=f"{gate.ood_round_trips}/{gate.ood_samples}")
    if inputs.measure_speed:
        from fieldpack.builder.compress.report import measure_speed

        before, after = measure_speed(inputs.source.path, repeats=2), measure_speed(f.path, repeats=2)
        row.update(decode_tps_before=round(before.decode_tps, 2), decode_tps_after=round(after.decode_tps, 2),
                   prompt_tps_before=round(before.prompt_tps, 2), prompt_tps_after=round(after.prompt_tps, 2),
                   decode_speedup=round(after.decode_tps / before.decode_tps, 3))
    return TrimRecord(gguf=f.path, vocab_size=f.vocab_after, keep=res.keep, reasons=res.reasons,
                      gate=dataclasses.asdict(gate), row=row)


TRIM = Stage("trim-vocab", "1", TrimRecord, run_trim, libraries=("llama_cpp_python", "gguf", "numpy"),
             code=("fieldpack.builder.trim", "fieldpack.builder.stages.trim"),
             label=lambda i: f"trim vocab (+{i.keep_general} general)")


class TrimLikeInputs(StageInputs):
    source: Input  # untrimmed F16/F32 GGUF with the vocabulary the keep list indexes
    keep: tuple[int, ...]  # untrimmed ids to keep, ascending: a TrimRecord's ``keep``


class TrimLikeRecord(StageRecord):
    """``gguf``: ``source`` cut to the given token ids (no selection, no gate of its own)."""

    gguf: Path
    vocab_size: int

    def trimmed(self) -> Input:
        return self.input_for(self.gguf)


def run_trim_like(inputs: TrimLikeInputs, out_dir: Path) -> TrimLikeRecord:
    """Cut ``inputs.source`` to ``inputs.keep`` (:func:`~fieldpack.builder.trim.gguf_trim.write_trimmed_gguf`).

    For ``--ship-adapter --trim-vocab``: the merged (base + LoRA) reference must have the shipped base model's
    vocabulary, ids included, for the adapter check and the quality stage to compare logits row for row; trimming it
    afresh could keep other tokens, since the general tokens are chosen by the model's own predictions.
    Raises ModelLoadError (a special token the list drops, a tensor whose rows are not the vocabulary).
    """
    from fieldpack.builder.trim.gguf_trim import write_trimmed_gguf

    res = write_trimmed_gguf(inputs.source.path, out_dir / "trimmed.gguf", list(inputs.keep))
    return TrimLikeRecord(gguf=res.path, vocab_size=res.vocab_after)


TRIM_LIKE = Stage("trim-vocab-like", "1", TrimLikeRecord, run_trim_like, libraries=("gguf", "numpy"),
                  code=("fieldpack.builder.trim.gguf_trim", "fieldpack.builder.stages.trim"),
                  label=lambda i: f"trim the merged reference to the same {len(i.keep)} tokens")
