"""What a remote unit's meta run does, learned and replayed (``hermes.engine.kinds.remote``).

A ring device runs the units other devices compute on the meta device, only for what that leaves behind: its
output's shape and its cache layer's length. torch's meta kernels of elementwise ops are Python (``torch._refs``):
a whole Llama-3.2-1B decode step on meta takes ~80-200 ms of one core, work a device of a ring does every token for
every block it does not own. Yet a block's run on meta depends, in practice, only on its inputs' shapes: the output is
tensors of known shapes, and what it leaves in the cache is its calls to the cache's ``update`` methods, with keys
and values of known shapes. So each remote module's run is recorded once per *signature* (its inputs' shapes,
dtypes and plain values; what carries the keys' length — an attention mask's last dimension, a paged cache's read
indices and key lengths — left out) — the cache calls it made
and the shapes it returned — and later calls with that signature make the same cache calls with new meta tensors
and return new meta tensors of the recorded shapes, without running the module.

What is left out of a signature is the keys' length, so a record is trusted at once only where nothing in it has
that length: no dimension of its outputs or cache calls and no plain value in them within one of a length its inputs
carried (a mask's last dimension, a length under a mask's name, a cache layer's length before or after the run).
Otherwise it is trusted when seen twice: the signature's second call is recorded again and compared with the first
(between the two the cache grew, so a run that depends on the cache length records differently and that signature
is never replayed). A module whose run involves anything else (an input or cache argument that is not a tensor, a
plain value, a cache or a container of them; an output that is not tensors) is never replayed either. So a
generation's prompt and first new token run remote blocks on meta (the first two new tokens where a record holds a
length by chance: a 63-token prompt's next key length is 64, a head dimension), later tokens replay them — the
first decode steps of a 4-device Llama-3.2-1B ring took 0.4 s each against 0.18 s for the others on two shared
cores. A cache whose meta updates leave nothing behind (``meta_updates_leave_nothing``: a ring's paged cache
under continuous batching, ``hermes serve``, which answers a remote layer's update from the read's length and keeps
no state for it) is not recorded at all: such a block's record is its output's shapes, and a step replays it once a
step of the same batch shape was trusted (by the rule above). Not replayed, measured: blocks that return their
attention weights (GPT-J, Bloom: the weights' last dimension grows with the cache). ``HERMES_RING_REPLAY=0`` turns
replaying off. A module alike to others (``hermes.engine.kinds.kin``) is also answered by their records: then one
block of each kind runs on meta per new signature, and GPT-J's and Bloom's others replay the first's every token.
"""
from __future__ import annotations

import inspect
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from hermes.engine.kinds.kin import Kin, layer_length, layer_lengths
from hermes.lean import MetaCat

_PLAIN = (type(None), bool, int, float, str, torch.dtype)
#: inputs that carry the keys' length (left out of signatures: a tensor's last dimension, a plain integer): a mask,
#: a paged cache's read indices and per-layer-type key lengths (continuous batching)
_MASKS = ("attention_mask", "read_index", "max_length_k")
LIMIT = 8  # signatures remembered per module (least recently used dropped)


class Unreplayable(Exception):
    """A run that cannot be described by shapes and plain values."""


class Spec(NamedTuple):
    """A meta tensor, by its shape and dtype (a tuple: hashed and compared in C, as signatures are every call)."""
    shape: tuple[int, ...]
    dtype: torch.dtype

    def make(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


def _is_cache(x: Any) -> bool:
    return type(x).__name__.endswith("Cache") and callable(getattr(type(x), "update", None))


def template(x: Any) -> Any:
    """``x`` with every tensor a :class:`Spec`, hashable; :class:`Unreplayable` for anything but tensors, plain
    values and tuples, lists and dicts of them."""
    if isinstance(x, torch.Tensor):
        return Spec(tuple(x.shape), x.dtype)
    if isinstance(x, _PLAIN):
        return x
    if isinstance(x, (tuple, list)) and (type(x) in (tuple, list)):
        return (type(x).__name__, tuple(template(v) for v in x))
    if type(x) is dict:
        return ("dict", tuple((k, template(v)) for k, v in x.items()))
    raise Unreplayable(type(x).__name__)


def make(t: Any) -> Any:
    """New meta tensors in the structure :func:`template` described."""
    if isinstance(t, Spec):
        return t.make()
    if isinstance(t, tuple):
        kind, items = t
        if kind == "dict":
            return {k: make(v) for k, v in items}
        values = [make(v) for v in items]
        return tuple(values) if kind == "tuple" else values
    return t


def signature(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...] = ()) \
        -> tuple[tuple[Any, ...], list[tuple[Any, Any]]]:
    """(a hashable signature of a call's inputs, [(path, cache)] of the caches among them); ``names``: the names of
    the positional parameters (an attention mask may come by position)."""
    caches: list[tuple[Any, Any]] = []

    def walk(x: Any, path: Any, mask: bool) -> Any:
        if isinstance(x, torch.Tensor):
            return ("mask", x.dim(), tuple(x.shape[:-1]), x.dtype) if mask else Spec(tuple(x.shape), x.dtype)
        if _is_cache(x):
            if not getattr(type(x), "meta_updates_leave_nothing", False):
                caches.append((path, x))
            return ("cache", type(x).__name__)
        if isinstance(x, _PLAIN):
            return "length" if mask and type(x) is int else x
        if type(x) in (tuple, list):
            return (type(x).__name__, tuple(walk(v, (*path, i), mask) for i, v in enumerate(x)))
        if type(x) is dict:
            return ("dict", tuple((k, walk(v, (*path, k), mask or k in _MASKS)) for k, v in x.items()))
        raise Unreplayable(type(x).__name__)

    key = (tuple(walk(v, ("args", i), i < len(names) and names[i] in _MASKS) for i, v in enumerate(args)),
           walk(kwargs, ("kwargs",), False))
    return key, caches


def _resolve(args: tuple[Any, ...], kwargs: dict[str, Any], path: tuple[Any, ...]) -> Any:
    x: Any = {"args": args, "kwargs": kwargs}
    for p in path:
        x = x[p]
    return x


@dataclass(frozen=True)
class Call:
    """One call a run made to a cache's (or its layers') ``update`` methods."""
    cache: tuple[Any, ...]  # where the cache was among the module's inputs
    layer: int | None  # the cache layer's index (its own method, or the index the cache's was given), or None
    method: str
    args: Any  # templates (a layer's index given to the cache's method: None, put back at replay)
    kwargs: Any
    index: int | str | None = None  # where the cache's method took the layer's index: a position, a name, or None
    holder: str | None = None  # the cache layer's class

    def replay(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cache = _resolve(args, kwargs, self.cache)
        target = cache if self.layer is None or self.index is not None else cache.layers[self.layer]
        a, kw = make(self.args), make(self.kwargs)  # outside the mode: it would see each torch.empty
        if isinstance(self.index, int):
            a = (*a[:self.index], self.layer, *a[self.index + 1:])
        elif self.index is not None:
            kw[self.index] = self.layer
        with MetaCat():  # the cache's meta cat, answered from shapes
            getattr(target, self.method)(*a, **kw)


#: the names a cache's method gives the index of the layer it updates (transformers: ``layer_idx``)
_LAYER_INDEX = ("layer_idx", "layer_index")


def _layer_call(path: tuple[Any, ...], cache: Any, method: Any, name: str, a: tuple[Any, ...],
                kw: dict[str, Any]) -> Call:
    """The record of a cache's own method called with ``a``/``kw``: where it took a layer's index, that index as the
    call's layer (so that alike blocks' records differ in it only, ``hermes.engine.kinds.kin``)."""
    try:
        bound = inspect.signature(method).bind(*a, **kw)
    except (TypeError, ValueError):
        return Call(path, None, name, template(a), template(kw))
    for i, param in enumerate(bound.arguments):
        value = bound.arguments[param]
        if param in _LAYER_INDEX and type(value) is int:
            layers = getattr(cache, "layers", None) or []
            holder = type(layers[value]).__name__ if 0 <= value < len(layers) else None
            if i < len(a):
                return Call(path, value, name, template((*a[:i], None, *a[i + 1:])), template(kw), i, holder)
            return Call(path, value, name, template(a), template({**kw, param: None}), param, holder)
    return Call(path, None, name, template(a), template(kw))


@dataclass(frozen=True)
class Record:
    calls: tuple[Call, ...]
    output: Any  # template


def _mutators(obj: Any, extra: tuple[str, ...] = ()) -> list[str]:
    return [n for n in dir(type(obj)) if (n.startswith("update") or n in extra) and callable(getattr(obj, n, None))]


def recorded(original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
             caches: list[tuple[Any, Any]]) -> tuple[Any, Record | None]:
    """Run ``original(*args, **kwargs)`` (meta inputs) recording its calls to the caches' ``update`` methods.
    Returns (its output, the record, or None where it cannot be replayed)."""
    calls: list[Call] = []
    failed: list[str] = []
    depth = [0]
    wrapped: list[tuple[Any, str]] = []

    def spy(obj: Any, name: str, path: tuple[Any, ...], layer: int | None) -> None:
        method = getattr(obj, name)

        def call(*a: Any, **kw: Any) -> Any:
            depth[0] += 1
            try:
                out = method(*a, **kw)
            finally:
                depth[0] -= 1
            if depth[0] == 0:  # the outermost call (a cache's update calls its layer's), recorded once it made
                try:  # the layer it updates
                    calls.append(Call(path, layer, name, template(a), template(kw), None, type(obj).__name__)
                                 if layer is not None else _layer_call(path, obj, method, name, a, kw))
                except Unreplayable as exc:
                    failed.append(str(exc))
            return out
        setattr(obj, name, call)
        wrapped.append((obj, name))

    try:
        for path, cache in caches:
            for name in _mutators(cache):
                spy(cache, name, path, None)
            for i, layer in enumerate(getattr(cache, "layers", None) or []):
                for name in _mutators(layer, ("lazy_initialization",)):
                    spy(layer, name, path, i)
        out = original(*args, **kwargs)
    finally:
        for obj, name in wrapped:
            obj.__dict__.pop(name, None)
    if failed:
        return out, None
    try:
        return out, Record(tuple(calls), template(out))
    except Unreplayable:
        return out, None


def key_lengths(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...] = ()) -> set[int] | None:
    """The keys' lengths a call's inputs carry — a mask's last dimension, a plain integer under a mask's name, each
    cache layer's length — or None where a cache's length cannot be read as an integer."""
    found: set[int] = set()

    def walk(x: Any, mask: bool) -> None:
        if isinstance(x, torch.Tensor):
            if mask and x.dim():
                found.add(x.shape[-1])
        elif _is_cache(x):
            if getattr(type(x), "meta_updates_leave_nothing", False):
                return  # no state for remote layers: their lengths come with the masks
            for layer in getattr(x, "layers", None) or [x]:
                n = layer.get_seq_length()
                if type(n) is not int:
                    raise TypeError(type(n).__name__)
                found.add(n)
        elif mask and type(x) is int:
            found.add(x)
        elif type(x) in (tuple, list):
            for v in x:
                walk(v, mask)
        elif type(x) is dict:
            for k, v in x.items():
                walk(v, mask or k in _MASKS)

    try:
        for i, v in enumerate(args):
            walk(v, i < len(names) and names[i] in _MASKS)
        walk(kwargs, False)
    except Exception:  # noqa: BLE001 - a cache whose length is not a plain integer: trusted only when seen twice
        return None
    return found


def _integers(t: Any, into: set[int]) -> set[int]:
    """Every integer in a template: its tensors' dimensions and its plain integers."""
    if isinstance(t, Spec):
        into.update(t.shape)
    elif type(t) is int:
        into.add(t)
    elif isinstance(t, tuple):
        for v in t:
            _integers(v, into)
    return into


def holds_no_length(record: Record, lengths: set[int]) -> bool:
    """Whether nothing in ``record`` is within one of a keys' length in ``lengths``, and it initializes no cache
    layer (a first update — or an empty layer, length 0, before it: a later call would find the layer made)."""
    if 0 in lengths:
        return False
    seen: set[int] = set()
    for call in record.calls:
        if call.method == "lazy_initialization":
            return False
        _integers(call.args, seen)
        _integers(call.kwargs, seen)
    _integers(record.output, seen)
    return not seen & {n + d for n in lengths for d in (-1, 0, 1)}


class Replays:
    """One remote module's recorded runs, by signature: replayed once trusted (at once, or once seen twice alike)."""

    enabled = os.environ.get("HERMES_RING_REPLAY", "1") != "0"

    def __init__(self, kin: Kin | None = None) -> None:
        self.seen: OrderedDict[Any, Record | None] = OrderedDict()  # None: not replayable
        self.trusted: set[Any] = set()
        self.calls = 0
        self.names: tuple[str, ...] | None = None  # the forward's positional parameters
        self.replayed = 0  # of them, answered without running (for tests and reports)
        self.kin = kin  # the alike modules this one may be answered by (``hermes.engine.kinds.kin``)
        self.borrowed = 0  # of the replayed, answered by a record another of its kin made

    def _signature(self, original: Callable[..., Any], args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[Any, list[tuple[Any, Any]]] | None:
        """:func:`signature` of a call of ``original``, or None: never replayed (replaying off, or unreplayable)."""
        if not self.enabled:
            return None
        if self.names is None:
            try:
                self.names = tuple(inspect.signature(original).parameters)
            except (TypeError, ValueError):
                self.names = ()
        try:
            return signature(args, kwargs, self.names)
        except Unreplayable:
            return None

    def _replayed(self, key: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Record | None:
        if key in self.trusted:
            self.seen.move_to_end(key)
            record = self.seen[key]
        elif self.kin is not None:
            record = self.kin.answer(self, key, lambda slot: layer_length(_resolve(args, kwargs, slot[0]), slot[1]))
            if record is None:
                return None
            self.borrowed += 1
        else:
            return None
        self.calls += 1
        self.replayed += 1
        return record

    def trusted_record(self, original: Callable[..., Any], args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> Record | None:
        """The record a call with these inputs replays (it counts as a call), or None: it must run. A signature
        holds shapes, dtypes and plain values only, so real inputs find the record their meta twins left."""
        found = self._signature(original, args, kwargs)
        return None if found is None else self._replayed(found[0], args, kwargs)

    @staticmethod
    def replay(record: Record, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``record``'s cache calls made on the caches among ``args``/``kwargs``, its output's meta tensors made."""
        for call in record.calls:
            call.replay(args, kwargs)
        return make(record.output)

    def run(self, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``original(*args, **kwargs)``, all inputs on meta — or its replay."""
        found = self._signature(original, args, kwargs)
        record = None if found is None else self._replayed(found[0], args, kwargs)
        if record is not None:
            return self.replay(record, args, kwargs)
        self.calls += 1
        if found is None:
            return original(*args, **kwargs)
        key, caches = found
        first = key not in self.seen
        before = key_lengths(args, kwargs, self.names) if first else None
        layers = layer_lengths(caches) if self.kin is not None else None
        out, record = recorded(original, args, kwargs, caches)
        if not first:
            if record is not None and record == self.seen[key]:
                self.trusted.add(key)
            else:
                self.seen[key] = None  # recorded differently (or not at all): never replayed
        else:
            self.seen[key] = record
            if before is not None and record is not None:
                after = key_lengths(args, kwargs, self.names)
                if after is not None and holds_no_length(record, before | after):
                    self.trusted.add(key)  # nothing in it has the length a second run would change
            if len(self.seen) > LIMIT:
                old, _ = self.seen.popitem(last=False)
                self.trusted.discard(old)
        if record is not None:
            self._compare(key, record, layers)
        return out

    def _compare(self, key: Any, record: Record, before: dict[Any, dict[int, int | None]] | None) -> None:
        """What this run recorded, told to its kin: it becomes akin where another recorded the same in this forward
        (on other cache layers), never where another recorded otherwise."""
        if self.kin is not None:
            self.kin.made(self, key, record, key in self.trusted, before)
