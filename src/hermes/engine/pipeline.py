"""PipeLoad: loading agents read units ahead of use, the inference agent (the caller's thread running the
unmodified Hugging Face forward) computes them as the forward asks for them, and the daemon does admission
control, keeps the queue of loaded units, frees each unit once computed and records a timeline.

Lifecycle of a unit's weights: reserve (daemon) -> load (loading agent) -> attach (pre-hook) -> compute
(HF forward) -> detach + release (post-hook). The loading agents follow the *predicted* order of the call
(``schedule.py``: the order observed last time for the same entry point); the forward may ask for units in
any order, skip units or run one several times: a unit ahead in the prediction skips the ones before it, a
unit not predicted is loaded on demand and the prediction resumes from it. Agents coordinate with one
condition variable; every wait of the inference agent ends, within ``wait_timeout`` at most, in progress or in
an :class:`EngineError` naming the units involved.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from hermes.engine.arena import Buf, Daemon
from hermes.engine.budget import ceil_mib, gather_layout, minimum_budget, side_room, tied_aliases
from hermes.engine.config import EngineConfig, PassStats, UnitEvent
from hermes.engine.reader import Reader, views
from hermes.engine.schedule import Schedule, entry_key
from hermes.errors import BudgetError, EngineError, HermesError, InputError, LoadError
from hermes.memory import format_bytes
from hermes.units import GATHER_ROWS, Unit, base_key, named_part

log = logging.getLogger(__name__)

#: Longest time (s) the inference agent waits for a unit while no loading agent makes any progress.
WAIT_TIMEOUT_S = float(os.environ.get("HERMES_WAIT_TIMEOUT", "300"))


class _Cancelled(Exception):
    pass


def _per_sequence(linear: Any, *args: Any, **kwargs: Any) -> Any:
    """An LM head's ``nn.Linear`` forward, one sequence at a time when its input is 3-D: transformers hands the head
    a slice of the hidden states (``hidden[:, -1:, :]``) whose batch stride cannot be folded into one matmul, and
    torch then materializes a copy of the whole weight for a batched matmul (116 MiB for one bf16 chunk of
    Llama-3.2-1B's head, 501 MiB for all of it: outside any budget). Per sequence the result is bit-identical
    to that batched matmul (checked for float32 and bfloat16, batch 1-4) and nothing is copied. A foldable
    (contiguous) input goes to the head as it is: torch folds it into one matmul without a copy."""
    x = args[0] if args else kwargs.pop("input")
    rest = args[1:]
    if isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[0] > 0 and x.stride(0) != x.shape[1] * x.shape[2]:
        return torch.stack([linear(x[b], *rest, **kwargs) for b in range(x.shape[0])])
    return linear(x, *rest, **kwargs)


class _Skip(Exception):
    pass


@dataclass
class _Loaded:
    unit: Unit
    buffer: Buf
    params: list[torch.nn.Parameter]


class _Pass:
    """State of one pass (one call of an entry point), guarded by the daemon's condition."""

    def __init__(self, key: str, entry: str, plan: list[int], owner: threading.Thread | None, t0: float,
                 after: _Pass | None = None) -> None:
        self.key = key  # entry_key of the call (what the schedule is recorded under)
        self.entry = entry  # "" (the model), a submodule name ("encoder"), or "unit:NAME" (a unit called directly)
        self.plan = plan  # unit indices the loading agents load, in predicted order; only ever appended to
        self.owner = owner  # the inference agent's thread (None: prefetched for the next call, not begun yet)
        self.t0 = t0
        self.after = after  # the pass this one continues (cross-pass prefetch): it admits after all of its units
        self.successor: _Pass | None = None
        self.implicit: int | None = None  # a pass begun by calling this unit directly: it ends with that unit
        self.aborted = False  # ended by an error or an interrupt: its successor must not run
        self.cancelled = False
        self.next_claim = 0  # next plan position a loading agent claims
        self.waiting: list[int] = []  # claimed positions waiting for admission, ascending
        self.loading: set[int] = set()  # admitted positions being read
        self.dropped: set[int] = set()  # positions the forward passed over: released as soon as they are loaded
        self.ready: dict[int, _Loaded] = {}
        self.cursor = 0  # plan position of the unit the forward is expected to ask for next
        self.trace: list[int] = []  # unit indices in the order the forward asked for them
        self.agents = 0  # loading agents still running
        self.error: BaseException | None = None  # first failure of a loading agent
        self.error_surfaced = False  # already raised in the inference agent
        self.threads: list[threading.Thread] = []
        self.stats = PassStats(entry=entry)
        self.events: dict[int, UnitEvent] = {}

    @property
    def held(self) -> int:
        """Units of this pass admitted and not yet handed to the forward."""
        return len(self.loading) + len(self.ready)


class PipeLoadEngine:
    """Streams the weights of ``model`` (a skeleton with meta parameters) unit by unit during each call.

    Attach with :meth:`install`; then every call of the model (or of an entry point such as its encoder, as
    ``generate`` does) is one pass of the PipeLoad pipeline.
    """

    def __init__(self, model: torch.nn.Module, units: list[Unit], config: EngineConfig, *,
                 eager_arena: bool = True) -> None:
        self.model = model
        self.units = units
        self.config = config
        self.pinned = tuple(u.index for u in units if u.kind == "pinned")
        self.side_bytes = side_room(units)
        self.aliases, self.resident, self.min_budget = self._residency(config)
        # the arena is claimed (allocated and touched) now, or at the first pass: ``generate`` resizes it per call
        self.daemon = Daemon(config.budget_bytes, self._arena_bytes(config), self.side_bytes, eager=eager_arena)
        self._modules = {u.index: model.get_submodule(u.name) for u in units if u.kind in ("block", "leftover")}
        self._side_reader: Reader | None = None  # the inference agent's own reads (experts, embedding rows)
        self._wrapped: list[torch.nn.Module] = []  # modules whose forward Hermes replaced (gathers, head)
        self._meta: dict[int, list[torch.Tensor]] = {
            u.index: [model.get_submodule(s.module)._parameters[s.attr] for s in u.slots] for u in units}
        self.schedule = Schedule(self._default_order)
        self.entries = self._entry_points()
        self._resident_loaded: dict[int, _Loaded] = {}
        self._attached: dict[int, _Loaded] = {}  # unit index -> loaded, computing now
        self._pass: _Pass | None = None
        self._next: _Pass | None = None  # the next pass, already loading (inside a session)
        self._session = 0  # > 0 inside continuous(): loading agents run across pass boundaries
        self._previous_key: str | None = None  # key of the last pass of this session (to learn what follows)
        self._progress = 0  # reads finished, ever (the inference agent's watchdog)
        self.wait_timeout = WAIT_TIMEOUT_S
        self.history: list[PassStats] | None = None  # when a list, every finished pass's stats are appended
        self.last_generation: Any = None  # GenerationStats of the last generate call (hermes.generation)
        self.auto_budget: Any = None  # what budget="auto" chose (hermes.memory.AutoBudget), set by hermes.load
        self._handles: list[Any] = []
        self._unit_handles: list[Any] = []
        self._bypass = False  # every unit resident and attached: calls skip the engine (see _enter_bypass)
        self.allow_bypass = True  # False: keep per-unit hooks and timelines on every pass (per-unit measurements)
        self._bypass_t0: dict[str, float] = {}
        self.last: PassStats | None = None
        self.passes = 0
        # Fault-injection seam for tests and benchmarks: called by a loading agent before it reads a unit.
        self.before_read: Any = None

    # ---- configuration -----------------------------------------------------------------------------------
    def _residency(self, config: EngineConfig) -> tuple[dict[int, int], set[int], int]:
        """(tied aliases, resident unit indices, minimum budget) of ``config``, checked against this model.

        Pinned units (parameters held directly by the model or by a container of blocks, such as CLIP's
        ``logit_scale``) are always resident.

        Raises:
            HermesError: a resident name is not a unit. BudgetError: the budget is below the minimum.
        """
        units = self.units
        names = {u.name for u in units}
        unknown = [r for r in config.resident if r not in names]
        if unknown:
            raise HermesError(f"resident units {unknown} are not units of this model; units are {sorted(names)}")
        wanted = tuple(config.resident) + tuple(units[i].name for i in self.pinned)
        aliases = tied_aliases(units, wanted)
        resident = {u.index for u in units if u.name in wanted and u.index not in aliases}
        minimum = minimum_budget(units, wanted)
        if config.budget_bytes < minimum:
            largest = max((u for u in units if u.index not in resident and u.called), key=lambda u: u.buffer_bytes,
                          default=units[0])
            raise BudgetError(
                f"budget {format_bytes(config.budget_bytes)} is below the minimum {format_bytes(minimum)} "
                f"for this model (largest unit {largest.name!r} = {format_bytes(largest.buffer_bytes)}"
                + (f", plus {len(resident)} resident unit(s)" if resident else "")
                + (f", plus {format_bytes(self.side_bytes)} to read embedding rows / experts into"
                   if self.side_bytes else "")
                + f"); use a budget of at least {minimum} bytes (--budget {ceil_mib(minimum)}MiB)")
        return aliases, resident, minimum

    def _arena_bytes(self, config: EngineConfig) -> int:
        resident = sum(u.buffer_bytes for u in self.units if u.index in self.resident)
        streamed = sum(u.buffer_bytes for u in self.units
                       if u.index not in self.resident and u.index not in self.aliases and u.called)
        return min(config.budget_bytes - resident - self.side_bytes, streamed)

    def reconfigure(self, config: EngineConfig) -> None:
        """Change loaders / prefetch / io / budget / resident units between passes.

        Units that stop being resident are freed now; new resident units are loaded by the next pass. The arena
        is kept when its size is unchanged (no page faults are paid again).
        """
        if self._pass is not None:
            raise EngineError("cannot reconfigure during a forward pass")
        self._exit_bypass()
        self._drop_next()
        aliases, resident, minimum = self._residency(config)
        with self.daemon.cond:
            for i in [i for i in self._resident_loaded if i not in resident]:
                self._detach(i)
                self.daemon.give_back(self._resident_loaded.pop(i).buffer)
        self.config, self.resident, self.aliases, self.min_budget = config, resident, aliases, minimum
        arena = self._arena_bytes(config)
        if arena != self.daemon.arena_bytes:
            self.daemon.trim()
            self.daemon.arena_bytes = arena
        self.daemon.budget = config.budget_bytes
        self.daemon.open()

    @contextlib.contextmanager
    def continuous(self) -> Iterator[None]:
        """Run a sequence of calls (e.g. the tokens of ``generate``) as one pipeline: once a pass has handed out
        its last unit, loading agents start on the next call's predicted units while the current pass computes
        and while the caller prepares the next call. The prefetched pass is dropped on exit."""
        self._session += 1
        try:
            yield
        finally:
            self._session -= 1
            if not self._session:
                self._drop_next()
                self._previous_key = None

    def _drop_next(self) -> None:
        with self.daemon.cond:
            nxt, self._next = self._next, None
        if nxt is not None:
            self._finish(nxt, record=False)

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
        return [u.index for u in self.units if (u.called or self._gathers_whole(u.index)) and
                (not entry or u.module == entry or u.name.startswith(entry + "."))]

    def _gathers_whole(self, index: int) -> bool:
        """A token embedding kept resident: loaded whole (and called like a leftover) instead of row gathers."""
        return self.units[index].kind == "gather" and index in self.resident

    def _plan(self, order: list[int], *, after: _Pass | None = None) -> list[int]:
        """What to load for a predicted order: pinned units first, resident units once, nothing resident
        already loaded (or, for a pass prefetched behind ``after``, loaded by it) and no tied alias."""
        out: list[int] = []
        for i in (*self.pinned, *order):
            if i in self.aliases or i in self._resident_loaded or \
                    (self.units[i].kind == "gather" and i not in self.resident):
                continue
            if i in self.resident and (after is not None or i in out):
                continue
            out.append(i)
        return out

    # ---- hooks -------------------------------------------------------------------------------------------
    def install(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for name, mod in self.entries.items():
            self._handles.append(mod.register_forward_pre_hook(
                lambda m, a, kw, n=name: self._begin_call(n, a, kw), with_kwargs=True))
            self._handles.append(mod.register_forward_hook(
                lambda m, a, o, n=name: self._end_call(n, o), always_call=True))
        self._hook_units()
        self._install_experts()
        self._install_rows()

    def _hook_units(self) -> None:
        for i, mod in self._modules.items():
            self._unit_handles.append(mod.register_forward_pre_hook(lambda m, a, i=i: self._before_unit(i)))
            self._unit_handles.append(mod.register_forward_hook(lambda m, a, o, i=i: self._after_unit(i),
                                                                always_call=True))

    # ---- everything resident: no per-unit work -----------------------------------------------------------
    def _can_bypass(self) -> bool:
        """Whether every unit is loaded for good (resident, pinned or served by a resident tied unit): then
        nothing streams and a call needs none of the engine's per-unit hooks."""
        if not self._unit_handles or any(u.kind == "expert" for u in self.units):
            return False
        return all(u.index in self._resident_loaded or self.aliases.get(u.index) in self._resident_loaded
                   for u in self.units)

    def _enter_bypass(self) -> None:
        """Unhook every unit and attach every weight once: a call then costs what the plain transformers model
        costs (the 'zero-overhead resident path'). Left by :meth:`reconfigure` and :meth:`close`."""
        for h in self._unit_handles:
            h.remove()
        self._unit_handles.clear()
        for u in self.units:
            if u.index in self._resident_loaded:
                self._attach(u.index, self._resident_loaded[u.index].params)
            elif u.kind != "chunk":  # a chunk is computed by the head's forward, from its tied source
                self._attach(u.index, self._alias_params(u.index))
        self._bypass = True

    def _exit_bypass(self) -> None:
        if not self._bypass:
            return
        self._bypass = False
        for u in self.units:
            if u.index not in self._resident_loaded:
                self._detach(u.index)
        self._hook_units()

    def _source_params(self, index: int) -> list[torch.nn.Parameter]:
        """The whole tensors tied unit ``index`` reads, from its loaded resident source (for a head chunk: the
        whole head's weight)."""
        src = self._resident_loaded[self.aliases[index]]
        by_key = {s.key: prm for s, prm in zip(src.unit.slots, src.params, strict=True)}
        return [by_key[base_key(s.key)] for s in self.units[index].slots]

    def _alias_params(self, index: int) -> list[torch.nn.Parameter]:
        """The parameters of tied unit ``index`` from its resident source (a head chunk: its rows of it)."""
        params, rows = self._source_params(index), self.units[index].rows
        if rows is not None:
            params = [torch.nn.Parameter(t[rows[0]: rows[1]], requires_grad=False) for t in params]
        return params

    def _bypassed_call(self, entry: str, output: Any) -> None:
        """A call made while everything is resident: recorded as a pass that read nothing."""
        now = time.perf_counter()
        t0 = self._bypass_t0.pop(entry, now)
        if self._bypass_t0:  # an entry point inside another call (the encoder inside the model)
            return
        st = PassStats(entry=entry)
        st.latency_s, st.finished_at = now - t0, now
        st.loaders, st.budget_bytes = self.config.loaders, self.config.budget_bytes
        st.weights_peak_bytes = st.weights_held_peak_bytes = self.daemon.allocated
        st.memory = [(0.0, self.daemon.allocated, self.daemon.held)]
        st.events = [UnitEvent(u.index, u.name, u.nbytes) for u in self.units] if output is not None else []
        self.last = st
        self.passes += 1
        if self.history is not None:
            self.history.append(st)

    def _install_rows(self) -> None:
        """Replace the forward of a gathered token embedding and of a chunked LM head (their units are parts of
        one module's weight: no module of their own to hook)."""
        chunks: dict[str, list[int]] = {}
        for u in self.units:
            if u.kind == "chunk":
                chunks.setdefault(u.module, []).append(u.index)
            elif u.kind == "gather":
                self._wrap(u.name, lambda orig, a, kw, i=u.index: self._gather_forward(i, orig, a, kw))
        for name, indices in chunks.items():
            self._wrap(name, lambda orig, a, kw, c=tuple(indices): self._head_forward(c, orig, a, kw))

    def _wrap(self, name: str, call: Any) -> None:
        mod = self.model.get_submodule(name)
        orig = mod.forward
        mod.forward = lambda *a, **kw: call(orig, a, kw)
        self._wrapped.append(mod)

    def _gather_forward(self, index: int, orig: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The token embedding's forward: reads only the rows of the ids it embeds into the side buffer and runs
        the module's own forward on them (with the ids renumbered), GATHER_ROWS distinct ids at a time."""
        if self._bypass:  # resident and attached
            return orig(*args, **kwargs)
        if self._gathers_whole(index):
            self._before_unit(index)
            try:
                return orig(*args, **kwargs)
            finally:
                self._after_unit(index)
        unit = self.units[index]
        mod = self.model.get_submodule(unit.name)
        if args:
            ids, rest, kw = args[0], args[1:], kwargs
        else:
            first = next(iter(kwargs))
            ids, rest, kw = kwargs[first], (), {k: v for k, v in kwargs.items() if k != first}
        flat = ids.reshape(-1)
        uniq, inv = torch.unique(flat, sorted=True, return_inverse=True)
        rows = unit.slots[0].shape[0]
        if uniq.numel() and (int(uniq[0]) < 0 or int(uniq[-1]) >= rows):
            raise InputError(f"token id {int(uniq[-1]) if int(uniq[-1]) >= rows else int(uniq[0])} is outside "
                             f"the vocabulary of {unit.name!r} ({rows} rows, ids 0..{rows - 1})")
        padding, mod.padding_idx = mod.padding_idx, None  # only used by backward; renumbered ids would not match
        try:
            if uniq.numel() <= GATHER_ROWS:
                self._attach(index, [self._read_rows(unit, uniq.tolist())])
                return orig(inv.view(ids.shape), *rest, **kw)
            out = None
            for a in range(0, uniq.numel(), GATHER_ROWS):
                sel = (inv >= a) & (inv < a + GATHER_ROWS)
                self._attach(index, [self._read_rows(unit, uniq[a: a + GATHER_ROWS].tolist())])
                piece = orig(inv[sel] - a, *rest, **kw)
                if out is None:
                    out = piece.new_empty((flat.numel(), *piece.shape[1:]))
                out[sel] = piece
            assert out is not None
            return out.view(*ids.shape, *out.shape[1:])
        finally:
            mod.padding_idx = padding
            self._detach(index)

    def _side_buffer(self) -> Any:
        """The side buffer (and the inference agent's reader), claimed again if the engine was closed meanwhile
        or no pass has run yet."""
        if self.daemon.side_buffer is None:
            with self.daemon.cond:
                self.daemon.open()
        if self._side_reader is None:
            self._side_reader = Reader(self.config.io == "direct")
        assert self.daemon.side_buffer is not None
        return self.daemon.side_buffer

    def _read_rows(self, unit: Unit, ids: list[int]) -> torch.nn.Parameter:
        """Rows ``ids`` (ascending) of a gathered embedding, read into the side buffer."""
        slot, seg = unit.slots[0], unit.segments[0]
        row = slot.nbytes // slot.shape[0]
        buffer = self._side_buffer()
        room, bounce = gather_layout(unit)
        t0 = time.perf_counter()
        assert self._side_reader is not None
        with memoryview(buffer) as mv:
            self._side_reader.read_rows(seg.path, seg.start + slot.offset - seg.buf_offset, row, ids,
                                        mv[: len(ids) * row], mv[room: room + bounce])
        p = self._pass
        if p is not None and p.owner is threading.current_thread():
            p.stats.bytes_read += len(ids) * row
            p.stats.stall_s += time.perf_counter() - t0
        t = torch.frombuffer(buffer, dtype=slot.dtype, count=len(ids) * row // slot.dtype.itemsize) if ids else \
            torch.empty(0, dtype=slot.dtype)
        return torch.nn.Parameter(t.view(len(ids), *slot.shape[1:]), requires_grad=False)

    def _head_forward(self, chunks: tuple[int, ...], orig: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The LM head's forward, one vocabulary chunk at a time (each a unit streamed like a block), the logits
        concatenated; one matmul over the whole vocabulary when its weight is a resident tied embedding."""
        orig = functools.partial(_per_sequence, orig)
        p = self._pass
        source = self.aliases.get(chunks[0])
        tied = source is not None and all(self.aliases.get(i) == source for i in chunks)
        if self._bypass:  # everything resident: the tied weight, or each resident chunk in turn
            if tied:
                self._attach(chunks[0], self._source_params(chunks[0]))
                return orig(*args, **kwargs)
            outs = []
            for i in chunks:
                self._attach(i, self._resident_loaded[i].params if i in self._resident_loaded
                             else self._alias_params(i))
                outs.append(orig(*args, **kwargs))
            return torch.cat(outs, dim=-1)
        if tied and p is not None and p.owner is threading.current_thread():
            if source not in self._resident_loaded:
                self._take(p, source)
            self._attach(chunks[0], self._source_params(chunks[0]))
            ev = p.events[chunks[0]]  # the one matmul's time, on the first chunk (the others take none)
            ev.compute_start = time.perf_counter() - p.t0
            try:
                return orig(*args, **kwargs)
            finally:
                ev.compute_end = time.perf_counter() - p.t0
                self._detach(chunks[0])
        outs = []
        for i in chunks:
            self._before_unit(i)
            try:
                outs.append(orig(*args, **kwargs))
            finally:
                self._after_unit(i)
        return torch.cat(outs, dim=-1)

    def _install_experts(self) -> None:
        """Route mixture-of-experts modules through the streamed experts forward (``experts.py``)."""
        by_module: dict[str, dict[int, int]] = {}
        for u in self.units:
            if u.kind == "expert":
                module, _, e = u.name.rpartition("#")
                by_module.setdefault(module, {})[int(e)] = u.index
        if not by_module:
            return
        from hermes.engine.experts import IMPLEMENTATION, register

        register()
        for module, experts in by_module.items():
            mod = self.model.get_submodule(module)
            mod._hermes_engine, mod._hermes_experts = self, experts
            mod.config._experts_implementation = IMPLEMENTATION

    def read_expert(self, index: int) -> dict[str, torch.Tensor]:
        """Read expert unit ``index`` into the expert buffer (in the calling thread, inside its layer's forward)
        and return its tensors by parameter name; they are valid until the next ``read_expert``."""
        p = self._pass
        if p is None:
            raise EngineError("a mixture-of-experts layer ran outside a forward of the streamed model; call the "
                              "model object returned by hermes.load")
        unit = self.units[index]
        buffer = self._side_buffer()
        ev = p.events[index]
        t0 = time.perf_counter()
        ev.load_start = t0 - p.t0
        buf = Buf(buffer, 0, unit.buffer_bytes, False)
        assert self._side_reader is not None
        self._side_reader.read(unit, buf)
        tensors = {s.attr: prm for s, prm in zip(unit.slots, views(unit, buf), strict=True)}
        ev.load_end = ev.compute_start = time.perf_counter() - p.t0
        p.stats.stall_s += time.perf_counter() - t0
        p.stats.bytes_read += unit.nbytes
        p.stats.units_loaded += 1
        p.stats.experts_read += 1
        return tensors

    def remove(self) -> None:
        """Remove the hooks and free every buffer (the model can no longer run)."""
        self.close()
        for h in (*self._handles, *self._unit_handles):
            h.remove()
        self._handles.clear()
        self._unit_handles.clear()
        for mod in self._wrapped:
            del mod.forward
        self._wrapped.clear()

    def close(self) -> None:
        """End any pass in progress and free every buffer, resident ones included."""
        self._exit_bypass()
        if self._pass is not None:
            self._finish(self._pass)
        self._drop_next()
        with self.daemon.cond:
            for i, loaded in list(self._resident_loaded.items()):
                self._detach(i)
                self.daemon.give_back(loaded.buffer)
            self._resident_loaded.clear()
        self.daemon.trim()
        if self._side_reader is not None:
            self._side_reader.close()
            self._side_reader = None

    # ---- pass lifecycle ----------------------------------------------------------------------------------
    def _begin_call(self, entry: str, args: Any, kwargs: dict[str, Any]) -> None:
        if self._bypass:
            self._bypass_t0[entry] = time.perf_counter()
            return
        p = self._pass
        if p is not None and p.owner is threading.current_thread() and p.implicit is None and not p.cancelled \
                and entry != p.entry and (p.entry == "" or entry.startswith(p.entry + ".")):
            return  # an entry point called inside the running pass (the model's forward calling its encoder)
        self._begin(entry, entry_key(entry, args, kwargs))

    def _end_call(self, entry: str, output: Any) -> None:
        if self._bypass:
            self._bypassed_call(entry, output)
            return
        p = self._pass
        if p is None or p.owner is not threading.current_thread() or p.entry != entry:
            return  # nested entry point, or a second thread refused by _begin: not its pass to end
        if output is None:  # the forward raised (torch calls always_call hooks without a result)
            p.aborted = True
        self._finish(p)
        if p.error is not None and not p.error_surfaced:
            raise LoadError(f"a loading agent failed: {p.error}") from p.error

    def _begin(self, entry: str, key: str, implicit: int | None = None) -> None:
        me = threading.current_thread()
        with self.daemon.cond:
            stale = self._pass
            if stale is not None and stale.owner is not me and stale.owner.is_alive():
                raise EngineError("this streamed model is already running a forward pass in another thread; "
                                  "a Hermes model serves one call at a time — serialize calls with a lock "
                                  "or load one model per thread")
        if stale is not None:  # a previous pass on this thread was interrupted (e.g. Ctrl-C inside torch code)
            stale.aborted = True
            self._finish(stale)
        with self.daemon.cond:
            p = self._next if self._session else None
            self._next = None
            if p is not None and not (p.cancelled or p.error is not None):
                # prefetched during the previous call: make its times relative to this call
                shift = time.perf_counter() - p.t0
                p.t0 += shift
                for ev in p.events.values():
                    for f in ("reserve", "load_start", "load_end", "free"):
                        if getattr(ev, f) is not None:
                            setattr(ev, f, getattr(ev, f) - shift)
                p.stats.memory = [(t - shift, a, h) for t, a, h in p.stats.memory]
            elif p is None:
                self.daemon.open()
                p = self._new_pass(me, key, entry)
            p.owner, p.key, p.entry, p.implicit = me, key, entry, implicit
            p.stats.entry = entry
            self.daemon.peak, self.daemon.held_peak = self.daemon.allocated, self.daemon.held
            self._pass = p
            self._sample(p)
            if not p.threads:
                self._ensure_agents(p)
            elif p.agents == 0 and p.next_claim >= len(p.plan):  # its agents finished before it began
                self._prefetch_next(p)
        for i in self.pinned:  # always attached; loaded by the first pass
            if i not in self._resident_loaded:
                self._take(p, i)

    def _new_pass(self, owner: threading.Thread | None, key: str, entry: str, after: _Pass | None = None) -> _Pass:
        p = _Pass(key, entry, self._plan(self.schedule.predict(key, entry), after=after), owner,
                  time.perf_counter(), after)
        p.stats.loaders = self.config.loaders
        p.stats.budget_bytes = self.config.budget_bytes
        p.events = {u.index: UnitEvent(u.index, u.name, u.nbytes) for u in self.units}
        return p

    def _prefetch_next(self, p: _Pass) -> None:
        """Cross-pass prefetch (``cond`` held): once running pass ``p`` has handed out its last unit, start the
        agents of the call predicted to follow. Only one pass ahead."""
        if self._session and p.successor is None and p.owner is not None and not p.cancelled:
            key, entry = self.schedule.next_key(p.key)
            p.successor = self._next = self._new_pass(None, key, entry, after=p)
            self._ensure_agents(p.successor)

    def _ensure_agents(self, p: _Pass) -> None:
        """Start loading agents (``cond`` held) up to the configured number while the plan has unclaimed units."""
        todo = len(p.plan) - max(p.next_claim, p.cursor)
        while p.agents < min(self.config.loaders, max(todo, 0)):
            agent = len(p.threads)
            t = threading.Thread(target=self._loader, args=(p, agent), name=f"hermes-loader-{agent}", daemon=True)
            p.threads.append(t)
            p.agents += 1
            t.start()

    def _cancel(self, p: _Pass) -> None:
        """Stop pass ``p``'s agents and free what it loaded (``cond`` held); in-flight reads free on arrival."""
        p.cancelled = p.aborted = True
        for loaded in p.ready.values():
            self._release(p, loaded)
        p.ready.clear()
        if self._next is p:
            self._next = None
        self.daemon.cond.notify_all()

    def _finish(self, p: _Pass, *, record: bool = True) -> None:
        with self.daemon.cond:
            p.cancelled = True
            if p.error is not None or p.aborted:
                # the call did not complete (or is not one): what was prefetched after it must not be used
                p.aborted = True
                if p.successor is not None:
                    self._cancel(p.successor)
            self.daemon.cond.notify_all()
        self._join(p)
        if p.successor is not None and p.successor.cancelled:
            self._join(p.successor)
        with self.daemon.cond:
            for loaded in p.ready.values():
                if loaded.unit.index in self.resident and not p.aborted and \
                        loaded.unit.index not in self._resident_loaded:
                    self._resident_loaded[loaded.unit.index] = loaded  # not called by this pass, but kept
                else:
                    self._release(p, loaded)
            p.ready.clear()
            if self._pass is p:
                for loaded in self._attached.values():
                    self._release(p, loaded)
                self._attached.clear()
            p.stats.finished_at = time.perf_counter()
            p.stats.latency_s = p.stats.finished_at - p.t0
            p.stats.weights_peak_bytes = self.daemon.peak
            p.stats.weights_held_peak_bytes = self.daemon.held_peak
            p.stats.events = [p.events[u.index] for u in self.units]
            self._sample(p)
            if self._pass is p:
                self._pass = None
        if not record:
            return
        for i in range(len(self.units)):
            if i not in self._resident_loaded:
                self._detach(i)
        if not p.aborted:
            self.schedule.record(p.key, p.trace, self._previous_key if self._session else None)
            self._previous_key = p.key
        self.last = p.stats
        self.passes += 1
        if self.history is not None:
            self.history.append(p.stats)
        if self.allow_bypass and not p.aborted and self._pass is None and self._can_bypass():
            self._enter_bypass()

    def _join(self, p: _Pass) -> None:
        """Wait for a finished pass's agents; one stuck in a read longer than ``wait_timeout`` is left behind
        (its buffer stays reserved until the read returns, then it frees it): never a hang."""
        deadline = time.perf_counter() + self.wait_timeout
        for t in p.threads:
            t.join(max(deadline - time.perf_counter(), 0.0))
            if t.is_alive():
                log.warning("loading agent %s is stuck in a read; left behind (its buffer is freed when the read "
                            "returns)", t.name)

    # ---- loading agents ----------------------------------------------------------------------------------
    def _loader(self, p: _Pass, agent: int) -> None:
        reader = Reader(self.config.io == "direct")
        cond = self.daemon.cond
        try:
            while True:
                with cond:
                    claimed = self._claim(p, agent)
                    if claimed is None:
                        return
                    pos, unit, buf, ev = claimed
                try:
                    ev.load_start = time.perf_counter() - p.t0
                    if self.before_read is not None:
                        self.before_read(unit)
                    reader.read(unit, buf)
                    params = views(unit, buf)
                    ev.load_end = time.perf_counter() - p.t0
                except BaseException:
                    with cond:
                        p.loading.discard(pos)
                        self.daemon.give_back(buf)
                    raise
                with cond:
                    p.loading.discard(pos)
                    loaded = _Loaded(unit, buf, params)
                    p.stats.bytes_read += unit.nbytes
                    p.stats.units_loaded += 1
                    self._progress += 1
                    if p.cancelled or pos in p.dropped:
                        self._release(p, loaded)
                    else:
                        p.ready[pos] = loaded
                    cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - surfaced in the inference agent by _take
            with cond:
                if p.error is None:
                    p.error = exc
                cond.notify_all()
        finally:
            reader.close()
            with cond:
                p.agents -= 1
                cond.notify_all()

    def _claim(self, p: _Pass, agent: int) -> tuple[int, Unit, Buf, UnitEvent] | None:
        """Claim the next plan position and wait for its admission (``cond`` held); None: nothing left to do."""
        cond = self.daemon.cond
        while True:
            if p.cancelled or p.error is not None:
                return None
            p.next_claim = max(p.next_claim, p.cursor)
            while p.next_claim < len(p.plan) and p.next_claim in p.dropped:
                p.next_claim += 1
            if p.next_claim >= len(p.plan):
                self._prefetch_next(p)
                return None
            pos = p.next_claim
            p.next_claim += 1
            p.waiting.append(pos)
            unit = self.units[p.plan[pos]]

            def admissible(pos: int = pos) -> bool:
                if p.cancelled or p.error is not None:
                    raise _Cancelled
                if pos in p.dropped:
                    raise _Skip
                if p.waiting[0] != pos:
                    return False
                held = p.held
                before = p.after
                if before is not None and not before.cancelled:  # the pass before is still running
                    if before.next_claim < len(before.plan) or before.waiting:
                        return False
                    held += before.held
                depth = self.config.prefetch
                return depth is None or held < depth

            try:
                buf = self.daemon.take(unit.buffer_bytes, resident=unit.index in self.resident,
                                       wait_until=admissible)
            except _Skip:
                p.waiting.remove(pos)
                cond.notify_all()
                continue
            except _Cancelled:
                p.waiting.remove(pos)
                return None
            p.waiting.remove(pos)
            p.loading.add(pos)
            ev = p.events[unit.index]
            ev.agent, ev.reserve = agent, time.perf_counter() - p.t0
            self._sample(p)
            cond.notify_all()
            return pos, unit, buf, ev

    # ---- inference agent ---------------------------------------------------------------------------------
    def _before_unit(self, index: int) -> None:
        p = self._pass
        if p is None or p.owner is not threading.current_thread():
            # a unit called on its own (outside any entry point): a pass of its own, ended by the unit's end
            name = self.units[index].name
            self._begin(f"unit:{name}", f"unit:{name}", implicit=index)
            p = self._pass
            assert p is not None
        p.trace.append(index)
        self._take(p, index, attach=True)
        p.events[index].compute_start = time.perf_counter() - p.t0

    def _after_unit(self, index: int) -> None:
        p = self._pass
        if p is None or p.owner is not threading.current_thread():
            return
        p.events[index].compute_end = time.perf_counter() - p.t0
        loaded = self._attached.pop(index, None)
        if loaded is not None:
            self._detach(index)  # before the buffer can be reused by a loading agent
            with self.daemon.cond:
                self._release(p, loaded)
        if p.implicit == index:
            self._end_call(p.entry, True)

    def _take(self, p: _Pass, index: int, *, attach: bool = False) -> None:
        """Make unit ``index`` available to the forward: from the resident units, a tied alias, or the pass."""
        if index in self.aliases:  # tied weights: served by the resident unit holding them
            source = self.aliases[index]
            if source not in self._resident_loaded:
                self._take(p, source)
            if attach:
                self._attach(index, self._alias_params(index))
            return
        if index not in self._resident_loaded:
            loaded = self._wait_for(p, index)
            if index in self.resident:
                with self.daemon.cond:
                    self._resident_loaded[index] = loaded
            elif attach:
                self._attached[index] = loaded
            else:  # not called (e.g. the source of an alias that is not resident): nothing to keep
                with self.daemon.cond:
                    self._release(p, loaded)
                return
        if attach or index in self.pinned:
            self._attach(index, (self._resident_loaded.get(index) or self._attached[index]).params)

    def _wait_for(self, p: _Pass, index: int) -> _Loaded:
        cond = self.daemon.cond
        t0 = time.perf_counter()
        try:
            with cond:
                pos = self._locate(p, index)
                seen, since = self._progress, time.perf_counter()
                while pos not in p.ready:
                    if p.error is not None:
                        p.error_surfaced = True
                        raise LoadError(f"loading unit {self.units[index].name!r} failed: {p.error}") from p.error
                    if p.cancelled:
                        raise EngineError("this forward pass was cancelled (the engine was closed meanwhile)")
                    self._ensure_agents(p)
                    self._check_stuck(p, pos)
                    cond.wait(self.wait_timeout)
                    if self._progress != seen:
                        seen, since = self._progress, time.perf_counter()
                    elif pos not in p.ready and time.perf_counter() - since >= self.wait_timeout:
                        raise EngineError(
                            f"waited {time.perf_counter() - since:.0f} s for unit {self.units[index].name!r} "
                            f"with no read finishing ({self._state(p)}); the disk may be stalled — retry, or "
                            "raise HERMES_WAIT_TIMEOUT for a very slow device")
                loaded = p.ready.pop(pos)
                p.cursor = pos + 1
                cond.notify_all()
        except BaseException:
            # Ctrl-C or an error while waiting: stop the agents now, not at the end of the forward.
            with cond:
                p.cancelled = p.aborted = True
                cond.notify_all()
            raise
        p.stats.stall_s += time.perf_counter() - t0
        return loaded

    def _locate(self, p: _Pass, index: int) -> int:
        """Plan position that will serve unit ``index`` (``cond`` held). Predicted units before it are skipped;
        a unit not predicted from here on is a surprise: the rest of the plan is dropped and the prediction
        resumes from that unit (loaded on demand)."""
        for q in range(p.cursor, len(p.plan)):
            if p.plan[q] == index:
                for r in range(p.cursor, q):
                    self._drop(p, r)
                p.cursor = q
                return q
        p.stats.surprises += 1
        log.debug("unit %s not in the predicted order of %s: loaded on demand", self.units[index].name, p.key)
        for r in range(p.cursor, len(p.plan)):
            self._drop(p, r)
        if p.successor is not None:  # it would hold memory this pass now needs
            self._cancel(p.successor)
            p.successor = None
        cont = self.schedule.continuation(p.key, p.entry, index, len(p.trace) - 1)
        rest = [i for i in self._plan(cont[1:]) if i not in self.pinned and not (i == index and i in self.resident)]
        p.cursor = len(p.plan)
        p.plan.extend([index, *rest])
        p.next_claim = max(p.next_claim, p.cursor)
        self.daemon.cond.notify_all()
        return p.cursor

    def _drop(self, p: _Pass, pos: int) -> None:
        """The forward passed over plan position ``pos`` (``cond`` held): free it, now or when it arrives."""
        p.dropped.add(pos)
        loaded = p.ready.pop(pos, None)
        if loaded is not None:
            if loaded.unit.index in self.resident and loaded.unit.index not in self._resident_loaded:
                self._resident_loaded[loaded.unit.index] = loaded  # resident: kept although not called yet
            else:
                self._release(p, loaded)

    def _check_stuck(self, p: _Pass, pos: int) -> None:
        """Raise if position ``pos`` can never be admitted (``cond`` held): the arena holds nothing but the units
        computing now and cannot hold the unit beside them (a unit called inside another unit's forward, with a
        budget too small for both)."""
        unit = self.units[p.plan[pos]]
        if pos in p.loading or unit.index in self.resident:
            return
        arena = self.daemon.arena
        if arena is None or arena.fits(unit.buffer_bytes) or pos not in p.waiting or p.waiting[0] != pos:
            return
        attached = sum(self.units[i].buffer_bytes for i in self._attached)
        if arena.used > attached:
            # something besides the computing units holds arena space (a unit loaded or loading for this pass or
            # the next, an agent of an ended pass still in its read): it is freed when consumed or when the read
            # lands — progress, or the watchdog if the read never returns
            return
        computing = [self.units[i].name for i in self._attached]
        need = unit.buffer_bytes + attached
        raise EngineError(
            f"unit {unit.name!r} was called while unit(s) {computing} are computing, and the weight budget "
            f"{format_bytes(self.config.budget_bytes)} cannot hold them together ({format_bytes(need)}); "
            f"use a budget of at least {need + self.min_budget - unit.buffer_bytes} bytes")

    def _state(self, p: _Pass) -> str:
        names = lambda ps: [self.units[p.plan[q]].name for q in sorted(ps)][:4]  # noqa: E731
        return (f"loading {names(p.loading)}, waiting for memory {names(p.waiting)}, "
                f"{p.agents} loading agent(s) running, {format_bytes(self.daemon.held)} held")

    # ---- helpers -----------------------------------------------------------------------------------------
    def _release(self, p: _Pass, loaded: _Loaded) -> None:
        """Free a unit's buffer (cond held)."""
        loaded.params.clear()
        self.daemon.give_back(loaded.buffer)
        p.events[loaded.unit.index].free = time.perf_counter() - p.t0
        self._sample(p)

    def _sample(self, p: _Pass) -> None:
        p.stats.memory.append((time.perf_counter() - p.t0, self.daemon.allocated, self.daemon.held))

    def _attach(self, index: int, params: list[torch.nn.Parameter]) -> None:
        for slot, param in zip(self.units[index].slots, params, strict=True):
            self.model.get_submodule(slot.module)._parameters[slot.attr] = param

    def _detach(self, index: int) -> None:
        for slot, meta in zip(self.units[index].slots, self._meta[index], strict=True):
            self.model.get_submodule(slot.module)._parameters[slot.attr] = meta

