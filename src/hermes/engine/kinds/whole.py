"""Blocks and leftover modules: read whole by a loading agent, computed by the module's own forward, around which
two hooks wait for the unit and attach it (pre) and detach and release it (post)."""
from __future__ import annotations

from typing import Any

from hermes.engine.kinds.base import UnitKind
from hermes.sources import forward_called_directly


class WholeModule(UnitKind):
    """A module of the model that is one unit (a repeated block, an embedding, a final norm, a head)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handles: list[Any] = []  # per-call hooks (removed while everything is resident)
        self._counters: list[Any] = []  # the routing's own hooks: installed for good, as the routing is

    def install(self) -> None:
        model = self.engine.model
        for u in self.units:
            if forward_called_directly(model, u.name):
                self._route_direct_calls(u.name)

    def hook(self) -> None:
        agent = self.engine.inference
        for u in self.units:
            mod = self.engine.model.get_submodule(u.name)
            self._handles.append(mod.register_forward_pre_hook(lambda m, a, i=u.index: agent.before_unit(i)))
            self._handles.append(mod.register_forward_hook(lambda m, a, o, i=u.index: agent.after_unit(i),
                                                           always_call=True))

    def _route_direct_calls(self, name: str) -> None:
        """Make ``mod.forward(x)`` (a parent calling the method itself) go through ``mod(x)``, so that the unit's
        hooks fire; inside that call (hooks done) the class's forward runs."""
        mod = self.engine.model.get_submodule(name)
        inside = [0]

        def enter(m: Any, a: Any) -> None:
            inside[0] += 1

        def leave(m: Any, a: Any, o: Any) -> None:
            inside[0] -= 1

        self._counters.append(mod.register_forward_pre_hook(enter, prepend=True))
        self._counters.append(mod.register_forward_hook(leave, always_call=True))
        self.wrap_forward(name, lambda original, a, kw: original(*a, **kw) if inside[0]
                          else type(mod).__call__(mod, *a, **kw))

    def unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def remove(self) -> None:
        self.unhook()
        for h in self._counters:
            h.remove()
        self._counters.clear()
        super().remove()
