"""Stages of the language model's source: ``convert`` (HF checkpoint -> F16/F32 GGUF) and ``parity`` (the GGUF
agrees with the checkpoint).

Both read only the checkpoint (by content hash) and options, never the documents, so a docs-only rebuild
reuses them. A build that starts from a GGUF instead of a HF folder plugs in here: the ``gguf input`` stage
(:mod:`.gguf`), whose record is a :class:`ConvertRecord` (a ``ConversionResult`` read from the file), and no
parity stage; every stage after it only reads ``ConvertRecord.conversion``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fieldpack.builder.convert.writer import ConversionResult
from fieldpack.builder.parity import ParityReport
from fieldpack.builder.stages.base import Input, Stage, StageInputs, StageRecord

CONVERT_CODE = ("fieldpack.builder.convert",)
TORCH_LIBRARIES = ("torch", "transformers", "safetensors", "tokenizers", "gguf")


class ConvertInputs(StageInputs):
    checkpoint: Input
    outtype: Literal["f16", "f32"] = "f16"


class ConvertRecord(StageRecord):
    """``conversion``: the GGUF (path, sha256, size) and the model facts the manifest needs."""

    conversion: ConversionResult

    def gguf(self) -> Input:
        """The converted GGUF as a downstream input."""
        return Input(path=self.conversion.path, sha256=self.conversion.sha256)


def run_convert(inputs: ConvertInputs, out_dir: Path) -> ConvertRecord:
    """Convert with our GGUF writer. Raises ModelLoadError, UnsupportedArchitectureError, ... (see convert)."""
    from fieldpack.builder.convert import convert_hf_to_gguf

    out = out_dir / f"model-{inputs.outtype}.gguf"
    return ConvertRecord(conversion=convert_hf_to_gguf(inputs.checkpoint.path, out, outtype=inputs.outtype))


CONVERT = Stage("convert", "1", ConvertRecord, run_convert, libraries=("gguf", "safetensors", "tokenizers", "numpy"),
                code=CONVERT_CODE)


class ParityInputs(StageInputs):
    checkpoint: Input
    gguf: Input


class ParityRecord(StageRecord):
    report: ParityReport


def run_parity(inputs: ParityInputs, out_dir: Path) -> ParityRecord:
    """Compare tokenization and logits. Raises ParityError when they disagree."""
    from fieldpack.builder.parity import check_parity
    from fieldpack.builder.quiet import quiet_third_party

    quiet_third_party()  # this stage loads torch/transformers
    return ParityRecord(report=check_parity(inputs.checkpoint.path, inputs.gguf.path))


PARITY = Stage("parity", "1", ParityRecord, run_parity, libraries=TORCH_LIBRARIES + ("llama_cpp_python",),
               code=("fieldpack.builder.parity", "fieldpack.builder.llama_eval"))
