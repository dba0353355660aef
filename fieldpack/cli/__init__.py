"""The ``fieldpack`` command: one typer app whose subcommands each call one library function.

This module and its siblings import only typer/rich at module level; each command imports what it needs
(builder, device) inside its body, so ``fieldpack ask`` on a device never imports torch or transformers.
Errors are turned into one line and an exit code here, in :func:`main`, and nowhere else.
"""

from __future__ import annotations

import logging
import sys

import click
import typer

from fieldpack.shared.errors import FieldpackError

app = typer.Typer(
    name="fieldpack",
    help="Build signed bundles (model + documents) on a build host; install and answer from them offline on a device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v info, -vv debug logging")) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    configure_logging(level)


def configure_logging(level: int) -> None:
    """Log to stderr through rich; library code only calls logging.getLogger(__name__)."""
    from rich.console import Console
    from rich.logging import RichHandler

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
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
    """Entry point: run the app; a FieldpackError becomes ``error: <one line>`` on stderr and its exit code."""
    try:
        rv = app(args=argv, prog_name="fieldpack", standalone_mode=False)
    except FieldpackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
