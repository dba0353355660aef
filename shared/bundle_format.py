"""The fieldpack bundle format (``.fpk``), defined once.

A bundle is an **uncompressed POSIX tar archive** (pax format). Uncompressed, so a device can hash and unpack
it in one streaming pass with no decompressor and seek to any member; the payload (GGUF, ONNX) does not
compress anyway.

Member order is fixed and checked by the reader::

    manifest.json          MANIFEST_NAME   UTF-8 JSON, schema in shared.manifest (first, so a reader can
                                           validate before reading anything else)
    manifest.json.sig      SIGNATURE_NAME  detached ed25519 signature over the exact bytes of manifest.json
                                           (JSON: {"alg": "ed25519", "key_id": ..., "signature": base64})
    model.gguf             MODEL_NAME      the language model, GGUF v3
    embedder/model.onnx    EMBEDDER_NAME   sentence embedder; input_ids/attention_mask -> (batch, dim) float32,
                                           mean-pooled and L2-normalised inside the graph
    embedder/tokenizer.json EMBEDDER_TOKENIZER_NAME  HF tokenizers file for the embedder
    index.sqlite           INDEX_NAME      chunks + sqlite-vec vec0 + FTS5
    recipe.toml            RECIPE_NAME     the exact build recipe (replayable with ``fieldpack build --recipe``)
    adapter.gguf           ADAPTER_NAME    optional (format 2 only): a llama.cpp LoRA adapter GGUF that the device
                                           applies on top of ``model.gguf`` at load (``manifest.adapter``)

Every member after the signature is listed in the manifest with its size (bytes) and sha256 (hex); nothing else
may be in the archive. Members are regular files with relative POSIX paths: no absolute paths, no ``..``, no
links, devices or FIFOs.

Versioning: :data:`FORMAT_VERSION` is an integer bumped on any incompatible change; a reader accepts exactly
the versions in :data:`SUPPORTED_FORMAT_VERSIONS`. A bundle that ships its LoRA adapter apart from the base model
(``fieldpack build --ship-adapter``) is written as :data:`ADAPTER_FORMAT_VERSION` (2), so a device whose fieldpack
reads only format 1 refuses it by version instead of running the base model without the adapter; every other
bundle is still written as format 1, which every device reads.
"""

from __future__ import annotations

from typing import Final

FORMAT_NAME: Final = "fieldpack-bundle"
FORMAT_VERSION: Final = 1
#: The format of a bundle whose model is a base GGUF plus a LoRA adapter member (:data:`ADAPTER_NAME`).
ADAPTER_FORMAT_VERSION: Final = 2
SUPPORTED_FORMAT_VERSIONS: Final = frozenset({1, 2})
EXTENSION: Final = ".fpk"

MANIFEST_NAME: Final = "manifest.json"
SIGNATURE_NAME: Final = "manifest.json.sig"
MODEL_NAME: Final = "model.gguf"
EMBEDDER_NAME: Final = "embedder/model.onnx"
EMBEDDER_TOKENIZER_NAME: Final = "embedder/tokenizer.json"
INDEX_NAME: Final = "index.sqlite"
RECIPE_NAME: Final = "recipe.toml"
ADAPTER_NAME: Final = "adapter.gguf"

#: Members every bundle must carry, in archive order after the manifest and signature.
REQUIRED_MEMBERS: Final = (MODEL_NAME, EMBEDDER_NAME, EMBEDDER_TOKENIZER_NAME, INDEX_NAME, RECIPE_NAME)

#: Largest manifest a reader accepts (bytes); guards against a hostile archive.
MAX_MANIFEST_BYTES: Final = 4 * 1024 * 1024
#: Largest signature file a reader accepts (bytes).
MAX_SIGNATURE_BYTES: Final = 4096

SIGNATURE_ALG: Final = "ed25519"

#: Key files written by ``fieldpack keygen``.
PRIVATE_KEY_FILE: Final = "builder.key"
PUBLIC_KEY_FILE: Final = "builder.pub"

#: Index database schema names (the builder writes them, the device queries them).
INDEX_CHUNKS_TABLE: Final = "chunks"
INDEX_VEC_TABLE: Final = "chunks_vec"
INDEX_FTS_TABLE: Final = "chunks_fts"
INDEX_META_TABLE: Final = "meta"
