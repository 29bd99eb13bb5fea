"""What a model's own source code does with its submodules, read from the methods of its classes: parameters read
by attribute or methods other than the call run on a submodule, and ``forward`` called directly — call paths on
which no hook fires, so that the engine pins or loads those units another way."""
from __future__ import annotations

import functools
import inspect
import re

import torch


def read_by_attribute(model: torch.nn.Module, module_name: str) -> bool:
    """Whether the module's parent reads its parameters directly (``self.rel_embeddings.weight`` in DeBERTa's
    encoder) instead of calling it: such a unit has no forward call to load it at, so it stays pinned."""
    if not module_name:
        return False
    parent_name, _, child = module_name.rpartition(".")
    params = tuple(model.get_submodule(module_name)._parameters)
    if not params:
        return False
    # its parameters read (``self.rel_embeddings.weight``), or a method other than the call run on it
    # (``self.position_embeddings._forward(...)`` in ProphetNet): no hook fires either way
    pattern = re.compile(rf"self\.{re.escape(child)}\.(({'|'.join(map(re.escape, params))})\b|\w+\()")
    return any(pattern.search(src) for src in _method_sources(type(model.get_submodule(parent_name))))


_DIRECT_FORWARD = re.compile(r"([\w\].)]+)\.forward\((\w*)")


def forward_called_directly(model: torch.nn.Module, module_name: str) -> bool:
    """Whether an ancestor of the module calls some module's ``forward`` method itself (``layer.forward(x)`` in
    SqueezeBERT's encoder) rather than calling the module: no hook fires on such a call."""
    parts = module_name.split(".")
    for i in range(len(parts)):
        cls = type(model.get_submodule(".".join(parts[:i])))
        for src in _method_sources(cls):
            for m in _DIRECT_FORWARD.finditer(src):
                if not m.group(1).endswith("super()") and m.group(2) != "self":  # not a class's own forward
                    return True
    return False


@functools.lru_cache(maxsize=256)
def _method_sources(cls: type) -> tuple[str, ...]:
    """Source of the methods a module class defines or inherits, up to torch's own classes (each method's
    source alone: ``inspect.getsource`` of a whole class re-parses its file, 50 ms a class)."""
    out = []
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.") or klass is object:
            break
        for fn in vars(klass).values():
            if inspect.isfunction(fn):
                try:
                    out.append(inspect.getsource(fn))
                except (OSError, TypeError):
                    continue
    return tuple(out)
