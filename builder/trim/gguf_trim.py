"""Write a GGUF with a trimmed vocabulary: tokens, scores, types and merges cut to the kept ids, special token ids
remapped, and the rows of ``token_embd.weight`` and ``output.weight`` (when not tied) cut to the kept ids.

Rows are cut as stored, so a quantized GGUF (Q8_0, Q4_K, ...: every GGML block lies inside one row) is trimmed
without dequantizing: the kept rows are bit-identical, and so are the logits of kept tokens on the same input.
Everything else (hyper-parameters, chat template, every other tensor) is copied unchanged.
Reference: gguf-py ``scripts/gguf_new_metadata.py`` (copying fields and tensors).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fieldpack.builder.trim.vocab import GgufVocab, trimmed_merges
from fieldpack.shared.atomic import atomic_path
from fieldpack.shared.errors import ModelLoadError

log = logging.getLogger(__name__)

#: Tensors with one row per token (GGUF ``ne[1] == n_vocab``).
VOCAB_TENSORS = ("token_embd.weight", "output.weight")
_TOKEN_ID_KEY = re.compile(r"^tokenizer\.ggml\.\w+_token_id$")


def read_gguf_vocab(path: Path) -> GgufVocab:
    """The tokenizer of a GGUF file. Raises ModelLoadError when it has none."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    f = reader.fields

    def get(key: str):
        return f[key].contents() if key in f else None

    model, tokens = get("tokenizer.ggml.model"), get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ModelLoadError(f"{path} has no tokenizer (tokenizer.ggml.model/tokens)", hint="use a GGUF with its tokenizer")
    types = get("tokenizer.ggml.token_type") or [1] * len(tokens)
    return GgufVocab(model=str(model), tokens=list(tokens), types=[int(t) for t in types],
                     scores=get("tokenizer.ggml.scores"), merges=get("tokenizer.ggml.merges"))


@dataclass(frozen=True)
class TrimmedFile:
    """What :func:`write_trimmed_gguf` wrote: sizes in bytes, vocabulary sizes in tokens."""

    path: Path
    size_bytes: int
    source_bytes: int
    vocab_before: int
    vocab_after: int
    merges_before: int
    merges_after: int


def write_trimmed_gguf(src: Path, dst: Path, keep: list[int]) -> TrimmedFile:
    """Write ``src`` with only the token ids ``keep`` (ascending; new id = position in ``keep``) to ``dst``,
    atomically.

    Raises:
        ModelLoadError: ``src`` has no tokenizer, a special token id that ``keep`` drops, or a per-token tensor
            whose row count is not the vocabulary size.
    """
    import gguf

    src, dst = Path(src), Path(dst)
    reader = gguf.GGUFReader(str(src))
    vocab = read_gguf_vocab(src)
    n_vocab = len(vocab.tokens)
    keep_arr = np.asarray(keep, dtype=np.int64)
    if keep_arr.size == 0 or np.any(np.diff(keep_arr) <= 0) or keep_arr[-1] >= n_vocab:
        raise ModelLoadError(f"kept ids for {src.name} are not ascending ids below {n_vocab}", hint="report this as a bug")
    new_id = {int(old): new for new, old in enumerate(keep_arr)}
    merges = trimmed_merges(vocab, keep) if vocab.merges is not None else None
    arch = reader.fields["general.architecture"].contents()
    replaced: dict[str, object] = {
        "tokenizer.ggml.tokens": [vocab.tokens[i] for i in keep],
        "tokenizer.ggml.token_type": [vocab.types[i] for i in keep],
    }
    if vocab.scores is not None:
        replaced["tokenizer.ggml.scores"] = [float(vocab.scores[i]) for i in keep]
    if merges is not None:
        replaced["tokenizer.ggml.merges"] = merges
    if f"{arch}.vocab_size" in reader.fields:
        replaced[f"{arch}.vocab_size"] = len(keep)

    with atomic_path(dst) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
        for fld in reader.fields.values():
            if fld.name == "general.architecture" or fld.name.startswith("GGUF."):
                continue
            vtype = fld.types[0]
            sub = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = replaced.get(fld.name, fld.contents())
            if _TOKEN_ID_KEY.match(fld.name):
                old = int(fld.contents())
                if old not in new_id:
                    if 0 <= old < n_vocab:
                        raise ModelLoadError(f"{fld.name} {old} of {src.name} is not kept", hint="report this as a bug")
                    continue  # an id outside the vocabulary (some converters write -1 or n_vocab): drop it
                value = new_id[old]
            w.add_key_value(fld.name, value, vtype, sub_type=sub)
        rows: dict[str, np.ndarray] = {}
        for t in reader.tensors:
            data = t.data
            if t.name in VOCAB_TENSORS:
                if data.shape[0] != n_vocab:
                    raise ModelLoadError(f"{t.name} of {src.name} has {data.shape[0]} rows, not {n_vocab}",
                                         hint="the file's vocabulary and embedding disagree; re-convert it")
                data = np.ascontiguousarray(data[keep_arr])
            rows[t.name] = data
            w.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in reader.tensors:
            w.write_tensor_data(rows[t.name], tensor_endianess=reader.endianess)
        w.close()
    result = TrimmedFile(path=dst, size_bytes=dst.stat().st_size, source_bytes=src.stat().st_size,
                         vocab_before=n_vocab, vocab_after=len(keep),
                         merges_before=len(vocab.merges or ()), merges_after=len(merges or ()))
    log.info("trimmed %s -> %s: %d -> %d tokens, %d -> %d bytes", src.name, dst.name, n_vocab, len(keep),
             result.source_bytes, result.size_bytes)
    return result
