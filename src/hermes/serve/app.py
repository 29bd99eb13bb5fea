"""The HTTP part of ``hermes serve``: the FastAPI app around a :class:`~hermes.serve.service.Service`, its
streamed answers (server-sent events), and :func:`serve`, which runs it under uvicorn until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

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


def create_app(service: Service, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    app = FastAPI(title="hermes serve", version="1")
    handler = error_handler(highs={"max_tokens": service.max_positions,
                                   "max_completion_tokens": service.max_positions})
    for exc in (ServeError, RequestValidationError, HTTPException):
        app.add_exception_handler(exc, handler)
    if api_key:
        _require_key(app, api_key)
    _add_info_routes(app, service)
    _add_completion_routes(app, service)
    return app


def _require_key(app: FastAPI, api_key: str) -> None:
    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        if request.url.path.startswith("/v1/") and request.headers.get("authorization", "") != f"Bearer {api_key}":
            return error_response(ServeError("invalid API key: send 'Authorization: Bearer KEY' with the server's "
                                             "key", status=401, kind="authentication_error", code="invalid_api_key"))
        return await call_next(request)


def _add_info_routes(app: FastAPI, service: Service) -> None:
    @app.get("/health")
    async def health() -> Any:
        ok = service.healthy()
        return JSONResponse({"status": "ok" if ok else "stopping", "model": service.model_name},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(prometheus_text(service.metrics()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> Any:
        return ModelList(data=[ModelCard(id=service.model_name)])


def _add_completion_routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/completions", response_model=Completion)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        tokens, sampling = _admit(body, service)
        ids = service.encode(body.prompt)
        return await respond(service, request, ids, tokens, sampling, body.stream, chat=False)

    @app.post("/v1/chat/completions", response_model=ChatCompletion)
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        tokens, sampling = _admit(body, service)
        ids = service.chat_ids([m.model_dump() for m in body.messages])
        return await respond(service, request, ids, tokens, sampling, body.stream, chat=True)


def prometheus_text(values: dict[str, float]) -> str:
    """``values`` in Prometheus' text format: names ending in ``_total`` are counters, the others gauges."""
    lines = []
    for name, value in values.items():
        kind = "counter" if name.endswith("_total") else "gauge"
        text = str(int(value)) if float(value).is_integer() else f"{float(value):.6g}"
        lines += [f"# TYPE {name} {kind}", f"{name} {text}"]
    return "\n".join(lines) + "\n"


def _admit(body: GenerationRequest, service: Service) -> tuple[int, Sampling]:
    """What the schema cannot check (the model served, the positions held per request): tokens to generate and
    the request's sampling."""
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
        raise ServeError(f"generation failed: {out.error}", status=500, kind="server_error")
    return _answer(service, rid, created, ids, out.generated_tokens, tokens, chat=chat)


def _answer(service: Service, rid: str, created: int, ids: list[int], generated: list[int], limit: int, *,
            chat: bool) -> Completion | ChatCompletion:
    text = service.decode(generated)
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
                yield _event(ErrorBody.of(ServeError(f"generation failed: {out.error}", kind="server_error")))
                break
            tokens = out.generated_tokens
            if len(tokens) > sent_tokens:
                text = service.decode(tokens)
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
    """uvicorn's server that says when it listens, and leaves the process alive after a graceful shutdown."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.on_ready = on_ready

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without re-raising the signal after the graceful shutdown (which would kill the
        process on SIGTERM before the generation thread is stopped and the engine closed)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if self.on_ready is not None and self.started:
            self.on_ready()


def serve(service: Service, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Run the HTTP server until SIGINT/SIGTERM (uvicorn's handling): requests in flight are finished or
    cancelled, the generation thread stopped and the engine closed."""
    app = create_app(service, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=5)
    ready = (lambda: on_ready(f"http://{host}:{port}/v1")) if on_ready is not None else None
    service.start()
    try:
        _Server(config, on_ready=ready).run()
    finally:
        service.stop()
