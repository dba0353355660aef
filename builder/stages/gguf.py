"""The ``gguf input`` stage: a GGUF the user already has (``fieldpack build --model x.gguf``) as the build's
model source, in place of ``convert`` and ``parity``.

Its record is a :class:`~.model.ConvertRecord` (``conversion``: the facts read from the file's header by
:func:`~fieldpack.builder.gguf_input.inspect_gguf`) plus the file type, so every later stage reads it exactly
as it reads a conversion. The file is hard-linked (copied across file systems, or when it is not writable)
into the stage's ``out/``: the cache then verifies it like any artefact, and a record reused from the cache
never points at a path the user may since have moved. The key holds only the file's sha256, so a docs-only
rebuild reuses it.

What follows (wired by :mod:`.orchestrator`): no parity stage (there is no reference to compare with;
the manifest says ``not applicable, GGUF input``); ``eval split`` counts ~4 characters per token (a GGUF has
no ``tokenizer.json``); then either the file ships as is and ``quality`` measures its perplexity only, or,
when ``--quant`` names another type, ``quantize`` re-quantizes it (``allow_requantize`` when it is already
quantized) and ``quality`` measures PPL/KLD against it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fieldpack.builder.stages.base import Input, Stage, StageInputs
from fieldpack.builder.stages.model import ConvertRecord


class GgufInputInputs(StageInputs):
    gguf: Input  # the user's .gguf file


class GgufInputRecord(ConvertRecord):
    """``conversion``: facts of the GGUF (its path inside the stage's ``out/``, sha256, size, architecture,
    shape, vocabulary, special tokens, tensor types); ``file_type``: fieldpack's name of ``general.file_type``
    (``"Q4_K_M"``, or gguf's ``"MOSTLY_IQ2_XS"``); ``quantized``: False for F32/F16/BF16 files."""

    file_type: str
    file_type_id: int
    quantized: bool


def link_or_copy(src: Path, dst: Path) -> Path:
    """``dst`` as a hard link to ``src`` when both are on one file system and ``src`` is writable by us (the
    cache fsyncs its artefacts through a read-write handle), else a byte copy. Returns ``dst``."""
    try:
        if not os.access(src, os.W_OK):
            raise PermissionError(f"{src} is read-only")
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def run_gguf_input(inputs: GgufInputInputs, out_dir: Path) -> GgufInputRecord:
    """Bring the GGUF into ``out_dir`` and read its facts (no llama.cpp load: ``check_inputs`` did it).

    Raises:
        InputNotFoundError, ModelLoadError, UnsupportedArchitectureError: from
        :func:`~fieldpack.builder.gguf_input.inspect_gguf`.
    """
    from fieldpack.builder.gguf_input import inspect_gguf

    src = inputs.gguf.path
    info = inspect_gguf(link_or_copy(src, out_dir / (src.name if src.suffix.lower() == ".gguf" else "model.gguf")),
                        load_check=False)
    return GgufInputRecord(conversion=info.model, file_type=info.file_type, file_type_id=info.file_type_id,
                           quantized=info.quantized)


GGUF_INPUT = Stage("gguf-input", "1", GgufInputRecord, run_gguf_input, libraries=("gguf",),
                   code=("fieldpack.builder.gguf_input", "fieldpack.builder.gguf_header"),
                   label=lambda _: "read GGUF")
