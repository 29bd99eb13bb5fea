"""The interface every unit kind implements, and the one seam that replaces a module's forward."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from hermes.units import Unit

if TYPE_CHECKING:  # the engine creates the kinds; at run time nothing here imports it
    from hermes.engine.pipeline import PipeLoadEngine


class UnitKind:
    """How the units of one kind are read, attached, computed and released (one instance per engine and kind).

    Lifecycle: :meth:`install` once (the seams into the model), :meth:`hook` / :meth:`unhook` around the
    all-resident bypass (per-unit hooks cost time on every call), :meth:`remove` to undo :meth:`install`.
    """

    #: False: some unit of this kind is always read during a call, so calls can never bypass the engine
    allows_bypass = True
    #: False: this kind's units are never loaded here (a ring's remote units): the all-resident mode ignores them
    holds_weights = True

    def __init__(self, engine: PipeLoadEngine, units: list[Unit]) -> None:
        self.engine = engine
        self.units = units  # the model's units of this kind
        self._wrapped: list[torch.nn.Module] = []

    def planned(self, index: int) -> bool:
        """Whether loading agents load unit ``index`` whole when a pass's schedule reaches it."""
        return True

    def install(self) -> None:
        """Connect this kind's units to the model (once)."""

    def hook(self) -> None:
        """Per-call hooks of this kind's units (removed while everything is resident)."""

    def unhook(self) -> None:
        """Remove what :meth:`hook` added."""

    def bypass_params(self, unit: Unit) -> list[torch.nn.Parameter] | None:
        """The tensors attached to ``unit`` while everything is resident (None: nothing to attach)."""
        res = self.engine.residency
        return res.loaded[unit.index].params if unit.index in res.loaded else res.alias_params(unit.index)

    def remove(self) -> None:
        """Undo :meth:`install`."""
        for mod in self._wrapped:
            del mod.forward
        self._wrapped.clear()

    def wrap_forward(self, name: str, call: Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]) \
            -> None:
        """Route module ``name``'s forward through ``call(original, args, kwargs)`` — the seam accelerate's
        ``add_hook_to_module`` uses, for units that are parts of one module's weight (no module of their own to
        hook). The original forward is the class's: removing the instance attribute restores it."""
        mod = self.engine.model.get_submodule(name)
        original = mod.forward
        mod.forward = functools.update_wrapper(lambda *a, **kw: call(original, a, kw), original)
        self._wrapped.append(mod)
