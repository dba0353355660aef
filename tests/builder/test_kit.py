"""fieldpack kit, the parts that need no package index: target parsing, the platform tags pip is given,
which wheels fit a device, and the refusal when llama-cpp-python cannot be had for another platform.
The full build -> offline install -> ask path is in tests/e2e/test_kit.py (slow)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fieldpack.builder import kit
from fieldpack.shared.errors import InputNotFoundError, UsageError
from tests.conftest import run_cli

ARM = kit.parse_target("manylinux_2_28_aarch64", "3.11")
X86 = kit.parse_target("manylinux_2_36_x86_64", "3.11")


def test_parse_target_and_refusals() -> None:
    assert (ARM.glibc, ARM.arch, ARM.python, ARM.python_tag) == ((2, 28), "aarch64", "3.11", "cp311")
    assert kit.parse_target("manylinux2014_x86_64", "3.12").platform == "manylinux_2_17_x86_64"
    host = kit.parse_target(None, None)
    assert host.arch == kit.host_arch() and host.glibc == kit.host_glibc()
    for bad in ("win_amd64", "manylinux_2_28_sparc", "musllinux_1_2_x86_64"):
        with pytest.raises(UsageError, match="--platform"):
            kit.parse_target(bad, "3.11")
    with pytest.raises(UsageError, match="--python"):
        kit.parse_target(None, "3")


def test_platform_tags_cover_older_glibc_levels_of_one_arch() -> None:
    tags = kit.platform_tags(ARM)
    assert tags[0] == "manylinux_2_28_aarch64"
    assert {"manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux1_aarch64", "linux_aarch64"} <= set(tags)
    assert "manylinux_2_29_aarch64" not in tags and not any("x86_64" in t for t in tags)
    assert "manylinux2014_x86_64" not in kit.platform_tags(kit.parse_target("manylinux_2_12_x86_64", "3.11"))


@pytest.mark.parametrize("name, target, fits", [
    ("cryptography-50.0.2-cp311-abi3-manylinux_2_34_x86_64.whl", X86, True),
    ("cryptography-50.0.2-cp311-abi3-manylinux_2_34_x86_64.whl", kit.parse_target("manylinux_2_28_x86_64", "3.11"),
     False),
    ("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", X86, True),
    ("numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
     kit.parse_target("manylinux_2_36_x86_64", "3.12"), False),
    ("tokenizers-0.23.3-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", X86, True),
    ("tokenizers-0.23.3-cp310-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", ARM, False),
    ("rich-15.0.0-py3-none-any.whl", ARM, True),
    ("llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl", ARM, True),
    ("llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl", ARM, False),
])
def test_wheel_fits(name: str, target: kit.Target, fits: bool) -> None:
    assert kit.wheel_fits(name, target) is fits


def test_min_glibc_is_the_newest_any_wheel_needs() -> None:
    names = ["rich-15.0.0-py3-none-any.whl",
             "cryptography-50.0.2-cp311-abi3-manylinux_2_34_x86_64.whl",
             "numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"]
    assert kit._min_glibc(names, X86) == (2, 34)
    assert kit._min_glibc(names[:1], X86) == (2, 5)


def test_llama_for_another_platform_needs_wheels(tmp_path: Path) -> None:
    with pytest.raises(InputNotFoundError, match=r"--wheels") as err:
        kit.llama_wheel(ARM, "0.3.36", None, tmp_path)
    assert "pip wheel --no-deps llama-cpp-python==0.3.36" in str(err.value) and "\n" not in str(err.value)
    wheels = tmp_path / "w"
    wheels.mkdir()
    (wheels / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").write_bytes(b"")  # wrong arch: not taken
    with pytest.raises(InputNotFoundError):
        kit.llama_wheel(ARM, "0.3.36", wheels, tmp_path)
    arm = wheels / "llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl"
    arm.write_bytes(b"")
    assert kit.llama_wheel(ARM, "0.3.36", wheels, tmp_path) == arm


def test_cli_refuses_another_platform_without_its_llama_wheel(tmp_path: Path) -> None:
    other = "manylinux_2_28_aarch64" if kit.host_arch() != "aarch64" else "manylinux_2_28_x86_64"
    r = run_cli("kit", "-o", str(tmp_path / "kit"), "--platform", other)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no llama-cpp-python") and "--wheels" in lines[0]
    assert not (tmp_path / "kit").exists() and not list(tmp_path.glob(".kit.*"))


def test_cli_refuses_a_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "old").write_text("x")
    r = run_cli("kit", "-o", str(tmp_path / "kit"))
    assert r.returncode == 2 and "not empty" in r.stderr
