"""The all-resident mode (the 'zero-overhead resident path'): once every unit is held for good (resident, pinned
or served by a resident tied unit), nothing streams, so the engine unhooks its units and attaches every weight
once — a call then costs what the plain transformers model costs. Each call is still recorded as a pass that
read nothing. Left by ``reconfigure`` and ``close``."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from hermes.engine.config import PassStats, UnitEvent

if TYPE_CHECKING:  # the engine wires the mode; at run time nothing here imports it
    from hermes.engine.pipeline import PipeLoadEngine


class Bypass:
    """Whether calls bypass the engine now, and the switch in and out."""

    def __init__(self, engine: PipeLoadEngine) -> None:
        self.engine = engine
        self.active = False
        self.allowed = True  # False: keep per-unit hooks and timelines on every pass (per-unit measurements)
        self._t0: dict[str, float] = {}  # entry -> start of its call

    def possible(self) -> bool:
        """Whether every unit is loaded for good: then a call needs none of the engine's per-unit hooks."""
        e, res = self.engine, self.engine.residency
        if not e.installed or not all(k.allows_bypass for k in e.kinds.values()):
            return False
        return all(u.index in res.loaded or res.aliases.get(u.index) in res.loaded for u in e.units
                   if e.kinds[u.kind].holds_weights)

    def enter_if_possible(self) -> None:
        if self.allowed and not self.active and self.possible():
            self.enter()

    def enter(self) -> None:
        """Unhook every unit and attach every weight once."""
        e = self.engine
        for kind in e.kinds.values():
            kind.unhook()
        for u in e.units:
            params = e.kinds[u.kind].bypass_params(u)
            if params is not None:
                e.residency.attach(u.index, params)
        self.active = True

    def exit(self) -> None:
        """Back to streaming: detach what is not held, hook the units again."""
        if not self.active:
            return
        self.active = False
        e = self.engine
        for u in e.units:
            if u.index not in e.residency.loaded:
                e.residency.detach(u.index)
        for kind in e.kinds.values():
            kind.hook()

    def begin(self, entry: str) -> None:
        self._t0[entry] = time.perf_counter()

    def end(self, entry: str, output: Any) -> None:
        """A call made while everything is resident: recorded as a pass that read nothing."""
        e = self.engine
        now = time.perf_counter()
        t0 = self._t0.pop(entry, now)
        if self._t0:  # an entry point inside another call (the encoder inside the model)
            return
        st = PassStats(entry=entry)
        st.latency_s, st.finished_at = now - t0, now
        st.loaders, st.budget_bytes, st.weights_max_bytes = e.config.loaders, e.config.budget_bytes, e.weights_max
        st.weights_peak_bytes = st.weights_held_peak_bytes = e.daemon.allocated
        st.memory = [(0.0, e.daemon.allocated, e.daemon.held)]
        st.events = [UnitEvent(u.index, u.name, u.nbytes) for u in e.units] if output is not None else []
        e.record(st)
