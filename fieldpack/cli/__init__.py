"""The ``fieldpack`` command: one typer app whose subcommands each call one library function.

This module and its siblings import only typer/rich at module level; each command imports what it needs
(builder, device) inside its body, so ``fieldpack ask`` on a device never imports torch or transformers.
Errors are turned into one line and an exit code here, in :func:`main`, and nowhere else: fieldpack's own
errors (``error: <what>. Fix: <how>``, exit code of the family) and the CLI library's usage errors (exit 2,
see :mod:`fieldpack.cli.usage`) for every subcommand, including ones registered later.
"""

from __future__ import annotations

import logging
import sys

import typer

from fieldpack.shared.errors import FieldpackError

app = typer.Typer(
    name="fieldpack",
    help="Build signed bundles (model + documents) on a build host; install and answer from them offline on a device.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def version_string() -> str:
    """``fieldpack <version>`` of the installed distribution."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"fieldpack {version('fieldpack')}"
    except PackageNotFoundError:
        return "fieldpack (not installed)"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(version_string())
        raise typer.Exit(0)


@app.callback()
def _root(verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v info, -vv debug logging"),
          _version: bool = typer.Option(False, "--version", help="print the fieldpack version and exit",
                                        is_eager=True, callback=_print_version)) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    configure_logging(level)


def configure_logging(level: int) -> None:
    """Log to stderr; library code only calls logging.getLogger(__name__).

    On a terminal through rich; off a terminal (a pipe, a file, a systemd journal) one plain, unwrapped line per
    record (``WARNING name: message``), so nothing is cut or wrapped at 80 columns."""
    from rich.console import Console

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    console = Console(stderr=True)
    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def _register() -> None:
    from fieldpack.cli import build as build_cmds
    from fieldpack.cli import device as device_cmds

    build_cmds.register(app)
    device_cmds.register(app)
    for optional in ("mqtt", "evaluate", "compress", "fleet", "kit"):
        try:
            mod = __import__(f"fieldpack.cli.{optional}", fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != f"fieldpack.cli.{optional}":
                raise
            continue
        mod.register(app)


_register()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; every error becomes one line on stderr and its exit code.

    A ``FieldpackError`` prints ``error: <message>. Fix: <hint>`` and exits with its family's code; a usage error of
    the CLI library (unknown command or option, missing argument, bad value) prints ``error: <command>: <what>.
    Fix: see `<command> --help``` and exits 2, whichever click copy typer uses.
    """
    from fieldpack.cli.usage import (INTERRUPT_EXIT, USAGE_EXIT, click_types, help_text, interrupt_explained,
                                     usage_line)

    ct = click_types()
    try:
        rv = app(args=argv, prog_name="fieldpack", standalone_mode=False)
    except FieldpackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except ct.no_args_is_help as exc:  # `fieldpack` or `fieldpack mqtt` alone: the help page, exit 0 as click < 8.2
        print(help_text(exc) or usage_line(exc))
        sys.exit(0)
    except ct.usage as exc:
        print(f"error: {usage_line(exc)}", file=sys.stderr)
        sys.exit(USAGE_EXIT)
    except ct.exit as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except (*ct.abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        sys.exit(INTERRUPT_EXIT)
    except ct.click_exception as exc:  # e.g. FileError: still one line
        msg = " ".join(str(exc.format_message()).split())
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1) or 1)
    if rv == INTERRUPT_EXIT and not interrupt_explained():
        # typer 0.29+ turns a KeyboardInterrupt into Exit(130), which standalone_mode=False returns as a value
        print("interrupted", file=sys.stderr)
    sys.exit(rv if isinstance(rv, int) else 0)
