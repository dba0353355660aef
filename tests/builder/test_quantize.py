"""builder.quantize and builder.llama_eval: real llama.cpp quantization, read back; PPL/KLD through llama.cpp."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest

from fieldpack.builder.convert import convert_hf_to_gguf
from fieldpack.builder.llama_eval import continuation_logprobs, open_gguf, perplexity, perplexity_kld
from fieldpack.builder.parity import gguf_file_type
from fieldpack.builder.quantize import (
    NOMINAL_TENSOR_TYPE,
    QUANT_TYPES,
    quantize_gguf,
    read_imatrix,
    write_imatrix_gguf,
)
from fieldpack.shared.errors import QuantizationError, UnknownQuantTypeError, UsageError


@pytest.fixture(scope="module")
def quantized(converted, tmp_path_factory):
    """``quantized(arch, qtype)`` -> QuantResult of the tiny model's F16 GGUF, once per module."""
    root = tmp_path_factory.mktemp("quant")
    done = {}

    def get(arch: str, qtype: str):
        if (arch, qtype) not in done:
            done[(arch, qtype)] = quantize_gguf(converted(arch, "f16").path, root / f"{arch}-{qtype}.gguf", qtype)
        return done[(arch, qtype)]

    return get


@pytest.mark.parametrize("qtype", list(QUANT_TYPES))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_quant_type_writes_what_it_says(quantized, converted, arch: str, qtype: str) -> None:
    import gguf

    r = quantized(arch, qtype)
    assert r.qtype == qtype and r.fallbacks == []  # every row length of the tiny models is a multiple of 256
    assert r.sha256 == hashlib.sha256(r.path.read_bytes()).hexdigest()
    assert gguf_file_type(r.path) == QUANT_TYPES[qtype]
    reader = gguf.GGUFReader(r.path)
    by_name = {t.name: t.tensor_type.name for t in reader.tensors}
    assert by_name == r.tensor_type_by_name
    assert sum(r.tensor_types.values()) == len(by_name)
    nominal = NOMINAL_TENSOR_TYPE[qtype].name
    matrices = [n for n in by_name if n.endswith(".weight") and "norm" not in n]
    norms = [n for n in by_name if "norm" in n or n.endswith(".bias")]
    assert all(by_name[n] == "F32" for n in norms)
    # the nominal type is the most common matrix type (mixes keep a few tensors in a larger type)
    counts = {t: sum(by_name[n] == t for n in matrices) for t in set(by_name[n] for n in matrices)}
    assert max(counts, key=counts.get) == nominal
    assert by_name["blk.0.attn_q.weight"] == nominal
    src = converted(arch, "f16")
    assert r.ratio_to_src == pytest.approx(r.size_bytes / src.size_bytes)


def test_sizes_shrink_with_bits(quantized) -> None:
    order = ["F32", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M"]
    sizes = [quantized("llama", q).size_bytes for q in order]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    assert quantized("llama", "Q4_0").size_bytes < quantized("llama", "Q8_0").size_bytes


def test_rows_that_do_not_fit_the_block_are_reported_as_fallbacks(odd_llama_dir: Path, tmp_path: Path) -> None:
    src = convert_hf_to_gguf(odd_llama_dir, tmp_path / "odd-f16.gguf").path
    r = quantize_gguf(src, tmp_path / "odd-q4km.gguf", "Q4_K_M")
    names = {f.tensor for f in r.fallbacks}
    assert names == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}  # 320 columns, K-quants need 256
    for f in r.fallbacks:
        assert f.wanted in ("Q4_K", "Q5_K", "Q6_K")
        assert f.written == r.tensor_type_by_name[f.tensor] and f.written in ("Q5_0", "Q5_1", "Q8_0")
    # the other matrices keep their K-quant; Q4_0 (block 32) needs no fallback at all
    assert r.tensor_type_by_name["blk.0.ffn_up.weight"] == "Q4_K"
    assert quantize_gguf(src, tmp_path / "odd-q40.gguf", "Q4_0").fallbacks == []


def test_unknown_quant_type_lists_the_valid_ones(converted, tmp_path: Path) -> None:
    with pytest.raises(UnknownQuantTypeError, match="Q4_K_X") as info:
        quantize_gguf(converted("llama", "f16").path, tmp_path / "x.gguf", "Q4_K_X")
    for q in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "F16"):
        assert q in str(info.value)
    assert quantize_gguf(converted("llama", "f16").path, tmp_path / "lower.gguf", "q8_0").qtype == "Q8_0"


def test_llama_cpp_failure_becomes_a_quantization_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(QuantizationError, match="bad.gguf"):
        quantize_gguf(bad, tmp_path / "out.gguf", "Q8_0")
    assert not (tmp_path / "out.gguf").exists()


def _activation_imatrix(model_dir: Path, texts: list[str], out: Path) -> Path:
    """Mean squared inputs of every linear layer of the HF model (what llama-imatrix collects), as GGUF."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, float] = {}

    def hook(name):
        def fn(_mod, inputs, _out):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0).numpy()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for hf_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_hook(hook(name_map.get_name(hf_name + ".weight", try_suffixes=(".weight",))))
    ids = tok(" ".join(texts), return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        model(ids)
    return write_imatrix_gguf(out, sums, counts, dataset="demo", chunk_count=1, chunk_size=ids.shape[1])


def test_imatrix_is_read_and_used(tiny_llama_dir: Path, converted, heldout_texts, tmp_path: Path) -> None:
    path = _activation_imatrix(tiny_llama_dir, heldout_texts, tmp_path / "imatrix.gguf")
    data = read_imatrix(path)
    assert data["blk.0.attn_q.weight"].shape == (256,) and data["blk.0.ffn_down.weight"].shape == (512,)
    assert all(np.all(v >= 0) for v in data.values())
    src = converted("llama", "f16").path
    plain = quantize_gguf(src, tmp_path / "plain.gguf", "Q4_K_M")
    weighted = quantize_gguf(src, tmp_path / "weighted.gguf", "Q4_K_M", imatrix=path)
    assert weighted.imatrix_entries == len(data) == 15  # 2 x 7 linear layers + output
    assert weighted.tensor_types == plain.tensor_types and weighted.sha256 != plain.sha256

    # the legacy binary format gives the same values (sums / ncall)
    legacy = tmp_path / "imatrix.dat"
    blob = struct.pack("<i", len(data))
    for name, v in data.items():
        blob += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 4, v.size)
        blob += (v * 4).astype("<f4").tobytes()
    legacy.write_bytes(blob)
    for name, v in read_imatrix(legacy).items():
        np.testing.assert_allclose(v, data[name], rtol=1e-6)

    mismatched = tmp_path / "wrong.gguf"
    write_imatrix_gguf(mismatched, {"blk.0.attn_q.weight": np.ones(7, np.float32)},
                       {"blk.0.attn_q.weight": 1.0}, dataset="x", chunk_count=1, chunk_size=1)
    with pytest.raises(QuantizationError):
        quantize_gguf(src, tmp_path / "never.gguf", "Q4_K_M", imatrix=mismatched)


def test_ppl_and_kld_rank_the_quant_types(converted, quantized, heldout_texts) -> None:
    ref = converted("llama", "f16").path
    q8 = perplexity_kld(ref, quantized("llama", "Q8_0").path, heldout_texts, n_ctx=128)
    q4 = perplexity_kld(ref, quantized("llama", "Q4_0").path, heldout_texts, n_ctx=128)
    assert q8.tokens_scored == q4.tokens_scored == q8.chunks * 63  # second half of each 128-token window
    assert q8.chunks >= 5
    assert q8.ppl_ref == q4.ppl_ref and 1.0 < q8.ppl_ref < 20.0  # the model knows this text
    assert q8.kld_mean < 1e-3 and abs(q8.delta_ppl) < 0.01 * q8.ppl_ref and q8.top1_agreement > 0.99
    assert q4.kld_mean > 5 * q8.kld_mean and q4.kld_p99 > q8.kld_p99
    assert perplexity(ref, heldout_texts, 128) == pytest.approx(q8.ppl_ref, rel=1e-9)
    from fieldpack.builder.progress import progress_sink

    seen: list[tuple[int, int, str]] = []
    with progress_sink(lambda d, t, u: seen.append((d, t, u))):  # the build's bar during the quality stage
        same = perplexity_kld(ref, ref, heldout_texts, n_ctx=128, max_chunks=2)
    assert same.chunks == 2 and same.kld_mean == pytest.approx(0.0, abs=1e-9) and same.top1_agreement == 1.0
    assert seen == [(i, 2, "held-out windows") for i in range(3)]


def test_continuation_logprobs_agree_with_perplexity_and_with_token_by_token_decoding(converted,
                                                                                     heldout_texts) -> None:
    ref = converted("llama", "f16").path
    with open_gguf(ref, n_ctx=128) as llm:
        stream = llm.tokenize("\n\n".join(heldout_texts).encode("utf-8"), add_bos=False, special=False)
        window = [llm.token_bos()] + list(stream[1:128])  # perplexity's first window
        lp = continuation_logprobs(llm, window[:65], window[65:])
        assert lp.shape == (63,) and lp.dtype == np.float64 and (lp < 0).all()
        # the same scored half as llama-perplexity's method
        assert float(np.exp(-lp.mean())) == pytest.approx(perplexity(ref, heldout_texts, 128, max_chunks=1),
                                                            rel=1e-9)
        # an independent path: feed the continuation one token at a time through the KV cache
        llm.reset()
        llm.eval(window[:65])
        steps = []
        for tok in window[65:75]:
            row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
            steps.append(row[tok] - row.max() - np.log(np.exp(row - row.max()).sum()))
            llm.eval([tok])
        np.testing.assert_allclose(lp[:10], steps, atol=2e-3)
        with pytest.raises(UsageError, match="non-empty prompt"):
            continuation_logprobs(llm, [], window[:3])


def test_eval_refuses_too_little_text_and_other_vocabularies(converted, spm_llama_dir: Path, tmp_path: Path) -> None:
    ref = converted("llama", "f16").path
    with pytest.raises(UsageError, match="fewer than one window"):
        perplexity(ref, ["too short"], 128)
    other = convert_hf_to_gguf(spm_llama_dir, tmp_path / "spm.gguf").path
    with pytest.raises(UsageError, match="tokens"):
        perplexity_kld(ref, other, ["pump " * 400], n_ctx=64)


def test_embedding_and_output_types_are_chosen_recorded_and_measured(quantized, converted, heldout_texts,
                                                                     tmp_path: Path) -> None:
    """--embd-type/--output-type reach llama.cpp: the named tensors are written in the asked type, the rest of the
    mix is unchanged, the file shrinks, and KLD vs F16 is measured like any quant type."""
    base = quantized("llama", "Q4_K_M")
    src = converted("llama", "f16")
    assert base.output_type == "Q6_K" and base.embd_type_requested is None  # the mix's own choice
    r = quantize_gguf(src.path, tmp_path / "q4km-embd-q4k.gguf", "Q4_K_M", embd_type="q4_k", output_type="Q4_K")
    assert (r.embd_type, r.output_type) == ("Q4_K", "Q4_K")
    assert (r.embd_type_requested, r.output_type_requested) == ("Q4_K", "Q4_K")
    assert r.tensor_type_by_name["token_embd.weight"] == "Q4_K" and r.tensor_type_by_name["output.weight"] == "Q4_K"
    others = {n: t for n, t in r.tensor_type_by_name.items() if n not in ("token_embd.weight", "output.weight")}
    assert others == {n: t for n, t in base.tensor_type_by_name.items() if n in others}
    assert r.size_bytes < base.size_bytes
    figs = perplexity_kld(src.path, r.path, heldout_texts, n_ctx=64)
    base_figs = perplexity_kld(src.path, base.path, heldout_texts, n_ctx=64)
    assert figs.kld_mean > base_figs.kld_mean > 0  # fewer bits on the output projection cost quality
    with pytest.raises(UnknownQuantTypeError, match="--embd-type 'Q2_X'"):
        quantize_gguf(src.path, tmp_path / "bad.gguf", "Q4_K_M", embd_type="Q2_X")
