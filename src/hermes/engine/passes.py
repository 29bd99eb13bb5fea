"""What one call of the streamed model is — a *pass*: the units the loading agents load for it (its plan, in the
predicted order), the cursor of the inference agent, the units loaded and not yet computed, its timeline and
statistics, and its cancellation. :class:`PassLifecycle` is the lifecycle: begin a pass when an entry point is called,
prefetch the next call's pass inside a session (``generate``), cancel, and finish (free what is left, record
the order the units ran in, the stats)."""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hermes.engine.arena import Buf
from hermes.engine.config import PassStats, UnitEvent
from hermes.engine.daemon import Daemon
from hermes.engine.schedule import entry_key
from hermes.errors import EngineError, LoadError
from hermes.memory import format_bytes
from hermes.units import Unit

if TYPE_CHECKING:  # the engine wires the passes; at run time nothing here imports it
    from hermes.engine.pipeline import PipeLoadEngine


class Cancelled(Exception):
    """The pass ended while a loading agent waited for admission."""


class Skip(Exception):
    """The forward passed over the plan position a loading agent waited to load."""


@dataclass
class Loaded:
    """A unit read into its buffer, as tensor views ready to attach."""

    unit: Unit
    buffer: Buf
    params: list[torch.nn.Parameter]


class Pass:
    """State of one pass (one call of an entry point), guarded by the daemon's condition."""

    def __init__(self, key: str, entry: str, plan: list[int], owner: threading.Thread | None, t0: float,
                 after: Pass | None = None) -> None:
        self.key = key  # entry_key of the call (what the schedule is recorded under)
        self.entry = entry  # "" (the model), a submodule name ("encoder"), or "unit:NAME" (a unit called directly)
        self.plan = plan  # unit indices the loading agents load, in predicted order; only ever appended to
        self.owner = owner  # the inference agent's thread (None: prefetched for the next call, not begun yet)
        self.t0 = t0
        self.after = after  # the pass this one continues (cross-pass prefetch): it admits after all of its units
        self.successor: Pass | None = None
        self.implicit: int | None = None  # a pass begun by calling this unit directly: it ends with that unit
        self.aborted = False  # ended by an error or an interrupt: its successor must not run
        self.interrupted = False  # Ctrl-C arrived during the call (raised again wherever Python lost it)
        self.frame: Any = None  # the frame of the entry point's call, while it runs (to tell nested calls)
        self.cancelled = False
        self.next_claim = 0  # next plan position a loading agent claims
        self.waiting: list[int] = []  # claimed positions waiting for admission, ascending
        self.loading: set[int] = set()  # admitted positions being read
        self.dropped: set[int] = set()  # positions the forward passed over: released as soon as they are loaded
        self.ready: dict[int, Loaded] = {}
        self.cursor = 0  # plan position of the unit the forward is expected to ask for next
        self.demand: int | None = None  # plan position the inference agent waits for now (prefetch 0 admits only it)
        self.trace: list[int] = []  # unit indices in the order the forward asked for them
        self.agents = 0  # loading agents still running
        self.error: BaseException | None = None  # first failure of a loading agent
        self.error_surfaced = False  # already raised in the inference agent
        self.threads: list[threading.Thread] = []
        self.stats = PassStats(entry=entry)
        self.events: dict[int, UnitEvent] = {}

    def raise_if_interrupted(self) -> None:
        """Raise the KeyboardInterrupt of a Ctrl-C that arrived during this call and that Python lost (raised
        inside a finalizer) — the forward went on instead of ending."""
        if self.interrupted:
            self.interrupted = False
            raise KeyboardInterrupt

    @property
    def held(self) -> int:
        """Units of this pass admitted and not yet handed to the forward."""
        return len(self.loading) + len(self.ready)

    def sample(self, daemon: Daemon) -> None:
        """Record the daemon's memory now on this pass's timeline."""
        self.stats.memory.append((time.perf_counter() - self.t0, daemon.allocated, daemon.held))

    def release(self, loaded: Loaded, daemon: Daemon) -> None:
        """Free a unit's buffer (``cond`` held)."""
        loaded.params.clear()
        daemon.give_back(loaded.buffer)
        self.events[loaded.unit.index].free = time.perf_counter() - self.t0
        self.sample(daemon)

    def rebase(self) -> None:
        """Make the times of a pass prefetched during the previous call relative to now, its own call's start."""
        shift = time.perf_counter() - self.t0
        self.t0 += shift
        for ev in self.events.values():
            for f in ("reserve", "load_start", "load_end", "free"):
                if getattr(ev, f) is not None:
                    setattr(ev, f, getattr(ev, f) - shift)
        self.stats.memory = [(t - shift, a, h) for t, a, h in self.stats.memory]

    def describe(self, units: list[Unit], daemon: Daemon) -> str:
        """What the loading agents are doing (for a watchdog's error message)."""
        names = lambda ps: [units[self.plan[q]].name for q in sorted(ps)][:4]  # noqa: E731
        return (f"loading {names(self.loading)}, waiting for memory {names(self.waiting)}, "
                f"{self.agents} loading agent(s) running, {format_bytes(daemon.held)} held")


class PassLifecycle:
    """The lifecycle of an engine's passes: begun by an entry point's pre-hook, ended by its hook (or by the end
    of a unit called on its own); inside a session (:meth:`continuous`) the next call's pass is prefetched."""

    def __init__(self, engine: PipeLoadEngine) -> None:
        self.engine = engine
        self.current: Pass | None = None
        self.next: Pass | None = None  # the next pass, already loading (inside a session)
        self.session = 0  # > 0 inside continuous(): loading agents run across pass boundaries
        self.previous_key: str | None = None  # key of the last pass of this session (to learn what follows)

    @contextlib.contextmanager
    def continuous(self) -> Iterator[None]:
        """A session: once a pass has handed out its last unit, loading agents start on the next call's units."""
        self.session += 1
        try:
            yield
        finally:
            self.session -= 1
            if not self.session:
                self.drop_next()
                self.previous_key = None

    def drop_next(self) -> None:
        """Drop the prefetched pass (its agents stop, what it loaded is freed). It stays ``next`` until ``finish``
        has freed it: a Ctrl-C before that leaves it for the next call to drop, never lost."""
        nxt = self.next
        if nxt is not None:
            self.finish(nxt, record=False)

    def left(self, p: Pass) -> bool:
        """Whether pass ``p`` is no longer running: its thread ended, or this thread left its call (an exception
        such as Ctrl-C propagated out of the forward; torch runs no end hook then)."""
        if p.owner is None or not p.owner.is_alive():
            return True
        return p.owner is threading.current_thread() and p.frame is not None and not _on_stack(p.frame)

    def plan(self, order: list[int], *, after: Pass | None = None) -> list[int]:
        """What to load for a predicted order: pinned units first, resident units once, nothing resident
        already loaded (or, for a pass prefetched behind ``after``, loaded by it), only units loaded whole."""
        res = self.engine.residency
        out: list[int] = []
        for i in (*res.pinned, *order):
            if i in res.aliases or i in res.loaded or not self.engine.kind_of(i).planned(i):
                continue
            if i in res.resident and (after is not None or i in out):
                continue
            out.append(i)
        return out

    # ---- entry points ------------------------------------------------------------------------------------
    def begin_call(self, entry: str, args: Any, kwargs: dict[str, Any]) -> None:
        """An entry point's forward pre-hook: begin its pass (unless it is called inside the running pass)."""
        p = self.current
        if p is not None and p.owner is threading.current_thread() and p.implicit is None \
                and entry != p.entry and (p.entry == "" or entry.startswith(p.entry + ".")):
            if p.interrupted and _on_stack(p.frame):
                p.raise_if_interrupted()  # inside a call whose Ctrl-C Python lost
            if not p.cancelled:
                return  # an entry point called inside the running pass (the model's forward calling its encoder)
        self.begin(entry, entry_key(entry, args, kwargs))

    def end_call(self, entry: str, output: Any) -> None:
        """An entry point's forward hook (always called): finish its pass."""
        p = self.current
        if p is None or p.owner is not threading.current_thread() or p.entry != entry:
            return  # nested entry point, or a second thread refused by begin: not its pass to end
        if output is None:  # the forward raised (torch calls always_call hooks without a result)
            p.aborted = True
        self.finish(p)
        if p.error is not None and not p.error_surfaced:
            raise LoadError(f"a loading agent failed: {p.error}") from p.error
        p.frame = None
        p.raise_if_interrupted()

    # ---- lifecycle ---------------------------------------------------------------------------------------
    def begin(self, entry: str, key: str, implicit: int | None = None) -> None:
        """Begin the pass of a call in the current thread (the inference agent)."""
        e, me = self.engine, threading.current_thread()
        frame = _entry_frame()
        with e.critical():
            stale = self.current
            if stale is not None and stale.owner is not me and stale.owner.is_alive():
                raise EngineError("this streamed model is already running a forward pass in another thread; "
                                  "a Hermes model serves one call at a time — serialize calls with a lock "
                                  "or load one model per thread")
        if stale is not None:  # a previous pass on this thread was interrupted (e.g. Ctrl-C inside torch code)
            stale.aborted = True
            self.finish(stale)
        if self.next is not None and (self.next.cancelled or not self.session):
            self.drop_next()  # a drop a Ctrl-C cut short (or a session that ended): free it, never lose it
        e.interrupts.arm()
        with e.critical():
            p = self.next if self.session else None
            self.next = None
            if p is not None and not (p.cancelled or p.error is not None):
                p.rebase()  # prefetched during the previous call
            elif p is None:
                e.daemon.open()
                p = self.new(me, key, entry)
            p.owner, p.key, p.entry, p.implicit, p.frame = me, key, entry, implicit, frame
            p.stats.entry = entry
            e.daemon.peak, e.daemon.held_peak = e.daemon.allocated, e.daemon.held
            self.current = p
            p.sample(e.daemon)
            if not p.threads:
                e.loading.ensure(p)
            elif p.agents == 0 and p.next_claim >= len(p.plan):  # its agents finished before it began
                self.prefetch_next(p)
        for i in e.residency.pinned:  # always attached; loaded by the first pass
            if i not in e.residency.loaded:
                e.inference.take(p, i)

    def new(self, owner: threading.Thread | None, key: str, entry: str, after: Pass | None = None) -> Pass:
        """A pass for a call of ``key``, planned along the schedule's prediction."""
        e = self.engine
        p = Pass(key, entry, self.plan(e.schedule.predict(key, entry), after=after), owner, time.perf_counter(),
                 after)
        p.stats.loaders = e.config.loaders
        p.stats.budget_bytes, p.stats.weights_max_bytes = e.config.budget_bytes, e.weights_max
        p.events = {u.index: UnitEvent(u.index, u.name, u.nbytes) for u in e.units}
        return p

    def prefetch_next(self, p: Pass) -> None:
        """Cross-pass prefetch (``cond`` held): once running pass ``p`` has handed out its last unit, start the
        agents of the call predicted to follow. Only one pass ahead; none with ``prefetch`` 0 (sequential: the
        next call's units are read when it asks for them, never while this one computes)."""
        if self.engine.config.prefetch == 0:
            return
        if self.session and p.successor is None and p.owner is not None and not p.cancelled:
            key, entry = self.engine.schedule.next_key(p.key)
            p.successor = self.next = self.new(None, key, entry, after=p)
            self.engine.loading.ensure(p.successor)

    def cancel(self, p: Pass) -> None:
        """Stop pass ``p``'s agents and free what it loaded (``cond`` held); in-flight reads free on arrival."""
        p.cancelled = p.aborted = True
        for loaded in p.ready.values():
            p.release(loaded, self.engine.daemon)
        p.ready.clear()
        if self.next is p:
            self.next = None
        self.engine.daemon.cond.notify_all()

    def finish(self, p: Pass, *, record: bool = True) -> None:
        """End pass ``p``: stop its agents, free what it holds (keeping resident units), record its stats."""
        e = self.engine
        with e.critical():
            p.cancelled = True
            if p.error is not None or p.aborted:
                # the call did not complete (or is not one): what was prefetched after it must not be used
                p.aborted = True
                if p.successor is not None:
                    self.cancel(p.successor)
            e.daemon.cond.notify_all()
        e.loading.join(p)
        if p.successor is not None and p.successor.cancelled:
            e.loading.join(p.successor)
        with e.critical():
            self._free(p)
            # a finished pass no longer gates its successor (a cancelled ``after`` is ignored): drop the links so
            # that a long session (serve, generate) does not keep every pass it ran, chained, with its threads
            p.after = None
            if p.successor is not None:
                p.successor.after = None
        if self.current is None and p.owner is threading.current_thread():
            e.interrupts.disarm()
        if record:
            self._record(p)


    def _free(self, p: Pass) -> None:
        """Free what pass ``p`` still holds and close its stats (``cond`` held)."""
        e, res = self.engine, self.engine.residency
        for loaded in p.ready.values():
            if not p.aborted and res.keep(loaded):
                continue  # resident: not called by this pass, but kept
            p.release(loaded, e.daemon)
        p.ready.clear()
        if self.current is p:
            for loaded in res.attached.values():
                p.release(loaded, e.daemon)
            res.attached.clear()
        p.stats.finished_at = time.perf_counter()
        p.stats.latency_s = p.stats.finished_at - p.t0
        p.stats.weights_peak_bytes = e.daemon.peak
        p.stats.weights_held_peak_bytes = e.daemon.held_peak
        p.stats.events = [p.events[u.index] for u in e.units]
        p.sample(e.daemon)
        if self.current is p:
            self.current = None
        if self.next is p:
            self.next = None

    def _record(self, p: Pass) -> None:
        e = self.engine
        e.residency.detach_streamed()
        if not p.aborted:
            e.schedule.record(p.key, p.trace, self.previous_key if self.session else None)
            self.previous_key = p.key
        e.record(p.stats)
        if not p.aborted and self.current is None:
            e.bypass.enter_if_possible()


def _entry_frame() -> Any:
    """The frame of torch's module call that began this pass (the entry point's, or for a unit called on its own
    the unit's): alive while its forward runs."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_name != "_call_impl":
        f = f.f_back
    return f


def _on_stack(frame: Any) -> bool:
    """Whether ``frame`` is still running in this thread (one of the current frame's callers)."""
    f = sys._getframe(1)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False
