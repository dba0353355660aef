"""`fieldpack build --model x.gguf` end to end: a GGUF the user already has becomes a signed bundle that
installs, kept as is or re-quantized on request; the real Gemma 3 270M GGUF builds over the demo documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import DEMO_DOCS, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_q4_gguf(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.quantize import quantize_gguf

    d = tmp_path_factory.mktemp("gguf-in")
    f16 = convert_hf_to_gguf(tiny_llama, d / "f16.gguf").path
    return quantize_gguf(f16, d / "tiny-llama-Q4_K_M.gguf", "Q4_K_M").path


def _build(model: Path, out: Path, keys: Path, *extra: str) -> dict:
    r = run_cli("build", "--model", str(model), "--docs", str(DEMO_DOCS), "--name", "riverside-gguf",
                "--version", "1.0.0", "--sign", str(keys / "builder.key"), "-o", str(out), "--n-ctx", "1024",
                "--max-tokens", "64", *extra)
    assert r.returncode == 0, r.stderr[-4000:]
    r = run_cli("inspect", str(out), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_gguf_kept_as_is_builds_installs_and_answers(llama_q4_gguf: Path, e2e_keys: Path, tmp_path: Path) -> None:
    m = _build(llama_q4_gguf, tmp_path / "b.fpk", e2e_keys)
    assert m["quality"]["parity"] == {"status": "not applicable, GGUF input"}
    q = m["quality"]["quantization"]
    assert q["requantized"] is False and q["qtype"] == "Q4_K_M" and q["ppl"] > 1.0
    assert m["model"]["file_type"] == "Q4_K_M" and m["model"]["source"] == llama_q4_gguf.name
    assert m["recipe"]["build"]["quant"] == "Q4_K_M"
    member = next(x for x in m["members"] if x["name"].endswith(".gguf"))
    assert member["size"] == llama_q4_gguf.stat().st_size  # the user's file ships byte for byte
    dev = tmp_path / "device"
    assert run_cli("device", "init", "--data-dir", str(dev), "--trust", str(e2e_keys / "builder.pub")).returncode == 0
    r = run_cli("install", str(tmp_path / "b.fpk"), "--data-dir", str(dev))
    assert r.returncode == 0, r.stderr
    r = run_cli("ask", "The connection pool is exhausted. What should I do?", "--data-dir", str(dev), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sources"][0]["source"] == "database.md"


def test_gguf_requantized_on_request_records_it(llama_q4_gguf: Path, e2e_keys: Path, tmp_path: Path) -> None:
    m = _build(llama_q4_gguf, tmp_path / "b.fpk", e2e_keys, "--quant", "Q4_0")
    q = m["quality"]["quantization"]
    assert q["requantized"] is True and q["requantized_from"] == "Q4_K_M" and q["qtype"] == "Q4_0"
    assert "already quantized" in q["reference"] and q["kld_mean"] >= 0 and q["ppl_test"] > 1.0
    assert m["model"]["file_type"] == "Q4_0" and "Q4_0" in m["model"]["tensor_types"]


@pytest.fixture(scope="module")
def gemma_bundle(gemma_gguf: Path, e2e_keys: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gemma-bundle") / "riverside-gemma.fpk"
    return out, _build(gemma_gguf, out, e2e_keys)


def test_real_gemma_gguf_builds_over_the_demo_docs(gemma_bundle: tuple[Path, dict]) -> None:
    _, m = gemma_bundle
    mo = m["model"]
    assert (mo["architecture"], mo["n_layer"], mo["vocab_size"], mo["file_type"]) == ("gemma3", 18, 262_144, "Q4_K_M")
    assert (mo["bos_id"], mo["eos_id"], mo["eot_id"]) == (2, 1, 106)
    # the model's EOG tokens, then the completion format's stop strings (a base model has no chat template)
    assert m["runtime"]["prompt_format"] == "completion"
    assert m["runtime"]["stop"] == ["<end_of_turn>", "<eos>", "\nQuestion:", "\nSources:", "\n\n",
                                    "Answer the question using the sources ab"]  # the instruction line, echoed
    assert m["quality"]["parity"]["status"] == "not applicable, GGUF input"
    assert 1.0 < m["quality"]["quantization"]["ppl"] < 1000


def test_real_gemma_gguf_bundle_installs(gemma_bundle: tuple[Path, dict], e2e_keys: Path, tmp_path: Path) -> None:
    dev = tmp_path / "device"
    assert run_cli("device", "init", "--data-dir", str(dev), "--trust", str(e2e_keys / "builder.pub")).returncode == 0
    r = run_cli("install", str(gemma_bundle[0]), "--data-dir", str(dev))
    assert r.returncode == 0, r.stderr
