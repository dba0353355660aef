"""Device commands: device init, install, ask, chat, status, rollback. Never import builder, torch or
transformers (tests/device/test_import_boundary.py keeps it so)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

DATA_DIR_HELP = "device data dir (default: $FIELDPACK_DATA_DIR or ~/.local/share/fieldpack)"

device_app = typer.Typer(help="Set up a device's data dir.", no_args_is_help=True)


def _data_dir(path: Optional[Path]):
    from fieldpack.device.slots import default_data_dir, open_data_dir

    return open_data_dir(path or default_data_dir())


@device_app.command("init")
def device_init(data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
                trust: list[Path] = typer.Option(..., "--trust", help="public key(s) whose bundles this device installs")) -> None:
    """Create the data dir (A/B slots, trusted keys, state)."""
    from fieldpack.device.slots import default_data_dir, init_data_dir

    dd = init_data_dir(data_dir or default_data_dir(), list(trust))
    typer.echo(f"initialised {dd.root} trusting {len(trust)} key(s)")


def install(bundle: Path = typer.Argument(..., help="the .fpk to install"),
            data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
            n_ctx: Optional[int] = typer.Option(None, "--n-ctx", help="context length this device will run (tokens)"),
            json_out: bool = typer.Option(False, "--json")) -> None:
    """Verify, unpack into the inactive slot, check, then activate (previous bundle kept for rollback)."""
    from fieldpack.device.install import install_bundle
    from fieldpack.device.runtime import check_slot

    res = install_bundle(bundle, _data_dir(data_dir), check=check_slot, n_ctx=n_ctx)
    typer.echo(json.dumps(_jsonable(res)) if json_out else res.message)


def _jsonable(obj):
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(obj).items()}
    return obj if isinstance(obj, (dict, list, str, int, float)) else str(obj)


def _runtime(data_dir: Optional[Path], n_ctx: Optional[int], threads: Optional[int]):
    from fieldpack.device.runtime import Runtime

    dd = _data_dir(data_dir)
    return Runtime(dd.require_active_slot_path(), n_ctx=n_ctx, threads=threads)


def ask(question: str = typer.Argument(..., help="the question"),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
        json_out: bool = typer.Option(False, "--json", help="answer, sources with scores, timings as JSON"),
        k: Optional[int] = typer.Option(None, "--k", help="chunks to retrieve"),
        n_ctx: Optional[int] = typer.Option(None, "--n-ctx", help="context length (tokens)"),
        threads: Optional[int] = typer.Option(None, "--threads", help="llama.cpp threads (default: physical cores)"),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens")) -> None:
    """Answer one question from the installed bundle, with numbered sources."""
    from fieldpack.shared.errors import EmptyQuestionError

    if not question.strip():
        raise EmptyQuestionError("the question is empty", hint='ask in words, e.g. fieldpack ask "pump 3 alarm?"')
    with _runtime(data_dir, n_ctx, threads) as rt:
        if json_out:
            ans = rt.answer(question, k=k, max_tokens=max_tokens)
            typer.echo(json.dumps(ans.to_dict(), ensure_ascii=False, indent=2))
            return
        from fieldpack.cli.show import print_answer

        ans = rt.answer(question, k=k, max_tokens=max_tokens, on_token=lambda t: typer.echo(t, nl=False))
        typer.echo("")
        print_answer(ans, streamed=True)


def chat(data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
         n_ctx: Optional[int] = typer.Option(None, "--n-ctx"),
         threads: Optional[int] = typer.Option(None, "--threads")) -> None:
    """Interactive offline assistant (streams tokens; /sources, /clear, /quit)."""
    from fieldpack.device.chat import run_chat

    with _runtime(data_dir, n_ctx, threads) as rt:
        run_chat(rt)


def status(data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
           json_out: bool = typer.Option(False, "--json")) -> None:
    """Active and previous bundle, model, index, memory, and the daemon's latest metrics."""
    from fieldpack.device.install import status as device_status

    dd = _data_dir(data_dir)
    info = device_status(dd)
    metrics_path = dd.root / "metrics.json"
    if metrics_path.exists():
        try:
            info["metrics"] = json.loads(metrics_path.read_text())
        except (OSError, ValueError):
            info["metrics"] = "unreadable"
    if json_out:
        typer.echo(json.dumps(info, indent=2, default=str))
        return
    from rich.console import Console
    from rich.pretty import Pretty

    Console().print(Pretty(info))


def rollback(data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP)) -> None:
    """Make the previous bundle active again."""
    from fieldpack.device.install import rollback as do_rollback

    res = do_rollback(_data_dir(data_dir))
    typer.echo(res.message)


def register(root: typer.Typer) -> None:
    """Add the device commands to the root app."""
    root.add_typer(device_app, name="device")
    root.command("install")(install)
    root.command("ask")(ask)
    root.command("chat")(chat)
    root.command("status")(status)
    root.command("rollback")(rollback)
