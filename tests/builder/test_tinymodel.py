"""builder.tinymodel: a really trained tiny checkpoint, in the layout real checkpoints use."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fieldpack.builder import tinymodel
from fieldpack.shared.errors import InputNotFoundError, NoDocumentsError


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_model_folder_is_a_complete_checkpoint(tiny_dirs: dict[str, Path], arch: str) -> None:
    d = tiny_dirs[arch]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (d / name).is_file(), name
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert (cfg["hidden_size"], cfg["intermediate_size"]) == (256, 512)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (4, 2)
    assert cfg["tie_word_embeddings"] is (arch == "qwen2")
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"] and "<|im_end|>" in tcfg["chat_template"]
    assert tcfg["add_bos_token"] is (arch == "llama")
    gen = json.loads((d / "generation_config.json").read_text())
    tok = json.loads((d / "tokenizer.json").read_text())
    ids = {a["content"]: a["id"] for a in tok["added_tokens"]}
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    # vocab ~1000, padded to a multiple of 64 in the model
    assert 900 <= len(tok["model"]["vocab"]) <= 2000
    assert cfg["vocab_size"] % 64 == 0 and cfg["vocab_size"] >= len(tok["model"]["vocab"])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_training_drops_loss_far_below_uniform(tiny_dirs: dict[str, Path], arch: str) -> None:
    log = tinymodel.read_train_log(tiny_dirs[arch])
    assert log.first_loss > 0.8 * log.uniform_loss  # starts near a uniform guess ...
    assert log.final_loss < 0.15 * log.uniform_loss  # ... and really learned the corpus


def test_qwen2_variant_has_tied_embeddings_and_qkv_biases(tiny_qwen2_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_qwen2_dir / "model.safetensors"), framework="pt") as fh:
        names = set(fh.keys())
    assert "lm_head.weight" not in names
    assert {"model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.k_proj.bias",
            "model.layers.0.self_attn.v_proj.bias"} <= names


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_answers_in_chat_format_and_ends_its_turn(tiny_dirs: dict[str, Path], demo_corpus, arch: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tiny_dirs[arch]
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    question, answer = tinymodel.make_qa_pairs(demo_corpus)[4]
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=120, do_sample=False, eos_token_id=im_end, pad_token_id=im_end)
    new = out[0, ids.shape[1]:].tolist()
    assert im_end in new, tok.decode(new)
    assert tok.decode(new[: new.index(im_end)]).strip() == answer


def test_same_seed_same_weights_other_seed_other_weights(tmp_path: Path, demo_corpus: list[str]) -> None:
    def digest(d: Path) -> str:
        return hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()

    a = tinymodel.make_tiny_model(tmp_path / "a", arch="qwen2", corpus=demo_corpus, steps=3, seed=7)
    b = tinymodel.make_tiny_model(tmp_path / "b", arch="qwen2", corpus=demo_corpus, steps=3, seed=7)
    c = tinymodel.make_tiny_model(tmp_path / "c", arch="qwen2", corpus=demo_corpus, steps=3, seed=8)
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_load_corpus_reads_every_text_file_raw(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("# B\n\nbody <b>", encoding="utf-8")
    (tmp_path / "sub" / "a.csv").write_text("x,y\n1,2\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert tinymodel.load_corpus(tmp_path) == ["# B\n\nbody <b>", "x,y\n1,2\n"]


def test_load_corpus_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match="nope"):
        tinymodel.load_corpus(tmp_path / "nope")
    with pytest.raises(NoDocumentsError, match=str(tmp_path)):
        tinymodel.load_corpus(tmp_path)
