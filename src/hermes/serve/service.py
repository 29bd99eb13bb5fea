"""The library part of ``hermes serve`` (no HTTP): a streamed model behind transformers' continuous batching.

A streamed model pays for a step in reads of its streamed layers, whatever the batch: sequences decoded
together share that read. Scheduling, the paged KV cache and sampling are transformers' own continuous batching
(``model.init_continuous_batching()``: one forward per step over the tokens of every active request, requests
joining and leaving between steps); Hermes streams the weights of each step under the budget. The budget covers
the weights, the KV cache pool (allocated once, so many clients cannot push memory past it) and one step's
activations (:mod:`hermes.serve.layout`). Requests beyond ``max_batch`` running plus ``max_queue`` waiting are
refused (429).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermes.errors import InputError
from hermes.memory import current_rss, format_bytes, reset_peak_rss
from hermes.serve.batching import batching_manager, drop_unrouted, eos_ids, forget_result_handler
from hermes.serve.guard import RequestMemory
from hermes.serve.layout import DEFAULT_MAX_BODY, serving_layout
from hermes.serve.metrics import Window
from hermes.serve.schemas import ServeError
from hermes.serve.text import Text, check_length
from hermes.share import bound_allocator

log = logging.getLogger(__name__)

#: seconds to wait for a failed generation loop to end before deciding what to do
RECOVERY_WAIT = 30.0
#: this many failed steps within RESTART_WINDOW seconds: stop restarting, exit non-zero
RESTARTS = 3
RESTART_WINDOW = 60.0


@dataclass(frozen=True)
class Sampling:
    """One request's decoding: greedy (temperature 0) or sampled with temperature / top-k / top-p."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k

    def processor_kwargs(self, vocab: int) -> dict[str, Any]:
        if self.temperature == 0:  # greedy: top-k 1 keeps the first most likely token (batching.greedy_is_argmax)
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        return {"temperature": float(self.temperature), "top_k": min(self.top_k or vocab, vocab),
                "top_p": float(self.top_p)}


# ---- set-up -------------------------------------------------------------------------------------------------

def _import_runtime() -> None:
    """What serving imports is runtime, held before budget="auto" measures the free memory (not inside it)."""
    import fastapi  # noqa: F401
    import torch  # noqa: F401
    import transformers.generation.continuous_batching  # noqa: F401
    import uvicorn  # noqa: F401
    from transformers import GenerationConfig  # noqa: F401
    from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: F401


def _open(model_dir: str | Path, budget: str | int, loaders: int, io: str, ring: Any) -> Any:
    """The streamed model (on a ring: this device's stage of it)."""
    if ring is None:
        import hermes

        return hermes.load(model_dir, budget=budget, loaders=loaders, io=io)
    from hermes.ring.serving import open_stage

    return open_stage(ring, model_dir, budget, loaders=loaders, io=io)


# ---- the service --------------------------------------------------------------------------------------------

#: why requests are refused (503) in each state but ``ready``: (message, code, Retry-After seconds)
_RECOVERING = ("the server is recovering from a failed step ({reason}); retry in a few seconds", "recovering", 2)
_REFUSALS = {
    "draining": ("the server is shutting down; retry on another instance or after it restarts", "shutting_down", 5),
    "broken": ("the server cannot serve: {reason}", "broken", 30),
    "reassembling": ("the ring of devices is assembling again ({reason}); retry in a few seconds", "reassembling",
                     5),
    "recovering": _RECOVERING, "ready": _RECOVERING,  # ready but the generation loop is not running
}


class Service:
    """A streamed model behind transformers' continuous batching: submit requests, get tokens as they come.

    Its ``state``: ``ready``; ``draining`` (stopping: no new requests, those in flight finish); ``recovering``
    (a step failed: its requests got the error, the generation loop restarts once the weights are checked);
    ``broken`` (the weights are gone or changed, or steps keep failing: ``on_fatal`` is told why, so that the
    server exits non-zero and a supervisor can restart it); ``reassembling`` (on a ring: a device left, the devices
    meet again, hermes.ring.serving); ``stopped``."""

    def __init__(self, model_dir: str | Path, budget: str | int = "auto", *, loaders: int = 1, io: str = "direct",
                 max_batch: int = 8, max_queue: int = 32, kv_cache: str | int | None = None,
                 model_name: str | None = None, request_memory: str | int | None = None,
                 max_body: str | int | None = None, on_load: Callable[[], None] | None = None,
                 ring: Any = None) -> None:
        from hermes.preflight import check_generates
        from hermes.skeleton import load_config

        # a model that cannot be served is refused from its config, before anything loads (on_load: now loading)
        check_generates(load_config(model_dir), model_dir, decoder_only=True)
        if on_load is not None:
            on_load()
        _import_runtime()
        bound_allocator()  # freed activations go back to the OS at once (hermes.share)
        self.model_dir = Path(model_dir)
        self.model_name = model_name or self.model_dir.name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.ring = ring  # a device of a ring (hermes.ring.serving): rank 0 takes the requests
        # the tokenizer is runtime too (Llama 3's: ~75 MiB while it loads): before the baseline, outside the budget
        self.text = Text(self.model_dir, self.model_name, 0) if ring is None or ring.first else None
        self._options = {"budget": budget, "loaders": loaders, "io": io, "kv_cache": kv_cache,
                         "request_memory": request_memory, "max_body": max_body}
        self.setup()
        self._lock = threading.Lock()
        self._admitted: dict[str, bool] = {}  # request id -> started (a first token came)
        self._token_times: collections.deque[float] = collections.deque(maxlen=4096)
        self.counters = collections.Counter()
        self._session: Any = None
        self.state = "starting"
        self.reason = ""
        self.on_fatal: Callable[[str], None] | None = None
        self._failures: collections.deque[float] = collections.deque(maxlen=RESTARTS)

    def setup(self) -> None:
        """Open the model (on a ring: this device's stage), split the budget, make the batching manager (again
        when a ring assembles again: hermes.ring.serving.rejoin)."""
        from hermes.inputs import max_positions
        from hermes.memory import parse_bytes

        o, ring = self._options, self.ring
        self.model = _open(self.model_dir, o["budget"], o["loaders"], o["io"], ring)
        # the runtime: the model opened (its skeleton), no weight memory claimed yet (claimed per call, as generate)
        self.baseline_rss = self._rss_after_load = current_rss()
        reset_peak_rss()  # the peak RSS /metrics reports is the serving's, from here
        engine = self.engine = self.model.hermes
        self.auto = engine.auto_budget
        text_config = self.model.config.get_text_config(decoder=True)
        self.vocab = int(text_config.vocab_size)
        self.layout = serving_layout(engine, text_config, self.model.dtype, o["kv_cache"], self.max_batch,
                                     o["request_memory"], ring)
        self.memory = RequestMemory(self.layout.requests)
        self.max_body = parse_bytes(o["max_body"], what="--max-body") if o["max_body"] else \
            min(DEFAULT_MAX_BODY, self.layout.requests)
        if self.max_body > self.layout.requests:
            raise InputError(f"--max-body {format_bytes(self.max_body)} is more than the request memory "
                             f"{format_bytes(self.layout.requests)}: no such body could be taken; give a smaller "
                             "--max-body or a larger --request-memory")
        self.max_positions = min(max_positions(text_config) or self.layout.kv_tokens, self.layout.kv_tokens)
        self.window = Window()
        engine.history = self.window
        if self.text is not None:
            self.text.max_positions = self.max_positions
        self.eos = eos_ids(self.model)
        self.manager = batching_manager(self.model, self.eos, self.layout, self.max_batch, ring)
        log.info("set-up after the model opened: %s", format_bytes(current_rss() - self._rss_after_load))

    # ---- life cycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._session = self.engine.continuous()
        self._session.__enter__()  # each step prefetches the next one's first layers
        self.manager.start()
        self.state = "ready"
        if self.ring is not None and self.ring.first:  # (the other devices watch in hermes serve's loop)
            from hermes.ring.serving import watch

            watch(self)  # the ring breaking: meet the devices again

    def drain(self) -> None:
        """Take no new requests (503); those in flight go on."""
        if self.state == "ready":
            self.state = "draining"

    def stop(self, timeout: float = 30.0) -> None:
        """Stop generating (requests still in flight get an error) and close the engine."""
        if self.state in ("starting", "stopped"):
            return
        self.state = "stopped"
        if self.ring is not None:  # every device learns that this is the end, not a break to recover from
            self.manager.distributed_helper.final = True
        if self.manager._generation_thread is not None:  # (a ring that did not assemble again: never started)
            self.manager.stop(block=True, timeout=timeout, hard_stop=True)
        if self._session is not None:
            self._session.__exit__(None, None, None)
            self._session = None
        self.engine.close()
        if self.text is not None:
            self.text.close()

    def healthy(self) -> bool:
        return self.state == "ready" and self.manager.is_running()

    def status(self) -> str:
        """What /health says: ``ok``, or why requests are refused now."""
        if self.healthy():
            return "ok"
        if self.state == "broken":
            return f"broken: {self.reason}"
        if self.state == "reassembling":
            return f"reassembling: {self.reason}"
        return {"ready": "recovering", "starting": "starting"}.get(self.state, self.state)

    # ---- faults ---------------------------------------------------------------------------------------------
    def _failed(self, error: str) -> None:
        """A request ended with an error (on the event loop): if the generation loop died with it, recover in a
        thread of its own."""
        if self.state != "ready":
            return
        self.state = "recovering"
        self.reason = error
        threading.Thread(target=self._recover, name="hermes-recover", daemon=True).start()

    def _recover(self) -> None:
        thread = getattr(self.manager, "_generation_thread", None)
        if thread is not None:
            thread.join(RECOVERY_WAIT)
        if self.manager.is_running():  # one request failed; the loop goes on
            if self.state == "recovering":
                self.state = "ready"
            return
        if self.ring is not None:  # every device stopped with it: they meet again, this one serves when they have
            from hermes.ring.serving import rejoin_later

            rejoin_later(self, self.reason)
            return
        now = time.monotonic()
        self._failures.append(now)
        problem = weights_problem(self.engine)
        if problem is None and len(self._failures) == RESTARTS and now - self._failures[0] < RESTART_WINDOW:
            problem = (f"{RESTARTS} steps failed within {RESTART_WINDOW:.0f} s, the last with: {self.reason}")
        if problem is not None:
            self._fatal(problem)
            return
        log.warning("a step failed (%s); the weights are all there: restarting the generation loop", self.reason)
        try:
            if self._session is not None:
                self._session.__exit__(None, None, None)
            self.engine.close()  # reopen the files: a restored file is read from its new inode
            self._session = self.engine.continuous()
            self._session.__enter__()
            self.manager.start()
        except Exception as exc:  # noqa: BLE001 (any failure to restart is fatal, with its reason)
            self._fatal(f"the generation loop could not restart: {exc}")
            return
        if self.state == "recovering":
            self.state = "ready"

    def _fatal(self, reason: str) -> None:
        log.error("cannot serve on: %s", reason)
        if self.state in ("recovering", "ready"):
            self.state = "broken"
        self.reason = reason
        if self.on_fatal is not None:
            self.on_fatal(reason)

    # ---- requests -------------------------------------------------------------------------------------------
    def refuse_unless_ready(self) -> None:
        if self.state == "ready" and self.manager.is_running():
            return
        message, code, retry = _REFUSALS.get(self.state, ("the server is stopping", "shutting_down", None))
        raise ServeError(message.format(reason=self.reason), status=503, kind="server_error", code=code,
                         retry_after=retry)

    def check(self, ids: list[int], max_new_tokens: int) -> None:
        """Refuse a request that could never run (before it takes a place in the queue)."""
        if not ids:
            raise ServeError("the prompt is empty; send at least one token", param="prompt")
        vocab = self.vocab
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ServeError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
        check_length(len(ids), max_new_tokens, self.max_positions)

    def submit(self, ids: list[int], max_new_tokens: int, sampling: Sampling,
               on_output: Callable[[Any], None]) -> str:
        """Queue a request; ``on_output`` gets each GenerationOutput (tokens so far) on the running event loop.
        Raises ServeError(429) when ``max_batch`` run and ``max_queue`` wait already, 503 when not ready."""
        self.check(ids, max_new_tokens)
        self.refuse_unless_ready()
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
            if out.error:
                self._failed(str(out.error))
            on_output(out)

        drop_unrouted(self.manager)
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
        forget_result_handler(self.manager, rid)
        self.manager.cancel_request(rid)

    # ---- measurements ---------------------------------------------------------------------------------------
    def request_counts(self) -> tuple[int, int, int]:
        """Requests started (a first token came, holding KV cache pages; at most ``max_batch`` of them compute in
        one step), requests waiting for their first token, tokens delivered over the last 10 s."""
        now = time.perf_counter()
        with self._lock:
            running = sum(self._admitted.values())
            recent = sum(1 for t in self._token_times if now - t <= 10.0)
            return running, len(self._admitted) - running, recent

    def metrics(self) -> dict[str, float]:
        from hermes.serve.metrics import service_metrics

        return service_metrics(self)


def weights_problem(engine: Any) -> str | None:
    """What is wrong with the checkpoint's weight files now (missing, unreadable, shorter than their tensors),
    or None when every file is there whole."""
    ends: dict[Path, int] = {}
    for info in engine.layout.store.tensors.values():
        ends[info.path] = max(ends.get(info.path, 0), info.end)
    for path, end in sorted(ends.items()):
        try:
            size = os.stat(path).st_size
            with open(path, "rb") as f:
                f.read(1)
        except OSError as exc:
            return f"the weights file {path} cannot be read ({exc.strerror or exc}); restore it"
        if size < end:
            return f"the weights file {path} is shorter than its tensors ({size} < {end} bytes); restore it"
    return None
