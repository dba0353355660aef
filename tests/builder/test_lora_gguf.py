"""LoRA adapters shipped as a GGUF adapter: llama.cpp applying the adapter to the base GGUF gives the logits of the
merged checkpoint's GGUF (tiny Llama: Q/K rows permuted; tiny Gemma 3: norms shifted, no permutation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fieldpack.shared.errors import AdaptationError


def _logits(gguf: Path, tokens: list[int], lora: Path | None = None) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=64, n_threads=1,
                logits_all=True, verbose=False, seed=0)
    llm.eval(tokens)
    out = np.array(llm.scores[:len(tokens)], dtype=np.float32)
    llm.close()
    return out


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_gemma_dir"])
def test_adapter_gguf_in_llama_cpp_equals_the_merged_model(fixture: str, request: pytest.FixtureRequest,
                                                           tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from fieldpack.builder.adapt.lora import attach_lora, merge_lora
    from fieldpack.builder.adapt.lora_gguf import export_lora_gguf
    from fieldpack.builder.compress.structured import save_checkpoint
    from fieldpack.builder.convert import convert_hf_to_gguf

    model_dir = Path(request.getfixturevalue(fixture))
    torch.manual_seed(0)
    peft = attach_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), r=4, alpha=8)
    with torch.no_grad():  # B starts at zero (no change); give it weights as training would
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    ad = export_lora_gguf(peft, model_dir, tmp_path / "adapter.gguf")
    assert ad.rank == 4 and ad.alpha == 8.0 and ad.tensors == 2 * 7 * peft.config.num_hidden_layers
    save_checkpoint(merge_lora(peft), model_dir, tmp_path / "merged", dtype=torch.float32)
    base = convert_hf_to_gguf(model_dir, tmp_path / "base.gguf", outtype="f32").path
    merged = convert_hf_to_gguf(tmp_path / "merged", tmp_path / "merged.gguf", outtype="f32").path
    tokens = list(range(3, 27))
    with_adapter, want, plain = _logits(base, tokens, ad.path), _logits(merged, tokens), _logits(base, tokens)
    assert np.abs(plain - want).max() > 0.05  # the adapter changes the model: the check below can fail
    assert np.abs(with_adapter - want).max() < 2e-3 * max(1.0, float(np.abs(want).max()))
    assert ad.size_bytes < 0.5 * base.stat().st_size


def test_export_without_lora_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from fieldpack.builder.adapt.lora_gguf import export_lora_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with pytest.raises(AdaptationError, match="LoRA adapters"):
        export_lora_gguf(model, tiny_llama_dir, tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())
