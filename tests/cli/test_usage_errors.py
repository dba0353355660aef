"""Usage mistakes through the installed ``fieldpack`` command: one line on stderr, exit 2, in every family."""

from __future__ import annotations

import pytest

from tests.cli.conftest import assert_one_line_error, run_cli

# (argv, text the one line must contain): unknown option, missing argument/option, bad value type per family.
CASES = [
    # root
    (["nosuchcmd"], "No such command"),
    (["--bogus"], "--bogus"),
    # build host
    (["build", "--bogus", "x"], "--bogus"),
    (["build", "--n-ctx", "many"], "--n-ctx"),
    (["keygen"], "--out"),
    (["inspect"], "BUNDLE"),
    (["inspect", "x.fpk", "--bogus"], "--bogus"),
    (["verify", "x.fpk"], "--trust"),
    # device
    (["ask"], "question"),
    (["ask", "--bogus", "x"], "--bogus"),
    (["ask", "--k", "abc", "q"], "--k"),
    (["ask", "q", "--threads", "1.5"], "--threads"),
    (["install"], "BUNDLE"),
    (["install", "x.fpk", "--n-ctx", "big"], "--n-ctx"),
    (["device", "init"], "--trust"),
    (["device", "nosuch"], "No such command"),
    (["status", "--bogus"], "--bogus"),
    (["chat", "--n-ctx", "x"], "--n-ctx"),
    (["rollback", "extra"], "extra"),
    (["trust", "add"], "KEY"),
    (["trust", "remove"], "KEY_ID"),
    (["trust", "list", "--bogus"], "--bogus"),
    (["remove"], "SLOT_OR_LABEL"),
    (["list", "extra"], "extra"),
    (["verify", "--installed", "--data-dir"], "--data-dir"),
    # mqtt
    (["mqtt", "forget"], "device"),
    (["mqtt", "forget", "d", "--bogus"], "--bogus"),
    (["mqtt", "ask"], "question"),
    (["mqtt", "ask", "q", "--bogus"], "--bogus"),
    (["mqtt", "ask", "q", "--broker", "mqtt://h", "--timeout", "soon"], "--timeout"),
    (["mqtt", "status", "--keepalive", "1"], "--keepalive"),
    (["mqtt", "nosuch"], "No such command"),
    (["asks"], "Did you mean 'ask'? Fix: see `fieldpack --help`"),  # no "?." before the fix
    (["serve", "--broker", "mqtt://h", "--device-id", "a", "--queue-size", "many"], "--queue-size"),
    # eval, plan
    (["eval"], "BUNDLES"),
    (["eval", "b.fpk", "--qa", "q.jsonl", "--k", "ten"], "--k"),
    (["plan", "--model", "m"], "--docs"),
    (["plan", "--bogus"], "--bogus"),
    # out of range: refused before anything is loaded (siblings in every command that takes them)
    (["ask", "--k", "0", "q"], "--k"),
    (["ask", "--k", "5000", "q"], "--k"),
    (["ask", "--max-tokens", "0", "q"], "--max-tokens"),
    (["ask", "--threads", "0", "q"], "--threads"),
    (["ask", "--n-ctx", "64", "q"], "--n-ctx"),
    (["chat", "--n-ctx", "0"], "--n-ctx"),
    (["install", "x.fpk", "--n-ctx", "0"], "--n-ctx"),
    (["serve", "--broker", "mqtt://h", "--device-id", "a", "--threads", "0"], "--threads"),
    (["eval", "b.fpk", "--qa", "q.jsonl", "--k", "0"], "--k"),
    (["eval", "b.fpk", "--qa", "q.jsonl", "--max-tokens", "-1"], "--max-tokens"),
    (["plan", "--model", "m", "--docs", "d", "--device-ram", "1GiB", "--min-tokens-per-s", "1", "--threads", "0"],
     "--threads"),
]


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_usage_error_is_one_line_exit_2(argv: list[str], needle: str) -> None:
    r = run_cli(*argv, env={"FIELDPACK_BROKER": ""})
    line = assert_one_line_error(r, 2)
    assert needle.lower() in line.lower(), line
    assert r.stdout == ""


@pytest.mark.slow
def test_every_command_answers_unknown_option_in_one_line() -> None:
    """Every registered command, also those added later, goes through the one handler."""
    import typer

    from fieldpack.cli import app

    def paths(cmd, prefix):  # type: ignore[no-untyped-def]
        sub = getattr(cmd, "commands", None)
        if not sub:
            yield prefix
            return
        for name, c in sub.items():
            yield from paths(c, [*prefix, name])

    all_paths = list(paths(typer.main.get_command(app), []))
    assert len(all_paths) >= 15
    for p in all_paths:
        r = run_cli(*p, "--no-such-option-xyz")
        assert_one_line_error(r, 2, "--no-such-option-xyz", f"fieldpack {' '.join(p)} --help")


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_short_and_long(flag: str) -> None:
    for argv in ([flag], ["ask", flag], ["mqtt", "ask", flag], ["device", "init", flag]):
        r = run_cli(*argv)
        assert r.returncode == 0, r.stderr
        assert "Usage:" in r.stdout and r.stderr == ""


def test_version() -> None:
    from importlib.metadata import version

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fieldpack {version('fieldpack')}"
    # `build --version` stays the bundle version option, not the program's
    r = run_cli("build", "--version")
    assert_one_line_error(r, 2, "--version")


def test_no_arguments_shows_help() -> None:
    for argv in ([], ["mqtt"], ["device"]):
        r = run_cli(*argv)
        assert r.returncode == 0 and "Usage:" in r.stdout and "Traceback" not in r.stderr


def test_shell_completion_script() -> None:
    r = run_cli("--show-completion", "bash")
    assert r.returncode == 0 and "_fieldpack_completion" in r.stdout, r.stderr


def test_build_help_lists_every_quant_type_the_build_accepts() -> None:
    """A new-user trial found --quant's help listing 6 types while the build took 11."""
    import inspect
    import re

    from fieldpack.builder.quantize import QUANT_TYPES
    from fieldpack.cli.build import build

    default = inspect.signature(build).parameters["quant"].default
    listed = set(re.findall(r"\b(?:Q\d_K_[MS]|Q\d_K|Q\d_0|F16|F32)\b", default.help))
    assert listed == set(QUANT_TYPES)
