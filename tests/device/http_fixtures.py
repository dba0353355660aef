"""Shared pieces of the HTTP API tests: a data dir with the real bundle, a running server, engine gates."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
import threading
import time
from typing import Iterator

from tests.conftest import run_cli


def install_device(root: Path, keys: Path, bundle: Path) -> Path:
    """``fieldpack device init`` + ``install`` of ``bundle`` into ``root`` (through the CLI, as a user does)."""
    r = run_cli("device", "init", "--data-dir", str(root), "--trust", str(keys / "builder.pub"))
    assert r.returncode == 0, r.stderr
    r = run_cli("install", str(bundle), "--data-dir", str(root))
    assert r.returncode == 0, r.stderr
    return root


@contextmanager
def running_server(data_dir: Path, *, queue_size: int = 8, api_key: str | None = None) -> Iterator[tuple[object, object]]:
    """A real HTTP server (uvicorn, loopback, any free port) over a local engine host; yields (server, host)."""
    from fieldpack.device.http.app import ApiConfig
    from fieldpack.device.http.engine import LocalEngineHost
    from fieldpack.device.http.security import HttpSecurity
    from fieldpack.device.http.server import HttpConfig, HttpServer
    from fieldpack.device.provider import ActiveBundleProvider
    from fieldpack.device.slots import open_data_dir

    host = LocalEngineHost(ActiveBundleProvider(open_data_dir(data_dir)), queue_size=queue_size)
    host.start()
    server = HttpServer(host, HttpConfig(port=0, api=ApiConfig(security=HttpSecurity(api_key=api_key))))
    server.start_in_thread()
    deadline = time.monotonic() + 300
    while host.state().loading:  # the worker loads the bundle first; /health says 503 until then
        assert time.monotonic() < deadline, "the bundle never loaded"
        time.sleep(0.05)
    try:
        yield server, host
    finally:
        server.stop()
        host.stop()


@contextmanager
def engine_held(host: object, *, fill_queue: bool = False) -> Iterator[None]:
    """Occupy the engine with a task that waits on a gate (and, with ``fill_queue``, every queue slot too), so
    requests made inside the block deterministically wait or are refused; the gate opens on exit."""
    from fieldpack.device.http.engine import submit

    gate, started = threading.Event(), threading.Event()

    def hold(engine: object, err: object) -> None:
        started.set()
        gate.wait(120)

    assert submit(host, hold) is not None  # type: ignore[arg-type]
    assert started.wait(120), "the worker never took the gate task"
    if fill_queue:
        while submit(host, lambda engine, err: None) is not None:  # type: ignore[arg-type]
            pass
    try:
        yield
    finally:
        gate.set()
