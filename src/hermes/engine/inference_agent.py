"""The inference agent of the paper: the caller's thread running the unmodified Hugging Face forward. Before a
unit computes, its hook waits for the unit (loaded by an agent, resident, or served by a tied unit) and attaches
its tensors; after, it detaches them and hands the buffer back to the daemon. The forward may ask for units in
any order: a unit ahead in the plan skips the ones before it, a unit not planned is loaded on demand and the
plan resumes from it. Every wait ends, within ``wait_timeout`` of no read finishing, in progress or in an
:class:`EngineError` naming the units involved (the watchdog)."""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from hermes.engine.passes import Loaded, Pass
from hermes.errors import EngineError, LoadError
from hermes.memory import format_bytes

if TYPE_CHECKING:  # the engine wires the agents; at run time nothing here imports it
    from hermes.engine.pipeline import PipeLoadEngine

log = logging.getLogger(__name__)


class InferenceAgent:
    """The hooks of the units that compute, and their waits."""

    def __init__(self, engine: PipeLoadEngine) -> None:
        self.engine = engine

    def current(self) -> Pass | None:
        """The pass this thread runs (None: none, or another thread's)."""
        p = self.engine.lifecycle.current
        return p if p is not None and p.owner is threading.current_thread() else None

    def before_unit(self, index: int) -> None:
        """A unit is about to compute: wait for it and attach it (a unit called on its own begins a pass)."""
        e = self.engine
        p = self.current()
        if p is None:  # a unit called outside any entry point: a pass of its own, ended by the unit's end
            name = e.units[index].name
            e.lifecycle.begin(f"unit:{name}", f"unit:{name}", implicit=index)
            p = e.lifecycle.current
            assert p is not None
        p.raise_if_interrupted()
        p.trace.append(index)
        self.take(p, index, attach=True)
        p.events[index].compute_start = time.perf_counter() - p.t0

    def after_unit(self, index: int) -> None:
        """A unit has computed: detach it and free its buffer (before a loading agent can reuse it)."""
        e = self.engine
        p = self.current()
        if p is None:
            return
        p.events[index].compute_end = time.perf_counter() - p.t0
        with e.critical():
            loaded = e.residency.attached.pop(index, None)
            if loaded is not None:
                e.residency.detach(index)
                p.release(loaded, e.daemon)
        if p.implicit == index:
            e.lifecycle.end_call(p.entry, True)

    def take(self, p: Pass, index: int, *, attach: bool = False) -> None:
        """Make unit ``index`` available to the forward: from the resident units, a tied alias, or the pass."""
        e, res = self.engine, self.engine.residency
        if index in res.aliases:  # tied weights: served by the resident unit holding them
            source = res.aliases[index]
            if source not in res.loaded:
                self.take(p, source)
            if attach or index in res.pinned:  # a pinned unit (Mamba's tied head) is attached for good
                res.attach(index, res.alias_params(index))
            return
        with e.critical():  # a Ctrl-C lands before the wait, inside it or after the unit is stored: never between
            if index not in res.loaded:
                loaded = self.wait_for(p, index)
                if index in res.resident:
                    res.loaded[index] = loaded
                elif attach:
                    res.attached[index] = loaded
                else:  # not called (e.g. the source of an alias that is not resident): nothing to keep
                    p.release(loaded, e.daemon)
                    return
            if attach or index in res.pinned:
                res.attach(index, res.held_params(index))

    def wait_for(self, p: Pass, index: int) -> Loaded:
        """Wait until unit ``index`` is loaded for pass ``p`` and take it (inside ``critical()``)."""
        e = self.engine
        cond = e.daemon.cond
        t0 = time.perf_counter()
        try:
            pos = self._locate(p, index)
            p.demand = pos  # with prefetch 0, what a loading agent may admit now
            cond.notify_all()
            seen, since = e.loading.progress, time.perf_counter()
            while pos not in p.ready:
                p.raise_if_interrupted()
                if p.error is not None:
                    p.error_surfaced = True
                    raise LoadError(f"loading unit {e.units[index].name!r} failed: {p.error}") from p.error
                if p.cancelled:
                    raise EngineError("this forward pass was cancelled (the engine was closed meanwhile)")
                e.loading.ensure(p)
                self._check_stuck(p, pos)
                with e.interrupts.allowed():
                    cond.wait(e.wait_timeout)
                if e.loading.progress != seen:
                    seen, since = e.loading.progress, time.perf_counter()
                elif pos not in p.ready and time.perf_counter() - since >= e.wait_timeout:
                    raise EngineError(
                        f"waited {time.perf_counter() - since:.0f} s for unit {e.units[index].name!r} "
                        f"with no read finishing ({p.describe(e.units, e.daemon)}); the disk may be stalled — "
                        "retry, or raise HERMES_WAIT_TIMEOUT for a very slow device")
            loaded = p.ready.pop(pos)
            p.cursor = pos + 1
            cond.notify_all()
        except BaseException:
            # Ctrl-C or an error while waiting: stop the agents now, not at the end of the forward.
            p.cancelled = p.aborted = True
            cond.notify_all()
            raise
        finally:
            p.demand = None
        p.stats.stall_s += time.perf_counter() - t0
        return loaded

    def _locate(self, p: Pass, index: int) -> int:
        """Plan position that will serve unit ``index`` (``cond`` held). Predicted units before it are skipped;
        a unit not predicted from here on is a surprise: the rest of the plan is dropped and the prediction
        resumes from that unit (loaded on demand)."""
        e = self.engine
        for q in range(p.cursor, len(p.plan)):
            if p.plan[q] == index:
                for r in range(p.cursor, q):
                    self._drop(p, r)
                p.cursor = q
                return q
        p.stats.surprises += 1
        log.debug("unit %s not in the predicted order of %s: loaded on demand", e.units[index].name, p.key)
        for r in range(p.cursor, len(p.plan)):
            self._drop(p, r)
        if p.successor is not None:  # it would hold memory this pass now needs
            e.lifecycle.cancel(p.successor)
            p.successor = None
        cont = e.schedule.continuation(p.key, p.entry, index, len(p.trace) - 1)
        res = e.residency
        rest = [i for i in e.lifecycle.plan(cont[1:]) if i not in res.pinned and not (i == index and i in res.resident)]
        p.cursor = len(p.plan)
        p.plan.extend([index, *rest])
        p.next_claim = max(p.next_claim, p.cursor)
        e.daemon.cond.notify_all()
        return p.cursor

    def _drop(self, p: Pass, pos: int) -> None:
        """The forward passed over plan position ``pos`` (``cond`` held): free it, now or when it arrives."""
        p.dropped.add(pos)
        loaded = p.ready.pop(pos, None)
        if loaded is not None and not self.engine.residency.keep(loaded):  # resident: kept although not called
            p.release(loaded, self.engine.daemon)

    def _check_stuck(self, p: Pass, pos: int) -> None:
        """Raise if position ``pos`` can never be admitted (``cond`` held): the arena holds nothing but the units
        computing now and cannot hold the unit beside them (a unit called inside another unit's forward, with a
        budget too small for both)."""
        e = self.engine
        unit = e.units[p.plan[pos]]
        if pos in p.loading or unit.index in e.residency.resident:
            return
        arena = e.daemon.arena
        if arena is None or arena.fits(unit.buffer_bytes) or pos not in p.waiting or p.waiting[0] != pos:
            return
        computing = e.residency.attached
        attached = sum(e.units[i].buffer_bytes for i in computing)
        if arena.used > attached:
            # something besides the computing units holds arena space (a unit loaded or loading for this pass or
            # the next, an agent of an ended pass still in its read): it is freed when consumed or when the read
            # lands — progress, or the watchdog if the read never returns
            return
        need = unit.buffer_bytes + attached
        raise EngineError(
            f"unit {unit.name!r} was called while unit(s) {[e.units[i].name for i in computing]} are computing, "
            f"and the weight budget {format_bytes(e.config.budget_bytes)} cannot hold them together "
            f"({format_bytes(need)}); use a budget of at least {need + e.residency.min_budget - unit.buffer_bytes} "
            "bytes")
