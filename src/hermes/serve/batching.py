"""transformers' continuous batching as ``hermes serve`` uses it: the manager over a streamed model (on a ring,
in lockstep with the other devices), and the few places its public API does not reach."""

from __future__ import annotations

from typing import Any

from hermes.serve.layout import PAGE_TOKENS, STEP_TOKENS, Layout


def eos_ids(model: Any) -> list[int]:
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def batching_manager(model: Any, eos: list[int], layout: Layout, max_batch: int, ring: Any = None) -> Any:
    """transformers' continuous batching over ``model``: the KV cache pool of ``layout``, ``max_batch`` requests
    a step, each request with its own sampling values (on a ring: in lockstep with the other devices)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = model.generation_config
    # sampling on, with every processor present, so that each request brings its own values (greedy: top_k=1)
    gc = GenerationConfig(do_sample=True, temperature=0.5, top_k=50, top_p=0.9, max_new_tokens=16,
                          eos_token_id=eos or -1, pad_token_id=gen.pad_token_id or 0)
    cb = ContinuousBatchingConfig(page_size=PAGE_TOKENS, num_blocks=layout.kv_tokens // PAGE_TOKENS,
                                  max_batch_tokens=STEP_TOKENS, max_requests_per_batch=max_batch,
                                  per_request_processors=True, allow_block_sharing=False,
                                  use_async_batching=False, use_cuda_graph=False, max_memory_percent=1.0)
    with torch.no_grad():
        manager = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
    if ring is not None:
        from hermes.ring.serving import ring_batching

        ring_batching(manager, ring)
    return manager


def drop_unrouted(manager: Any) -> None:
    """Empty the output router's shared queue: outputs of requests with no handler (a cancelled request's last
    step) land there, and nothing here reads it (every request has its handler), so they would pile up for as long
    as the server runs."""
    import queue

    q = manager.output_router.output_queue
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass


def forget_result_handler(manager: Any, rid: str) -> None:
    """Drop the result handler of a cancelled request. transformers removes a handler only when its request
    finishes, and a cancelled request never does (it leaves the scheduler without a last output); its manager has
    no public way to unregister one (5.23: only ``register_result_handler``), so this takes the output router's
    lock and dict as ``register_result_handler`` itself does."""
    router = manager.output_router
    with router._lock:
        router.result_handlers.pop(rid, None)
