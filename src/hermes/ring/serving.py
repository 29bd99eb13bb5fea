"""``hermes serve`` on a ring: transformers' continuous batching run in lockstep on every device.

transformers' continuous batching already runs one scheduler per process in lockstep for tensor parallelism: its
driver (rank 0) takes the requests, and before each step every process learns the new requests and cancellations
and whether any wants to stop, so that each schedules the same batch and runs the same forward
(``continuous_batching.distributed``). A ring uses that machinery unchanged, with :class:`RingHelper` in place of its
tensor-parallel helper: the step's agreement is a small all-reduce over the ring, the new requests travel as JSON
(transformers would pickle them), and the sampling seed is rank 0's. Each rank's forward is its stage's
(:mod:`hermes.ring.stage`): its own blocks computed and streamed under its budget, the others on the meta device,
the last rank's logits broadcast so that every rank samples the same tokens.

The paged KV cache: every rank holds the whole pool's page table (the scheduler needs it), but its memory only for
its own blocks — the pool is mapped lazily zeroed (:func:`_lazy_zeros`) and remote layers never touch their slices
(:meth:`RingPagedCache.update` answers them on the meta device).
"""
from __future__ import annotations

import contextlib
import logging
import mmap
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from transformers.generation.continuous_batching import cache as cache_module
from transformers.generation.continuous_batching import continuous_api
from transformers.generation.continuous_batching.continuous_api import BackgroundThreadStatus
from transformers.generation.continuous_batching.distributed import DistributedHelper
from transformers.generation.continuous_batching.requests import RequestState

from hermes.ring.link import Ring, RingError

log = logging.getLogger(__name__)

#: the count of new requests with which rank 0 tells every device it stops for good
FINAL = 2**62

#: fields of transformers' RequestState that a new request is made from (what ``add_request`` gives it)
_REQUEST_FIELDS = ("request_id", "initial_tokens", "num_children", "record_timestamps", "max_new_tokens",
                   "eos_token_id", "streaming", "logit_processor_kwargs")


class RingHelper(DistributedHelper):
    """transformers' tensor-parallel helper for continuous batching, its collectives made over a ring."""

    def __init__(self, ring: Ring) -> None:  # no device mesh: the ring is the group
        self.ring = ring
        self.dist_on, self.device_mesh, self.tp_plan = True, None, {}
        self.global_rank, self.world_size = ring.rank, ring.size
        self.tp_size, self.tp_group, self.tp_root_global_rank = ring.size, None, 0
        self.tp_local_rank, self.cpu_comm_group = ring.rank, None
        self.is_tp_driver = ring.first
        self.dp_rank, self.dp_size = 0, 1
        self.final = False  # the ring stops for good (rank 0 stopped), not a break to recover from

    def are_kv_heads_tp_ed(self) -> bool:
        return False  # each rank holds whole layers

    def maybe_warn_nccl_graph_mixing(self) -> None:
        return None

    def destroy_cpu_comm_group(self) -> None:
        return None

    def tp_broadcast_from_rank_0(self, value: torch.Tensor) -> torch.Tensor:
        value.copy_(self.ring.broadcast(value, 0, "rank 0's sampling seed").reshape(value.shape))
        return value

    def tp_all_reduce_state(self, payload_size: int, stop_status: int, pause_requested: int = 0
                            ) -> tuple[int, int, int]:
        """Before each step: rank 0's count of new requests, and whether any rank stops or pauses (maxima); rank 0
        stopping for good says so with a count no step has (:data:`FINAL`)."""
        if self.final and self.ring.first:
            payload_size = FINAL
        acc = torch.tensor([payload_size, stop_status, pause_requested], dtype=torch.int64)
        try:  # (a ring broken by an earlier transfer fails here at once, waiting on no one)
            with self.ring.guard("agreeing on the next serving step"):
                dist.all_reduce(acc, op=dist.ReduceOp.MAX)
        except RingError:
            if stop_status == BackgroundThreadStatus.HARD_STOP:  # stopping already: the others see it too
                return 0, stop_status, 0
            raise
        a, b, c = acc.tolist()
        if a >= FINAL:
            self.final = True
            return 0, BackgroundThreadStatus.HARD_STOP, 0
        return a, b, c

    def tp_all_reduce_min(self, value: torch.Tensor, on_cpu: bool = False) -> torch.Tensor:
        with self.ring.guard("agreeing on the KV cache pool"):
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return value

    def tp_broadcast_object_from_rank_0(self, obj: Any) -> Any:
        """The step's new requests and cancellations (rank 0's), as JSON."""
        doc = None
        if self.ring.first:
            states, cancelled = obj
            doc = {"new": [{k: getattr(s, k) for k in _REQUEST_FIELDS} for s in states],
                   "cancelled": list(cancelled)}
        doc = self.ring.broadcast_json(doc, 0, "the step's new requests")
        if self.ring.first:
            return obj
        return [RequestState(**d) for d in doc["new"]], doc["cancelled"]


class RingPagedCache(cache_module.PagedAttentionCache):
    """transformers' paged KV cache, its pool lazily zeroed memory that only this rank's layers touch."""

    #: a remote layer's update (on meta) is answered from the read's length and leaves nothing here: replays of
    #: remote blocks need not record or repeat it (hermes.engine.kinds.replay)
    meta_updates_leave_nothing = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with _lazy_zeros(cache_module):
            super().__init__(*args, **kwargs)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.device.type != "meta":
            return super().update(key_states, value_states, layer_idx, kwargs)
        # a remote layer (run on the meta device): its keys and values as long as the read, on meta
        allocator = self.layer_to_allocator[layer_idx]
        kwargs["cu_seq_lens_k"] = kwargs["cu_seq_lens_k"][allocator.layer_type].to(torch.int32)
        kwargs["max_length_k"] = kwargs["max_length_k"][allocator.layer_type]
        n = kwargs["read_index"][allocator.index].shape[-1]
        shape = (*key_states.shape[:2], n, key_states.shape[-1])
        return (torch.empty(shape, dtype=key_states.dtype, device="meta"),
                torch.empty(shape, dtype=value_states.dtype, device="meta"))


@contextlib.contextmanager
def _lazy_zeros(module: Any) -> Iterator[None]:
    """Within the block, ``module``'s ``torch.zeros`` of a flat byte pool returns anonymous mapped memory: zero,
    and resident only where written (a rank writes only its own layers' slices of each page)."""
    real = module.torch

    class _Torch:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        @staticmethod
        def zeros(*size: Any, dtype: Any = None, device: Any = None, **kw: Any) -> torch.Tensor:
            n = size[0] if len(size) == 1 and isinstance(size[0], int) else None
            if dtype is real.uint8 and n and (device is None or real.device(device).type == "cpu") and not kw:
                buf = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                return real.frombuffer(buf, dtype=real.uint8)
            return real.zeros(*size, dtype=dtype, device=device, **kw)

    module.torch = _Torch()
    try:
        yield
    finally:
        module.torch = real


def ring_batching(manager: Any, ring: Ring) -> Any:
    """Make ``manager`` (transformers' ContinuousBatchingManager, not started) run in lockstep over ``ring``."""
    ring.on_break = "the devices meet again at the same address; a restarted device joins them"
    manager.distributed_helper = RingHelper(ring)
    manager.is_tp_driver = ring.first
    continuous_api.PagedAttentionCache = RingPagedCache
    if not ring.first:  # no request has a handler here: outputs would pile up in the shared queue
        manager.output_router.output_queue = _Discard()
    cb_log = logging.getLogger("ContinuousBatchingLogger")
    if not any(isinstance(f, _RingErrorsPlain) for f in cb_log.filters):
        cb_log.addFilter(_RingErrorsPlain())
    return manager


class _RingErrorsPlain(logging.Filter):
    """A broken ring is logged by transformers' generation loop as its message, not a traceback (the message says
    what happened and what to do)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], RingError):
            record.exc_info, record.exc_text = None, None
        return True


class _Discard:
    def put(self, item: Any, *args: Any, **kwargs: Any) -> None:
        return None

    put_nowait = put

    def get_nowait(self) -> Any:
        import queue

        raise queue.Empty


def open_stage(ring: Ring, model_dir: Any, budget: Any, **options: Any) -> torch.nn.Module:
    """This device's stage of the model to serve (every device learns whether every other could open its own);
    every rank samples from the last rank's logits."""
    from hermes.ring.driver import _open

    model = _open(ring, model_dir, budget, **options)
    model.hermes.stage.relay = "generate"
    return model


def agree_layout(ring: Ring, plan: Any, kv_cache: str | int | None) -> Any:
    """Every rank's serving layout (``plan(kv_cache)``: hermes.serve.layout.plan_layout for this rank's budget)
    with one KV cache pool size, the smallest any rank can hold: every rank schedules the same requests into the
    same pages. A rank that cannot serve at all stops every rank with its reason."""
    from hermes.ring.driver import _agree
    from hermes.serve.layout import PAGE_TOKENS, TRASH_PAGES

    layout = _agree(ring, lambda: plan(kv_cache), "serve its share in its budget")
    least = min(ring.gather_json(layout.kv_tokens, "the KV cache pool each device can hold"))
    kv = (least + TRASH_PAGES * PAGE_TOKENS) * layout.kv_token_bytes if least != layout.kv_tokens else None
    # every rank agrees once more: those holding more than the least plan again with its pool
    again = _agree(ring, lambda: plan(kv) if kv is not None else None, "serve its share in its budget")
    return again if again is not None else layout


def watch(service: Any) -> None:
    """When the ring's generation loop ends while ``service`` still serves (a device left, or was stopped), the
    devices meet again (:func:`rejoin_later`); while draining, the server stops with the reason."""
    def run() -> None:
        reason = wait_stopped(service)
        if service.state in ("ready", "recovering"):
            rejoin_later(service, reason)
        elif service.state == "draining":
            service._fatal(f"the ring stopped: {reason}")

    threading.Thread(target=run, name="hermes-ring-watch", daemon=True).start()


_REJOIN = threading.Lock()


def rejoin_later(service: Any, reason: str) -> None:
    """Rank 0's server: 503 ``reassembling`` while, in a thread, the devices meet again (:func:`rejoin`); serving
    again once they have, or the server stops with the reason if they do not within the ring's timeout."""
    with _REJOIN:
        if service.state not in ("ready", "recovering"):
            return
        service.state, service.reason = "reassembling", reason
    log.warning("the ring stopped (%s): meeting the devices again at %s (a restarted device joins)", reason,
                service.ring.spec.address or "torchrun's address")

    def run() -> None:
        try:
            rejoin(service)
        except Exception as exc:  # noqa: BLE001 - any failure to serve again stops the server with its reason
            service._fatal(f"the ring did not assemble again: {exc}")
            return
        log.warning("the ring is whole again: serving")

    threading.Thread(target=run, name="hermes-ring-rejoin", daemon=True).start()


def rejoin(service: Any) -> None:
    """Take this device's stage down (its loop has ended), leave the broken ring, meet every device again at the
    same address — the ones still running and any restarted in place of one that left, within the ring's
    timeout — and serve again: the stage shared anew, the budget split, a new batching manager started."""
    import gc

    if service.manager.is_running():  # its loop ends at once (the ring is broken); the manager lets go of it
        with contextlib.suppress(Exception):
            service.manager.stop(block=True, timeout=30, hard_stop=True)
    if service._session is not None:
        service._session.__exit__(None, None, None)
        service._session = None
    engine = service.engine
    engine.remove()
    engine.stage.remove()
    gc.collect()  # the old stage's memory is gone before the new one opens
    service.ring.close()
    # the ring's timeout again after it: a device stuck in the broken ring's last transfer notices within one
    service.ring.join(wait_s=2 * service.ring.spec.timeout_s)
    service.setup()
    service.start()


def wait_stopped(service: Any, poll_s: float = 0.5) -> str:
    """Block until ``service``'s generation loop ends; why it ended."""
    manager = service.manager
    while True:
        thread = manager._generation_thread
        if thread is None or not thread.is_alive():
            break
        thread.join(poll_s)
    error = manager.background_thread_status.fatal_error
    return str(error) if error is not None else "a device of the ring stopped serving"
