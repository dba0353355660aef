"""``fieldpack build --adapt dapt --ship-adapter``: the unadapted base model ships (the same bytes a plain build
quantizes), the LoRA travels beside it as ``adapter.gguf`` in a format-2 bundle, the adapter check and the quality
stage measure base + adapter against the merged model, ``inspect`` shows it, and a device installs the bundle
and answers with the adapter applied (its logits differ from the base model's alone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import DEMO_DOCS, run_cli

ADAPT_FLAGS = ("--adapt", "dapt", "--adapt-steps", "6", "--adapt-seq-len", "64", "--lora-r", "4")


def _build(tiny_llama_dir: Path, keys: Path, out: Path, *extra: str):
    return run_cli("build", "--model", str(tiny_llama_dir), "--docs", str(DEMO_DOCS), "--name", "riverside",
                   "--version", "1.0.0", "--sign", str(keys / "builder.key"), "-o", str(out), "--n-ctx", "1024",
                   "--max-tokens", "128", *extra, timeout=900)


@pytest.mark.parametrize("flags,needle", [
    (("--ship-adapter",), "--ship-adapter needs a LoRA to ship"),
    (ADAPT_FLAGS + ("--ship-adapter", "--prune", "depth", "--drop-layers", "1"),
     "--ship-adapter is not combined with --prune"),
])
def test_ship_adapter_refuses_what_it_cannot_ship(tiny_llama_dir: Path, e2e_keys: Path, tmp_path: Path,
                                                  flags: tuple[str, ...], needle: str) -> None:
    out = tmp_path / "b.fpk"
    r = _build(tiny_llama_dir, e2e_keys, out, *flags)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert needle in last and "Traceback" not in r.stderr and not out.exists(), r.stderr[-2000:]


@pytest.fixture(scope="module")
def shipped(tiny_llama_dir: Path, e2e_keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ship-adapter") / "adapter.fpk"
    r = _build(tiny_llama_dir, e2e_keys, out, *ADAPT_FLAGS, "--ship-adapter")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "adapter check" in r.stderr
    return out


@pytest.mark.slow
def test_bundle_ships_the_base_model_and_the_adapter(shipped: Path, bundle_v1: Path) -> None:
    from fieldpack.builder.stages.adapt import ADAPTER_MAX_KLD
    from fieldpack.shared import bundle_format as fmt
    from fieldpack.shared.bundle import open_bundle

    with open_bundle(shipped) as b:
        m = b.manifest
    with open_bundle(bundle_v1) as b:
        plain = b.manifest
    members = {x.name: x for x in m.members}
    assert m.format_version == fmt.ADAPTER_FORMAT_VERSION == 2 and plain.format_version == 1
    # model.gguf is the unadapted base quantized exactly as a plain build quantizes it
    assert members[fmt.MODEL_NAME].sha256 == {x.name: x.sha256 for x in plain.members}[fmt.MODEL_NAME]
    a = m.adapter
    assert a is not None and a.member == fmt.ADAPTER_NAME and a.method == "dapt" and a.rank == 4
    assert a.size_bytes == members[fmt.ADAPTER_NAME].size < members[fmt.MODEL_NAME].size
    assert 0 <= a.check_kld_mean <= ADAPTER_MAX_KLD and a.check_top1_agreement >= 0.99
    q = m.quality.quantization
    assert q is not None and "LoRA adapter" in q["reference"] and q["kld_mean"] >= 0
    # the weights the device holds in RAM: base + adapter (mmap is off with an adapter)
    assert m.runtime.memory.weights_bytes == members[fmt.MODEL_NAME].size + a.size_bytes
    assert m.recipe["build"]["ship_adapter"] is True and m.quality.adaptation[0]["method"] == "dapt"
    r = run_cli("inspect", str(shipped))
    assert r.returncode == 0 and "LoRA adapter" in r.stdout and "format v2" in r.stdout, r.stdout


@pytest.mark.slow
def test_device_installs_and_answers_with_the_adapter_applied(shipped: Path, e2e_keys: Path, tmp_path: Path) -> None:
    import llama_cpp
    from llama_cpp import Llama

    from fieldpack.device.runtime import Runtime
    from fieldpack.device.slots import open_data_dir
    from fieldpack.shared import bundle_format as fmt

    d = tmp_path / "device"
    assert run_cli("device", "init", "--data-dir", str(d), "--trust", str(e2e_keys / "builder.pub")).returncode == 0
    r = run_cli("install", str(shipped), "--data-dir", str(d))
    assert r.returncode == 0, r.stderr[-2000:]
    slot = open_data_dir(d).active_slot_path()
    assert (slot / fmt.ADAPTER_NAME).is_file()
    r = run_cli("ask", "What causes cavitation?", "--data-dir", str(d), "--max-tokens", "8")
    assert r.returncode == 0 and r.stdout.strip(), r.stderr[-2000:]
    tokens = list(range(3, 19))

    def last_logits(llm: Llama) -> np.ndarray:  # the last position's logits (the runtime keeps no others)
        llm.reset()
        llm.eval(tokens)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).copy()

    with Runtime(slot, n_ctx=128, threads=1) as rt:
        with_adapter = last_logits(rt.llama)
    base = Llama(model_path=str(slot / fmt.MODEL_NAME), n_ctx=128, n_threads=1, verbose=False, seed=0)
    plain = last_logits(base)
    base.close()
    assert np.isfinite(with_adapter).all() and np.isfinite(plain).all()
    assert np.abs(with_adapter - plain).max() > 1e-3  # the runtime applied the adapter


@pytest.mark.slow
def test_a_reader_of_format_1_only_refuses_the_bundle(shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What an older device does: it reads only format 1, so it refuses the bundle by version (one line, with the
    fix) instead of running the base model without its adapter."""
    from fieldpack.shared import bundle_format as fmt
    from fieldpack.shared.bundle import open_bundle
    from fieldpack.shared.errors import UnsupportedFormatVersion

    monkeypatch.setattr(fmt, "SUPPORTED_FORMAT_VERSIONS", frozenset({1}))
    with pytest.raises(UnsupportedFormatVersion, match="format_version 2") as ei:
        with open_bundle(shipped):
            pass
    assert "\n" not in str(ei.value) and "Fix:" in str(ei.value)


@pytest.mark.slow
def test_ship_adapter_with_a_trimmed_vocabulary(tiny_gemma_dir: Path, e2e_keys: Path, tmp_path: Path) -> None:
    """--trim-vocab with --ship-adapter: the base is trimmed and gated as in a plain build, the merged reference is
    cut to the same token ids, the adapter check passes on the trimmed pair, and a device runs the trimmed base with
    the adapter (the LoRA is on the blocks' linear layers, which trimming does not touch). Tiny Gemma 3: the tiny
    Llama's near-uniform predictions fail the trim gate at --keep-general 20 and 200."""
    import json
    import shutil

    from fieldpack.builder.stages.adapt import ADAPTER_MAX_KLD
    from fieldpack.device.runtime import Runtime
    from fieldpack.device.slots import open_data_dir

    pg = Path("/usr/share/doc/postgresql-doc-15/html/runtime-config-resource.html")
    if not pg.is_file():
        pytest.skip("postgresql-doc-15 is not installed (scripts/setup.sh installs it)")
    docs = tmp_path / "docs"  # the demo documents and one PostgreSQL page: above trimming's 2,048-token minimum
    shutil.copytree(DEMO_DOCS, docs)
    shutil.copyfile(pg, docs / pg.name)
    out = tmp_path / "trimmed-adapter.fpk"
    r = run_cli("build", "--model", str(tiny_gemma_dir), "--docs", str(docs), "--name", "riverside", "--version",
                "1.0.0", "--sign", str(e2e_keys / "builder.key"), "-o", str(out), "--n-ctx", "1024", "--max-tokens",
                "128", *ADAPT_FLAGS, "--ship-adapter", "--trim-vocab", "--keep-general", "20", "--json", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trim the merged reference to the same" in r.stderr and "adapter check" in r.stderr, r.stderr[-3000:]
    m = json.loads(r.stdout[r.stdout.index("{"):])
    row = next(s for s in m["quality"]["stages"] if s["stage"] == "vocabulary trim")
    assert row["vocab_after"] == m["model"]["vocab_size"] < row["vocab_before"]
    assert m["format_version"] == 2 and m["adapter"]["check_kld_mean"] <= ADAPTER_MAX_KLD
    assert m["adapter"]["check_top1_agreement"] >= 0.99 and m["recipe"]["build"]["trim_vocab"] is True
    d = tmp_path / "device"
    assert run_cli("device", "init", "--data-dir", str(d), "--trust", str(e2e_keys / "builder.pub")).returncode == 0
    assert run_cli("install", str(out), "--data-dir", str(d)).returncode == 0
    with Runtime(open_data_dir(d).active_slot_path(), n_ctx=256, threads=1) as rt:
        assert rt.llama.n_vocab() == m["model"]["vocab_size"]
        ans = rt.answer("What causes cavitation?", max_tokens=8)
    assert ans.sources and ans.timings.completion_tokens > 0
