"""One budget for the whole process: how a budget is shared between the weights and everything else the process
takes above its runtime while it runs the model.

Whichever way a budget is given (``--budget SIZE``, ``auto``, a plan, ``hermes serve``), it is the memory the
process may take above its runtime (Python, torch, transformers, the model's skeleton). It holds, besides the
weights: the KV cache (``generate``, ``serve``), one pass's activations (estimated for the call, or a plan's
profiled figure), what requests hold (``serve``), and one stated margin, the **runtime slack**
(:data:`RUNTIME_SLACK_BYTES`, 32 MiB): torch's own code that the first calls page in (10-11 MiB measured on GPT-2:
file-backed pages that count in RSS), thread stacks, torch's scratch beyond the activation estimate, and the C
allocator's retained memory, which :func:`bound_allocator` keeps from growing with the activations. The engine's
weight budget is what is left.

A budget below the minimum weight budget plus the rest (KV cache, activations, requests) is refused with that
minimum named. Between that and the minimum plus the runtime slack, the slack gets what is left and the process
may exceed the budget by the difference: :attr:`Share.slack_short` says by how much (commands print it).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from hermes.errors import BudgetError
from hermes.figures import budget_flag, minimum_text
from hermes.memory import format_bytes, glibc

log = logging.getLogger(__name__)

#: the margin every budget holds beside weights, KV cache, activations and requests: torch's code faulted in by
#: the first calls (file-backed, 10-11 MiB measured), thread stacks, torch's scratch beyond the activation
#: estimate (0-14 MiB on GPT-2, from run to run) and the allocator's bounded slack; 16 MiB left GPT-2's run and
#: serve 11-15 MiB above their budgets (docs/BENCHMARKS.md "One budget")
RUNTIME_SLACK_BYTES = 32 * 2**20
#: allocations at least this large are mapped and unmapped on their own (:func:`bound_allocator`)
MMAP_THRESHOLD_BYTES = 64 * 2**10
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_bounded: bool | None = None


def bound_allocator() -> bool:
    """Keep the C allocator from holding on to freed activations: glibc raises its mmap threshold every time a
    large block is freed (up to 32 MiB), after which freed activations stay in its heaps, counted in RSS. Measured
    on GPT-2: at 512 positions +115 MiB retained above the live tensors after three calls; generating 4 x 32 + 16
    tokens, +34 MiB in 5 of 6 runs with a 256 KiB threshold, in none of 6 with 64 KiB. A fixed threshold
    (:data:`MMAP_THRESHOLD_BYTES`) gives every tensor of 64 KiB or more back to the OS when it dies (decode speed
    unchanged: 23.4-24.8 tokens/s either way). Once per process; kept as the user set it where
    ``MALLOC_MMAP_THRESHOLD_`` is in the environment. Returns whether it applies."""
    global _bounded
    if _bounded is None:
        _bounded = False
        libc = glibc()
        if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None and libc is not None:
            try:
                _bounded = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
            except AttributeError:
                _bounded = False
        log.debug("allocator mmap threshold fixed: %s", _bounded)
    return _bounded


@dataclass(frozen=True)
class Share:
    """How a budget is shared (bytes)."""

    budget: int
    weights: int  # the engine's weight budget
    kv_cache: int = 0
    activations: int = 0
    requests: int = 0
    slack: int = RUNTIME_SLACK_BYTES  # the runtime slack the budget holds

    @property
    def slack_short(self) -> int:
        """How much of the runtime slack the budget could not hold (by which the process may exceed it)."""
        return RUNTIME_SLACK_BYTES - self.slack

    def parts(self) -> list[tuple[str, int]]:
        """The named parts besides the weights, those that are not zero."""
        named = [("KV cache", self.kv_cache), ("activations", self.activations), ("requests", self.requests),
                 ("runtime slack", self.slack)]
        return [(name, n) for name, n in named if n]

    def describe(self) -> str:
        text = f"budget {format_bytes(self.budget)} = weights {format_bytes(self.weights)}" + "".join(
            f" + {name} {format_bytes(n)}" for name, n in self.parts())
        return text + slack_note(self.slack)


def slack_note(slack: int) -> str:
    """What a tight budget could not hold of the runtime slack, said where it applies ("" where it holds it all)."""
    short = RUNTIME_SLACK_BYTES - slack
    return (f" ({format_bytes(short)} short of the {format_bytes(RUNTIME_SLACK_BYTES)} runtime slack: the process "
            f"may take up to {format_bytes(short)} more)") if short > 0 else ""


def share(budget: int, minimum_weights: int, *, kv_cache: int = 0, activations: int = 0, requests: int = 0,
          what: str = "with activations", fix: str = "") -> Share:
    """Share ``budget`` between the weights and the rest; the weights get at least ``minimum_weights``.

    A budget below the minimum weight budget itself goes to the weights whole: the engine refuses it, naming
    the minimum and what it is made of.

    Raises:
        BudgetError: the budget cannot hold the minimum weight budget and the rest (the message names the
            minimum, as a sum of its parts, and ``fix``: what else would help).
    """
    rest = kv_cache + activations + requests
    if budget < minimum_weights:  # the engine names the minimum weight budget and what it is made of
        return Share(budget, budget, slack=0)
    if budget < minimum_weights + rest:
        parts = [(n, b) for n, b in (("KV cache", kv_cache), ("activations", activations), ("requests", requests))
                 if b]
        need = minimum_weights + rest
        least = minimum_text(minimum_weights, *parts, what=what)
        raise BudgetError(f"budget {format_bytes(budget)} is below the {least}; use a budget of at least "
                          f"{format_bytes(need)} ({budget_flag(need)}), or {format_bytes(need + RUNTIME_SLACK_BYTES)} "
                          f"with the runtime slack{fix}")
    slack = min(RUNTIME_SLACK_BYTES, budget - minimum_weights - rest)
    return Share(budget, budget - rest - slack, kv_cache, activations, requests, slack)
