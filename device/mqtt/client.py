"""Broker settings and paho-mqtt client setup, shared by the daemon and the requesting client.

One place turns ``mqtt://host:port`` plus the login and TLS options into a configured
``paho.mqtt.client.Client`` (paho-mqtt 2.x, callback API version 2, MQTT v5): username/password, TLS from
our own ``ssl.SSLContext`` (server certificate and host name verified), optional client certificate,
reconnect backoff, a Last Will, and TCP_NODELAY on every socket the client opens (small messages such as
single tokens go out at once instead of waiting for Nagle's algorithm). Errors of ``ssl`` and file access
are translated here into ``shared.errors``.

The broker must do the same on its side: Mosquitto leaves Nagle's algorithm on unless its config says
``set_tcp_nodelay true`` (Mosquitto >= 2.0), and then Nagle plus the peer's delayed ACK hold a reply for
about 40 ms (measured with ``benchmarks/mqtt_bench.py``: first token 42 ms after the request without it,
0.5-2.5 ms with it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import logging
import os
from pathlib import Path
import socket
import ssl
import stat
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from fieldpack.shared import errors, protocol

log = logging.getLogger(__name__)

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883


@dataclass(frozen=True)
class BrokerSettings:
    """Where the broker is and how to log in.

    Attributes:
        host, port: broker address; ``port`` defaults to 1883, or 8883 with TLS.
        tls: connect with TLS (``mqtts://`` or a CA file given).
        username, password: login; ``password`` is kept out of ``repr``.
        ca_file: CA bundle (PEM) that signed the broker's certificate; ``None`` with TLS = system CAs.
        cert_file, key_file: client certificate and key (PEM) for brokers that ask for one.
        keepalive_s: MQTT keep-alive, seconds; the broker drops (and fires the Last Will of) a client silent
            for 1.5 times this.
        reconnect_min_s, reconnect_max_s: reconnect backoff, seconds; doubles from min up to max after each
            failed attempt, back to min after a successful CONNACK.
    """

    host: str
    port: int = DEFAULT_PORT
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 30.0

    @property
    def url(self) -> str:
        """``mqtt(s)://host:port`` (no credentials), for messages and logs."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @classmethod
    def from_options(
        cls,
        broker: str,
        *,
        username: str | None = None,
        password_file: Path | None = None,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        keepalive_s: int = 30,
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 30.0,
    ) -> BrokerSettings:
        """Settings from the CLI options (``--broker mqtt://host:1883 --username U --password-file F
        --tls-ca ca.pem --tls-cert c.pem --tls-key k.pem``). The password is read from its file now (first
        line, without the line end) so it never appears on a command line.

        Raises:
            UsageError: bad URL or scheme, port out of range, password file without username, certificate
                without key (or the reverse), client certificate without TLS, empty password file.
            InputNotFoundError: a named file does not exist or cannot be read.
        """
        host, port, tls = parse_broker_url(broker)
        if tls_ca is not None or tls_cert is not None:
            tls = True
        if port is None:
            port = DEFAULT_TLS_PORT if tls else DEFAULT_PORT
        if (tls_cert is None) != (tls_key is None):
            raise errors.UsageError(
                "--tls-cert and --tls-key go together", hint="give both the client certificate and its key"
            )
        for option, path in (("--tls-ca", tls_ca), ("--tls-cert", tls_cert), ("--tls-key", tls_key)):
            if path is not None and not Path(path).is_file():
                raise errors.InputNotFoundError(f"{option} {path} does not exist", hint="give an existing PEM file")
        password: str | None = None
        if password_file is not None:
            if not username:
                raise errors.UsageError(
                    f"--password-file {password_file} given without --username", hint="add --username"
                )
            password = read_password_file(Path(password_file))
        if keepalive_s < 1:
            raise errors.UsageError(f"keep-alive {keepalive_s} s is too short", hint="use 1 second or more")
        return cls(
            host=host,
            port=port,
            tls=tls,
            username=username or None,
            password=password,
            ca_file=Path(tls_ca) if tls_ca else None,
            cert_file=Path(tls_cert) if tls_cert else None,
            key_file=Path(tls_key) if tls_key else None,
            keepalive_s=keepalive_s,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
        )


def probe_broker(settings: BrokerSettings, timeout_s: float = 5.0) -> None:
    """Fail fast, with the cause, when the broker's host does not resolve or nothing listens on its port: one DNS
    lookup and one TCP connect (closed at once), before a command waits for an MQTT CONNACK that cannot come (a
    trial's `fleet push` to a refused port and to an unknown host both said only "did not accept the connection in
    10 s"). A host that answers TCP passes; login and TLS problems show in the MQTT connection itself.

    Raises:
        DeviceError: the host name does not resolve, the connection is refused, or there is no answer within
            ``timeout_s`` seconds.
    """
    where = f"{settings.host}:{settings.port}"
    try:
        addresses = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise errors.DeviceError(f"broker host {settings.host!r} does not resolve ({exc.strerror})",
                                 hint="check the host name in --broker, or use its IP address") from exc
    last: OSError | None = None
    for family, kind, proto, _, addr in addresses:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout_s)
                sock.connect(addr)
                return
        except OSError as exc:
            last = exc
    if isinstance(last, ConnectionRefusedError):
        raise errors.DeviceError(f"broker {where} refused the connection: nothing listens on port {settings.port}",
                                 hint="check the port in --broker and that the broker runs") from last
    raise errors.DeviceError(f"broker {where} did not answer within {timeout_s:.0f} s ({last})",
                             hint="check --broker and the network path to it (firewall, VPN)") from last


def parse_broker_url(url: str) -> tuple[str, int | None, bool]:
    """``mqtt://host[:port]`` / ``mqtts://host[:port]`` (or a bare ``host[:port]``) -> ``(host, port or None,
    tls)``.

    Raises:
        UsageError: another scheme, no host, a port out of 1..65535, or a path/credentials in the URL.
    """
    text = url.strip()
    if "://" not in text:
        text = "mqtt://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise errors.UsageError(
            f"broker URL {url!r} is not valid ({exc})", hint="write it as mqtt://host:1883 or mqtts://host:8883"
        ) from exc
    if parts.scheme not in ("mqtt", "mqtts"):
        raise errors.UsageError(
            f"broker URL {url!r} has scheme {parts.scheme!r}",
            hint="use mqtt://host:1883 (plain) or mqtts://host:8883 (TLS)",
        )
    if not parts.hostname or parts.path not in ("", "/") or parts.username or parts.query:
        raise errors.UsageError(
            f"broker URL {url!r} must be scheme://host[:port] only",
            hint="give the login with --username/--password-file, not in the URL",
        )
    if port == 0:
        raise errors.UsageError(f"broker URL {url!r} has port 0", hint="use the broker's port, e.g. 1883")
    return parts.hostname, port, parts.scheme == "mqtts"


def read_password_file(path: Path) -> str:
    """First line of ``path`` without its line end. Logs a warning when others may read the file.

    Raises:
        InputNotFoundError: missing or unreadable. UsageError: empty first line.
    """
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.InputNotFoundError(
            f"--password-file {path} cannot be read ({exc})", hint="give a readable UTF-8 file holding the password"
        ) from exc
    password = text.splitlines()[0] if text else ""
    if not password:
        raise errors.UsageError(f"--password-file {path} is empty", hint="write the password on its first line")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("password file %s is readable by others; chmod 600 it", path)
    return password


def _set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """paho ``on_socket_open``: turn off Nagle's algorithm on the fresh (possibly TLS) socket."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # unix sockets / websockets wrappers have no TCP options
        log.debug("TCP_NODELAY not set: %s", exc)


def tls_context(settings: BrokerSettings) -> ssl.SSLContext:
    """Client TLS context: verifies the broker's certificate (against ``ca_file`` or the system CAs) and its
    host name; loads the client certificate when given.

    Raises:
        UsageError: a PEM file that ``ssl`` cannot load (wrong format, key not matching the certificate).
    """
    try:
        context = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
        if settings.cert_file is not None:
            context.load_cert_chain(str(settings.cert_file), str(settings.key_file) if settings.key_file else None)
    except (ssl.SSLError, OSError) as exc:
        raise errors.UsageError(
            f"TLS files for {settings.url} cannot be loaded ({exc})",
            hint="give PEM files: --tls-ca the CA certificate, --tls-cert/--tls-key a matching pair",
        ) from exc
    return context


def make_client(
    settings: BrokerSettings,
    client_id: str,
    *,
    will: tuple[str, bytes] | None = None,
    userdata: Any = None,
) -> mqtt.Client:
    """A configured, not yet connected MQTT v5 client.

    Args:
        settings: broker and login.
        client_id: MQTT client id; must be unique on the broker (a second connection with the same id takes
            the session over and disconnects the first).
        will: ``(topic, payload)`` of a retained QoS 1 Last Will, or ``None``.
        userdata: passed to callbacks.

    Raises:
        UsageError: TLS files that cannot be loaded.
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        userdata=userdata,
        reconnect_on_failure=True,
    )
    if settings.username:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls:
        client.tls_set_context(tls_context(settings))
    client.reconnect_delay_set(settings.reconnect_min_s, settings.reconnect_max_s)  # type: ignore[arg-type]
    client.on_socket_open = _set_nodelay
    if will is not None:
        topic, payload = will
        client.will_set(topic, payload, qos=1, retain=True, properties=json_properties(PacketTypes.WILLMESSAGE))
    return client


def connect_async(client: mqtt.Client, settings: BrokerSettings) -> None:
    """Start connecting with a clean session (subscriptions are restored by the caller's ``on_connect``).

    A clean start is deliberate: with a persistent session an offline group member would keep receiving
    its share of group requests at the broker until it came back.
    """
    client.connect_async(settings.host, settings.port, keepalive=settings.keepalive_s, clean_start=True)


def json_properties(packet_type: int = PacketTypes.PUBLISH) -> Properties:
    """MQTT v5 properties marking a JSON UTF-8 payload (Payload Format Indicator 1, Content Type)."""
    props = Properties(packet_type)
    props.PayloadFormatIndicator = 1
    props.ContentType = protocol.CONTENT_TYPE
    return props


def fresh_client_id(prefix: str) -> str:
    """``<prefix>-<12 hex>``: a random client id for short-lived clients (CLI, benchmark)."""
    return f"{prefix}-{os.urandom(6).hex()}"
