"""Sentence embedder on ONNX Runtime + HF ``tokenizers``: the one way fieldpack turns text into vectors.

The builder embeds document chunks with this class on the exported ONNX file and the device embeds questions
with it, so both sides tokenize, truncate, pool and normalise identically. No torch, no transformers.

The ONNX graph is the one :func:`builder.embedder_export.export_embedder` writes: inputs ``input_ids``,
``attention_mask`` and (for BERT-like models) ``token_type_ids``, all ``(batch, seq) int64``; output
``sentence_embedding`` ``(batch, dim) float32``, mean-pooled and L2-normalised. A graph whose first output is
token-level ``(batch, seq, dim)`` (a plain encoder export) is mean-pooled over the attention mask here instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fieldpack.shared.errors import RuntimeLoadError, UsageError

if TYPE_CHECKING:
    import onnxruntime
    from tokenizers import Tokenizer

log = logging.getLogger(__name__)

_PAD_CANDIDATES = ("[PAD]", "<pad>", "<|pad|>", "<unk>")


def load_tokenizer(path: Path, *, max_tokens: int | None) -> Tokenizer:
    """Load a HF ``tokenizer.json`` set up the way fieldpack embeds.

    Args:
        path: the ``tokenizer.json``.
        max_tokens: truncate at this many tokens (special tokens included) and pad each batch to its longest
            text with the tokenizer's pad token; ``None``: no truncation and no padding (for counting).

    Raises:
        RuntimeLoadError: the file cannot be parsed by ``tokenizers``.
    """
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise RuntimeLoadError(
            f"cannot load embedder tokenizer {path}: {exc}", hint="the file must be a HF tokenizer.json"
        ) from exc
    declared = tok.padding  # the tokenizer.json's own padding settings, if any (dict or None)
    tok.no_padding()
    tok.no_truncation()
    if max_tokens is None:
        return tok
    tok.enable_truncation(max_length=max_tokens)
    if declared is not None:
        pad_id, pad_token = int(declared["pad_id"]), str(declared["pad_token"])
    else:
        pad_id, pad_token = 0, "[PAD]"
        for cand in _PAD_CANDIDATES:
            tid = tok.token_to_id(cand)
            if tid is not None:
                pad_id, pad_token = tid, cand
                break
    tok.enable_padding(pad_id=pad_id, pad_token=pad_token)  # no fixed length: pad to the batch's longest
    return tok


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """Tokenize ``texts`` into the model inputs.

    Returns:
        ``input_ids``, ``attention_mask`` and ``token_type_ids``, each ``(len(texts), seq) int64`` where
        ``seq`` is the longest encoding in the batch (after truncation).
    """
    encs = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.asarray([e.ids for e in encs], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in encs], dtype=np.int64),
        "token_type_ids": np.asarray([e.type_ids for e in encs], dtype=np.int64),
    }


def cpu_session(path: Path, threads: int | None, *, what: str) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session for ``path`` with every graph optimisation, one inter-op thread and
    ``threads`` intra-op threads (``None``: every core); errors-only logging.

    Raises:
        RuntimeLoadError: ONNX Runtime cannot load the file (``what`` names it in the message).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.inter_op_num_threads = 1
    if threads is not None:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... without a common base
        raise RuntimeLoadError(
            f"ONNX Runtime cannot load {what} {path}: {exc}",
            hint="the file is damaged or from an incompatible exporter; rebuild or reinstall the bundle",
        ) from exc


class OnnxEmbedder:
    """Embeds text with an ONNX sentence-embedding model.

    Args:
        onnx_path: the ``.onnx`` file (fp32 or int8 dynamic-quantised).
        tokenizer_path: the model's HF ``tokenizer.json``.
        max_tokens: truncation length in tokens, special tokens ([CLS]/[SEP]) included; text past it is cut.
        threads: ONNX Runtime intra-op threads; ``None`` lets ONNX Runtime use every core.

    Raises:
        RuntimeLoadError: a file is missing, or ONNX Runtime / tokenizers cannot load it.
        UsageError: ``max_tokens`` < 2 or ``threads`` < 1.

    The object owns a native ONNX Runtime session; call :meth:`close` (or use it as a context manager) to
    release it. ``embed`` may be called from several threads (ONNX Runtime sessions are thread-safe for run).
    """

    def __init__(
        self, onnx_path: Path, tokenizer_path: Path, *, max_tokens: int, threads: int | None = None
    ) -> None:
        onnx_path, tokenizer_path = Path(onnx_path), Path(tokenizer_path)
        if max_tokens < 2:
            raise UsageError(f"max_tokens={max_tokens} is too small for the embedder", hint="use at least 2")
        if threads is not None and threads < 1:
            raise UsageError(f"threads={threads} is not a thread count", hint="give 1 or more, or None for all")
        for p, what in ((onnx_path, "ONNX embedder"), (tokenizer_path, "embedder tokenizer")):
            if not p.is_file():
                raise RuntimeLoadError(
                    f"{what} file {p} does not exist", hint="reinstall the bundle or point at the right file"
                )
        self.onnx_path = onnx_path
        self.tokenizer_path = tokenizer_path
        self.max_tokens = max_tokens
        self._tokenizer = load_tokenizer(tokenizer_path, max_tokens=max_tokens)
        self._counter = load_tokenizer(tokenizer_path, max_tokens=None)
        self._session: onnxruntime.InferenceSession | None = self._load_session(onnx_path, threads)
        self._input_names = [i.name for i in self._session.get_inputs()]
        missing = {"input_ids", "attention_mask"} - set(self._input_names)
        if missing:
            raise RuntimeLoadError(
                f"ONNX embedder {onnx_path} lacks the input(s) {sorted(missing)} (it has {self._input_names})",
                hint="export the embedder with `fieldpack` (builder.embedder_export)",
            )
        self._output_name = self._session.get_outputs()[0].name
        self._dimension = self._probe_dimension()

    # --- loading -------------------------------------------------------------------------------------------
    @staticmethod
    def _load_session(path: Path, threads: int | None) -> onnxruntime.InferenceSession:
        return cpu_session(path, threads, what="embedder")

    def _probe_dimension(self) -> int:
        shape = self._require_session().get_outputs()[0].shape
        if shape and isinstance(shape[-1], int) and shape[-1] > 0:
            return int(shape[-1])
        return int(self.embed(["dimension probe"]).shape[1])

    def _require_session(self) -> onnxruntime.InferenceSession:
        if self._session is None:
            raise RuntimeLoadError(f"embedder {self.onnx_path} is closed", hint="create a new OnnxEmbedder")
        return self._session

    # --- public --------------------------------------------------------------------------------------------
    @property
    def dimension(self) -> int:
        """Embedding width (e.g. 384 for all-MiniLM-L6-v2)."""
        return self._dimension

    def count_tokens(self, text: str) -> int:
        """Number of tokenizer tokens in ``text``, without special tokens and without truncation.

        This is the chunking budget unit; a chunk of ``n`` tokens is embedded as ``n + 2`` ([CLS] ... [SEP]
        for BERT-like models), so keep chunk budgets below ``max_tokens - 2`` to avoid truncation.
        """
        return len(self._counter.encode(text, add_special_tokens=False).ids)

    def embed(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Embed ``texts``.

        Texts are sorted by length and batched (``batch_size`` per ONNX run, padded to the longest in the
        batch) and truncated at ``max_tokens``; results come back in input order.

        Returns:
            ``(len(texts), dimension) float32``, each row L2-normalised (a zero vector stays zero).

        Raises:
            UsageError: ``batch_size`` < 1 or an item is not a ``str``.
            RuntimeLoadError: the embedder is closed or ONNX Runtime fails on the input.
        """
        if batch_size < 1:
            raise UsageError(f"batch_size={batch_size} must be at least 1", hint="use e.g. 32")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UsageError(f"text #{i} is {type(t).__name__}, not str", hint="pass a list of strings")
        session = self._require_session()
        n = len(texts)
        if n == 0:
            return np.zeros((0, getattr(self, "_dimension", 0)), dtype=np.float32)
        lengths = [len(t) for t in texts]
        order = sorted(range(n), key=lambda i: lengths[i])
        out: np.ndarray | None = None
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            vecs = self._run(session, [texts[i] for i in idx])
            if out is None:
                out = np.empty((n, vecs.shape[1]), dtype=np.float32)
            out[idx] = vecs
        assert out is not None
        return out

    def _run(self, session: onnxruntime.InferenceSession, batch: list[str]) -> np.ndarray:
        arrays = encode_batch(self._tokenizer, batch)
        feed = {name: arrays[name] for name in self._input_names if name in arrays}
        mask = arrays["attention_mask"]
        try:
            raw = session.run([self._output_name], feed)[0]
        except Exception as exc:  # onnxruntime's RuntimeException family
            raise RuntimeLoadError(
                f"ONNX Runtime failed embedding a batch of {len(batch)} with {self.onnx_path}: {exc}",
                hint="check that the embedder file matches its tokenizer",
            ) from exc
        vecs = np.asarray(raw, dtype=np.float32)
        if vecs.ndim == 3:  # token embeddings (b, seq, dim): mean-pool over the attention mask
            m = mask[:, :, None].astype(np.float32)
            vecs = (vecs * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        return (vecs / np.maximum(norms, 1e-12)).astype(np.float32)

    def close(self) -> None:
        """Release the ONNX Runtime session. Idempotent; ``embed`` after ``close`` raises."""
        self._session = None

    def __enter__(self) -> OnnxEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"OnnxEmbedder({self.onnx_path.name}, dim={getattr(self, '_dimension', '?')}, max={self.max_tokens})"
