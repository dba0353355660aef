"""builder.convert: HF checkpoint -> GGUF, checked by reading the file back and by loading it in llama.cpp."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from fieldpack.builder.convert import convert_hf_to_gguf, hub_or_local
from fieldpack.builder.convert.tokenizer import read_sentencepiece_model
from fieldpack.shared.errors import (
    InputNotFoundError,
    ModelLoadError,
    UnsupportedArchitectureError,
    UnsupportedTokenizerError,
    UsageError,
)


def _reader(path: Path):
    import gguf

    return gguf.GGUFReader(path)


def _field(reader, key: str):
    import gguf

    f = reader.fields[key]
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i][0].item() for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]][0].item()


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".complete", "train_log.json"))
    return dst


@pytest.mark.parametrize("arch,pre", [("llama", "llama-bpe"), ("qwen2", "qwen2")])
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_conversion_result_describes_the_file(converted, tiny_dirs, arch: str, pre: str, outtype: str) -> None:
    r = converted(arch, outtype)
    assert r.path.is_file()
    assert r.sha256 == hashlib.sha256(r.path.read_bytes()).hexdigest()
    assert r.size_bytes == r.path.stat().st_size
    assert (r.architecture, r.tokenizer_model, r.tokenizer_pre) == (arch, "gpt2", pre)
    assert (r.n_embd, r.n_layer, r.n_head, r.n_head_kv, r.vocab_size, r.n_ctx_train) == (256, 2, 4, 2, 1024, 512)
    assert r.stop_strings == ["<|im_end|>", "<|endoftext|>"]
    assert r.chat_template is not None and "<|im_start|>" in r.chat_template
    assert r.add_bos is (arch == "llama")

    reader = _reader(r.path)
    tensors = {t.name: t for t in reader.tensors}
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    assert r.parameter_count == n_params
    types = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    assert r.tensor_types == types
    if outtype == "f16":  # matrices F16, norms/biases F32
        assert tensors["blk.0.attn_q.weight"].tensor_type.name == "F16"
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    else:
        assert set(types) == {"F32"}
    # HF parameter count: every weight once (tied embeddings counted once)
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.float32)
    assert r.parameter_count == sum(p.numel() for p in hf.parameters())


def test_tied_embeddings_write_no_output_weight(converted) -> None:
    qwen = {t.name for t in _reader(converted("qwen2", "f16").path).tensors}
    llama = {t.name for t in _reader(converted("llama", "f16").path).tensors}
    assert "output.weight" not in qwen and "token_embd.weight" in qwen
    assert "output.weight" in llama
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= qwen
    assert not any(n.endswith(".bias") for n in llama)


def test_gguf_metadata_matches_tokenizer_and_config(converted, tiny_llama_dir: Path) -> None:
    r = converted("llama", "f16")
    reader = _reader(r.path)
    tok = json.loads((tiny_llama_dir / "tokenizer.json").read_text())
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 1024
    for text, i in tok["model"]["vocab"].items():
        assert tokens[i] == text
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    assert all(types[i] == 3 for i in ids.values())  # CONTROL
    assert tokens[1000:] == [f"[PAD{i}]" for i in range(1000, 1024)] and set(types[1000:]) == {5}  # UNUSED
    assert _field(reader, "tokenizer.ggml.eot_token_id") == ids["<|im_end|>"]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == ids["<|endoftext|>"]
    assert _field(reader, "tokenizer.ggml.bos_token_id") == ids["<|begin_of_text|>"]
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    merges = tok["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges")[:5] == [m if isinstance(m, str) else " ".join(m) for m in merges[:5]]
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert _field(reader, "llama.attention.head_count_kv") == 2
    assert _field(reader, "general.file_type") == 1


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_llama_cpp_chats_with_the_conversion_and_stops_at_end_of_turn(converted, demo_corpus, arch: str) -> None:
    from llama_cpp import Llama

    from fieldpack.builder.tinymodel import make_qa_pairs

    pairs = make_qa_pairs(demo_corpus)[:10]
    llm = Llama(str(converted(arch, "f16").path), n_ctx=512, verbose=False, seed=0)
    stopped = exact = 0
    try:
        for question, answer in pairs:
            out = llm.create_chat_completion(
                messages=[{"role": "user", "content": question}], max_tokens=160, temperature=0.0
            )
            choice = out["choices"][0]
            stopped += choice["finish_reason"] == "stop"  # ended on <|im_end|> (EOG), not on max_tokens
            exact += choice["message"]["content"].strip() == answer
    finally:
        llm.close()
    assert stopped == len(pairs)
    assert exact >= 8  # the tiny model recites what it was trained on, through llama.cpp and the GGUF template


def test_sharded_checkpoint_converts_to_the_same_tensors(tiny_llama_dir: Path, converted, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    r = convert_hf_to_gguf(sharded, tmp_path / "sharded.gguf", outtype="f32")
    a = {t.name: np.array(t.data) for t in _reader(r.path).tensors}
    b = {t.name: np.array(t.data) for t in _reader(converted("llama", "f32").path).tensors}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_qk_permutation_is_applied_to_llama_only(converted, tiny_llama_dir: Path, tiny_qwen2_dir: Path) -> None:
    from safetensors import safe_open

    from fieldpack.builder.convert.arch import permute_qk

    def hf(d: Path, name: str) -> np.ndarray:
        with safe_open(str(d / "model.safetensors"), framework="pt") as fh:
            return fh.get_tensor(name).float().numpy()

    llama = {t.name: np.array(t.data) for t in _reader(converted("llama", "f32").path).tensors}
    qwen = {t.name: np.array(t.data) for t in _reader(converted("qwen2", "f32").path).tensors}
    q_hf = hf(tiny_llama_dir, "model.layers.0.self_attn.q_proj.weight")
    k_hf = hf(tiny_llama_dir, "model.layers.0.self_attn.k_proj.weight")
    np.testing.assert_array_equal(llama["blk.0.attn_q.weight"], permute_qk(q_hf, 4))
    np.testing.assert_array_equal(llama["blk.0.attn_k.weight"], permute_qk(k_hf, 2))  # GQA: KV heads
    assert not np.array_equal(llama["blk.0.attn_q.weight"], q_hf)
    q_qwen = hf(tiny_qwen2_dir, "model.layers.0.self_attn.q_proj.weight")
    np.testing.assert_array_equal(qwen["blk.0.attn_q.weight"], q_qwen)  # qwen2: NEOX RoPE, HF layout


def test_unsupported_architecture_is_refused_by_name(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _copy_model(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel") as info:
        convert_hf_to_gguf(d, tmp_path / "out.gguf")
    assert "LlamaForCausalLM" in str(info.value)  # the fix names what is supported
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize(
    "pre_tokenizer,named",
    [
        ({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+"}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
         r"split:\\p\{L\}\+"),
        ({"type": "Whitespace"}, "Whitespace"),
    ],
)
def test_unknown_pre_tokenizer_is_refused_by_name(tiny_qwen2_dir: Path, tmp_path: Path, pre_tokenizer, named) -> None:
    d = _copy_model(tiny_qwen2_dir, tmp_path / "m")
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = pre_tokenizer
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UnsupportedTokenizerError, match=named) as info:
        convert_hf_to_gguf(d, tmp_path / "out.gguf")
    assert "llama-bpe" in str(info.value)


def test_missing_inputs_are_named(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="nope"):
        convert_hf_to_gguf(tmp_path / "nope", tmp_path / "o.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        convert_hf_to_gguf(empty, tmp_path / "o.gguf")
    d = _copy_model(tiny_llama_dir, tmp_path / "noweights")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors") as info:
        convert_hf_to_gguf(d, tmp_path / "o.gguf")
    assert "safe_serialization" in str(info.value)
    d = _copy_model(tiny_llama_dir, tmp_path / "notok")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer"):
        convert_hf_to_gguf(d, tmp_path / "o.gguf")
    d = _copy_model(tiny_llama_dir, tmp_path / "truncated")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        convert_hf_to_gguf(d, tmp_path / "o.gguf")


def test_spm_style_tokenizer_json_becomes_a_llama_vocab(spm_llama_dir: Path, tmp_path: Path) -> None:
    r = convert_hf_to_gguf(spm_llama_dir, tmp_path / "spm.gguf", outtype="f32")
    assert (r.tokenizer_model, r.tokenizer_pre, r.bos_id, r.eos_id, r.add_bos) == ("llama", None, 1, 2, True)
    reader = _reader(r.path)
    types = _field(reader, "tokenizer.ggml.token_type")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    assert tokens[3] == "<0x00>" and types[3:259] == [6] * 256  # BYTE
    assert types[0] == 2 and types[1] == types[2] == 3  # UNKNOWN, CONTROL
    assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
    merged = [s for s, t in zip(scores, types, strict=True) if t == 1 and s < 0]
    assert merged and merged == sorted(merged, reverse=True)  # earlier merges score higher


def test_sentencepiece_model_proto_is_read_without_sentencepiece(tmp_path: Path) -> None:
    def field(num: int, wt: int, payload: bytes) -> bytes:
        key = bytes([(num << 3) | wt])
        if wt == 2:
            return key + bytes([len(payload)]) + payload
        return key + payload

    def piece(text: str, score: float, ptype: int | None) -> bytes:
        body = field(1, 2, text.encode()) + field(2, 5, struct.pack("<f", score))
        if ptype is not None:
            body += field(3, 0, bytes([ptype]))
        return field(1, 2, body)

    proto = (piece("<unk>", 0.0, 2) + piece("<s>", 0.0, 3) + piece("▁a", -1.5, None) + piece("<0x41>", 0.0, 6)
             + field(2, 2, field(3, 0, bytes([2])))  # trainer_spec.model_type = BPE
             + field(3, 2, field(3, 0, bytes([0]))))  # normalizer_spec.add_dummy_prefix = false
    path = tmp_path / "tokenizer.model"
    path.write_bytes(proto)
    spm = read_sentencepiece_model(path)
    assert spm.pieces == [("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("▁a", -1.5, 1), ("<0x41>", 0.0, 6)]
    assert spm.model_type == 2 and spm.add_dummy_prefix is False
    path.write_bytes(proto[:-3])
    with pytest.raises(ModelLoadError, match="tokenizer.model"):
        read_sentencepiece_model(path)


def test_hub_or_local_uses_a_folder_and_asks_for_one_offline(tmp_path: Path, monkeypatch) -> None:
    import huggingface_hub.constants

    assert hub_or_local(str(tmp_path)) == tmp_path
    with pytest.raises(InputNotFoundError, match="does-not-exist"):
        hub_or_local(str(tmp_path / "does-not-exist"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(UsageError) as info:
        hub_or_local("fieldpack-test/definitely-not-cached")
    msg = str(info.value)
    assert "\n" not in msg
    assert "fieldpack-test/definitely-not-cached" in msg and "local" in msg
