"""Device commands: device init, install, ask, chat, status, rollback. Never import builder, torch or
transformers (tests/device/test_import_boundary.py keeps it so)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

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
    from fieldpack.device.slots import DataDir, default_data_dir, init_data_dir

    root = data_dir or default_data_dir()
    before = DataDir(root)
    existed = before.state_path.exists()
    known = {k.key_id for k in before.trusted_keys()} if existed else set()
    dd = init_data_dir(root, list(trust))
    keys = dd.trusted_keys()
    if not existed:
        typer.echo(f"initialised {dd.root}; it trusts {len(keys)} key(s)")
        return
    added = sum(1 for k in keys if k.key_id not in known)
    typer.echo(f"kept {dd.root} (its slots and state are unchanged); it trusts {len(keys)} key(s), "
               f"{added} of them new")


trust_app = typer.Typer(help="The builder keys whose bundles this device installs.", no_args_is_help=True)


@trust_app.command("list")
def trust_list(data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
               json_out: bool = typer.Option(False, "--json")) -> None:
    """List the trusted keys (key id and file)."""
    keys = _data_dir(data_dir).trusted_keys()
    if json_out:
        typer.echo(json.dumps([{"key_id": k.key_id, "file": str(k.origin)} for k in keys], indent=2))
        return
    for k in keys:
        typer.echo(f"{k.key_id}  {k.origin}")
    if not keys:
        typer.echo("no trusted keys", err=True)


@trust_app.command("add")
def trust_add(key: Path = typer.Argument(..., help="a builder's public key (builder.pub)"),
              data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP)) -> None:
    """Trust a builder's public key."""
    dd = _data_dir(data_dir)
    before = {k.key_id for k in dd.trusted_keys()}
    pub = dd.add_trust(key)
    said = "already trusted" if pub.key_id in before else "now trusted"
    typer.echo(f"key {pub.key_id} {said}; {len(dd.trusted_keys())} trusted key(s)")


@trust_app.command("remove")
def trust_remove(key_id: str = typer.Argument(..., help="key id (from `fieldpack trust list`)"),
                 data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP)) -> None:
    """Stop trusting a key. Installed bundles stay; new ones signed by it are refused."""
    from fieldpack.shared.errors import UsageError

    dd = _data_dir(data_dir)
    match = [k for k in dd.trusted_keys() if k.key_id == key_id]
    if not match:
        raise UsageError(f"no trusted key {key_id} in {dd.root}", hint="see the ids with `fieldpack trust list`")
    if len(dd.trusted_keys()) == 1:
        raise UsageError(f"key {key_id} is the only trusted key of {dd.root}",
                         hint="add the replacement first with `fieldpack trust add NEW.pub`")
    for k in match:
        Path(k.origin).unlink()
    typer.echo(f"key {key_id} removed; {len(dd.trusted_keys())} trusted key(s)")
    from fieldpack.device.install import status as device_status

    info = device_status(dd)
    signed = [f"the {role} {rec['label']}" for role in ("active", "previous")
              if (rec := info.get(role)) and rec.get("key_id") == key_id]
    if signed:  # a trial removed the active bundle's key and nothing said so
        one = len(signed) == 1
        typer.echo(f"note: {' and '.join(signed)} {'is' if one else 'are'} signed by this key: "
                   f"{'it keeps' if one else 'they keep'} running, but installs of bundles signed by it are refused "
                   "from now on", err=True)


def install(bundle: Path = typer.Argument(..., help="the .fpk to install"),
            data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
            n_ctx: Optional[int] = typer.Option(None, "--n-ctx", min=128, help="context length this device will run (tokens)"),
            allow_downgrade: bool = typer.Option(False, "--allow-downgrade",
                                                 help="install an older version or another bundle name over the active one"),
            json_out: bool = typer.Option(False, "--json")) -> None:
    """Verify, unpack into the inactive slot, check, then activate (previous bundle kept for rollback).
    Installing the active bundle again repairs its slot if its files no longer match."""
    from fieldpack.device.install import install_bundle, stop_on_sigterm
    from fieldpack.device.runtime import check_slot

    stop_on_sigterm()  # a stopped install empties the slot it was writing (exit 143)
    res = install_bundle(bundle, _data_dir(data_dir), check=check_slot, n_ctx=n_ctx, allow_downgrade=allow_downgrade)
    typer.echo(json.dumps(_jsonable(res)) if json_out else res.message)


def _jsonable(obj):
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(obj).items()}
    return obj if isinstance(obj, (dict, list, str, int, float)) else str(obj)


def _runtime(data_dir: Optional[Path], n_ctx: Optional[int], threads: Optional[int]):
    from fieldpack.device.runtime import Runtime

    dd = _data_dir(data_dir)
    slot = dd.require_active_slot_path()
    return load_with_deferred_ctrl_c(lambda: Runtime(slot, n_ctx=n_ctx, threads=threads))


def _check_options_before_loading(data_dir: Optional[Path], *, n_ctx: Optional[int], k: Optional[int],
                                  max_tokens: Optional[int]) -> None:
    """``--n-ctx``, ``--k`` and ``--max-tokens`` against the active bundle's manifest, before the model loads (the
    runtime checks them again; README promises usage mistakes are refused before any work).

    Raises:
        UsageError: a value out of range; NoActiveBundleError: nothing is installed.
    """
    from fieldpack.device.options import check_answer_options, check_n_ctx
    from fieldpack.device.runtime import read_slot_manifest

    m = read_slot_manifest(_data_dir(data_dir).require_active_slot_path())
    ctx = check_n_ctx(n_ctx, default=m.runtime.n_ctx, n_ctx_train=m.model.n_ctx_train)
    check_answer_options(k=k, max_tokens=max_tokens, n_ctx=ctx)


def load_with_deferred_ctrl_c(load: Callable[[], Any]) -> Any:
    """``load()`` (a llama.cpp model load) with Ctrl-C held until it returns, then raised as KeyboardInterrupt
    (the model closed first when ``load`` returned one with ``close()``).

    llama.cpp calls back into Python (its log callback) while it loads. A KeyboardInterrupt raised inside a
    ctypes callback is printed and dropped, to a stderr that llama-cpp-python points at /dev/null during the load,
    so a Ctrl-C in the first second of `fieldpack chat` was lost and the chat started anyway (a new-user trial).
    Main thread only; elsewhere ``load()`` runs as is.
    """
    from fieldpack.device.interrupts import sigint_calls

    pressed = threading.Event()
    with sigint_calls(pressed.set):
        loaded = load()
    if pressed.is_set():
        close = getattr(loaded, "close", None)
        if callable(close):
            close()
        raise KeyboardInterrupt
    return loaded


def require_question(question: str, example: str) -> str:
    """``question`` normalised (``shared.text.clean_question``), refused before any work when nothing is left.

    Args:
        example: the command the fix shows, e.g. ``'fieldpack ask "pump 3 alarm?"'``.

    Raises:
        EmptyQuestionError: empty, whitespace or control characters only (exit 7).
    """
    from fieldpack.shared.errors import EmptyQuestionError
    from fieldpack.shared.text import clean_question

    cleaned = clean_question(question)
    if not cleaned:
        raise EmptyQuestionError("the question is empty", hint=f"ask in words, e.g. {example}")
    return cleaned


def ask(question: str = typer.Argument(..., help="the question"),
        data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
        json_out: bool = typer.Option(False, "--json", help="answer, sources with scores, timings as JSON"),
        k: Optional[int] = typer.Option(None, "--k", min=1, max=100, help="chunks to retrieve (1-100)"),
        n_ctx: Optional[int] = typer.Option(None, "--n-ctx", min=128,
                                            help="context length (tokens), up to the model's training context"),
        threads: Optional[int] = typer.Option(None, "--threads", min=1, help="llama.cpp threads (default: physical cores)"),
        max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="answer length cap (tokens)")) -> None:
    """Answer one question from the installed bundle, with numbered sources."""
    question = require_question(question, 'fieldpack ask "pump 3 alarm?"')
    _check_options_before_loading(data_dir, n_ctx=n_ctx, k=k, max_tokens=max_tokens)
    with _runtime(data_dir, n_ctx, threads) as rt:
        if json_out:
            ans = rt.answer(question, k=k, max_tokens=max_tokens)
            typer.echo(json.dumps(ans.to_dict(), ensure_ascii=False, indent=2))
            return
        from fieldpack.cli.show import print_answer

        streamed: list[str] = []

        def show(token: str) -> None:
            streamed.append(token)
            typer.echo(token, nl=False)

        try:
            ans = rt.answer(question, k=k, max_tokens=max_tokens, on_token=show)
        except KeyboardInterrupt:
            if streamed:  # end the cut line, so that stderr's "interrupted" starts its own
                typer.echo("")
            raise
        typer.echo("")
        print_answer(ans, streamed=True)


def chat(data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
         n_ctx: Optional[int] = typer.Option(None, "--n-ctx", min=128, help="context length (tokens)"),
         threads: Optional[int] = typer.Option(None, "--threads", min=1, help="llama.cpp threads"),
         max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1,
                                                  help="answer length cap (tokens; default: the bundle's)")) -> None:
    """Interactive offline assistant (streams tokens; /sources, /clear, /quit)."""
    import sys

    from fieldpack.cli.console import console
    from fieldpack.device.chat import enable_line_editing, run_chat

    _check_options_before_loading(data_dir, n_ctx=n_ctx, k=None, max_tokens=max_tokens)
    save = enable_line_editing(_data_dir(data_dir).root / "chat_history") if sys.stdin.isatty() else (lambda: None)
    try:
        with _runtime(data_dir, n_ctx, threads) as rt:
            run_chat(rt, console=console(), max_tokens=max_tokens)  # piped: full width, no wrapping (README)
    finally:
        save()


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
    from fieldpack.cli.show import print_status

    print_status(info)


def list_slots(data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
               json_out: bool = typer.Option(False, "--json")) -> None:
    """The installed bundles, one line per slot (active, previous, damaged)."""
    from fieldpack.device.install import status as device_status

    info = device_status(_data_dir(data_dir))
    if json_out:
        typer.echo(json.dumps(info["slots"], indent=2))
        return
    for slot, rec in info["slots"].items():
        if rec is None:
            typer.echo(f"{slot}  (empty)")
            continue
        role = "active" if info["active"] and info["active"]["slot"] == slot else \
            "previous" if info["previous"] and info["previous"]["slot"] == slot else "-"
        typer.echo(f"{slot}  {rec['label']}  {role}  installed {rec['installed_at']}"
                   + (f"  DAMAGED: {rec['damage']}" if rec.get("damage") else ""))


def remove(slot_or_label: str = typer.Argument(..., help="slot (a, b) or name@version of a non-active bundle"),
           data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP)) -> None:
    """Remove a non-active bundle (frees its disk; no rollback to it afterwards)."""
    from fieldpack.device.install import remove_slot

    typer.echo(remove_slot(_data_dir(data_dir), slot_or_label))


def rollback(data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=DATA_DIR_HELP)) -> None:
    """Make the previous bundle active again."""
    from fieldpack.device.install import rollback as do_rollback

    res = do_rollback(_data_dir(data_dir))
    typer.echo(res.message)


def register(root: typer.Typer) -> None:
    """Add the device commands to the root app."""
    root.add_typer(device_app, name="device")
    root.add_typer(trust_app, name="trust")
    root.command("list")(list_slots)
    root.command("remove")(remove)
    root.command("install")(install)
    root.command("ask")(ask)
    root.command("chat")(chat)
    root.command("status")(status)
    root.command("rollback")(rollback)
