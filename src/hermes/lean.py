"""A smaller runtime: what importing transformers brings into the process and Hermes does not use, kept out until
something does use it.

On a small device the runtime is memory the model cannot have (issue #20: 338 MiB of RSS before the model, on a
586 MiB device). Measured here (torch 2.13, transformers 5, anonymous memory, i.e. what a device cannot page out):
``import torch`` 142 MiB; importing ``LlamaForCausalLM`` then adds 111 MiB, of which **sympy 32, torch._dynamo 27,
DTensor 7**: transformers imports torch's compiler at module level (``@torch.compiler.disable`` decorators,
masking_utils' ``TransformGetItemToIndex``, ``@torch._dynamo.assume_constant_result``) and DTensor when
``torch.distributed`` is available (for its tensor-parallel sharding), and both import sympy. Hermes compiles
nothing and shards nothing with DTensor (a ring uses point-to-point sends), so :func:`install` keeps them out:

- ``torch._dynamo`` is a module made from its own spec but not executed yet (:class:`_LazyDynamo`): its decorators
  (``disable``, ``allow_in_graph``, ``assume_constant_result``) return the function, wrapped so that once the
  compiler is loaded the real decorator applies (so a later ``torch.compile`` sees them as before); ``is_compiling``
  is False (nothing compiles without it); ``mark_static_address`` marks the tensor as torch's own does;
  ``trace_rules.clear_lru_cache`` (``init_process_group`` calls it) has nothing to clear. Any other
  use — an attribute, a submodule, ``torch.compile`` — runs the real package in place, the same module object (a
  finder first in ``sys.meta_path`` makes sure a submodule import runs the package first and is not run twice).
- transformers' ``masking_utils`` gets a ``TransformGetItemToIndex`` that loads the compiler when it is used (a mask
  built by vmap, which Hermes' models do not use).
- transformers' ``is_torch_distributed_available`` answers False, as it does on a torch built without distributed:
  its tensor/expert-parallel and FSDP code stays out (``torch.distributed`` itself still works: the ring uses it).
  A program that imports Hermes and also uses transformers' tensor parallelism (``tp_plan``) sets
  ``HERMES_LEAN_IMPORTS=0``.

The result: 71 MiB less after importing a Llama (254 → 183 MiB anonymous), every output the same (the whole test
suite runs with it). ``HERMES_LEAN_IMPORTS=0`` turns it off; it does nothing when the compiler or transformers'
masking utilities were imported before Hermes."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

DYNAMO = "torch._dynamo"
_TRACE = "torch._dynamo._trace_wrapped_higher_order_op"
_lock = threading.RLock()


def install() -> bool:
    """Keep torch's compiler and DTensor out of the process until used (see the module docstring); True when
    installed now or before, False when off or too late (already imported)."""
    if os.environ.get("HERMES_LEAN_IMPORTS", "1").strip() == "0":
        return False
    if isinstance(sys.modules.get(DYNAMO), _LazyDynamo):
        return True
    if DYNAMO in sys.modules or "transformers.masking_utils" in sys.modules:
        return False
    spec = importlib.util.find_spec(DYNAMO)
    if spec is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)
    module.__class__ = _LazyDynamo
    sys.modules[DYNAMO] = module
    torch._dynamo = module  # as the import system would set it
    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        _quiet_transformers()
    except Exception as e:  # noqa: BLE001 - another transformers than this was written for: run as before
        log.warning("hermes.lean: importing transformers with torch's compiler kept out failed (%s: %s); the "
                    "runtime is not shrunk", type(e).__name__, e)
        sys.meta_path.remove(finder)
        load_dynamo()
        return False
    return True


def is_lazy() -> bool:
    """Whether torch's compiler is still kept out of this process."""
    return isinstance(sys.modules.get(DYNAMO), _LazyDynamo)


def load_dynamo() -> types.ModuleType:
    """The real ``torch._dynamo``, run now if it was kept out."""
    module = sys.modules.get(DYNAMO)
    if isinstance(module, _LazyDynamo):
        with _lock:
            if isinstance(module, _LazyDynamo):
                module.__class__ = types.ModuleType  # from here on a plain module being imported, as usual
                spec = module.__spec__
                spec._initializing = True
                try:
                    spec.loader.exec_module(module)
                finally:
                    spec._initializing = False
                log.debug("torch._dynamo loaded on first use")
        return module
    return importlib.import_module(DYNAMO)


def _deferred(name: str) -> Callable[..., Any]:
    """A decorator of ``torch._dynamo`` that returns the function itself while the compiler is not loaded, and the
    real decorator's result once it is."""
    def decorator(fn: Any = None, *args: Any, **kwargs: Any) -> Any:
        if fn is None:
            return lambda f: decorator(f, *args, **kwargs)
        applied: list[Callable[..., Any]] = []

        @functools.wraps(fn)
        def call(*a: Any, **k: Any) -> Any:
            if is_lazy():
                return fn(*a, **k)
            if not applied:
                applied.append(getattr(load_dynamo(), name)(fn, *args, **kwargs))
            return applied[0](*a, **k)
        return call
    return decorator


def _mark_static_address(t: Any, guard: bool = False) -> None:
    """``torch._dynamo.mark_static_address`` as torch 2.13 writes it (a mark on the tensor for a later compile):
    transformers' continuous batching marks its cache with it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"mark_static_address expects a tensor but received {type(t)}")
    t._dynamo_static_input_type = "guarded" if guard else "unguarded"


class _TraceRules:
    """``torch._dynamo.trace_rules`` while the compiler is out: ``torch.distributed.init_process_group`` clears its
    cache when ``torch._dynamo`` is in ``sys.modules`` (a ring's every device) — nothing is cached before the
    compiler runs, so that is nothing to do; anything else loads the compiler."""

    def clear_lru_cache(self) -> None:
        if not is_lazy():
            load_dynamo().trace_rules.clear_lru_cache()

    def __getattr__(self, name: str) -> Any:
        return getattr(load_dynamo().trace_rules, name)


class _LazyDynamo(types.ModuleType):
    """``torch._dynamo`` before it runs: the names transformers touches at import time, anything else runs it."""

    _cheap: dict[str, Any] = {"disable": _deferred("disable"), "allow_in_graph": _deferred("allow_in_graph"),
                              "assume_constant_result": _deferred("assume_constant_result"),
                              "is_compiling": lambda: False, "mark_static_address": _mark_static_address,
                              "trace_rules": _TraceRules()}

    def __getattr__(self, name: str) -> Any:  # only while this class is the module's: the compiler is out
        if name in _LazyDynamo._cheap:
            return _LazyDynamo._cheap[name]
        return getattr(load_dynamo(), name)


class _Present:
    """A loader for a submodule that running the package already imported: the module as it is."""

    def __init__(self, module: types.ModuleType) -> None:
        self.module, self.spec = module, module.__spec__

    def create_module(self, spec: Any) -> types.ModuleType:
        return self.module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self.spec  # module_from_spec set ours


class _Finder:
    """First in ``sys.meta_path``: a submodule of the kept-out compiler runs the package first, as Python always
    does for a package; one the package imported meanwhile is returned as it is, not run again."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if not name.startswith(DYNAMO + ".") or not is_lazy():
            return None
        load_dynamo()
        present = sys.modules.get(name)
        if present is None:
            return None
        return importlib.util.spec_from_loader(name, _Present(present))

    def invalidate_caches(self) -> None:
        pass


class _TransformGetItemToIndex:
    """masking_utils' vmap context manager, the compiler's own made when first used."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        load_dynamo()
        return importlib.import_module(_TRACE).TransformGetItemToIndex(*args, **kwargs)


def _quiet_transformers() -> None:
    """transformers imported with DTensor and the compiler kept out (the module docstring says what and why)."""
    import transformers.utils
    import transformers.utils.import_utils as import_utils

    def no_distributed() -> bool:
        return False

    original = import_utils.is_torch_distributed_available
    import_utils.is_torch_distributed_available = no_distributed
    transformers.utils.is_torch_distributed_available = no_distributed
    stub = types.ModuleType(_TRACE)
    stub.TransformGetItemToIndex = _TransformGetItemToIndex
    sys.modules[_TRACE] = stub  # found before its package: masking_utils imports it without running the compiler
    try:
        import transformers.masking_utils  # noqa: F401
    except Exception:
        import_utils.is_torch_distributed_available = original
        transformers.utils.is_torch_distributed_available = original
        raise
    finally:
        if sys.modules.get(_TRACE) is stub:
            del sys.modules[_TRACE]


class MetaCat(torch.overrides.TorchFunctionMode):
    """``torch.cat`` of meta tensors answered here, from the shapes: torch's own meta ``cat`` is a Python reference
    that imports its symbolic shapes, and with them sympy (32 MiB). Used where Hermes sizes a cache by filling it
    with meta tensors (:mod:`hermes.kvcache`); the result has ``cat``'s shape and promoted dtype, and anything it
    does not settle (``out=``, mismatched shapes: torch's error) goes to torch as before."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _CATS and "out" not in kwargs:
            tensors = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            shape = _cat_shape(tensors, dim)
            if shape is not None:
                dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
                return torch.empty(shape, dtype=dtype, device="meta")
        return func(*args, **kwargs)


_CATS = (torch.cat, torch.concat, torch.concatenate)


def _cat_shape(tensors: Any, dim: Any) -> list[int] | None:
    """The shape ``torch.cat(tensors, dim)`` returns for meta tensors of matching shapes, else None. (Plain loops:
    a ring device calls this for every remote layer's cache update, every token.)"""
    if type(tensors) not in (list, tuple) or not tensors or type(dim) is not int:
        return None
    shapes = []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not t.is_meta:
            return None
        if t.dim() != 1 or t.shape[0] != 0:  # cat skips 1-D empty tensors
            shapes.append(t.shape)
    if not shapes:
        shapes.append(tensors[0].shape)
    first = shapes[0]
    n = len(first)
    if n == 0 or not -n <= dim < n:
        return None
    d = dim % n
    total = 0
    for shape in shapes:
        if len(shape) != n or shape[:d] != first[:d] or shape[d + 1:] != first[d + 1:]:
            return None
        total += shape[d]
    out = list(first)
    out[d] = total
    return out
