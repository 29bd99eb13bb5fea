"""Blocks and leftover modules: read whole by a loading agent, computed by the module's own forward, around which
two hooks wait for the unit and attach it (pre) and detach and release it (post)."""
from __future__ import annotations

from typing import Any

from hermes.engine.kinds.base import UnitKind


class WholeModule(UnitKind):
    """A module of the model that is one unit (a repeated block, an embedding, a final norm, a head)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._handles: list[Any] = []

    def hook(self) -> None:
        agent = self.engine.inference
        for u in self.units:
            mod = self.engine.model.get_submodule(u.name)
            self._handles.append(mod.register_forward_pre_hook(lambda m, a, i=u.index: agent.before_unit(i)))
            self._handles.append(mod.register_forward_hook(lambda m, a, o, i=u.index: agent.after_unit(i),
                                                           always_call=True))

    def unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def remove(self) -> None:
        self.unhook()
        super().remove()
