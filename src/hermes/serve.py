"""``hermes serve``: an OpenAI-compatible HTTP server for a streamed model, with continuous batching.

A streamed model pays for a step in reads of its streamed layers, whatever the batch: sequences decoded
together share that read. Scheduling, the paged KV cache and sampling are transformers' own continuous batching
(``model.init_continuous_batching()``: one forward per step over the tokens of every active request, requests
joining and leaving between steps); Hermes streams the weights of each step under the budget. The budget covers
the weights, the KV cache pool (allocated once, so many clients cannot push memory past it) and one step's
activations. Requests beyond ``max_batch`` running plus ``max_queue`` waiting are refused (429).

:class:`Service` is the library part (no HTTP); :func:`create_app` the FastAPI app around it.
"""

import asyncio
import collections
import contextlib
import json
import logging
import signal
import statistics
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes.errors import BudgetError, HermesError, InputError
from hermes.memory import current_rss, format_bytes, parse_bytes

log = logging.getLogger(__name__)

#: tokens of one KV cache page (transformers' paged cache allocates the pool in pages of every layer)
PAGE_TOKENS = 16
#: pages of the paged KV cache that transformers never hands out (its "trash" sectors)
TRASH_PAGES = 2
#: positions per request of a full batch that the default KV cache pool holds (when a quarter of the budget can)
DEFAULT_POSITIONS = 512
#: most tokens in one step (decode tokens of every active request plus a chunk of a prompt being prefilled)
STEP_TOKENS = 128


class ServeError(HermesError):
    """A request the server refuses; ``status`` is its HTTP status, ``kind`` the OpenAI error type."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code


@dataclass(frozen=True)
class Sampling:
    """One request's decoding: greedy (temperature 0) or sampled with temperature / top-k / top-p."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k

    def processor_kwargs(self, vocab: int) -> dict[str, Any]:
        if self.temperature == 0:  # greedy: sampling from the one most likely token is the argmax
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        return {"temperature": float(self.temperature), "top_k": min(self.top_k or vocab, vocab),
                "top_p": float(self.top_p)}


@dataclass
class Layout:
    """How the budget is split (bytes)."""

    budget: int
    weights: int
    kv_cache: int
    activations: int
    kv_tokens: int  # positions the KV cache pool holds, over all requests
    resident: tuple[str, ...]

    def describe(self) -> str:
        return (f"budget {format_bytes(self.budget)}: weights {format_bytes(self.weights)}, KV cache "
                f"{format_bytes(self.kv_cache)} ({self.kv_tokens} positions over all requests), activations "
                f"{format_bytes(self.activations)}; {len(self.resident)} unit(s) resident")


class _Window:
    """The last few pass statistics and token times, shared between the generation thread and the server."""

    def __init__(self, size: int = 256) -> None:
        self._lock = threading.Lock()
        self._passes: collections.deque[Any] = collections.deque(maxlen=size)
        self.steps = 0

    def append(self, stats: Any) -> None:  # engine.history protocol (called by the generation thread)
        with self._lock:
            self._passes.append(stats)
            self.steps += 1

    def passes(self) -> list[Any]:
        with self._lock:
            return list(self._passes)


def split_budget(engine: Any, config: Any, dtype: Any, budget: int, *, kv_cache: int | None,
                 max_batch: int) -> Layout:
    """Split ``budget`` into weights, the KV cache pool and one step's activations. ``kv_cache`` None: a quarter
    of the budget or ``max_batch`` x DEFAULT_POSITIONS positions, whichever is smaller, as far as the weights'
    minimum allows."""
    from hermes.engine import minimum_budget
    from hermes.generation import GenerationPolicy, activation_bytes, generation_config, kv_geometry

    layers, heads, kv_heads, head_dim = kv_geometry(config)
    per_token = 2 * layers * kv_heads * head_dim * dtype.itemsize  # every layer's keys and values
    tokens = STEP_TOKENS
    # one step: hidden states of STEP_TOKENS tokens, the logits of each request's last token, and one layer's
    # attention over the keys the step reads (at most the pool): float32 scores and softmax, keys and values
    # gathered and repeated per query head
    base = activation_bytes(config, 1, tokens, dtype, logits_rows=max_batch)
    per_read = 2 * heads * tokens * 4 + 3 * heads * head_dim * dtype.itemsize

    def step(kv_tokens: int) -> int:
        return base + per_read * kv_tokens

    minimum = minimum_budget(engine.units)
    trash = TRASH_PAGES * PAGE_TOKENS * per_token  # the paged cache's pages that are never handed out
    given = kv_cache is not None
    if kv_cache is None:  # a quarter of the budget, at most 512 positions per request of a full batch
        kv_cache = min(budget // 4, max_batch * DEFAULT_POSITIONS * per_token + trash)
    kv_tokens = max(kv_cache - trash, 0) // per_token // PAGE_TOKENS * PAGE_TOKENS
    spare = budget - minimum - step(kv_tokens) - kv_tokens * per_token - trash
    if given and spare < 0:
        raise BudgetError(f"--kv-cache {format_bytes(kv_cache)} with its step activations "
                          f"{format_bytes(step(kv_tokens))} leaves the weights {format_bytes(max(spare + minimum, 0))}"
                          f" of the budget {format_bytes(budget)}, below their minimum {format_bytes(minimum)}; give a "
                          "smaller --kv-cache or a larger budget")
    if spare < 0 and kv_tokens > 2 * PAGE_TOKENS:  # make room for the weights: fewer KV positions
        fit = (budget - minimum - step(0) - trash) // (per_token + per_read)
        kv_tokens = max(fit // PAGE_TOKENS * PAGE_TOKENS, 0)
    kv = kv_tokens * per_token + trash
    act = step(kv_tokens)
    if kv_tokens < 2 * PAGE_TOKENS or budget - kv - act < minimum:
        need = minimum + step(2 * PAGE_TOKENS) + 2 * PAGE_TOKENS * per_token + trash
        raise BudgetError(f"budget {format_bytes(budget)} cannot serve this model: the weights need at least "
                          f"{format_bytes(minimum)}, a KV cache of {2 * PAGE_TOKENS} positions "
                          f"{format_bytes(2 * PAGE_TOKENS * per_token)} and a step's activations "
                          f"{format_bytes(step(2 * PAGE_TOKENS))}; use a budget of at least {format_bytes(need)} "
                          f"(--budget {-(-need // 2**20)}MiB)")
    cfg = generation_config(engine, GenerationPolicy(budget, 0, engine.generation_policy.resident), kv, act)
    return Layout(budget, cfg.budget_bytes, kv, act, kv_tokens, tuple(cfg.resident))


def return_freed_memory() -> bool:
    """Make glibc give large freed blocks back to the system at once (``mallopt(M_MMAP_THRESHOLD, 128 KiB)``, which
    also stops glibc from raising that threshold as it sees large frees). A server's steps allocate activations of
    ever different shapes (a prompt chunk, 3 decodes, 8 decodes, ...): with glibc's adaptive threshold they came
    from the heap, which fragmented and grew step after step until Llama-3.2-1B with 8 clients passed the device's
    RAM on its sixth wave of requests. Process-wide; returns whether it was set (only on glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024))


#: mallopt's parameter number of the mmap threshold (glibc's malloc.h)
M_MMAP_THRESHOLD = -3


class Service:
    """A streamed model behind transformers' continuous batching: submit requests, get tokens as they come."""

    def __init__(self, model_dir: str | Path, budget: str | int = "auto", *, loaders: int = 1, io: str = "direct",
                 max_batch: int = 8, max_queue: int = 32, kv_cache: str | int | None = None,
                 model_name: str | None = None) -> None:
        # what serving imports is runtime, held before budget="auto" measures the free memory (not inside it)
        import fastapi  # noqa: F401
        import torch
        import transformers.generation.continuous_batching  # noqa: F401
        import uvicorn  # noqa: F401
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        import hermes
        from hermes.inputs import max_positions

        return_freed_memory()
        self.model_dir = Path(model_dir)
        self.model_name = model_name or self.model_dir.name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.baseline_rss = current_rss()
        self.model = hermes.load(model_dir, budget=budget, loaders=loaders, io=io)
        self._rss_after_load = current_rss()
        if not (callable(getattr(self.model, "can_generate", None)) and self.model.can_generate()):
            raise InputError(f"{model_dir} holds a {type(self.model).__name__}, which does not generate text; "
                             "serve a causal language model (GPT-2, Llama, ...)")
        if getattr(self.model.config, "is_encoder_decoder", False):
            raise InputError("hermes serve runs decoder-only language models; this one is an encoder-decoder")
        engine = self.engine = self.model.hermes
        self.auto = engine.auto_budget
        text_config = self.model.config.get_text_config(decoder=True)
        self.vocab = int(text_config.vocab_size)
        # the user's budget (auto: what was measured), as hermes.load parsed it
        self.layout = split_budget(engine, text_config, self.model.dtype, engine.generation_policy.budget_bytes,
                                   kv_cache=parse_bytes(kv_cache, what="--kv-cache") if kv_cache else None,
                                   max_batch=max_batch)
        self.max_positions = min(max_positions(text_config) or self.layout.kv_tokens, self.layout.kv_tokens)
        from hermes.engine import EngineConfig

        c = engine.config
        engine.reconfigure(EngineConfig(self.layout.weights, loaders=c.loaders, prefetch=c.prefetch, io=c.io,
                                        resident=self.layout.resident))
        self.window = _Window()
        engine.history = self.window
        self.tokenizer = _tokenizer(self.model_dir)
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.model.config.eos_token_id
        self.eos = [eos] if isinstance(eos, int) else list(eos or [])
        # sampling on, with every processor present, so that each request brings its own values (greedy: top_k=1)
        gc = GenerationConfig(do_sample=True, temperature=0.5, top_k=50, top_p=0.9, max_new_tokens=16,
                              eos_token_id=self.eos or -1, pad_token_id=gen.pad_token_id or 0)
        cb = ContinuousBatchingConfig(page_size=PAGE_TOKENS, num_blocks=self.layout.kv_tokens // PAGE_TOKENS,
                                      max_batch_tokens=STEP_TOKENS, max_requests_per_batch=max_batch,
                                      per_request_processors=True, allow_block_sharing=False,
                                      use_async_batching=False, use_cuda_graph=False, max_memory_percent=1.0)
        with torch.no_grad():
            self.manager = self.model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
        log.info("set-up after the model opened: %s", format_bytes(current_rss() - self._rss_after_load))
        self._lock = threading.Lock()
        self._admitted: dict[str, bool] = {}  # request id -> started (a first token came)
        self._token_times: collections.deque[float] = collections.deque(maxlen=4096)
        self.counters = collections.Counter()
        self._session: Any = None
        self.started = False

    # ---- life cycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._session = self.engine.continuous()
        self._session.__enter__()  # each step prefetches the next one's first layers
        self.manager.start()
        self.started = True

    def stop(self, timeout: float = 30.0) -> None:
        if not self.started:
            return
        self.started = False
        self.manager.stop(block=True, timeout=timeout)
        if self._session is not None:
            self._session.__exit__(None, None, None)
        self.engine.close()

    def healthy(self) -> bool:
        return self.started and self.manager.is_running()

    # ---- requests -------------------------------------------------------------------------------------------
    def check(self, ids: list[int], max_new_tokens: int) -> None:
        """Refuse a request that could never run (before it takes a place in the queue)."""
        if not ids:
            raise ServeError("the prompt is empty; send at least one token", param="prompt")
        vocab = self.vocab
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ServeError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        total = len(ids) + max_new_tokens
        if total > self.max_positions:
            raise ServeError(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_new_tokens}) = {total} exceeds the "
                f"{self.max_positions} positions this server holds per request (the model's, or its KV cache's); "
                "shorten the prompt or ask for fewer tokens", param="max_tokens", code="context_length_exceeded")

    def submit(self, ids: list[int], max_new_tokens: int, sampling: Sampling,
               on_output: Callable[[Any], None]) -> str:
        """Queue a request; ``on_output`` gets each GenerationOutput (tokens so far) on the running event loop.
        Raises ServeError(429) when ``max_batch`` run and ``max_queue`` wait already."""
        self.check(ids, max_new_tokens)
        if not self.healthy():
            raise ServeError("the server is stopping", status=503, kind="server_error")
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        with self._lock:
            if len(self._admitted) >= self.max_batch + self.max_queue:
                self.counters["rejected"] += 1
                raise ServeError(f"the server is full: {self.max_batch} requests decode and {self.max_queue} wait; "
                                 "retry later", status=429, kind="rate_limit_error", code="queue_full")
            self._admitted[rid] = False

        def deliver(out: Any) -> None:
            now = time.perf_counter()
            with self._lock:
                if rid in self._admitted:
                    self._admitted[rid] = True
                self._token_times.append(now)
                if out.is_finished():
                    self._admitted.pop(rid, None)
                    self.counters["errors" if out.error else "completed"] += 1
            on_output(out)

        self.manager.register_result_handler(rid, deliver)
        self.manager.add_request(ids, request_id=rid, max_new_tokens=max_new_tokens, streaming=True,
                                 eos_token_id=self.eos or -1,
                                 **sampling.processor_kwargs(self.vocab))
        self.counters["submitted"] += 1
        return rid

    def cancel(self, rid: str) -> None:
        """Free a request's place (a client that went away): its sequence leaves the batch at the next step."""
        with self._lock:
            if self._admitted.pop(rid, None) is None:
                return
            self.counters["cancelled"] += 1
        with self.manager.output_router._lock:
            self.manager.output_router.result_handlers.pop(rid, None)
        self.manager.cancel_request(rid)

    # ---- text -----------------------------------------------------------------------------------------------
    def encode(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            return list(prompt)
        if isinstance(prompt, list) and len(prompt) == 1:
            return self.encode(prompt[0])
        if not isinstance(prompt, str):
            raise ServeError("prompt must be a string or a list of token ids (one prompt per request)",
                             param="prompt")
        if self.tokenizer is None:
            raise ServeError(f"{self.model_name} has no tokenizer; send the prompt as a list of token ids",
                             param="prompt")
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def chat_ids(self, messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ServeError("messages must be a non-empty list of {role, content} objects with string content",
                             param="messages")
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ServeError(f"{self.model_name} has no chat template in its tokenizer; use /v1/completions",
                             param="messages")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return "".join(f" {i}" for i in ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- measurements ---------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        passes = self.window.passes()
        now = time.perf_counter()
        with self._lock:
            running = sum(self._admitted.values())
            waiting = len(self._admitted) - running
            recent = [t for t in self._token_times if now - t <= 10.0]
        kv = _kv_tensor_bytes(self.manager)
        return {
            "hermes_requests_running": running,
            "hermes_requests_waiting": waiting,
            "hermes_requests_completed_total": self.counters["completed"],
            "hermes_requests_rejected_total": self.counters["rejected"],
            "hermes_requests_cancelled_total": self.counters["cancelled"],
            "hermes_requests_failed_total": self.counters["errors"],
            "hermes_steps_total": self.window.steps,
            "hermes_tokens_per_second": len(recent) / 10.0,
            "hermes_step_bytes_read": statistics.median(p.bytes_read for p in passes) if passes else 0,
            "hermes_step_seconds": statistics.median(p.latency_s for p in passes) if passes else 0,
            "hermes_budget_bytes": self.layout.budget,
            "hermes_weight_budget_bytes": self.layout.weights,
            "hermes_weights_peak_bytes": max((p.weights_peak_bytes for p in passes), default=0),
            "hermes_weights_held_bytes": self.engine.daemon.allocated,
            "hermes_kv_cache_bytes": kv,
            "hermes_activation_reserved_bytes": self.layout.activations,
            "hermes_memory_held_bytes": self.engine.daemon.allocated + kv,
            "hermes_rss_above_baseline_bytes": max(current_rss() - self.baseline_rss, 0),
        }


def _kv_tensor_bytes(manager: Any) -> int:
    cache = getattr(getattr(manager, "batch_processor", None), "cache", None)
    t = getattr(cache, "cache_tensor", None)
    return int(t.numel() * t.element_size()) if t is not None else 0


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                   "tokenizer.model")):
        return None
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        log.warning("the tokenizer of %s cannot be loaded (%s); prompts must be token ids", model_dir, exc)
        return None


# ---- HTTP ---------------------------------------------------------------------------------------------------

def _error(exc: ServeError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": str(exc), "type": exc.kind, "param": exc.param, "code": exc.code}},
                        status_code=exc.status)


def _number(body: dict[str, Any], key: str, default: Any, *, low: float, high: float, integer: bool = False) -> Any:
    v = body.get(key, default)
    if v is None:
        v = default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not low <= v <= high:
        kind = "an integer" if integer else "a number"
        raise ServeError(f"{key} must be {kind} in [{low:g}, {high:g}], got {v!r}", param=key)
    return v


def _parse(body: Any, service: Service, *, default_tokens: int = 16) -> tuple[int, Sampling, bool]:
    if not isinstance(body, dict):
        raise ServeError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != service.model_name:
        raise ServeError(f"model {model!r} does not exist; this server serves {service.model_name!r}",
                         status=404, param="model", code="model_not_found")
    if body.get("n", 1) not in (1, None):
        raise ServeError("n must be 1 (one choice per request)", param="n")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    tokens = _number(body, key, default_tokens, low=1, high=service.max_positions, integer=True)
    sampling = Sampling(temperature=_number(body, "temperature", 1.0, low=0, high=2),
                        top_p=_number(body, "top_p", 1.0, low=1e-9, high=1),
                        top_k=_number(body, "top_k", 0, low=0, high=10**9, integer=True))
    for unsupported in ("stop", "logprobs", "logit_bias", "tools"):
        if body.get(unsupported) not in (None, False, [], {}):
            raise ServeError(f"{unsupported} is not supported by hermes serve; leave it out", param=unsupported)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ServeError("stream must be true or false", param="stream")
    return tokens, sampling, stream


def create_app(service: Service, *, api_key: str | None = None) -> Any:
    """The FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="hermes serve", version="1")

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> Any:
        return _error(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Any:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(ServeError(str(exc.detail), status=exc.status_code, kind=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Any:
        return _error(ServeError(f"invalid request: {exc.errors()}"))

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1/") and \
                request.headers.get("authorization", "") != f"Bearer {api_key}":
            return _error(ServeError("invalid API key: send 'Authorization: Bearer KEY' with the server's key",
                                     status=401, kind="authentication_error", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health() -> Any:
        ok = service.healthy()
        return JSONResponse({"status": "ok" if ok else "stopping", "model": service.model_name},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Any:
        lines = []
        for name, value in service.metrics().items():
            kind = "counter" if name.endswith("_total") else "gauge"
            text = str(int(value)) if float(value).is_integer() else f"{float(value):.6g}"
            lines += [f"# TYPE {name} {kind}", f"{name} {text}"]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Any:
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": 0,
                                            "owned_by": "hermes"}]}

    async def body_of(request: Request) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ServeError(f"the request body is not valid JSON: {exc}") from None

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await body_of(request)
        tokens, sampling, stream = _parse(body, service)
        if "prompt" not in body:
            raise ServeError("prompt is required", param="prompt")
        ids = service.encode(body["prompt"])
        return await _respond(service, request, ids, tokens, sampling, stream, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await body_of(request)
        tokens, sampling, stream = _parse(body, service)
        ids = service.chat_ids(body.get("messages"))
        return await _respond(service, request, ids, tokens, sampling, stream, chat=True)

    async def _respond(service: Service, request: Request, ids: list[int], tokens: int, sampling: Sampling,
                       stream: bool, *, chat: bool) -> Any:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        rid = service.submit(ids, tokens, sampling, queue.put_nowait)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
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
        text = service.decode(out.generated_tokens)
        reason = _finish_reason(service, out.generated_tokens, tokens)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                  if chat else {"index": 0, "text": text, "logprobs": None, "finish_reason": reason})
        return {"id": rid, "object": obj, "created": created, "model": service.model_name, "choices": [choice],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out.generated_tokens),
                          "total_tokens": len(ids) + len(out.generated_tokens)},
                "hermes": {"token_ids": out.generated_tokens}}

    return app


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


async def _events(service: Service, rid: str, queue: asyncio.Queue[Any], ids: list[int], limit: int, created: int,
                  chat: bool) -> AsyncIterator[str]:
    """Server-sent events of one request; a client that disconnects cancels this generator, freeing its slot."""
    sent_tokens = 0
    sent_text = ""
    obj = "chat.completion.chunk" if chat else "text_completion"
    finished = False

    def chunk(delta: str, reason: str | None, first: bool = False) -> str:
        if chat:
            d: dict[str, Any] = {"role": "assistant", "content": delta} if first else {"content": delta}
            choice: dict[str, Any] = {"index": 0, "delta": d if reason is None or delta else {},
                                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta, "logprobs": None, "finish_reason": reason}
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": service.model_name,
                                      "choices": [choice]}) + "\n\n"

    try:
        if chat:
            yield chunk("", None, first=True)
        while True:
            out = await queue.get()
            if out.error:
                finished = True
                err = {"error": {"message": f"generation failed: {out.error}", "type": "server_error"}}
                yield "data: " + json.dumps(err) + "\n\n"
                break
            tokens = out.generated_tokens
            if len(tokens) > sent_tokens:
                text = service.decode(tokens)
                # hold back an incomplete character (a multi-byte token split) until the next token completes it
                if not text.endswith("\ufffd") or out.is_finished():
                    delta, sent_text = text[len(sent_text):], text
                    sent_tokens = len(tokens)
                    if delta:
                        yield chunk(delta, None)
            if out.is_finished():
                finished = True
                yield chunk("", _finish_reason(service, tokens, limit))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:
            service.cancel(rid)


def serve(service: Service, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Run the HTTP server until SIGINT/SIGTERM (uvicorn's handling): requests in flight are finished or
    cancelled, the generation thread stopped and the engine closed."""
    import uvicorn

    class Server(uvicorn.Server):
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
            if on_ready is not None and self.started:
                on_ready(f"http://{host}:{port}/v1")

    app = create_app(service, api_key=api_key)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=5)
    service.start()
    try:
        Server(config).run()
    finally:
        service.stop()
