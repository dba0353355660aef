"""`fieldpack build` checks everything the manifest will check, and the output, before the first stage."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli.conftest import assert_one_line_error, run_cli


@pytest.fixture()
def inputs(tmp_path: Path) -> dict[str, Path]:
    """A folder with a docs/ folder, a (fake) model folder and a key path: enough to reach the checks."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Pumps\nCavitation damages impellers.\n")
    (tmp_path / "model").mkdir()
    return {"docs": tmp_path / "docs", "model": tmp_path / "model", "key": tmp_path / "builder.key",
            "out": tmp_path / "b.fpk"}


def _build(inputs: dict[str, Path], *extra: str, cwd: Path | None = None):
    return run_cli("build", "--model", str(inputs["model"]), "--docs", str(inputs["docs"]), "--sign",
                   str(inputs["key"]), "-o", str(inputs["out"]), *extra, cwd=cwd)


@pytest.mark.parametrize("opt,value", [("--name", "bad name/x"), ("--name", "-starts-with-dash"), ("--name", "x" * 65),
                                       ("--version", "1.0 beta!"), ("--version", "v" * 33)])
def test_name_and_version_checked_before_any_stage(inputs: dict[str, Path], opt: str, value: str) -> None:
    args = ["--name", "ok", "--version", "1.0.0"]
    args[args.index(opt) + 1] = value
    r = _build(inputs, *args)
    assert_one_line_error(r, 2, opt, value[:20])
    assert "✓" not in r.stderr and "ValidationError" not in r.stderr  # no stage ran, no pydantic text
    assert not inputs["out"].exists()


def test_existing_output_refused_unless_force(inputs: dict[str, Path]) -> None:
    inputs["out"].write_bytes(b"previous bundle")
    r = _build(inputs, "--name", "ok")
    assert_one_line_error(r, 2, str(inputs["out"]), "--force")
    assert "✓" not in r.stderr
    assert inputs["out"].read_bytes() == b"previous bundle"
    r = _build(inputs, "--name", "ok", "--force")  # passes the output check; fails later on the fake model
    assert r.returncode != 0 and "--force" not in r.stderr and "already exists" not in r.stderr
    inputs["out"].unlink()
    inputs["out"].mkdir()
    assert_one_line_error(_build(inputs, "--name", "ok", "--force"), 2, "is a folder")


def test_recipe_paths_resolve_against_the_recipe_folder(inputs: dict[str, Path], tmp_path: Path) -> None:
    """A recipe with relative paths replays from any folder: paths are taken relative to the recipe file."""
    from fieldpack.builder.config import BuildConfig

    folder = inputs["docs"].parent
    recipe = folder / "recipe.toml"
    recipe.write_text('[build]\nmodel = "model"\ndocs = "docs"\nname = "ok"\nsign = "builder.key"\noutput = "b.fpk"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = BuildConfig.from_toml(recipe)
    assert cfg.docs == inputs["docs"] and cfg.output == inputs["out"] and cfg.model == str(inputs["model"])
    # the saved recipe (also inside every bundle) holds absolute paths
    saved = BuildConfig.validated(dict(model="model", docs="docs", name="ok", sign="k", output="o.fpk"))
    assert all(Path(saved.to_recipe()["build"][k]).is_absolute() for k in ("docs", "sign", "output"))
    # through the command, from another folder: the existing output next to the recipe is the one protected
    inputs["out"].write_bytes(b"previous")
    r = run_cli("build", "--recipe", str(recipe), cwd=elsewhere)
    assert_one_line_error(r, 2, str(inputs["out"]))
    assert not (elsewhere / "b.fpk").exists()
    # a hub id in a recipe stays a hub id
    recipe.write_text('[build]\nmodel = "org/some-model"\ndocs = "docs"\nname = "ok"\nsign = "k"\noutput = "c.fpk"\n')
    assert BuildConfig.from_toml(recipe).model == "org/some-model"
