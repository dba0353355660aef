"""MQTT commands: ``fieldpack serve`` (the device daemon), ``fieldpack mqtt ask`` and ``fieldpack mqtt status``.

Only typer is imported at module level; each command imports the daemon, the requester and the runtime inside
its body. Errors are raised as ``shared.errors`` classes and turned into one line by ``fieldpack.cli.main``.
Every broker option can also come from the environment (``FIELDPACK_BROKER``, ``FIELDPACK_MQTT_USERNAME``,
...), which is how ``scripts/fieldpack-serve.service`` configures the daemon.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

DATA_DIR_HELP = "device data dir (default: $FIELDPACK_DATA_DIR or ~/.local/share/fieldpack)"

Broker = Annotated[
    str,
    typer.Option("--broker", envvar="FIELDPACK_BROKER", help="mqtt://host:1883 or mqtts://host:8883"),
]
Username = Annotated[Optional[str], typer.Option("--username", envvar="FIELDPACK_MQTT_USERNAME", help="MQTT user")]
PasswordFile = Annotated[
    Optional[Path],
    typer.Option("--password-file", envvar="FIELDPACK_MQTT_PASSWORD_FILE", help="file whose first line is the password"),
]
TlsCa = Annotated[
    Optional[Path],
    typer.Option("--tls-ca", envvar="FIELDPACK_MQTT_TLS_CA", help="CA (PEM) of the broker's certificate; turns TLS on"),
]
TlsCert = Annotated[
    Optional[Path], typer.Option("--tls-cert", envvar="FIELDPACK_MQTT_TLS_CERT", help="client certificate (PEM)")
]
TlsKey = Annotated[Optional[Path], typer.Option("--tls-key", envvar="FIELDPACK_MQTT_TLS_KEY", help="client key (PEM)")]
Keepalive = Annotated[int, typer.Option("--keepalive", help="MQTT keep-alive, seconds")]

app = typer.Typer(help="Ask field devices over MQTT and read their status.", no_args_is_help=True)


def _settings(
    broker: str,
    username: Optional[str],
    password_file: Optional[Path],
    tls_ca: Optional[Path],
    tls_cert: Optional[Path],
    tls_key: Optional[Path],
    keepalive: int = 30,
):  # -> device.mqtt.BrokerSettings (imported lazily)
    from fieldpack.device.mqtt.client import BrokerSettings

    return BrokerSettings.from_options(
        broker, username=username, password_file=password_file, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
        keepalive_s=keepalive,
    )


def serve(
    broker: Annotated[
        Optional[str],
        typer.Option("--broker", envvar="FIELDPACK_BROKER", help="mqtt://host:1883 or mqtts://host:8883"),
    ] = None,
    device_id: Annotated[
        Optional[str],
        typer.Option("--device-id", envvar="FIELDPACK_DEVICE_ID", help="this device's id, e.g. fieldbox-7 (MQTT)"),
    ] = None,
    http: Annotated[
        Optional[str],
        typer.Option("--http", envvar="FIELDPACK_HTTP", help="also serve the HTTP API and page on HOST:PORT"),
    ] = None,
    api_key_file: Annotated[
        Optional[Path],
        typer.Option("--api-key-file", envvar="FIELDPACK_API_KEY_FILE", help="HTTP bearer key (first line)"),
    ] = None,
    insecure_no_auth: Annotated[
        bool, typer.Option("--insecure-no-auth", help="allow a non-loopback --http bind without an API key")
    ] = False,
    max_body_bytes: Annotated[int, typer.Option("--max-body-bytes", help="largest HTTP request body")] = 256 * 1024,
    cors_origin: Annotated[
        Optional[list[str]], typer.Option("--cors-origin", metavar="ORIGIN", help="allow this web origin (CORS is off by default)")
    ] = None,
    username: Username = None,
    password_file: PasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    group: Annotated[
        Optional[list[str]],
        typer.Option("--group", envvar="FIELDPACK_GROUP", metavar="GROUP", help="also serve this group's shared requests (repeatable)"),
    ] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help=DATA_DIR_HELP)] = None,
    queue_size: Annotated[int, typer.Option("--queue-size", help="requests that may wait; one more gets 'busy'")] = 8,
    metrics_interval: Annotated[
        float, typer.Option("--metrics-interval", help="seconds between metrics publications")
    ] = 30.0,
    keepalive: Keepalive = 30,
    n_ctx: Annotated[Optional[int], typer.Option("--n-ctx", min=128, help="context length (tokens)")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", min=1, help="llama.cpp threads")] = None,
) -> None:
    """Answer questions over MQTT (--broker) and/or HTTP (--http) from the installed bundle until SIGTERM/SIGINT.

    A bundle installed while serving is used from the next request. MQTT: a retained status, a Last Will that
    marks the device offline, and metrics (also written to DATA_DIR/metrics.json). HTTP: an OpenAI-compatible
    API, /v1/ask, /health, /metrics and the chat page at /; one engine answers both.
    """
    import dataclasses
    import logging
    import signal
    import threading

    from fieldpack.device.provider import ActiveBundleProvider
    from fieldpack.device.slots import default_data_dir, open_data_dir
    from fieldpack.shared.errors import UsageError

    if broker is None and http is None:
        raise UsageError("serve needs --broker URL, --http HOST:PORT, or both", hint="e.g. --http 127.0.0.1:8080")
    http_config = _http_config(http, api_key_file, insecure_no_auth, max_body_bytes, cors_origin) if http else None
    config = None
    if broker is not None:
        from fieldpack.device.mqtt import DaemonConfig

        if not device_id:
            raise UsageError("--broker needs --device-id", hint="e.g. --device-id fieldbox-7")
        settings = _settings(broker, username, password_file, tls_ca, tls_cert, tls_key, keepalive)
        config = DaemonConfig(  # checks the options before anything is opened
            device_id, groups=tuple(group or ()), queue_size=queue_size, metrics_interval_s=metrics_interval
        )
    dd = open_data_dir(data_dir or default_data_dir())
    device_log = logging.getLogger("fieldpack.device")
    if device_log.getEffectiveLevel() > logging.INFO:  # a daemon reports its connection life by default
        device_log.setLevel(logging.INFO)
    provider = ActiveBundleProvider(dd, n_ctx=n_ctx, threads=threads)
    if http_config is not None:
        from fieldpack.device.http.server import serve as serve_http

        mqtt = (dataclasses.replace(config, data_dir=dd.root), settings) if config is not None else None
        serve_http(provider, http_config, queue_size=queue_size, mqtt=mqtt)
        return
    from fieldpack.device.mqtt import MqttDaemon

    assert config is not None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    daemon = MqttDaemon(dataclasses.replace(config, data_dir=dd.root), provider, settings)
    daemon.run(stop)


def _http_config(bind: str, api_key_file: Optional[Path], insecure_no_auth: bool, max_body_bytes: int,
                 cors_origin: Optional[list[str]]):  # -> device.http.server.HttpConfig (imported lazily)
    from fieldpack.device.http.app import ApiConfig
    from fieldpack.device.http.security import HttpSecurity, check_bind, parse_bind
    from fieldpack.device.http.server import HttpConfig
    from fieldpack.shared.errors import InputNotFoundError, UsageError

    host, port = parse_bind(bind)
    key = None
    if api_key_file is not None:
        try:
            key = api_key_file.read_text(encoding="utf-8").splitlines()[0].strip() if api_key_file.stat().st_size else ""
        except OSError as exc:
            raise InputNotFoundError(f"cannot read --api-key-file {api_key_file} ({exc.strerror})",
                                     hint="give a readable file whose first line is the key") from exc
        if len(key) < 16:
            raise UsageError(f"the API key in {api_key_file} is shorter than 16 characters",
                             hint="use a long random key, e.g. `openssl rand -hex 24 > key`")
    check_bind(host, api_key=key, insecure_no_auth=insecure_no_auth)
    if max_body_bytes < 1024:
        raise UsageError(f"--max-body-bytes {max_body_bytes} is below 1024", hint="use 1024 or more")
    security = HttpSecurity(host=host, api_key=key, max_body_bytes=max_body_bytes,
                            cors_origins=tuple(cors_origin or ()))
    return HttpConfig(host=host, port=port, api=ApiConfig(security=security))


@app.command("ask")
def ask(
    question: Annotated[str, typer.Argument(help="the question")],
    broker: Broker,
    device: Annotated[Optional[str], typer.Option("--device", help="device id to ask")] = None,
    group: Annotated[Optional[str], typer.Option("--group", help="ask any device of this group")] = None,
    bundle: Annotated[
        Optional[str], typer.Option("--bundle", help='require this bundle: "name" or "name@version"')
    ] = None,
    username: Username = None,
    password_file: PasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    timeout: Annotated[float, typer.Option("--timeout", help="seconds to wait for the final reply")] = 120.0,
    expiry: Annotated[
        Optional[int], typer.Option("--expiry", help="drop the request if it waited longer than this (seconds)")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the final reply as JSON")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="send even if the device is offline or unknown, and wait")] = False,
) -> None:
    """Ask a device (or a group) over MQTT; streams the answer, then prints the sources.

    A device whose retained status says offline, or that never published one, is refused at once (exit 6)
    unless --wait; so is a group that no retained status lists, or whose devices are all offline."""
    from fieldpack.cli.device import require_question
    from fieldpack.device.mqtt import Requester
    from fieldpack.shared.errors import UsageError

    if (device is None) == (group is None):
        raise UsageError("give exactly one of --device and --group", hint="e.g. --device fieldbox-7")
    target = f"--device {device}" if device is not None else f"--group {group}"
    question = require_question(question, f'fieldpack mqtt ask "pump 3 alarm?" {target}')  # never sent empty
    settings = _settings(broker, username, password_file, tls_ca, tls_cert, tls_key)
    streamed = not json_out
    with Requester(settings) as requester:
        if device is not None and not wait:
            _check_reachable(requester, device, settings.url)
        elif group is not None and not wait:
            _check_group_reachable(requester, group, settings.url)
        final = requester.ask(
            question, device=device, group=group, bundle=bundle, stream=streamed, expiry_s=expiry, timeout_s=timeout,
            on_partial=(lambda p: typer.echo(p.text, nl=False)) if streamed else None,
        )
    if json_out:
        typer.echo(final.model_dump_json(indent=2))
    if final.error is not None:
        if streamed and final.partials:
            typer.echo("")
        raise final.error.to_exception()
    if json_out:
        return
    typer.echo("")
    for source in final.sources:
        typer.echo(f"[{source.n}] {source.citation}")
    if final.finish_reason == "length":
        from fieldpack.device.types import cut_notice

        typer.echo(cut_notice(final.timings.completion_tokens if final.timings else 0), err=True)  # MQTT has no cap
    if final.abstained and final.gate is not None:  # the line `fieldpack ask` prints (here on stderr, as the
        from fieldpack.device.types import gate_notice  # other notes under an MQTT answer)

        typer.echo(gate_notice(final.gate), err=True)
    if final.timings is not None:
        t = final.timings
        if final.abstained:  # no generation ran: only retrieval has a time (as `fieldpack ask` says it)
            typer.echo(f"-- {final.device}, {final.bundle}: abstained without running the model, retrieval "
                       f"{t.retrieval_ms:.0f} ms, queued {t.queue_ms:.0f} ms", err=True)
            return
        typer.echo(
            f"-- {final.device}, {final.bundle}: first token {t.time_to_first_token_ms:.0f} ms, "
            f"{t.tokens_per_s:.1f} tok/s, retrieval {t.retrieval_ms:.0f} ms, queued {t.queue_ms:.0f} ms",
            err=True,
        )


@app.command("status")
def status(
    broker: Broker,
    username: Username = None,
    password_file: PasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    json_out: Annotated[bool, typer.Option("--json", help="print statuses and metrics as JSON")] = False,
) -> None:
    """Every device's retained status (online, bundle, model, queue, uptime) and latest metrics."""
    import json

    from fieldpack.device.mqtt import Requester

    settings = _settings(broker, username, password_file, tls_ca, tls_cert, tls_key)
    with Requester(settings) as requester:
        states = requester.device_states()
    if json_out:
        rows = [
            {"status": s.status.model_dump(), "metrics": s.metrics.model_dump() if s.metrics else None} for s in states
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    if not states:
        typer.echo(f"no device has published a status on {settings.url}")
        return
    from rich.table import Table

    table = Table("device", "online", "last status", "bundle", "model", "queue", "uptime", "answered", "errors",
                  "busy", "TTFT p50 ms", "tok/s", title=f"devices on {settings.url}")
    for state in states:
        s, m = state.status, state.metrics
        live = s.online  # queue and uptime of an offline device are history, not shown as live
        table.add_row(
            s.device,
            "yes" if s.online else "NO",
            _when(s.ts),
            s.bundle or (s.error or "-"),
            s.model or "-",
            f"{s.queue_depth}/{s.queue_max}" if live and s.queue_max is not None else "-",
            _duration(s.uptime_s) if live else "-",
            str(m.answered) if m else "-",
            str(m.errors) if m else "-",
            str(m.busy) if m else "-",
            f"{m.ttft_ms.p50:.0f}" if m and m.ttft_ms.p50 is not None else "-",
            f"{m.tokens_per_s.mean:.1f}" if m and m.tokens_per_s.mean is not None else "-",
        )
    from fieldpack.cli.console import console

    console().print(table)


def _check_reachable(requester, device: str, url: str) -> None:  # noqa: ANN001 - device.mqtt.Requester
    """Fail fast (DeviceError) when ``device``'s retained status is offline or absent."""
    from fieldpack.shared.errors import DeviceError

    states = requester.device_states(device=device)
    if not states:
        raise DeviceError(f"device {device} has never published a status on {url} (or it was forgotten)",
                          hint="check the id with `fieldpack mqtt status`, or pass --wait to send the question anyway")
    s = states[0].status
    if not s.online:
        was = f", was running {s.bundle}" if s.bundle else ""
        raise DeviceError(f"device {device} is offline (last status {_when(s.ts)}{was})",
                          hint="bring it back online, or pass --wait to queue the question until it returns")


def _check_group_reachable(requester, group: str, url: str) -> None:  # noqa: ANN001 - device.mqtt.Requester
    """Fail fast (DeviceError) when no device's retained status lists ``group``, or every one that does is
    offline: a group request would otherwise wait for the whole --timeout."""
    from fieldpack.shared.errors import DeviceError

    members = [s.status for s in requester.device_states() if group in (s.status.groups or [])]
    if not members:
        raise DeviceError(f"no device on {url} serves group {group} (no retained status lists it)",
                          hint="check the name with `fieldpack mqtt status`, or pass --wait to send the question anyway")
    if not any(m.online for m in members):
        names = ", ".join(sorted(m.device for m in members)[:5])
        raise DeviceError(f"every device of group {group} is offline ({names})",
                          hint="bring one back online, or pass --wait to queue the question until one returns")


def _when(ts: float | None) -> str:
    """Unix seconds as ``2026-11-30 21:10:05 UTC`` (or ``unknown``)."""
    if ts is None:
        return "unknown"
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


@app.command("forget")
def forget(
    device: Annotated[str, typer.Argument(help="id of a decommissioned device")],
    broker: Broker,
    username: Username = None,
    password_file: PasswordFile = None,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    force: Annotated[bool, typer.Option("--force", help="forget it even if its status says online")] = False,
) -> None:
    """Clear a decommissioned device's retained status and metrics from the broker."""
    from fieldpack.device.mqtt import Requester
    from fieldpack.shared.errors import UsageError

    settings = _settings(broker, username, password_file, tls_ca, tls_cert, tls_key)
    with Requester(settings) as requester:
        states = requester.device_states(device=device)
        if not states:
            raise UsageError(f"device {device} has no retained status on {settings.url}",
                             hint="see the ids with `fieldpack mqtt status`")
        if states[0].status.online and not force:
            raise UsageError(f"device {device} says it is online", hint="stop its daemon first, or pass --force")
        requester.forget_device(device)
    typer.echo(f"forgot {device} on {settings.url}")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def register(root: typer.Typer) -> None:
    """Add ``serve`` and the ``mqtt`` group (``ask``, ``status``) to the root app."""
    root.command("serve")(serve)
    root.add_typer(app, name="mqtt")
