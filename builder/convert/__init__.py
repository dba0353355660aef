"""Hugging Face checkpoint -> GGUF conversion, on the ``gguf`` package's writer (not llama.cpp's script).

Public surface::

    convert_hf_to_gguf(model_dir, out_path, *, outtype="f16") -> ConversionResult
    hub_or_local(model) -> Path

Modules: :mod:`.checkpoint` (lazy safetensors), :mod:`.arch` (supported architectures, hyperparameters,
tensor plan, Q/K permutation), :mod:`.gemma3` (Gemma 3 specifics), :mod:`.tokenizer` (picks the tokenizer
reader: :mod:`.bpe` byte-level BPE and pre-tokenizer detection, :mod:`.sentencepiece`, :mod:`.special_tokens`,
:mod:`.vocab` the record), :mod:`.writer` (the GGUF file), :mod:`.hub` (local path or hub id),
:mod:`.from_gguf_checkpoint` (an HF checkpoint made from a GGUF by transformers).
"""

from fieldpack.builder.convert.arch import SUPPORTED_ARCHITECTURES
from fieldpack.builder.convert.hub import hub_or_local
from fieldpack.builder.convert.tokenizer import KNOWN_PRE_TOKENIZERS
from fieldpack.builder.convert.writer import ConversionResult, convert_hf_to_gguf

__all__ = [
    "KNOWN_PRE_TOKENIZERS",
    "SUPPORTED_ARCHITECTURES",
    "ConversionResult",
    "convert_hf_to_gguf",
    "hub_or_local",
]
