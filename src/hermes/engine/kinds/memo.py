"""A memo of torch's meta kernels: the output shapes of an aten operator on meta tensors, by its inputs' shapes.

A remote unit of a ring runs on the meta device (``hermes.engine.kinds.remote``) and torch's meta kernels are
mostly Python references (``torch._refs``: an ``add`` 0.3 ms, ``scaled_dot_product_attention`` 2.4-3.2 ms): a
Llama-3.2-1B decode step of the whole model on meta took ~200 ms of one core. The blocks of a model make the same
calls on the same shapes, block after block and step after step; :class:`MetaMemo` answers a call it has seen
with new meta tensors of the shapes (strides, dtypes) it recorded, without the kernel. Only calls that can be
answered so: every tensor argument on the meta device; an operator that mutates nothing and returns new tensors
(no views, no in-place, no ``out=``: their outputs must be their inputs); outputs all meta tensors. Everything else
runs as before. Nothing about values is lost: meta tensors have none.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
#: entries kept before the memo starts afresh (a model's distinct calls: a few hundred per input shape)
MEMO_ENTRIES = 8192


class _Unkeyable(Exception):
    pass


def _key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        if not x.is_meta or x.layout != torch.strided or x.is_neg() or x.is_conj():
            raise _Unkeyable
        return (x.shape, x.stride(), x.dtype, x.storage_offset())
    if isinstance(x, _PLAIN):
        return (type(x), x)
    if isinstance(x, (list, tuple)):
        return (type(x), *map(_key, x))
    raise _Unkeyable


def _spec(out: Any) -> tuple[bool, tuple[tuple[Any, ...], ...]] | None:
    outs = out if isinstance(out, tuple) else (out,)
    if not all(isinstance(o, torch.Tensor) and o.device.type == "meta" and o.layout == torch.strided for o in outs):
        return None
    return isinstance(out, tuple), tuple((tuple(o.shape), o.stride(), o.dtype) for o in outs)


def _returns_new_tensors(func: Any) -> bool:
    schema = func._schema
    return (not schema.is_mutable and len(schema.returns) > 0
            and all(r.alias_info is None and str(r.type) == "Tensor" for r in schema.returns))


class _Memo:
    """The recorded output shapes, by call."""

    def __init__(self) -> None:
        self.shapes: dict[Any, tuple[bool, tuple[tuple[Any, ...], ...]]] = {}
        self.answerable: dict[Any, bool] = {}  # by operator: whether its calls can be answered
        self.hits = self.misses = 0

    def call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """``func(*args, **kwargs)``, or new meta tensors of the shapes it returned before."""
        if not any(isinstance(a, torch.Tensor) or isinstance(a, (list, tuple)) and any(
                isinstance(t, torch.Tensor) for t in a) for a in args):
            return func(*args, **kwargs)  # factories: cheap, and their device is an argument
        try:
            key = (func, _key(args), _key(tuple(sorted(kwargs.items()))))
        except _Unkeyable:
            return func(*args, **kwargs)
        spec = self.shapes.get(key)
        if spec is None:
            self.misses += 1
            out = func(*args, **kwargs)
            spec = _spec(out)
            if spec is not None:
                if len(self.shapes) >= MEMO_ENTRIES:
                    self.shapes.clear()
                self.shapes[key] = spec
            return out
        self.hits += 1
        many, shapes = spec
        outs = tuple(torch.empty_strided(shape, stride, dtype=dtype, device="meta") for shape, stride, dtype in shapes)
        return outs if many else outs[0]


class _Kernels(TorchDispatchMode):
    def __init__(self, memo: _Memo) -> None:
        super().__init__()
        self.memo = memo

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        ok = self.memo.answerable.get(func)
        if ok is None:
            ok = self.memo.answerable[func] = _returns_new_tensors(func)
        return self.memo.call(func, args, kwargs) if ok else func(*args, **kwargs)


class MetaMemo:
    """A context in which aten calls on meta tensors are answered from their recorded output shapes where they can
    be (see the module). ``hits`` and ``misses`` count the calls answered and those run. Re-entrant; its mode is
    the entering thread's."""

    def __init__(self) -> None:
        self.memo = _Memo()
        self.modes: list[Any] = []

    @property
    def hits(self) -> int:
        return self.memo.hits

    @property
    def misses(self) -> int:
        return self.memo.misses

    def __enter__(self) -> MetaMemo:
        self.modes.append(_Kernels(self.memo))
        self.modes[-1].__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.modes.pop().__exit__(*exc)
