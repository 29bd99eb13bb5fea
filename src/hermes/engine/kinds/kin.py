"""Remote modules alike: a record one of them made answers the others (``hermes.engine.kinds.replay``).

A ring device runs every block another device computes on the meta device, once per new signature (the prompt, the
first new token; the second where a length meets a dimension by chance): ~5-25 ms of one core each, a dozen blocks
per device, on every device at once — what made a 4-device Llama-3.2-1B ring's first two decode steps take twice
the others (0.43 s against 0.2 s, measured). Yet a model's blocks are mostly alike: the same code, the same
structure, the same inputs, each with its own cache layer. So remote modules are grouped by :func:`likeness` —
their classes, parameters' shapes and plain attributes, all but a layer's index — and a module becomes **akin** to
its group once its own meta run recorded what another of the group recorded for the same signature in the same
forward (the prompt's, usually), the cache layers it touched aside. From then on, a record another of its group
made — in this forward, from cache layers of the lengths its own have, or trusted by the rules
of ``hermes.engine.kinds.replay`` — answers it, made on its own cache layers: one block of each kind runs on meta
per new signature, not all of them. Only akin modules lend records; one that recorded otherwise than another of its
group neither borrows nor lends.
``HERMES_RING_KIN=0`` turns this off (each module is then answered by its own records only).
"""
from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

#: attributes that hold a layer's own index (each layer's differs; what a record holds of it is its cache layer)
_INDEX_NAMES = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "block_idx", "idx"})
_PLAIN = (type(None), bool, int, float, str, torch.dtype)
LIMIT = 8  # records kept per group (least recently made dropped)


def likeness(module: torch.nn.Module) -> tuple[Any, ...]:
    """What must be equal for two modules to run alike on the meta device: each submodule's class, its parameters'
    and buffers' shapes and dtypes, its plain attributes (but a layer's index)."""
    parts = []
    for name, m in module.named_modules():
        attrs = tuple(sorted((k, v) for k, v in vars(m).items()
                             if not k.startswith("_") and type(v) in _PLAIN and k not in _INDEX_NAMES))
        tensors = tuple((k, tuple(t.shape), t.dtype) for k, t in (*m._parameters.items(), *m._buffers.items())
                        if t is not None)
        parts.append((name, type(m).__module__, type(m).__qualname__, attrs, tensors))
    return tuple(parts)


Slot = tuple[tuple[Any, ...], int]  # a cache layer a record touched: (the cache's place among the inputs, its index)


def normalized(record: Any) -> tuple[Any, tuple[Slot, ...]]:
    """(``record`` with each cache layer it touched numbered by first use, those layers)."""
    slots: list[Slot] = []
    calls = []
    for call in record.calls:
        if call.layer is not None:
            slot = (call.cache, call.layer)
            if slot not in slots:
                slots.append(slot)
            call = dataclasses.replace(call, layer=slots.index(slot))
        calls.append(call)
    return dataclasses.replace(record, calls=tuple(calls)), tuple(slots)


def on_layers(record: Any, slots: tuple[Slot, ...]) -> Any:
    """A :func:`normalized` record made on the cache layers ``slots``."""
    return dataclasses.replace(record, calls=tuple(
        c if c.layer is None else dataclasses.replace(c, layer=slots[c.layer][1]) for c in record.calls))


def layer_length(cache: Any, layer: int) -> int | None:
    """Cache layer ``layer``'s length (-1: not made yet), or None where it has none to read."""
    try:
        layers = cache.layers
        if layer >= len(layers):
            return -1
        n = layers[layer].get_seq_length()
    except Exception:  # noqa: BLE001 - a cache of another make: its records are never borrowed
        return None
    return n if type(n) is int else None


def layer_lengths(caches: list[tuple[Any, Any]]) -> dict[Any, dict[int, int | None]]:
    """Each cache layer's length among a call's caches, by the cache's place and the layer's index."""
    return {path: {i: layer_length(cache, i) for i in range(len(getattr(cache, "layers", None) or []))}
            for path, cache in caches}


class Forwards:
    """The model's forwards, counted (a record made in this one describes the state every remote layer is in)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, *_: Any) -> None:  # a forward pre-hook
        self.n += 1


class Kin:
    """One group of alike remote modules (its members: their ``Replays``): the records they made, by signature."""

    enabled = os.environ.get("HERMES_RING_KIN", "1") != "0"

    def __init__(self, forwards: Forwards) -> None:
        self.forwards = forwards
        #: signature -> (forward, normalized record, its cache layers' lengths before it, its maker, their layers)
        self.fresh: OrderedDict[Any, tuple[int, Any, tuple[int, ...] | None, Any, tuple[Slot, ...]]] = OrderedDict()
        self.trusted: OrderedDict[Any, Any] = OrderedDict()  # signature -> normalized record an akin member trusted
        self.akin: dict[Any, tuple[Slot, ...]] = {}  # members found alike to another, with the layers they touch
        self.unlike: set[Any] = set()  # members that recorded otherwise than another: never borrow, never lend
        self._mapped: dict[tuple[Any, Any], Any] = {}  # (signature, member): a trusted record made on its layers

    @staticmethod
    def _keep(d: OrderedDict[Any, Any], key: Any, value: Any) -> None:
        d[key] = value
        d.move_to_end(key)
        if len(d) > LIMIT:
            d.popitem(last=False)

    def made(self, member: Any, key: Any, record: Any, trusted: bool,
             before: dict[Any, dict[int, int | None]] | None) -> None:
        """``member`` ran ``key`` on meta and recorded ``record`` (``trusted``: by its own rules), its caches' layers'
        lengths ``before`` it (by the cache's place, the layer's index; -1: not made yet; None: unreadable). Where
        another member recorded the same signature from the same lengths in this forward, both are akin if the
        records are the same on their own layers — and ``member`` is unlike the group if not."""
        if member in self.unlike:
            return
        norm, slots = normalized(record)
        lengths = tuple((before or {}).get(path, {}).get(layer, -1) for path, layer in slots)
        state = None if before is None or None in lengths else lengths
        now = self.forwards.n
        earlier = self.fresh.get(key)
        if earlier is not None and earlier[0] == now and state is not None and earlier[2] == state:
            if earlier[3] is not member and earlier[1] != norm:
                self.unlike.add(member)
                self.akin.pop(member, None)
                return
            if earlier[3] is not member and earlier[3] not in self.unlike:
                self.akin[member] = slots
                self.akin.setdefault(earlier[3], earlier[4])
        else:
            self._keep(self.fresh, key, (now, norm, state, member, slots))
        if trusted and member in self.akin:
            self._keep(self.trusted, key, norm)
            self._mapped.clear()

    def answer(self, member: Any, key: Any, length: Callable[[Slot], int | None]) -> Any:
        """The record an akin ``member`` replays for ``key`` (``length(slot)``: a cache layer's length now), made on
        its own cache layers: one an akin member trusted, or one an akin member made in this forward from the
        lengths its layers have; or None: it runs."""
        slots = self.akin.get(member)
        if slots is None:
            return None
        norm = self.trusted.get(key)
        if norm is not None and (key, member) in self._mapped:
            return self._mapped[(key, member)]
        if norm is None:
            fresh = self.fresh.get(key)
            if fresh is None or fresh[0] != self.forwards.n or fresh[2] is None or fresh[3] not in self.akin \
                    or len(fresh[2]) > len(slots) or tuple(length(s) for s in slots[:len(fresh[2])]) != fresh[2]:
                return None
            norm = fresh[1]
        if any(c.layer is not None and c.layer >= len(slots) for c in norm.calls):
            return None
        record = on_layers(norm, slots)
        if norm is self.trusted.get(key):
            self._mapped[(key, member)] = record
        return record
