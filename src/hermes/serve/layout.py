"""How ``hermes serve`` splits its budget: the weights, the KV cache pool (allocated once), one step's
activations and the memory requests hold (their bodies and token ids, :mod:`hermes.serve.guard`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hermes.errors import BudgetError
from hermes.figures import budget_flag, minimum_text, weights_use
from hermes.memory import format_bytes, parse_bytes
from hermes.share import RUNTIME_SLACK_BYTES, slack_note

#: tokens of one KV cache page (transformers' paged cache allocates the pool in pages of every layer)
PAGE_TOKENS = 16
#: pages of the paged KV cache that transformers never hands out (its "trash" sectors)
TRASH_PAGES = 2
#: positions per request of a full batch that the default KV cache pool holds (when a quarter of the budget can)
DEFAULT_POSITIONS = 512
#: most tokens in one step (decode tokens of every active request plus a chunk of a prompt being prefilled)
STEP_TOKENS = 128
#: request memory by default: an eighth of the budget, at most this
DEFAULT_REQUEST_MEMORY = 16 * 2**20
#: largest request body by default (or the request memory, if smaller)
DEFAULT_MAX_BODY = 2**20


@dataclass
class Layout:
    """How the budget is split (bytes)."""

    budget: int
    weights: int
    kv_cache: int
    activations: int
    kv_tokens: int  # positions the KV cache pool holds, over all requests
    resident: tuple[str, ...]
    requests: int = 0  # request bodies and token ids held at once
    weights_max: int = 0  # the weights held at most: ``weights``, or less when the whole model fits (0: not known)
    slack: int = 0  # the runtime slack the budget holds (hermes.share)
    kv_token_bytes: int = 0  # one position's keys and values in the pool (a ring device: its own layers')

    def describe(self) -> str:
        held = weights_use(self.weights, self.weights_max or self.weights)
        return (f"budget {format_bytes(self.budget)}: weights {held}, KV cache "
                f"{format_bytes(self.kv_cache)} ({self.kv_tokens} positions over all requests), activations "
                f"{format_bytes(self.activations)}, requests {format_bytes(self.requests)}, runtime slack "
                f"{format_bytes(self.slack)}{slack_note(self.slack)}; "
                f"{len(self.resident)} unit(s) resident")


def split_budget(engine: Any, config: Any, dtype: Any, budget: int, *, kv_cache: int | None,
                 max_batch: int, requests: int = 0) -> Layout:
    """Split ``budget`` into weights, the KV cache pool, one step's activations, ``requests`` bytes for what
    requests hold and the runtime slack (:mod:`hermes.share`). ``kv_cache`` None: a quarter of the budget or
    ``max_batch`` x DEFAULT_POSITIONS positions, whichever is smaller, as far as the weights' minimum allows."""
    whole = budget
    budget -= requests
    from hermes.engine import minimum_budget
    from hermes.generation import GenerationPolicy, activation_bytes, generation_config, kv_geometry

    layers, heads, kv_heads, head_dim = kv_geometry(config)
    per_token = 2 * layers * kv_heads * head_dim * dtype.itemsize  # every layer's keys and values
    if engine.stage is not None:  # a device of a ring: its own blocks' (hermes.ring.serving)
        per_token = max(engine.stage.kv_share(per_token), 1)  # a device with no blocks holds none
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
    spare = budget - minimum - step(kv_tokens) - kv_tokens * per_token - trash - RUNTIME_SLACK_BYTES
    if given and spare + RUNTIME_SLACK_BYTES < 0:
        raise BudgetError(f"--kv-cache {format_bytes(kv_cache)} with its step activations "
                          f"{format_bytes(step(kv_tokens))} leaves the weights "
                          f"{format_bytes(max(spare + RUNTIME_SLACK_BYTES + minimum, 0))}"
                          f" of the budget {format_bytes(whole)} (requests {format_bytes(requests)}), below the "
                          f"{minimum_text(minimum)}; give a smaller --kv-cache or a larger budget")
    if spare < 0 and kv_tokens > 2 * PAGE_TOKENS and not given:  # room for the weights and the slack: fewer positions
        room = budget - minimum - step(0) - trash
        fit = (room - RUNTIME_SLACK_BYTES) // (per_token + per_read)
        if fit < 2 * PAGE_TOKENS:  # a budget too tight for the slack: the positions that fit, the slack what is left
            fit = room // (per_token + per_read)
        kv_tokens = min(kv_tokens, max(fit // PAGE_TOKENS * PAGE_TOKENS, 0))
    kv = kv_tokens * per_token + trash
    act = step(kv_tokens)
    if kv_tokens < 2 * PAGE_TOKENS or budget - kv - act < minimum:
        parts = [(f"KV cache of {2 * PAGE_TOKENS} positions", 2 * PAGE_TOKENS * per_token + trash),
                 ("a step's activations", step(2 * PAGE_TOKENS)), ("requests", requests)]
        need = minimum + sum(n for _, n in parts)
        raise BudgetError(f"budget {format_bytes(whole)} cannot serve this model: "
                          f"{minimum_text(minimum, *parts, what='to serve')}; use a budget of at least "
                          f"{format_bytes(need)} ({budget_flag(need)})")
    cfg = generation_config(engine, GenerationPolicy(budget, 0, engine.generation_policy.resident), kv, act)
    return Layout(whole, cfg.budget_bytes, kv, act, kv_tokens, tuple(cfg.resident), requests,
                  slack=budget - cfg.budget_bytes - kv - act, kv_token_bytes=per_token)


def request_memory(budget: int, given: str | int | None) -> int:
    """The request memory: ``given`` (--request-memory), else an eighth of the budget, at most
    DEFAULT_REQUEST_MEMORY."""
    if given:
        return parse_bytes(given, what="--request-memory")
    return min(budget // 8, DEFAULT_REQUEST_MEMORY)


def plan_layout(engine: Any, text_config: Any, dtype: Any, *, kv_cache: str | int | None, max_batch: int,
                requests: str | int | None = None) -> Layout:
    """Split the user's budget (auto: what was measured, as hermes.load parsed it) and give the engine its share
    of the weights."""
    from hermes.engine import EngineConfig

    budget = engine.generation_policy.budget_bytes
    layout = split_budget(engine, text_config, dtype, budget,
                          kv_cache=parse_bytes(kv_cache, what="--kv-cache") if kv_cache else None,
                          max_batch=max_batch, requests=request_memory(budget, requests))
    c = engine.config
    engine.reconfigure(EngineConfig(layout.weights, loaders=c.loaders, prefetch=c.prefetch, io=c.io,
                                    resident=layout.resident))
    layout.weights_max = engine.weights_max
    return layout


def serving_layout(engine: Any, text_config: Any, dtype: Any, kv_cache: str | int | None, max_batch: int,
                   request_memory: str | int | None, ring: Any) -> Layout:
    """:func:`plan_layout`; on a ring (hermes.ring.serving), with the KV cache pool every device can hold."""

    def plan(kv: str | int | None) -> Layout:
        return plan_layout(engine, text_config, dtype, kv_cache=kv, max_batch=max_batch, requests=request_memory)

    if ring is None:
        return plan(kv_cache)
    from hermes.ring.serving import agree_layout

    return agree_layout(ring, plan, kv_cache)
