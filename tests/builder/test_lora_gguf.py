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


def _trained_adapter(model_dir: Path, out: Path, *, outtype: str = "f16", b_std: float = 0.05) -> tuple[Path, Path, Path]:
    """(base F16 GGUF, adapter GGUF, merged F16 GGUF) of a tiny model with random non-zero LoRA B (as after training,
    normal with standard deviation ``b_std``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from fieldpack.builder.adapt.lora import attach_lora, merge_lora
    from fieldpack.builder.adapt.lora_gguf import export_lora_gguf
    from fieldpack.builder.compress.structured import save_checkpoint
    from fieldpack.builder.convert import convert_hf_to_gguf

    torch.manual_seed(0)
    peft = attach_lora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), r=4, alpha=8)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, b_std)
    ad = export_lora_gguf(peft, model_dir, out / "adapter.gguf", outtype=outtype)
    save_checkpoint(merge_lora(peft), model_dir, out / "merged", dtype=torch.float32)
    base = convert_hf_to_gguf(model_dir, out / "base.gguf", outtype="f16").path
    merged = convert_hf_to_gguf(out / "merged", out / "merged.gguf", outtype="f16").path
    return base, ad.path, merged


def test_adapter_check_passes_base_plus_adapter_and_fails_a_mismatched_pair(tiny_llama_dir: Path,
                                                                            heldout_texts: list[str],
                                                                            tmp_path: Path) -> None:
    """The ``adapter check`` stage of ``--ship-adapter`` builds: F16 base + F16 adapter against the merged F16 model
    passes (only rounding differs); the same adapter measured against the unadapted base (an adapter that does not
    belong to the reference) fails with one line naming the figure and the fix."""
    import json

    from fieldpack.builder.stages.adapt import (
        ADAPTER_MAX_KLD,
        AdapterCheckInputs,
        run_adapter_check,
    )
    from fieldpack.builder.stages.base import Input
    from fieldpack.shared.errors import ParityError

    base, adapter, merged = _trained_adapter(tiny_llama_dir, tmp_path, b_std=0.2)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"calib": [], "held_out": heldout_texts}))
    ok = run_adapter_check(AdapterCheckInputs(base=Input.file(base), adapter=Input.file(adapter),
                                              merged=Input.file(merged), split=Input.file(split), n_ctx=64), tmp_path)
    assert ok.kld_mean <= ADAPTER_MAX_KLD / 100 and ok.top1_agreement >= 0.99 and ok.tokens_scored > 0
    with pytest.raises(ParityError, match="adapter check failed") as ei:
        run_adapter_check(AdapterCheckInputs(base=Input.file(base), adapter=Input.file(adapter),
                                             merged=Input.file(base), split=Input.file(split), n_ctx=64), tmp_path)
    assert "\n" not in str(ei.value) and "--ship-adapter" in str(ei.value)
