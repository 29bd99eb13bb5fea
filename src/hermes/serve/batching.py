"""transformers' continuous batching as ``hermes serve`` uses it: the manager over a streamed model (on a ring,
in lockstep with the other devices), and the few places its public API does not reach."""

from __future__ import annotations

import functools
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
    greedy_is_argmax(manager)
    if ring is not None:
        from hermes.ring.serving import ring_batching

        ring_batching(manager, ring)
    return manager


def greedy_is_argmax(manager: Any) -> None:
    """A greedy request (``top_k=1`` in the manager's sampling) gets the first most likely token, as transformers'
    greedy ``generate`` (``argmax``) does. transformers' top-k keeps every token whose score equals the k-th largest,
    so on an exact tie (common in bfloat16 logits) sampling picked one of the tied tokens at random — the served
    tokens then depended on the random state, not on the model."""
    from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingTopKLogitsWarper

    for processor in manager.logit_processor.logits_processor:
        if type(processor) is ContinuousBatchingTopKLogitsWarper:
            processor.__class__ = _argmax_top_k()


@functools.cache
def _argmax_top_k() -> type:
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingTopKLogitsWarper

    class ArgmaxTopK(ContinuousBatchingTopKLogitsWarper):
        """transformers' per-request top-k; rows with ``top_k == 1`` keep only their first most likely token."""

        def __call__(self, scores: torch.Tensor, tensor_arg: torch.Tensor) -> torch.Tensor:
            out = super().__call__(scores, tensor_arg)
            one = tensor_arg[: scores.size(0)] == 1
            if bool(one.any()):
                best = scores.argmax(dim=-1, keepdim=True)
                only = torch.full_like(scores, self.filter_value).scatter(-1, best, scores.gather(-1, best))
                out = torch.where(one.unsqueeze(-1), only, out)
            return out

    return ArgmaxTopK


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
