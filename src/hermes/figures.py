"""How reported figures are named: the minimum budgets, what a budget really holds, a prediction beside its
measurement. One helper per figure, so that every command, result and error names the same figure the same way.
A leaf module: imports nothing from hermes but ``memory``.

The figures:

- **minimum weight budget**: the smallest budget the engine runs the model with: the largest streamed unit, the
  resident units and the side buffer (embedding rows, routed experts). ``run --budget`` and ``hermes.load`` need it.
- **minimum budget with activations** (``plan``), **for this generation** (``generate``), **to serve** (``serve``):
  the minimum weight budget plus what that budget also covers there (activations, KV cache, request memory), each
  part named.
- **weights held at most** (``weights_max_bytes``): what the engine can hold under its weight budget: the budget, or
  less when the whole model fits in it.
- **whole model in the engine** (``whole_model_bytes``): every unit's page-aligned buffer once plus the side buffer;
  a weights peak is a share of it, and never above 100 %.
- **predicted vs measured**: a measurement that a plan (or a cached profile) predicted is printed beside the
  prediction, with measured / predicted.
"""
from __future__ import annotations

from typing import Any

from hermes.memory import format_bytes

MIN_WEIGHTS = "minimum weight budget"
#: what the minimum weight budget is made of, when no unit is kept resident
MIN_WEIGHTS_PARTS = "largest unit + side buffer"


def budget_flag(n: int) -> str:
    """The ``--budget`` option that gives at least ``n`` bytes, in whole MiB: ``--budget 28MiB``."""
    return f"--budget {-(-n // 2**20)}MiB"


def minimum_text(weights: int, *parts: tuple[str, int], what: str = "", detail: str = MIN_WEIGHTS_PARTS) -> str:
    """The minimum weight budget alone (no ``parts``): ``minimum weight budget 27.8 MiB (largest unit + side
    buffer)``; or a minimum budget ``what`` covers more, each part named: ``minimum budget with activations
    46.3 MiB = minimum weight budget 27.8 MiB + activations 18.5 MiB``."""
    if not parts:
        return f"{MIN_WEIGHTS} {format_bytes(weights)} ({detail})"
    total = weights + sum(n for _, n in parts)
    more = " + ".join(f"{name} {format_bytes(n)}" for name, n in parts)
    return f"minimum budget {what} {format_bytes(total)} = {MIN_WEIGHTS} {format_bytes(weights)} + {more}"


def weights_use(weight_budget: int, most: int, *, held: str = "the whole model resident", of: str = "") -> str:
    """What a weight budget really holds: ``300.0 MiB`` when the engine can use all of it, else ``the whole model
    resident (475.0 MiB) of 20.0 GiB available`` (``most``: the weights held at most; ``held``: what they are;
    ``of``: what the budget is called)."""
    if most < weight_budget:
        return f"{held} ({format_bytes(most)}) of {of}{format_bytes(weight_budget)} available"
    return format_bytes(weight_budget)


def peak_share(peak: int, whole: int) -> str:
    """A weights peak as a share of the whole model in the engine (never above 100 %)."""
    return f"{100 * peak / max(whole, 1):.1f}% of the whole model ({format_bytes(whole)} in the engine)"


def prediction(predicted: float, measured: float, source: str) -> dict[str, Any]:
    """The record of a predicted figure beside its measurement (``source``: what predicted it)."""
    return {"source": source, "predicted": predicted, "measured": measured,
            "ratio": measured / predicted if predicted > 0 else None}


def versus(p: dict[str, Any], fmt: Any = lambda s: f"{s * 1000:.1f} ms") -> str:
    """``(plan predicted 858.0 ms, x1.20)``: a :func:`prediction` for the text beside its measurement."""
    ratio = f", x{p['ratio']:.2f}" if p.get("ratio") is not None else ""
    return f"({p['source']} predicted {fmt(p['predicted'])}{ratio})"
