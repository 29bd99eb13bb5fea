"""The HTTP part of ``hermes serve``: the FastAPI app around a :class:`~hermes.serve.service.Service` behind its
:class:`~hermes.serve.guard.Guard`, its streamed answers (server-sent events), and :func:`serve`, which runs it
under uvicorn: SIGTERM/SIGINT drain it (no new requests, those in flight finish within ``drain_timeout``, the rest
end with an error), a fault the service cannot recover from ends it with a non-zero exit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from hermes.serve.guard import LOOPBACK, TOKEN_BYTES, Guard, hold_of
from hermes.serve.metrics import METRICS_HELP, prometheus_text
from hermes.serve.schemas import (
    RANGES,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Chunk,
    Completion,
    CompletionRequest,
    Delta,
    ErrorBody,
    GenerationRequest,
    HermesExtra,
    ModelCard,
    ModelList,
    ServeError,
    TextChoice,
    Usage,
    error_handler,
    error_response,
)
from hermes.serve.service import Sampling, Service

log = logging.getLogger(__name__)


def create_app(service: Service, *, api_key: str | None = None, host: str = "127.0.0.1",
               allowed_hosts: list[str] | None = None, allowed_origins: list[str] = ()) -> Guard:
    """The app, as an ASGI callable: :class:`Guard` (key, Host/Origin, JSON, body size, request memory) around the
    FastAPI app (``.app``) of /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics (and, with the
    key, /docs). ``allowed_hosts``: Host names answered besides the default (loopback names when ``host`` is a
    loopback address, any name otherwise; ``["*"]``: any)."""
    app = FastAPI(title="hermes serve", version="1")
    handler = error_handler(highs={"max_tokens": service.max_positions,
                                   "max_completion_tokens": service.max_positions})
    for exc in (ServeError, RequestValidationError, HTTPException):
        app.add_exception_handler(exc, handler)
    app.add_exception_handler(Exception, _unexpected)
    _add_info_routes(app, service)
    _add_completion_routes(app, service)
    return Guard(app, memory=service.memory, max_body=service.max_body, api_key=api_key,
                 hosts=_hosts(host, allowed_hosts or []), origins=allowed_origins)


def _hosts(host: str, allowed: list[str]) -> list[str] | None:
    if "*" in allowed:
        return None
    if host.strip("[]") not in LOOPBACK:
        return None if not allowed else [*allowed, host]
    return [*LOOPBACK, *allowed]


async def _unexpected(request: Any, exc: Exception) -> Any:
    """A fault of the server itself: still the OpenAI error shape (the traceback goes to the log)."""
    return error_response(ServeError(f"internal error: {type(exc).__name__}: {exc}", status=500,
                                     kind="server_error"))


def _add_info_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health")
    async def health() -> Any:
        status = service.status()
        return JSONResponse({"status": status, "model": service.model_name},
                            status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(prometheus_text(service.metrics(), METRICS_HELP),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> Any:
        return ModelList(data=[ModelCard(id=service.model_name)])


def _add_completion_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/completions", response_model=Completion)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        tokens, sampling = _admit(body, service)
        ids = await service.text.encode_async(body.prompt, tokens)
        _hold_tokens(request, ids, tokens)
        return await respond(service, request, ids, tokens, sampling, body.stream, chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        tokens, sampling = _admit(body, service)
        ids = await service.text.chat_ids_async([m.model_dump() for m in body.messages], tokens)
        _hold_tokens(request, ids, tokens)
        return await respond(service, request, ids, tokens, sampling, body.stream, chat=True)


def _hold_tokens(request: Request, ids: list[int], tokens: int) -> None:
    """Count the request's token ids (prompt and answer) in the request memory before it is admitted."""
    hold = hold_of(request)
    if hold is not None:
        hold.resize(hold.nbytes + TOKEN_BYTES * (len(ids) + tokens), "this request's tokens")


def _admit(body: GenerationRequest, service: Service) -> tuple[int, Sampling]:
    """What the schema cannot check (the model served, the positions held per request): tokens to generate and
    the request's sampling."""
    service.refuse_unless_ready()
    if body.model is not None and body.model != service.model_name:
        raise ServeError(f"model {body.model!r} does not exist; this server serves {service.model_name!r}",
                         status=404, param="model", code="model_not_found")
    key, tokens = body.token_limit()
    if tokens > service.max_positions:
        raise ServeError(f"{key} must be {RANGES[key].describe(service.max_positions)}, got {tokens!r}", param=key)
    return tokens, Sampling(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k)


async def respond(service: Service, request: Request, ids: list[int], tokens: int, sampling: Sampling,
                  stream: bool, *, chat: bool) -> Any:
    """Submit one request and answer it: server-sent events, or the finished completion."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    rid = service.submit(ids, tokens, sampling, queue.put_nowait)
    created = int(time.time())
    if stream:
        return StreamingResponse(_events(service, rid, queue, ids, tokens, created, chat),
                                 media_type="text/event-stream")
    try:
        out = await _final(service, request, rid, queue)
    except asyncio.CancelledError:
        service.cancel(rid)
        raise
    if out is None:  # the client went away
        return JSONResponse({}, status_code=499)
    if out.error:
        raise _failure(service, out.error)
    return await _answer(service, rid, created, ids, out.generated_tokens, tokens, chat=chat)


def _failure(service: Service, error: Any) -> ServeError:
    """Why a request ended without its answer: the server shut down first (503), or a step failed (500)."""
    if service.state in ("draining", "stopped"):
        return ServeError("the server shut down before this request finished; retry", status=503,
                          kind="server_error", code="shutting_down", retry_after=5)
    return ServeError(f"generation failed: {error}", status=500, kind="server_error")


async def _answer(service: Service, rid: str, created: int, ids: list[int], generated: list[int], limit: int, *,
                  chat: bool) -> Completion | ChatCompletion:
    text = await service.text.decode_async(generated)
    reason = _finish_reason(service, generated, limit)
    usage = Usage(prompt_tokens=len(ids), completion_tokens=len(generated), total_tokens=len(ids) + len(generated))
    head = {"id": rid, "created": created, "model": service.model_name, "usage": usage,
            "hermes": HermesExtra(token_ids=generated)}
    if chat:
        return ChatCompletion(**head, choices=[ChatChoice(message=AssistantMessage(content=text),
                                                          finish_reason=reason)])
    return Completion(**head, choices=[TextChoice(text=text, finish_reason=reason)])


def _finish_reason(service: Service, generated: list[int], limit: int) -> str:
    return "stop" if generated and generated[-1] in service.eos and len(generated) <= limit else "length"


async def _final(service: Service, request: Any, rid: str, queue: asyncio.Queue[Any]) -> Any:
    """The finished output of ``rid``, or None when the client disconnects first (its sequence is freed)."""
    async def disconnected() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watch = asyncio.ensure_future(disconnected())
    try:
        while True:
            get = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                service.cancel(rid)
                return None
            out = get.result()
            if out.is_finished():
                return out
    finally:
        watch.cancel()


def _event(payload: Any) -> str:
    return "data: " + json.dumps(payload.model_dump()) + "\n\n"


def _chunk(service: Service, rid: str, created: int, chat: bool, delta: str, reason: str | None,
           first: bool = False) -> str:
    """One server-sent event adding ``delta`` to the answer (``reason``: the last one)."""
    choice: TextChoice | ChatChunkChoice
    if chat:
        if first:
            d = Delta(role="assistant", content=delta)
        else:
            d = Delta(content=delta) if reason is None or delta else Delta()
        choice = ChatChunkChoice(delta=d, finish_reason=reason)
    else:
        choice = TextChoice(text=delta, finish_reason=reason)
    return _event(Chunk(id=rid, object="chat.completion.chunk" if chat else "text_completion", created=created,
                        model=service.model_name, choices=[choice]))


async def _events(service: Service, rid: str, queue: asyncio.Queue[Any], ids: list[int], limit: int, created: int,
                  chat: bool) -> AsyncIterator[str]:
    """Server-sent events of one request; a client that disconnects cancels this generator, freeing its slot."""
    sent_tokens = 0
    sent_text = ""
    finished = False
    try:
        if chat:
            yield _chunk(service, rid, created, chat, "", None, first=True)
        while True:
            out = await queue.get()
            if out.error:
                finished = True
                yield _event(ErrorBody.of(_failure(service, out.error)))
                break
            tokens = out.generated_tokens
            if len(tokens) > sent_tokens:
                text = await service.text.decode_async(tokens)
                # hold back an incomplete character (a multi-byte token split) until the next token completes it
                if not text.endswith("\ufffd") or out.is_finished():
                    delta, sent_text = text[len(sent_text):], text
                    sent_tokens = len(tokens)
                    if delta:
                        yield _chunk(service, rid, created, chat, delta, None)
            if out.is_finished():
                finished = True
                yield _chunk(service, rid, created, chat, "", _finish_reason(service, tokens, limit))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            service.cancel(rid)


class _Server(uvicorn.Server):
    """uvicorn's server that says when it listens, drains on the first SIGTERM/SIGINT (the second stops at once),
    and stops with exit code 1 when the service cannot go on."""

    def __init__(self, config: uvicorn.Config, service: Service, guard: Guard, drain_timeout: float,
                 on_ready: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.service, self.guard, self.drain_timeout, self.on_ready = service, guard, drain_timeout, on_ready
        self.exit_code = 0
        self.failure = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._hurry = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without re-raising the signal after the shutdown (which would kill the process on SIGTERM
        before the generation thread is stopped and the engine closed)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        """The first signal drains; the second ends the requests in flight with an error at once; a third stops
        without waiting for anything."""
        if self._loop is None or self.service.state not in ("ready", "draining") or self._hurry.is_set():
            super().handle_exit(sig, frame)
        elif self.service.state == "draining":
            self._loop.call_soon_threadsafe(self._hurry.set)
        else:
            self.service.drain()
            self._loop.call_soon_threadsafe(self._spawn, self._drain())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        """Requests in flight finish within ``drain_timeout`` (or until a second signal); the rest end with an
        error; then uvicorn stops."""
        n = self.guard.active
        if n:
            log.warning("draining: %d request(s) in flight, %g s to finish (a second Ctrl-C/SIGTERM ends them now)",
                        n, self.drain_timeout)
        idle = asyncio.ensure_future(self.guard.wait_idle(self.drain_timeout))
        hurry = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({idle, hurry}, return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
        if not (idle.done() and idle.result()):
            idle.cancel()
            log.warning("ending %d request(s) in flight with an error", self.guard.active)
            await asyncio.get_running_loop().run_in_executor(None, self.service.stop)
            await self.guard.wait_idle(5.0)
        self.should_exit = True

    def fatal(self, reason: str) -> None:
        """The service cannot go on (called from any thread): stop with exit code 1."""
        def stop() -> None:
            self.exit_code, self.failure = 1, reason
            self.should_exit = True

        if self._loop is not None:
            self._loop.call_soon_threadsafe(stop)

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)
        if self.on_ready is not None and self.started:
            self.on_ready()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free one), bound once and handed to uvicorn, with
    ``SO_REUSEADDR`` as uvicorn binds: a restart right after a kill finds the port free (connections of the
    previous process in TIME_WAIT do not block it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(service: Service, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          on_ready: Callable[[str], None] | None = None, sock: socket.socket | None = None,
          drain_timeout: float = 30.0, allowed_hosts: list[str] | None = None,
          allowed_origins: list[str] = ()) -> tuple[int, str]:
    """Run the HTTP server until SIGINT/SIGTERM (a drain: see :class:`_Server`) or a fault the service cannot
    recover from; then the generation thread is stopped and the engine closed. Returns (exit code, why it
    failed): (0, "") after a drain, (1, reason) after a fault."""
    guard = create_app(service, api_key=api_key, host=host, allowed_hosts=allowed_hosts,
                       allowed_origins=allowed_origins)
    sock = sock if sock is not None else listen(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(guard, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    ready = (lambda: on_ready(f"http://{host}:{bound}/v1")) if on_ready is not None else None
    server = _Server(config, service, guard, drain_timeout, on_ready=ready)
    service.on_fatal = server.fatal
    service.start()
    try:
        server.run(sockets=[sock])
    finally:
        service.stop()
        sock.close()
    return server.exit_code, server.failure
