"""The execution schedule, learned by observation: the order in which units really run, per entry point.

Hugging Face models do not always run their modules in registration order (OPT registers its final norm before
the layers, BART its embedding norm after them), ``generate`` calls an encoder on its own, shared layers run
several times, unused heads never run. So the engine does not assume an order: it records the order units ran
in each pass, keyed by what was called (the model, its encoder, ...) and which arguments were given, and the
loading agents prefetch along the last order seen for that key. A unit asked for out of the predicted order is
a *surprise*: it is loaded on demand and the prediction continues from there (see ``continuation``); the next
pass of that key follows the corrected order.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def entry_key(entry: str, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """Key of a call: the entry module and which inputs were given (an encoder-decoder's forward with
    ``encoder_outputs`` runs other units than one without)."""
    given = sorted(k for k, v in kwargs.items() if v is not None)
    return f"{entry}|{len(args)}|{','.join(given)}"


class Schedule:
    """Observed unit orders by call key, and which key followed which (to prefetch the next call)."""

    def __init__(self, default: Callable[[str], list[int]]) -> None:
        self._default = default  # entry name -> a first guess (the entry's units in registration order)
        self.traces: dict[str, list[int]] = {}
        self._after: dict[str, str] = {}  # key -> key of the call that followed it last time
        self._entry: dict[str, str] = {}

    def predict(self, key: str, entry: str) -> list[int]:
        """The unit order expected for a call of ``key`` (entry ``entry``)."""
        self._entry.setdefault(key, entry)
        trace = self.traces.get(key)
        return list(trace) if trace is not None else self._default(entry)

    def record(self, key: str, trace: list[int], previous: str | None = None) -> None:
        """Remember the order a completed call ran in (and that it followed ``previous``)."""
        self.traces[key] = list(trace)
        if previous is not None:
            self._after[previous] = key

    def next_key(self, key: str) -> tuple[str, str]:
        """(key, entry) of the call expected after ``key``: the one seen after it last time, else ``key`` again."""
        nxt = self._after.get(key, key)
        return nxt, self._entry.get(nxt, self._entry.get(key, ""))

    def continuation(self, key: str, entry: str, unit: int, done: int) -> list[int]:
        """Predicted order from ``unit`` on, after a surprise at the ``done``-th unit of a call: the expected
        order resumed at the occurrence of ``unit`` nearest after ``done`` (else the last one before it), or
        just ``unit`` if it is not expected at all (on-demand loading until the next prediction holds)."""
        order = self.predict(key, entry)
        hits = [i for i, u in enumerate(order) if u == unit]
        if not hits:
            return [unit]
        after = [i for i in hits if i >= done]
        start = after[0] if after else hits[-1]
        return order[start:]
