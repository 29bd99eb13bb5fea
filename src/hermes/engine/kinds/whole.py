"""Blocks and leftover modules: read whole by a loading agent, computed by the module's own forward, around which
two hooks wait for the unit and attach it (pre) and detach and release it (post)."""
from __future__ import annotations

import functools
from typing import Any

import torch

from hermes.engine.kinds.base import UnitKind
from hermes.units import forward_called_directly


class WholeModule(UnitKind):
    """A module of the model that is one unit (a repeated block, an embedding, a final norm, a head)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handles: list[Any] = []
        self._routed: list[torch.nn.Module] = []  # modules whose direct forward calls are routed through the hooks

    def hook(self) -> None:
        agent = self.engine.inference
        model = self.engine.model
        for u in self.units:
            mod = model.get_submodule(u.name)
            if forward_called_directly(model, u.name):
                self._route_direct_calls(mod)
            self._handles.append(mod.register_forward_pre_hook(lambda m, a, i=u.index: agent.before_unit(i)))
            self._handles.append(mod.register_forward_hook(lambda m, a, o, i=u.index: agent.after_unit(i),
                                                           always_call=True))

    def _route_direct_calls(self, mod: torch.nn.Module) -> None:
        """Make ``mod.forward(x)`` (a parent calling the method itself) go through ``mod(x)``, so that the unit's
        hooks fire; inside that call (hooks done) the class's forward runs."""
        cls_forward = type(mod).forward
        inside = [0]

        @functools.wraps(cls_forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            if inside[0]:
                return cls_forward(mod, *args, **kwargs)
            return type(mod).__call__(mod, *args, **kwargs)

        def enter(m: Any, a: Any) -> None:
            inside[0] += 1

        def leave(m: Any, a: Any, o: Any) -> None:
            inside[0] -= 1

        self._handles.append(mod.register_forward_pre_hook(enter, prepend=True))
        self._handles.append(mod.register_forward_hook(leave, always_call=True))
        mod.forward = forward
        self._routed.append(mod)

    def unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for mod in self._routed:
            del mod.forward  # the class's forward again
        self._routed.clear()

    def remove(self) -> None:
        self.unhook()
        super().remove()
