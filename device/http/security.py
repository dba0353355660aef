"""Who may talk to the device's HTTP API, and how much they may send.

* Loopback by default; binding anything else needs an API key (``Authorization: Bearer <key>``) or the explicit
  ``insecure_no_auth`` (:func:`check_bind`).
* Bodies above ``max_body_bytes`` are refused with 413 before they are read whole (``Content-Length`` or the
  running count of a chunked body).
* CORS is off unless origins are listed; on a loopback bind without a key the ``Host`` header must name the
  loopback (a web page elsewhere cannot reach the API through DNS rebinding).
* The page and ``/health`` need no key (the page asks for it); everything else does when one is set.
"""

from __future__ import annotations

from dataclasses import dataclass
import hmac
import ipaddress
import json
from typing import Any, Awaitable, Callable

from fieldpack.shared import errors

#: Default request body limit, bytes (a long chat with history fits; a document dump does not).
MAX_BODY_BYTES = 256 * 1024

_OPEN_PATHS = frozenset({"/", "/health"})
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass(frozen=True)
class HttpSecurity:
    """Attributes:
        host: the address bound (used for the loopback check and the allowed ``Host`` names).
        api_key: the bearer token required, or ``None``.
        max_body_bytes: largest request body, bytes.
        cors_origins: origins allowed by CORS (empty: CORS off).
    """

    host: str = "127.0.0.1"
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    cors_origins: tuple[str, ...] = ()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_bind(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` / ``"[::1]:PORT"`` / ``"PORT"`` -> (host, port); the host defaults to 127.0.0.1.

    Raises:
        UsageError: no port, or a port outside 1..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 < number < 65536:
        raise errors.UsageError(f"--http {text!r} has no valid port", hint="give HOST:PORT, e.g. 127.0.0.1:8080")
    return host, number


def check_bind(host: str, *, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse a non-loopback bind without an API key or an explicit ``insecure_no_auth``.

    Raises:
        UsageError: naming the address and both ways out.
    """
    if is_loopback(host) or api_key or insecure_no_auth:
        return
    raise errors.UsageError(
        f"--http binds {host}, which other machines can reach, and no API key is set",
        hint="give --api-key-file FILE (clients send 'Authorization: Bearer <key>'), or --insecure-no-auth on a "
             "network you trust, or bind 127.0.0.1")


def _error(status: int, message: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": code}}).encode()


ASGIApp = Callable[[dict[str, Any], Callable[[], Awaitable[dict[str, Any]]], Callable[[dict[str, Any]], Awaitable[None]]],
                   Awaitable[None]]


#: Set in an ASGI scope whose request this middleware refused (and counted through ``on_refused``).
REFUSED_SCOPE_KEY = "fieldpack.refused"


class _Guard:
    """Pure ASGI middleware: body size limit, bearer key, Host check (no body buffering, streaming kept)."""

    def __init__(self, app: ASGIApp, security: HttpSecurity, on_refused: Callable[[int], None]) -> None:
        self.app = app
        self.sec = security
        self.on_refused = on_refused
        self.check_host = is_loopback(security.host) and not security.api_key
        self.key = security.api_key.encode() if security.api_key else None

    async def _refuse(self, scope: dict[str, Any], send: Any, status: int, message: str, code: str,
                      headers: list[tuple[bytes, bytes]] = []) -> None:
        self.on_refused(status)
        scope[REFUSED_SCOPE_KEY] = True  # counted here: the app's per-route counter (outside) skips it
        body = _error(status, message, code)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.check_host:
            name = headers.get("host", "").rsplit(":", 1)[0] if not headers.get("host", "").startswith("[") \
                else headers["host"].split("]")[0] + "]"
            if name.lower() not in _LOOPBACK_NAMES:
                await self._refuse(scope, send, 421, f"host {name!r} is not this device's loopback address", "bad_host")
                return
        if self.key is not None and scope.get("path") not in _OPEN_PATHS and scope.get("method") != "OPTIONS":
            auth = headers.get("authorization", "")
            token = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(token, self.key):
                await self._refuse(scope, send, 401, "missing or wrong API key", "invalid_api_key",
                                   [(b"www-authenticate", b"Bearer")])
                return
        limit = self.sec.max_body_bytes
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await self._refuse(scope, send, 413, f"the request body is larger than {limit} bytes", "payload_too_large")
            return
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except BodyTooLarge:
            await self._refuse(scope, send, 413, f"the request body is larger than {limit} bytes", "payload_too_large")


class BodyTooLarge(Exception):
    pass


def install_security(app: Any, security: HttpSecurity, *, on_refused: Callable[[int], None]) -> None:
    """Add CORS (only when origins are listed) and the guard to a Starlette/FastAPI ``app``."""
    if security.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(security.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(_Guard, security=security, on_refused=on_refused)
