"""Running the API: uvicorn over :func:`device.http.app.create_app`, alone or beside the MQTT daemon.

:class:`HttpServer` runs uvicorn on a thread. :func:`serve` is the whole daemon: one engine host (the MQTT
daemon's worker when a broker is given, a local worker otherwise), the HTTP server, and an orderly stop on
SIGINT/SIGTERM (exit status 0, as the MQTT-only daemon).
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
import threading
import time
from typing import Any

from fieldpack.shared import errors

from fieldpack.device.http.app import ApiConfig, create_app
from fieldpack.device.http.engine import EngineHost

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpConfig:
    """Attributes: ``host``/``port`` bound (port 0: any free port, see :attr:`HttpServer.port`); ``api``."""

    host: str = "127.0.0.1"
    port: int = 8080
    api: ApiConfig = ApiConfig()


def check_bindable(host: str, port: int) -> None:
    """Bind ``host:port`` once and let go, so a taken port is one clear line before uvicorn starts (uvicorn
    would log its own ``[Errno 98]`` line and exit its thread). Uses ``SO_REUSEADDR`` as uvicorn does, so a port
    in TIME_WAIT still counts as free.

    Raises:
        UsageError: the port is in use, or the address is not one of this machine's.
    """
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise errors.UsageError(f"HTTP port {port} on {host} is already in use",
                                        hint="stop the program that holds it, or pick another port: --http "
                                             f"{host}:PORT") from exc
            raise errors.UsageError(f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}",
                                    hint="use an address of this machine, e.g. 127.0.0.1") from exc


class HttpServer:
    """uvicorn serving the API of ``host`` (an :class:`~device.http.engine.EngineHost`, started by the caller)."""

    def __init__(self, host: EngineHost, config: HttpConfig) -> None:
        import uvicorn

        self.config = config
        self.app = create_app(host, config.api)
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, host=config.host, port=config.port, log_level="warning", access_log=False,
            timeout_graceful_shutdown=5, lifespan="off", limit_concurrency=256, server_header=False))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start_in_thread` returned)."""
        for server in getattr(self._server, "servers", []):
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.config.port

    @property
    def url(self) -> str:
        host = self.config.host
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def start_in_thread(self, timeout_s: float = 30.0) -> None:
        """Serve on a background thread; returns once the socket listens.

        Raises:
            UsageError: the address cannot be bound (in use, not this machine's).
        """
        check_bindable(self.config.host, self.config.port)
        self._thread = threading.Thread(target=self._server.run, name="fieldpack-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise errors.UsageError(f"cannot serve HTTP on {self.config.host}:{self.config.port}",
                                        hint="pick a free port or an address of this machine")
            time.sleep(0.02)

    def stop(self) -> None:
        """Ask uvicorn to finish (open streams get a few seconds) and wait for the thread."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)


def serve(provider: Any, http: HttpConfig, *, queue_size: int = 8, mqtt: tuple[Any, Any] | None = None) -> None:
    """``fieldpack serve --http``: serve until SIGINT/SIGTERM, then stop in order (the worker, then HTTP).

    Args:
        provider: the engine provider (``device.provider.ActiveBundleProvider``).
        http: where and how to serve.
        queue_size: requests that may wait (HTTP alone; beside MQTT the daemon's config sets it).
        mqtt: ``(DaemonConfig, BrokerSettings)`` to serve MQTT too, from the same worker.

    Raises:
        UsageError: the address cannot be bound, or the MQTT daemon stopped for good (login refused, twin).
    """
    import signal

    check_bindable(http.host, http.port)  # before a model is loaded or a broker dialled
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    daemon = None
    if mqtt is None:
        from fieldpack.device.http.engine import LocalEngineHost

        host: Any = LocalEngineHost(provider, queue_size=queue_size)
        host.start()
    else:
        from fieldpack.device.http.engine import MqttEngineHost
        from fieldpack.device.mqtt import MqttDaemon

        daemon = MqttDaemon(mqtt[0], provider, mqtt[1])
        host = MqttEngineHost(daemon, provider)
        daemon.start()
    server: HttpServer | None = None
    try:
        server = HttpServer(host, http)
        server.start_in_thread()
        log.info("serving HTTP on %s/", server.url)
        # a fatal MQTT error (login refused, twin device id) stops the HTTP side too
        while not stop.is_set() and (daemon is None or daemon.fatal_error is None):
            stop.wait(0.5)
    finally:
        # the engine first: what waits is refused and what runs is stopped (shutting_down), so open streams end
        # with an error event and [DONE]; stopping uvicorn first cut them at its graceful-shutdown timeout with a
        # CancelledError traceback (a new-user trial)
        if daemon is not None:
            daemon.stop()
        else:
            host.stop()
        if server is not None:
            server.stop()
    log.info("HTTP on %s stopped", f"http://{http.host}:{http.port}")
    if daemon is not None and daemon.fatal_error is not None:
        raise daemon.fatal_error
