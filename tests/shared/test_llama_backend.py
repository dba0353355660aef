"""The llama.cpp import guard: AMX detection from /proc/cpuinfo, the override variable, and that models load with
llama.cpp's extra CPU buffer types off where it says so (on an AMX CPU they crashed every quantized decode)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldpack.shared.errors import UsageError
from fieldpack.shared.llama_backend import ENV, cpu_has_amx, extra_buffer_types_off, llama_cpp_module


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    return p


@pytest.mark.parametrize("flags,want", [("fpu sse avx2 avx512f amx_bf16 amx_int8 amx_tile", True),
                                        ("fpu sse avx2 avx512f avx512_vnni", False),
                                        ("fp asimd neon", False)])
def test_amx_is_read_from_the_cpu_flags(tmp_path: Path, flags: str, want: bool) -> None:
    assert cpu_has_amx(_cpuinfo(tmp_path, flags)) is want


def test_no_cpuinfo_means_no_amx(tmp_path: Path) -> None:
    assert cpu_has_amx(tmp_path / "absent") is False


@pytest.mark.parametrize("env,amx,want", [("auto", True, True), ("auto", False, False), ("", True, True),
                                          ("off", False, True), ("OFF", False, True), ("on", True, False)])
def test_override_variable(env: str, amx: bool, want: bool) -> None:
    assert extra_buffer_types_off(env, amx=amx) is want


def test_override_variable_rejects_other_values() -> None:
    with pytest.raises(UsageError, match=ENV) as e:
        extra_buffer_types_off("maybe")
    assert "Fix: unset" in str(e.value) and "\n" not in str(e.value)


def test_model_loads_get_the_decided_buffer_setting() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    lc = llama_cpp_module(llama_cpp)
    import llama_cpp.llama_cpp as low

    want_off = extra_buffer_types_off()
    assert low.llama_model_default_params().use_extra_bufts is (not want_off)
    assert lc.llama_model_default_params().use_extra_bufts is (not want_off)
