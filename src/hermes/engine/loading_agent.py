"""The loading agents of the paper: threads that read units ahead of use. Each agent claims the next position of
its pass's plan, asks the daemon to admit the unit (a buffer inside the budget, and no more units ahead of the
inference agent than ``prefetch``), reads it with one read per contiguous byte range, and hands it over as
ready. A pass prefetched for the next call admits only after the running pass has claimed all of its units.
With ``prefetch`` 0 (sequential) a unit is admitted only when the forward waits for it and nothing else of the
pass is loading or loaded: load -> compute -> free, one unit at a time, no read overlapping a compute."""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from hermes.engine.arena import Buf
from hermes.engine.config import UnitEvent
from hermes.engine.passes import Cancelled, Loaded, Pass, Skip
from hermes.engine.reader import Reader, views
from hermes.units import Unit

if TYPE_CHECKING:  # the engine wires the agents; at run time nothing here imports it
    from hermes.engine.pipeline import PipeLoadEngine

log = logging.getLogger(__name__)


class LoadingAgents:
    """Starts, runs and joins the loading agents of an engine's passes."""

    def __init__(self, engine: PipeLoadEngine) -> None:
        self.engine = engine
        self.progress = 0  # reads finished, ever (the inference agent's watchdog)

    def ensure(self, p: Pass) -> None:
        """Start agents (``cond`` held) up to the configured number while the plan has unclaimed units."""
        todo = len(p.plan) - max(p.next_claim, p.cursor)
        while p.agents < min(self.engine.config.loaders, max(todo, 0)):
            agent = len(p.threads)
            t = threading.Thread(target=self._run, args=(p, agent), name=f"hermes-loader-{agent}", daemon=True)
            p.threads.append(t)
            p.agents += 1
            t.start()

    def join(self, p: Pass) -> None:
        """Wait for a finished pass's agents; one stuck in a read longer than ``wait_timeout`` is left behind
        (its buffer stays reserved until the read returns, then it frees it): never a hang."""
        deadline = time.perf_counter() + self.engine.wait_timeout
        for t in p.threads:
            t.join(max(deadline - time.perf_counter(), 0.0))
            if t.is_alive():
                log.warning("loading agent %s is stuck in a read; left behind (its buffer is freed when the read "
                            "returns)", t.name)

    def _run(self, p: Pass, agent: int) -> None:
        """One agent: claim, wait for admission, read, hand over — until the plan is done or the pass ends. A
        failure is kept on the pass and raised in the inference agent."""
        e = self.engine
        reader = Reader(e.config.io == "direct")
        cond = e.daemon.cond
        try:
            while True:
                with cond:
                    claimed = self._claim(p, agent)
                    if claimed is None:
                        return
                    pos, unit, buf, ev = claimed
                loaded = self._read(p, pos, unit, buf, ev, reader)
                with cond:
                    p.loading.discard(pos)
                    p.stats.bytes_read += unit.nbytes
                    p.stats.units_loaded += 1
                    self.progress += 1
                    if p.cancelled or pos in p.dropped:
                        p.release(loaded, e.daemon)
                    else:
                        p.ready[pos] = loaded
                    cond.notify_all()
        except BaseException as exc:  # noqa: BLE001 - surfaced in the inference agent (InferenceAgent.wait_for)
            with cond:
                if p.error is None:
                    p.error = exc
                cond.notify_all()
        finally:
            reader.close()
            with cond:
                p.agents -= 1
                cond.notify_all()

    def _read(self, p: Pass, pos: int, unit: Unit, buf: Buf, ev: UnitEvent, reader: Reader) -> Loaded:
        """Read an admitted unit into its buffer; on failure its buffer goes back to the daemon."""
        e = self.engine
        try:
            ev.load_start = time.perf_counter() - p.t0
            if e.before_read is not None:
                e.before_read(unit)
            reader.read(unit, buf)
            params = views(unit, buf)
            ev.load_end = time.perf_counter() - p.t0
        except BaseException:
            with e.daemon.cond:
                p.loading.discard(pos)
                e.daemon.give_back(buf)
            raise
        return Loaded(unit, buf, params)

    def _claim(self, p: Pass, agent: int) -> tuple[int, Unit, Buf, UnitEvent] | None:
        """Claim the next plan position and wait for its admission (``cond`` held); None: nothing left to do."""
        e = self.engine
        while True:
            if p.cancelled or p.error is not None:
                return None
            p.next_claim = max(p.next_claim, p.cursor)
            while p.next_claim < len(p.plan) and p.next_claim in p.dropped:
                p.next_claim += 1
            if p.next_claim >= len(p.plan):
                e.lifecycle.prefetch_next(p)
                return None
            pos = p.next_claim
            p.next_claim += 1
            p.waiting.append(pos)
            unit = e.units[p.plan[pos]]
            try:
                buf = e.daemon.take(unit.buffer_bytes, resident=unit.index in e.residency.resident,
                                    wait_until=lambda pos=pos: self._admissible(p, pos))
            except Skip:
                p.waiting.remove(pos)
                e.daemon.cond.notify_all()
                continue
            except Cancelled:
                p.waiting.remove(pos)
                return None
            p.waiting.remove(pos)
            p.loading.add(pos)
            ev = p.events[unit.index]
            ev.agent, ev.reserve = agent, time.perf_counter() - p.t0
            p.sample(e.daemon)
            e.daemon.cond.notify_all()
            return pos, unit, buf, ev

    def _admissible(self, p: Pass, pos: int) -> bool:
        """Whether plan position ``pos`` may be admitted now (``cond`` held): its turn, and within the prefetch
        depth (counting the units of a running pass this one follows); with depth 0, the unit the forward waits
        for once nothing else is held (never blocked by a unit computing: it may be the caller of this one, or a
        resident unit, held for good). Raises to give up."""
        if p.cancelled or p.error is not None:
            raise Cancelled
        if pos in p.dropped:
            raise Skip
        if p.waiting[0] != pos:
            return False
        held = p.held
        before = p.after
        if before is not None and not before.cancelled:  # the pass before is still running
            if before.next_claim < len(before.plan) or before.waiting:
                return False
            held += before.held
        depth = self.engine.config.prefetch
        if depth == 0:
            return p.demand == pos and held == 0
        return depth is None or held < depth
