"""``fieldpack kit``: an offline install kit for a device with no network (library: fieldpack.builder.kit)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def kit(
    output: Path = typer.Option(..., "-o", "--output", help="kit folder to create (absent or empty)"),
    platform: Optional[str] = typer.Option(None, "--platform",
                                           help="device wheel platform, e.g. manylinux_2_28_aarch64 (default: this host's)"),
    python: Optional[str] = typer.Option(None, "--python", help="device CPython major.minor, e.g. 3.11 (default: this one's)"),
    bundle: Optional[Path] = typer.Option(None, "--bundle", help="a signed .fpk to ship and install"),
    trust: list[Path] = typer.Option([], "--trust", help="builder public key the device trusts (repeatable)"),
    wheels: Optional[Path] = typer.Option(None, "--wheels",
                                          help="folder of extra wheels; must hold llama-cpp-python for another platform"),
    no_index: bool = typer.Option(False, "--no-index", help="resolve only from --wheels (no package index)"),
) -> None:
    """Make a folder that installs fieldpack, a bundle and its service on a device with no network."""
    from fieldpack.builder.kit import build_kit

    res = build_kit(output, platform_tag=platform, python=python, bundle=bundle, trust=list(trust), wheels=wheels,
                    no_index=no_index)
    n_wheels = sum(1 for f in res.files if f.startswith("wheels/"))
    typer.echo(f"kit {res.out}: {n_wheels} wheels for {res.target.platform} / Python {res.target.python}, "
               f"{res.size_bytes / 2**20:.1f} MiB, {res.seconds:.0f} s")
    typer.echo(f"kit.json sha256 {res.manifest_sha256}")
    typer.echo(f"next: scripts/flash {res.out} --to user@device, then on the device: sh {res.out.name}/install.sh")


def register(root: typer.Typer) -> None:
    """Add ``fieldpack kit`` to the root app."""
    root.command("kit")(kit)
