"""What stands between the network and the model: who may ask (API key, ``Host``, ``Origin``), how a request must
come (JSON, at most ``max_body`` bytes) and the memory requests may hold together (:class:`RequestMemory`).

:class:`Guard` is a plain ASGI middleware, so it answers before FastAPI reads or parses anything: a 10 MB body is
refused from its ``Content-Length`` (or once the bytes read pass the limit), never held whole. The bytes a request
holds (its body while it lives, then its token ids) are reserved in :class:`RequestMemory` before they are taken,
so many large requests at once get 413/429, never more memory than the pool.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from hermes.memory import format_bytes
from hermes.serve.schemas import ServeError, error_response

#: bytes a request holds per token (its prompt ids and generated ids as Python lists, and transformers' copy)
TOKEN_BYTES = 64
#: paths served without the API key (a supervisor's probe)
OPEN_PATHS = ("/health",)
#: bytes of a refused body read and dropped (not held) so that the client, still sending, reads the 413
DISCARD_MAX = 64 * 2**20
#: seconds spent dropping a refused body at most
DISCARD_SECONDS = 2.0
#: seconds a client may take between two parts of its body (a stalled client frees its request memory: 408)
BODY_TIMEOUT = 30.0
#: methods whose requests carry a body
BODY_METHODS = ("POST", "PUT", "PATCH")
#: Host names a server listening on a loopback address answers by default (any port)
LOOPBACK = ("localhost", "127.0.0.1", "::1", "[::1]")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Hold:
    """Bytes one request holds in a :class:`RequestMemory` (resized as it goes, released when it ends)."""

    def __init__(self, pool: RequestMemory, nbytes: int) -> None:
        self.pool, self.nbytes = pool, nbytes

    def resize(self, nbytes: int, what: str = "this request") -> None:
        self.pool._resize(self, nbytes, what)

    def release(self) -> None:
        self.pool._resize(self, 0, "")


class RequestMemory:
    """A fixed pool of bytes for what requests hold (bodies, token ids): a request that would pass it waits for
    nothing — it is refused, 413 if it could never fit, 429 if it could once others finish."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    def hold(self, nbytes: int, what: str = "this request") -> Hold:
        h = Hold(self, 0)
        self._resize(h, nbytes, what)
        return h

    def _resize(self, h: Hold, nbytes: int, what: str) -> None:
        if nbytes > self.capacity:
            raise ServeError(f"{what} needs {format_bytes(nbytes)} of request memory; this server holds at most "
                             f"{format_bytes(self.capacity)} for all requests together (hermes serve "
                             "--request-memory); send a shorter prompt or ask for fewer tokens", status=413,
                             code="request_too_large")
        with self._lock:
            if nbytes > h.nbytes and self.used + nbytes - h.nbytes > self.capacity:
                raise ServeError(f"the server is busy: requests in flight hold {format_bytes(self.used)} of its "
                                 f"{format_bytes(self.capacity)} request memory and {what} needs "
                                 f"{format_bytes(nbytes)}; retry later", status=429, kind="rate_limit_error",
                                 code="request_memory_full")
            self.used += nbytes - h.nbytes
            h.nbytes = nbytes
            self.peak = max(self.peak, self.used)


def _host_name(value: str) -> str:
    """``Host``'s name without its port (``[::1]:8000`` -> ``[::1]``)."""
    if value.startswith("["):
        return value.split("]", 1)[0] + "]"
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def _origin_host(origin: str) -> str | None:
    """The host of an ``Origin`` header, None where it is not http(s)://HOST[:PORT] (``null``, ``file://``)."""
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme not in ("http", "https"):
        return None
    return _host_name(rest.split("/", 1)[0]).lower()


class Guard:
    """ASGI middleware: API key, ``Host``/``Origin`` checks, JSON content type, body size, request memory.

    ``hosts``: the ``Host`` names answered (lower case; None: any) — a server on a loopback address answers only
    loopback names, so a web page that rebinds its own name to 127.0.0.1 (DNS rebinding) is refused.
    ``origins``: the browser origins (host names) allowed besides loopback ones; a request from any other web page
    (``Origin`` set by the browser) is refused, so a page the user visits cannot drive the server."""

    def __init__(self, app: Any, *, memory: RequestMemory, max_body: int, api_key: str | None,
                 hosts: Iterable[str] | None, origins: Iterable[str] = ()) -> None:
        self.app, self.memory, self.max_body = app, memory, max_body
        self.key = api_key.encode() if api_key else None
        self.hosts = None if hosts is None else {h.lower() for h in hosts}
        self.origins = {h.lower() for h in origins} | set(LOOPBACK)
        self.active = 0  # requests with a body (completions) being answered
        self._idle: asyncio.Event | None = None

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request with a body is being answered (at most ``timeout`` s); whether none is."""
        if self.active == 0:
            return True
        if self._idle is None:
            self._idle = asyncio.Event()
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return self.active == 0
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            self._check(scope, headers)
            if scope["method"] not in BODY_METHODS:
                await self.app(scope, receive, send)
                return
            declared = _content_length(headers, self.max_body)
            hold = self.memory.hold(declared if declared is not None else self.max_body, "this request's body")
        except ServeError as exc:
            if scope["method"] in BODY_METHODS:
                await _discard(receive)
            await _answer(exc, scope, receive, send)
            return
        self.active += 1
        try:
            try:
                body = await self._read(receive)
                hold.resize(len(body), "this request's body")
            except ServeError as exc:
                await _answer(exc, scope, receive, send)
                return
            scope.setdefault("state", {})["hermes_hold"] = hold
            await self.app(scope, _replay(body, receive), send)
        finally:
            hold.release()
            self.active -= 1
            if self.active == 0 and self._idle is not None:
                self._idle.set()

    def _check(self, scope: Scope, headers: dict[str, str]) -> None:
        host = _host_name(headers.get("host", "")).lower()
        if self.hosts is not None and host not in self.hosts:
            raise ServeError(f"this server does not answer the host name {host!r} (a web page's name rebound to "
                             "this machine?); use http://127.0.0.1:PORT, or allow it with hermes serve "
                             "--allowed-hosts", status=403, kind="permission_error", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and _origin_host(origin) not in self.origins:
            raise ServeError(f"requests from the web page {origin!r} are refused (a page in a browser must not drive "
                             "a local model server); allow it with hermes serve --allowed-origins", status=403,
                             kind="permission_error", code="origin_not_allowed")
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            sent = headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(sent, b"Bearer " + self.key):
                raise ServeError("invalid API key: send 'Authorization: Bearer KEY' with the server's key",
                                 status=401, kind="authentication_error", code="invalid_api_key")
        if scope["method"] in BODY_METHODS:
            kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if kind != "application/json":
                raise ServeError(f"the request body must be JSON sent with the header 'Content-Type: "
                                 f"application/json' (got {kind or 'no content type'!r})", status=415,
                                 code="unsupported_media_type")

    async def _read(self, receive: Receive) -> bytes:
        """The whole body, refused (413) as soon as it passes ``max_body``."""
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), BODY_TIMEOUT)
            except TimeoutError:
                raise ServeError(f"the client sent no part of its body for {BODY_TIMEOUT:g} s; send the whole body "
                                 "at once", status=408, code="request_timeout") from None
            if message["type"] == "http.disconnect":
                raise ServeError("the client went away while sending its request", status=400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                if message.get("more_body", False):
                    await _discard(receive)
                raise _too_large(self.max_body, f"more than {format_bytes(self.max_body)}")
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)


async def _discard(receive: Receive) -> None:
    """Read and drop the rest of a refused body (at most DISCARD_MAX bytes): a client still sending it would get
    a broken pipe instead of the answer."""
    size = 0
    deadline = asyncio.get_running_loop().time() + DISCARD_SECONDS
    while size <= DISCARD_MAX:
        try:
            message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
        except TimeoutError:
            return
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _too_large(limit: int, sent: str) -> ServeError:
    return ServeError(f"the request body ({sent}) is larger than this server takes: at most {format_bytes(limit)} "
                      "(hermes serve --max-body); send a shorter prompt", status=413, code="request_too_large")


def _content_length(headers: dict[str, str], limit: int) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise ServeError(f"Content-Length must be a number of bytes, got {value!r}")
    n = int(value)
    if n > limit:
        raise _too_large(limit, f"{n} bytes")
    return n


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then waits on the client (for its disconnect)."""
    sent = False

    async def replay() -> MutableMapping[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(exc: ServeError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(exc)(scope, receive, send)


def hold_of(request: Any) -> Hold | None:
    """The request memory a request's body holds (set by :class:`Guard`)."""
    return request.scope.get("state", {}).get("hermes_hold")
