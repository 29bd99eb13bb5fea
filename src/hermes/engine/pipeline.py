"""PipeLoad, the engine as the paper draws it — this module only wires the parts:

- the **loading agents** (``loading_agent.py``) read units ahead of use, in the *predicted* order of the call
  (``schedule.py``: the order observed last time for the same entry point);
- the **inference agent** (``inference_agent.py``) is the caller's thread running the unmodified Hugging Face
  forward: hooks wait for each unit, attach it, and after it computed detach and release it;
- the **daemon** (``daemon.py``) owns weight memory: admission control into the arena, freeing;
- a **pass** (``passes.py``) is one call: its plan, cursor, loaded units, events, stats and cancellation;
- **unit kinds** (``kinds/``) say how each kind of unit is read, attached and computed; ``residency.py`` which
  units stay loaded; ``bypass.py`` the all-resident mode; ``interrupts.py`` Ctrl-C.

Lifecycle of a unit's weights: reserve (daemon) -> load (loading agent) -> attach (inference agent) -> compute
(HF forward) -> detach + release (inference agent, daemon). Agents coordinate with the daemon's condition
variable; every wait of the inference agent ends, within ``wait_timeout`` at most, in progress or in an
:class:`EngineError` naming the units involved.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from hermes.engine.bypass import Bypass
from hermes.engine.config import EngineConfig, PassStats
from hermes.engine.daemon import Daemon
from hermes.engine.inference_agent import InferenceAgent
from hermes.engine.interrupts import Interrupts
from hermes.engine.kinds import KINDS, UnitKind
from hermes.engine.loading_agent import LoadingAgents
from hermes.engine.passes import PassLifecycle
from hermes.engine.reader import Reader
from hermes.engine.residency import Residency
from hermes.engine.schedule import Schedule
from hermes.errors import EngineError
from hermes.share import bound_allocator
from hermes.units import Unit, named_part

#: Longest time (s) the inference agent waits for a unit while no loading agent makes any progress.
WAIT_TIMEOUT_S = float(os.environ.get("HERMES_WAIT_TIMEOUT", "300"))


class PipeLoadEngine:
    """Streams the weights of ``model`` (a skeleton with meta parameters) unit by unit during each call.

    Attach with :meth:`install`; then every call of the model (or of an entry point such as its encoder, as
    ``generate`` does) is one pass of the PipeLoad pipeline.
    """

    def __init__(self, model: torch.nn.Module, units: list[Unit], config: EngineConfig, *,
                 eager_arena: bool = True, layout: Any = None, generation_policy: Any = None,
                 auto_budget: Any = None) -> None:
        bound_allocator()  # freed activations go back to the OS: the budget holds the process (hermes.share)
        self.model = model
        self.units = units
        self.config = config
        self.residency = Residency(model, units)
        self.residency.configure(config)
        # the arena is claimed (allocated and touched) now, or at the first pass: ``generate`` resizes it per call
        self.daemon = Daemon(config.budget_bytes, self.residency.arena_bytes(config.budget_bytes),
                             self.residency.side_bytes, eager=eager_arena)
        self.schedule = Schedule(self._default_order)
        self.lifecycle = PassLifecycle(self)
        self.loading = LoadingAgents(self)
        self.inference = InferenceAgent(self)
        self.bypass = Bypass(self)
        self.interrupts = Interrupts(self._interrupted)
        present = dict.fromkeys(u.kind for u in units)
        self.kinds: dict[str, UnitKind] = {k: KINDS[k](self, [u for u in units if u.kind == k]) for k in present}
        self.entries = self._entry_points()
        self.installed = False
        self.wait_timeout = WAIT_TIMEOUT_S
        self.history: list[PassStats] | None = None  # when a list, every finished pass's stats are appended
        self.layout = layout  # the opened checkpoint (hermes.api.ModelLayout: path, config, store, units)
        self.generation_policy = generation_policy  # how generate splits the budget (hermes.generation)
        self.auto_budget = auto_budget  # what budget="auto" chose (hermes.memory.AutoBudget)
        self.last_generation: Any = None  # GenerationStats of the last generate call (hermes.generation)
        self.stage: Any = None  # this device's stage of a ring (hermes.ring.Stage): set before install
        self.generating = False  # inside a budgeted generate call (it sets aside its own KV cache and activations)
        self.last: PassStats | None = None
        self.passes = 0  # passes recorded
        self.before_read: Any = None  # fault-injection seam (tests, benchmarks): called before a unit's read
        self._side_reader: Reader | None = None  # the inference agent's own reads (experts, embedding rows)
        self._handles: list[Any] = []
        self._grad_modes: list[bool] = []  # the caller's autograd mode at each entry call in progress

    # ---- what the engine holds -----------------------------------------------------------------------------
    @property
    def resident(self) -> set[int]:
        """Indices of the units kept loaded across passes."""
        return self.residency.resident

    @property
    def aliases(self) -> dict[int, int]:
        """Tied units served by a resident unit's tensors: {unit index: resident unit index}."""
        return self.residency.aliases

    @property
    def pinned(self) -> tuple[int, ...]:
        return self.residency.pinned

    @property
    def min_budget(self) -> int:
        """The smallest weight budget that runs this model with this configuration's resident units."""
        return self.residency.min_budget

    @property
    def weights_max(self) -> int:
        """The weights held at most with this configuration: its weight budget, or less when the whole model fits."""
        return self.residency.held_at_most(self.config.budget_bytes)

    @property
    def allow_bypass(self) -> bool:
        """False: keep per-unit hooks and timelines on every pass, even when everything is resident."""
        return self.bypass.allowed

    @allow_bypass.setter
    def allow_bypass(self, value: bool) -> None:
        self.bypass.allowed = value

    def kind_of(self, index: int) -> UnitKind:
        return self.kinds[self.units[index].kind]

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """The daemon's lock, held by the inference agent for bookkeeping that a Ctrl-C must not cut in two."""
        with self.interrupts.deferred(), self.daemon.cond:
            yield

    def side_buffer(self) -> tuple[Any, Reader]:
        """The side buffer and the inference agent's reader (claimed again if the engine was closed meanwhile or
        no pass has run yet)."""
        if self.daemon.side_buffer is None:
            with self.critical():
                self.daemon.open()
        if self._side_reader is None:
            self._side_reader = Reader(self.config.io == "direct")
        assert self.daemon.side_buffer is not None
        return self.daemon.side_buffer, self._side_reader

    def record(self, stats: PassStats) -> None:
        """A finished pass's measurements."""
        self.last = stats
        self.passes += 1
        if self.history is not None:
            self.history.append(stats)

    # ---- configuration -----------------------------------------------------------------------------------
    def reconfigure(self, config: EngineConfig) -> None:
        """Change loaders / prefetch / io / budget / resident units between passes.

        Units that stop being resident are freed now; new resident units are loaded by the next pass. The arena
        is kept when its size is unchanged (no page faults are paid again).
        """
        p = self.lifecycle.current
        if p is not None:
            if not self.lifecycle.left(p):
                raise EngineError("cannot reconfigure during a forward pass")
            p.aborted = True  # a pass its call left by an exception (Ctrl-C): finished now, not at the next call
            self.lifecycle.finish(p)
        self.bypass.exit()
        self.lifecycle.drop_next()
        with self.interrupts.deferred():  # all of it or none: a Ctrl-C is delivered when the engine is consistent
            self.residency.configure(config)  # raises before anything changes
            with self.critical():
                for loaded in self.residency.dropped():
                    self.daemon.give_back(loaded.buffer)
            self.config = config
            arena = self.residency.arena_bytes(config.budget_bytes)
            if arena != self.daemon.arena_bytes:
                self.daemon.trim()
                self.daemon.arena_bytes = arena
            self.daemon.budget = config.budget_bytes
            self.daemon.open()

    def continuous(self) -> contextlib.AbstractContextManager[None]:
        """Run a sequence of calls (e.g. the tokens of ``generate``) as one pipeline: once a pass has handed out
        its last unit, loading agents start on the next call's predicted units while the current pass computes
        and while the caller prepares the next call. The prefetched pass is dropped on exit."""
        return self.lifecycle.continuous()

    # ---- schedule ----------------------------------------------------------------------------------------
    def _entry_points(self) -> dict[str, torch.nn.Module]:
        """Modules whose call is a pass: the model, and its encoder (``generate`` calls it on its own)."""
        entries = {"": self.model}
        enc, name = named_part(self.model, "get_encoder")
        if enc is not None and name:
            entries[name] = enc
        return entries

    def _default_order(self, entry: str) -> list[int]:
        """First guess of a call's order: the entry's units in registration order."""
        if entry.startswith("unit:"):
            return [u.index for u in self.units if u.name == entry[5:]]
        whole = [u for u in self.units if u.called or (u.kind == "gather" and u.index in self.resident)]
        return [u.index for u in whole if not entry or u.module == entry or u.name.startswith(entry + ".")]

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def install(self) -> None:
        """Connect the engine to the model (idempotent): entry-point hooks begin and end passes, each unit kind
        adds its seams."""
        if self.installed:
            return
        for name, mod in self.entries.items():
            self._handles.append(mod.register_forward_pre_hook(
                lambda m, a, kw, n=name: self._begin_call(n, a, kw), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(
                lambda m, a, o, n=name: self._end_call(n, o), always_call=True))
        for kind in self.kinds.values():
            kind.install()
            kind.hook()
        self.installed = True

    def _begin_call(self, entry: str, args: Any, kwargs: dict[str, Any]) -> None:
        # A streamed call runs without autograd, whatever the caller's mode: a graph would keep every layer's
        # input (beyond the budget) and views of buffers that the next units overwrite.
        self._grad_modes.append(torch.is_grad_enabled())
        torch.set_grad_enabled(False)
        if self.bypass.active:
            self.bypass.begin(entry)
        else:
            self.lifecycle.begin_call(entry, args, kwargs)

    def _end_call(self, entry: str, output: Any) -> None:
        try:
            if self.bypass.active:
                self.bypass.end(entry, output)
            else:
                self.lifecycle.end_call(entry, output)
        finally:
            if self._grad_modes:
                torch.set_grad_enabled(self._grad_modes.pop())

    def _interrupted(self) -> None:
        """Ctrl-C during a pass: its loading agents stop now (its buffers are freed when the call unwinds or
        the next call begins)."""
        with self.daemon.cond:  # inside the handler: a second Ctrl-C meanwhile is deferred
            p = self.lifecycle.current
            if p is not None:
                p.cancelled = p.aborted = p.interrupted = True
            self.daemon.cond.notify_all()

    def remove(self) -> None:
        """Remove the hooks and free every buffer (the model can no longer run)."""
        self.close()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for kind in self.kinds.values():
            kind.remove()
        self.installed = False

    def close(self) -> None:
        """End any pass in progress and free every buffer, resident ones included."""
        self.bypass.exit()
        if self.lifecycle.current is not None:
            self.lifecycle.finish(self.lifecycle.current)
        self.lifecycle.drop_next()
        with self.critical():
            for i, loaded in list(self.residency.loaded.items()):
                self.residency.detach(i)
                self.daemon.give_back(loaded.buffer)
            self.residency.loaded.clear()
            self.daemon.trim()
        if self._side_reader is not None:
            self._side_reader.close()
            self._side_reader = None
