"""Stage ``embedder``: sentence-transformers checkpoint -> ONNX (fp32, int8 kept when it passes the quality gate);
stage ``embedder-adapt`` (with ``--adapt-embedder``): the checkpoint fine-tuned on the build's documents, kept when it
beats the base model on held-out pseudo-queries (:mod:`builder.embedder_adapt`), then exported like the base.

Inputs: the checkpoint folder (content hash), the recorded name, whether to try int8. Depends on nothing the
documents or the language model change, so a docs-only or model-only rebuild reuses it.
"""

from __future__ import annotations

from pathlib import Path

from fieldpack.builder.embedder_adapt import AdaptResult
from fieldpack.builder.embedder_export import EmbedderExport
from fieldpack.builder.stages.base import Input, Stage, StageInputs, StageRecord

EMBEDDER_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "tokenizers")


class EmbedderInputs(StageInputs):
    checkpoint: Input
    name: str | None = None
    int8: bool = True

    @classmethod
    def from_config(cls, embedder: Path | None, int8: bool) -> "EmbedderInputs":
        """Resolve the default embedder (the packaged all-MiniLM-L6-v2) and hash the checkpoint folder."""
        from fieldpack.builder.embedder_export import DEFAULT_NAME, default_model_dir

        if embedder is None:
            return cls(checkpoint=Input.tree(default_model_dir()), name=DEFAULT_NAME, int8=int8)
        return cls(checkpoint=Input.tree(Path(embedder)), int8=int8)


class EmbedderRecord(StageRecord):
    """``export``: the ONNX file, its tokenizer, shape facts and the int8 gate figures."""

    export: EmbedderExport


def run_embedder(inputs: EmbedderInputs, out_dir: Path) -> EmbedderRecord:
    """Export into ``out_dir`` (``embedder.onnx``, ``tokenizer.json``). Raises what :func:`export_embedder` does."""
    from fieldpack.builder.embedder_export import export_embedder
    from fieldpack.builder.quiet import quiet_third_party

    quiet_third_party()  # this stage loads torch/transformers
    return EmbedderRecord(export=export_embedder(inputs.checkpoint.path, out_dir, int8=inputs.int8,
                                                 name=inputs.name))


EMBEDDER = Stage("embedder", "1", EmbedderRecord, run_embedder, libraries=EMBEDDER_LIBRARIES,
                 code=("fieldpack.builder.embedder_export", "fieldpack.retrieval.embedder"))


# --- embedder-adapt: fine-tune the embedder on the documents (optional) ---------------------------------------------------
class EmbedderAdaptInputs(StageInputs):
    checkpoint: Input  # the base sentence-transformers folder
    chunks: Input  # the ingest stage's chunks.jsonl
    steps: int = 200
    batch_size: int = 32
    seed: int = 0


class EmbedderAdaptRecord(StageRecord):
    """``result``: the gate figures and whether the adapted model (in ``out/model``) was kept."""

    result: AdaptResult


ADAPTED_DIR = "model"


def run_embedder_adapt(inputs: EmbedderAdaptInputs, out_dir: Path) -> EmbedderAdaptRecord:
    """Fine-tune on pairs mined from the chunks; keep ``out_dir/model`` only if it passes the gate.
    Raises what :func:`builder.embedder_adapt.adapt_embedder` does."""
    from fieldpack.builder.embedder_adapt import adapt_embedder
    from fieldpack.builder.quiet import quiet_third_party
    from fieldpack.builder.stages.docs import _read_chunks

    quiet_third_party()
    chunks = _read_chunks(inputs.chunks.path)
    return EmbedderAdaptRecord(result=adapt_embedder(inputs.checkpoint.path, chunks, out_dir / ADAPTED_DIR,
                                             steps=inputs.steps, batch_size=inputs.batch_size, seed=inputs.seed))


EMBEDDER_ADAPT = Stage("embedder-adapt", "1", EmbedderAdaptRecord, run_embedder_adapt, libraries=("torch", "transformers", "sentence-transformers"),
              code=("fieldpack.builder.embedder_adapt",))
