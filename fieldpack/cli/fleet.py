"""Fleet commands: ``fieldpack fleet push``, ``fleet status`` and ``fleet abort`` (thin; the work is in
``fieldpack.device.fleet``). Broker options are the ones of ``fieldpack mqtt``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fieldpack.cli.mqtt import Broker, PasswordFile, TlsCa, TlsCert, TlsKey, Username, _settings

Group = Annotated[str, typer.Option("--group", envvar="FIELDPACK_GROUP", help="the devices' group")]

app = typer.Typer(help="Roll a bundle out to a group of devices over MQTT.", no_args_is_help=True)


@app.command("push")
def push(
    bundle: Annotated[Path, typer.Argument(help="signed bundle (.fpk)")],
    broker: Broker,
    group: Group,
    username: Username = None,
    password_file: PasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    canary: Annotated[str, typer.Option("--canary", help="share of devices in the first wave, e.g. 10% (rounded up: "
                                        "at least one device; 34% of 3 is 2)")] = "10%",
    wave: Annotated[str, typer.Option("--wave", help="share of devices per later wave")] = "100%",
    rate: Annotated[Optional[str], typer.Option("--rate", help="limit for all chunk traffic, e.g. 2MiB/s")] = None,
    max_failures: Annotated[str, typer.Option("--max-failures", help="halt when failed/started exceeds this")] = "0%",
    url: Annotated[Optional[str], typer.Option("--url", help="HTTP(S) URL of the same file, tried first")] = None,
    health_timeout: Annotated[float, typer.Option("--health-timeout", min=1, help="seconds for the smoke question")] = 120.0,
    wave_timeout: Annotated[float, typer.Option("--wave-timeout", min=1, help="seconds a wave may take")] = 1800.0,
) -> None:
    """Publish BUNDLE as the group's desired bundle, serve its chunks, canary first, then waves; exit 6 if halted or aborted."""
    from fieldpack.device.fleet.pusher import Rollout, parse_rate, parse_share
    from fieldpack.shared.errors import DeviceError

    max_fail = 0.0 if max_failures.strip() in ("0", "0%") else parse_share(max_failures, "--max-failures")
    rollout = Rollout(
        bundle, group, _settings(broker, username, password_file, tls_ca, tls_cert, tls_key),
        canary=parse_share(canary, "--canary"), wave=parse_share(wave, "--wave"),
        rate=parse_rate(rate) if rate else None,
        max_failures=max_fail, url=url, health_timeout_s=health_timeout, wave_timeout_s=wave_timeout)
    seen: dict[str, str] = {}

    def progress(states: dict[str, Any]) -> None:
        for device, s in sorted(states.items()):
            line = f"{device}: {s.phase}" + (f" {s.done}/{s.total}" if s.phase == "downloading" else "")
            line += f" ({s.reason})" if s.reason else ""
            if seen.get(device) != line and (s.phase != "downloading" or s.done in (1, s.total) or s.done % 64 == 0):
                seen[device] = line
                typer.echo(line, err=True)

    result = rollout.run(on_update=progress)
    typer.echo(f"rollout {result.rollout}: {result.outcome}; {len(result.states)} devices, "
               f"{result.bytes_sent / 2**20:.1f} MiB sent in {result.seconds:.1f} s")
    if result.outcome == "aborted":
        raise DeviceError(f"rollout {result.rollout} of {bundle} was aborted (fleet abort); devices keep what they "
                          "run", hint="push it again to resume (staged chunks are kept)")
    if result.outcome == "superseded":
        other = rollout.superseded_by
        raise DeviceError(f"rollout {result.rollout} of {bundle} was replaced by rollout "
                          f"{other.rollout if other else '?'} of {other.label if other else '?'} (another fleet push to "
                          f"{group}); this push stopped", hint="see `fieldpack fleet status`")
    if result.outcome != "done":
        raise DeviceError(f"rollout {result.rollout} of {bundle} {result.outcome}; failed on "
                          f"{', '.join(result.failed) or 'no device'}",
                          hint="see `fieldpack fleet status`; fix the bundle and push again")


@app.command("status")
def status(
    broker: Broker,
    group: Group,
    username: Username = None,
    password_file: PasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    json_out: Annotated[bool, typer.Option("--json", help="print as JSON")] = False,
) -> None:
    """The group's desired bundle and, per device: online, active bundle, rollout phase, progress, last error."""
    import json

    from fieldpack.device.fleet.pusher import read_fleet

    desired, states, statuses = read_fleet(_settings(broker, username, password_file, tls_ca, tls_cert, tls_key),
                                           group)
    # "active" from the daemon's own retained status first: it is republished when the bundle changes in any way
    # (a local `fieldpack rollback` too), while the rollout state says what was active at the last rollout step
    rows = [dict(device=s.device, online=statuses[s.device].online if s.device in statuses else None,
                 active=(statuses[s.device].bundle if s.device in statuses else None) or s.active,
                 phase=s.phase, target=s.target, done=s.done, total=s.total, reason=s.reason) for s in states]
    head = None if desired is None else dict(label=desired.label, rollout=desired.rollout, state=desired.state,
                                             targets=desired.targets, size=desired.size, chunks=desired.chunks)
    if json_out:
        typer.echo(json.dumps({"group": group, "desired": head, "devices": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    title = f"group {group}: " + (f"{head['label']} ({head['state']}, rollout {head['rollout']})" if head else
                                  "no rollout")
    table = Table("device", "online", "active", "phase", "progress", "last error", title=title)
    for r in rows:
        table.add_row(r["device"], {True: "yes", False: "NO", None: "?"}[r["online"]], r["active"] or "-",
                      r["phase"], f"{r['done']}/{r['total']}" if r["total"] else "-", r["reason"] or "")
    Console(width=200).print(table)


@app.command("abort")
def abort(
    broker: Broker,
    group: Group,
    username: Username = None,
    password_file: PasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
) -> None:
    """Stop the group's rollout: devices that have not switched stop fetching; every device keeps what it runs."""
    from fieldpack.device.fleet.pusher import abort_rollout

    record, aborted = abort_rollout(_settings(broker, username, password_file, tls_ca, tls_cert, tls_key), group)
    if not aborted:
        typer.echo(f"nothing to abort: rollout {record.rollout} of {record.label} to {group} is already {record.state}")
        return
    typer.echo(f"rollout {record.rollout} of {record.label} to {group} aborted")


def register(root: typer.Typer) -> None:
    """Add the ``fleet`` group (``push``, ``status``, ``abort``)."""
    root.add_typer(app, name="fleet")
