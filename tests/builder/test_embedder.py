"""builder.embedder_export + retrieval.embedder: the ONNX graph matches sentence-transformers, the int8 gate
decides honestly, other checkpoints (CLS pooling, no tokenizer.json) export, bad ones are refused clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fieldpack.builder.embedder_export import GATE_SENTENCES, default_model_dir, export_embedder
from fieldpack.retrieval.embedder import OnnxEmbedder
from fieldpack.shared.errors import InputNotFoundError, RuntimeLoadError, UnsupportedArchitectureError, UsageError
from tests.retrieval_fixtures import ExportedEmbedder, minilm_fp32, minilm_int8  # noqa: F401

SENTENCES = [
    "The connection pool is exhausted. What should I do?",
    "hi",
    "Restart PostgreSQL in the maintenance window after raising max_connections to 200.",
    "Cavitation sounds like gravel in the pump casing " * 12,  # long: padding inside a batch
    "Über die Brücke fährt ein Zug.",
    "",
]


@pytest.fixture(scope="module")
def st_minilm():  # noqa: ANN201 - SentenceTransformer
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_model_dir()), device="cpu")


def test_fp32_onnx_matches_sentence_transformers(minilm_fp32: ExportedEmbedder, st_minilm) -> None:  # noqa: ANN001,F811
    rec = minilm_fp32.record
    assert (rec["dimension"], rec["pooling"], rec["normalized"], rec["max_tokens"]) == (384, "mean", True, 256)
    assert rec["precision"] == "fp32" and rec["kept_int8"] is False and rec["gate"] is None
    assert rec["parity_min_cosine"] > 0.999
    ref = st_minilm.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)  # (6, 384)
    with OnnxEmbedder(minilm_fp32.onnx_path, minilm_fp32.tokenizer_path, max_tokens=256) as emb:
        got = emb.embed(SENTENCES, batch_size=4)  # batches of mixed lengths, sorted and restored
        assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
        cos = np.sum(got * ref, axis=1)
        assert cos.min() > 0.999, cos
        one_by_one = np.stack([emb.embed([s])[0] for s in SENTENCES])
        np.testing.assert_allclose(one_by_one, got, atol=2e-5)  # padding does not leak into the pooling


def test_int8_gate_keeps_int8_for_minilm_and_records_figures(
    minilm_int8: ExportedEmbedder, minilm_fp32: ExportedEmbedder  # noqa: F811
) -> None:
    rec = minilm_int8.record
    gate = rec["gate"]
    assert gate is not None and gate["k"] == 1
    assert gate["passed"] and rec["kept_int8"] and rec["precision"] == "int8"
    assert 0.99 <= gate["mean_cosine"] < 1.0 and gate["min_cosine"] <= gate["mean_cosine"]
    assert gate["recall_at_k"] >= 0.9
    assert rec["size_bytes"] == rec["int8_bytes"] == minilm_int8.onnx_path.stat().st_size
    assert rec["int8_bytes"] < rec["fp32_bytes"] / 3  # ~23 MB vs ~91 MB
    with OnnxEmbedder(minilm_int8.onnx_path, minilm_int8.tokenizer_path, max_tokens=256) as e8, OnnxEmbedder(
        minilm_fp32.onnx_path, minilm_fp32.tokenizer_path, max_tokens=256
    ) as e32:
        cos = np.sum(e8.embed(list(GATE_SENTENCES)) * e32.embed(list(GATE_SENTENCES)), axis=1)
    assert cos.mean() == pytest.approx(gate["mean_cosine"], abs=1e-5)  # the record is what the files do


def _tiny_st_checkpoint(folder: Path, *, pooling: str = "cls", tokenizer_json: bool = True) -> Path:
    """A random 2-layer BERT (hidden 32) as a sentence-transformers folder, MiniLM's WordPiece vocabulary."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(folder)
    src = default_model_dir()
    names = ["vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]
    names += ["tokenizer.json"] if tokenizer_json else []
    for name in names:
        shutil.copy(src / name, folder / name)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": pooling == "max",
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    return folder


def test_other_checkpoint_cls_pooling_without_tokenizer_json(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    ckpt = _tiny_st_checkpoint(tmp_path / "tiny", pooling="cls", tokenizer_json=False)
    rec = export_embedder(ckpt, tmp_path / "out", int8=True, gate_min_cosine=1.0)
    assert (rec.name, rec.dimension, rec.pooling) == ("tiny", 32, "cls")
    assert rec.max_tokens == 64  # sentence_bert_config's max_seq_length
    assert rec.tokenizer_path.is_file()  # built from vocab.txt through transformers' fast tokenizer
    # An unreachable gate: int8 is measured, recorded, and not kept.
    assert rec.gate is not None and rec.gate.mean_cosine < 1.0 and not rec.gate.passed
    assert not rec.kept_int8 and rec.precision == "fp32" and rec.size_bytes == rec.fp32_bytes
    assert rec.int8_bytes is not None and rec.int8_bytes < rec.fp32_bytes
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["embedder.onnx", "tokenizer.json"]
    ref = SentenceTransformer(str(ckpt), device="cpu").encode(SENTENCES, normalize_embeddings=True)
    with OnnxEmbedder(rec.onnx_path, rec.tokenizer_path, max_tokens=rec.max_tokens) as emb:
        got = emb.embed(SENTENCES)
    assert np.sum(got * ref, axis=1).min() > 0.999


def test_unsupported_checkpoints_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="does not exist"):
        export_embedder(tmp_path / "missing", tmp_path / "out")
    ckpt = _tiny_st_checkpoint(tmp_path / "maxpool", pooling="max")
    with pytest.raises(UnsupportedArchitectureError, match="pooling_mode_max_tokens") as err:
        export_embedder(ckpt, tmp_path / "out")
    assert "Fix:" in str(err.value)
    dense = _tiny_st_checkpoint(tmp_path / "dense", pooling="mean")
    mods = json.loads((dense / "modules.json").read_text())
    mods.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (dense / "modules.json").write_text(json.dumps(mods))
    with pytest.raises(UnsupportedArchitectureError, match="'Dense'"):
        export_embedder(dense, tmp_path / "out")
    with pytest.raises(UsageError):
        export_embedder(dense, tmp_path / "out", gate_min_cosine=1.5)
    assert not (tmp_path / "out" / "embedder.onnx").exists()


def test_device_embedder_truncates_counts_and_closes(minilm_int8: ExportedEmbedder, tmp_path: Path) -> None:  # noqa: F811
    emb = OnnxEmbedder(minilm_int8.onnx_path, minilm_int8.tokenizer_path, max_tokens=32, threads=1)
    assert emb.dimension == 384
    assert emb.count_tokens("hello world") == 2  # no [CLS]/[SEP]
    long = " ".join(f"word{i}" for i in range(200))
    assert emb.count_tokens(long) > 32  # counting never truncates
    a, b = emb.embed([long, long + " and a different ending that is cut off"])
    np.testing.assert_allclose(a, b, atol=1e-6)  # both truncated to the same 32 tokens
    assert emb.embed([]).shape == (0, 384)
    vecs = emb.embed(["x", "y"])
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    with pytest.raises(UsageError):
        emb.embed(["x"], batch_size=0)
    emb.close()
    emb.close()  # idempotent
    with pytest.raises(RuntimeLoadError, match="closed"):
        emb.embed(["x"])
    with pytest.raises(RuntimeLoadError, match="does not exist"):
        OnnxEmbedder(tmp_path / "none.onnx", minilm_int8.tokenizer_path, max_tokens=32)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not an onnx graph")
    with pytest.raises(RuntimeLoadError, match="cannot load") as err:
        OnnxEmbedder(junk, minilm_int8.tokenizer_path, max_tokens=32)
    assert "Fix:" in str(err.value)
