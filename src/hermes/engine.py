"""PipeLoad: loading agents read units ahead of use, the inference agent (the caller's thread running the
unmodified Hugging Face forward) computes them in order, and the daemon does admission control, keeps the
queue of loaded units, frees each unit once computed and records a timeline.

Lifecycle of a unit's weights: reserve (daemon) -> load (loading agent) -> attach (pre-hook) -> compute
(HF forward) -> detach + release (post-hook). Agents coordinate with one condition variable; nothing polls
or sleeps.
"""
from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hermes.errors import BudgetError, EngineError, HermesError, LoadError
from hermes.memory import format_bytes
from hermes.store import PAGE, read_exact
from hermes.units import Unit

log = logging.getLogger(__name__)

IO_MODES = ("buffered", "direct")


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the PipeLoad engine (what a plan decides)."""

    budget_bytes: int  # hard cap on weight buffer memory held by the engine
    loaders: int = 2  # number of loading agents (threads)
    prefetch: int | None = None  # most units loaded or loading ahead of the one computing (None: budget-bound)
    io: str = "buffered"  # "buffered" (page cache) or "direct" (O_DIRECT, no page cache)
    resident: tuple[str, ...] = ()  # unit names kept loaded across passes

    def __post_init__(self) -> None:
        if self.loaders < 1:
            raise HermesError(f"loaders must be >= 1, got {self.loaders}")
        if self.prefetch is not None and self.prefetch < 1:
            raise HermesError(f"prefetch must be >= 1 (or None), got {self.prefetch}")
        if self.io not in IO_MODES:
            raise HermesError(f"io must be one of {IO_MODES}, got {self.io!r}")


@dataclass
class UnitEvent:
    """Timeline of one unit in one pass; times in seconds since the pass started."""

    unit: int
    name: str
    bytes: int
    agent: int | None = None  # loading agent id (None: resident, not loaded in this pass)
    reserve: float | None = None  # admission granted
    load_start: float | None = None
    load_end: float | None = None
    compute_start: float | None = None
    compute_end: float | None = None
    free: float | None = None


@dataclass
class PassStats:
    """Measurements of one forward pass."""

    latency_s: float = 0.0
    stall_s: float = 0.0  # time the inference agent waited for weights
    loaders: int = 0
    budget_bytes: int = 0
    weights_peak_bytes: int = 0  # peak of engine-accounted weight memory (arena + resident buffers)
    weights_held_peak_bytes: int = 0  # peak bytes of units actually loaded at once
    bytes_read: int = 0
    units_loaded: int = 0
    finished_at: float = 0.0  # time.perf_counter() when the pass ended
    events: list[UnitEvent] = field(default_factory=list)
    memory: list[tuple[float, int, int]] = field(default_factory=list)  # (t, allocated, held by units)

    def to_dict(self, *, timeline: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not timeline:
            d.pop("events")
            d.pop("memory")
        return d


class _Cancelled(Exception):
    pass


@dataclass
class _Loaded:
    unit: Unit
    buffer: _Buf
    params: list[torch.nn.Parameter]


class _Pass:
    """State of one pass, guarded by the daemon's condition."""

    def __init__(self, schedule: list[int], owner: threading.Thread | None, t0: float,
                 after: _Pass | None = None) -> None:
        self.schedule = schedule  # unit indices to load, in order
        self.position = {u: p for p, u in enumerate(schedule)}
        self.owner = owner  # the inference agent's thread (None: prefetched for the next forward, not begun yet)
        self.t0 = t0
        self.after = after  # the pass this one continues (cross-pass prefetch): it admits after all of its units
        self.successor: _Pass | None = None
        self.aborted = False  # ended by an error or an interrupt: its successor must not run
        self.next_claim = 0
        self.next_admit = 0
        self.consumed = 0  # positions released by the inference agent
        self.ready: dict[int, _Loaded] = {}
        self.error: BaseException | None = None  # first failure of a loading agent
        self.error_surfaced = False  # already raised in the inference agent
        self.cancelled = False
        self.expect = 0  # next unit index the forward should run
        self.threads: list[threading.Thread] = []
        self.stats = PassStats()
        self.events: dict[int, UnitEvent] = {}


def new_buffer(size: int, *, huge: bool = True) -> mmap.mmap:
    """Anonymous page-aligned memory (O_DIRECT needs the alignment), returned to the OS when unmapped.

    Private, and with ``huge`` backed by 2 MiB transparent huge pages where the kernel allows them (THP
    "madvise" or "always"): an O_DIRECT read is DMA'd into the buffer's physical pages, and scattered 4 KiB
    pages (a process that has allocated and freed memory for a while) cut O_DIRECT bandwidth here from 3.8 to
    0.7 GB/s, while huge pages keep it high in every process state. The arena is faulted in once, when the model
    is loaded; resident units' buffers are faulted during a pass, where huge-page faults (with the kernel's
    synchronous compaction) cost more than they save: keeping every layer that way was 25 % slower
    (docs/ENGINE.md, "Huge pages"). ``HERMES_HUGE_PAGES=0`` turns huge pages off everywhere.
    """
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and os.environ.get("HERMES_HUGE_PAGES", "1") != "0":
        with contextlib.suppress(AttributeError, OSError):  # no THP on this platform / kernel: 4 KiB pages
            buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def touch_pages(buf: mmap.mmap) -> None:
    """Fault every page of ``buf`` in now (one write per page), so that later reads pay no page faults."""
    for off in range(0, len(buf), PAGE):
        buf[off] = 0


def _unmap(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:  # a tensor view still exists: memory is freed when it dies
        log.warning("a released weight buffer is still referenced; its memory is freed later")


class Arena:
    """One pre-faulted, page-aligned region holding the streamed units, used as a FIFO ring.

    Units are admitted and released in execution order, so a ring fits exactly: a unit is carved at the head
    (or at offset 0 when the tail end is too short) and its space returns when it is released. The region is
    allocated and touched once, so no pass pays page faults and the memory held is exactly its size.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.buffer = new_buffer(max(capacity, PAGE))
        touch_pages(self.buffer)  # now, not during a pass
        self.live: dict[int, list[int]] = {}  # offset -> [size, released], in allocation order

    def take(self, size: int) -> int | None:
        """Offset of ``size`` contiguous free bytes, or None if the ring has no such room now."""
        if size > self.capacity:
            return None
        if not self.live:
            offset = 0
        else:
            offsets = list(self.live)
            first, last = offsets[0], offsets[-1]
            end = last + self.live[last][0]
            if last >= first:  # not wrapped: free space is [end, capacity) and [0, first)
                offset = end if end + size <= self.capacity else (0 if size <= first else None)
            else:  # wrapped: free space is [end, first)
                offset = end if end + size <= first else None
            if offset is None:
                return None
        self.live[offset] = [size, 0]
        return offset

    def give_back(self, offset: int) -> None:
        self.live[offset][1] = 1
        while self.live:
            first = next(iter(self.live))
            if not self.live[first][1]:
                break
            del self.live[first]

    @property
    def used(self) -> int:
        return sum(size for size, released in self.live.values() if not released)

    def close(self) -> None:
        _unmap(self.buffer)


@dataclass
class _Buf:
    """Where a loaded unit lies: a slice of the arena, or a dedicated buffer (resident units)."""

    mm: mmap.mmap
    offset: int
    size: int
    resident: bool


class Daemon:
    """Admission control over the arena (streamed units) and dedicated buffers (resident units).

    ``allocated`` (arena + resident buffers) never exceeds the budget: the arena is sized to the budget minus
    the resident units' bytes, capped at what the streamed units need.
    """

    def __init__(self, budget_bytes: int, arena_bytes: int) -> None:
        self.budget = budget_bytes
        self.cond = threading.Condition()
        self.arena: Arena | None = None
        self.arena_bytes = arena_bytes
        self.resident_bytes = 0
        self.held = 0  # bytes of buffers holding a unit
        self.peak = 0
        self.held_peak = 0
        self.open()

    def open(self) -> None:
        if self.arena is None:
            self.arena = Arena(self.arena_bytes)
            self._account()

    @property
    def allocated(self) -> int:
        return (self.arena.capacity if self.arena else 0) + self.resident_bytes

    def _account(self) -> None:
        self.peak = max(self.peak, self.allocated)
        self.held_peak = max(self.held_peak, self.held)

    def take(self, size: int, *, resident: bool, wait_until: Any) -> _Buf:
        """Wait until ``wait_until()`` holds and the unit fits, then hand out its buffer (``cond`` held)."""
        while True:
            if wait_until():
                if resident:  # its bytes were set aside when the arena was sized
                    self.resident_bytes += size
                    self.held += size
                    self._account()
                    return _Buf(new_buffer(size, huge=False), 0, size, True)
                assert self.arena is not None
                offset = self.arena.take(size)
                if offset is not None:
                    self.held += size
                    self._account()
                    return _Buf(self.arena.buffer, offset, size, False)
            self.cond.wait()

    def give_back(self, buf: _Buf) -> None:
        """Release a unit's buffer (``cond`` held)."""
        self.held -= buf.size
        if buf.resident:
            self.resident_bytes -= buf.size
            _unmap(buf.mm)
        else:
            assert self.arena is not None
            self.arena.give_back(buf.offset)
        self.cond.notify_all()

    def trim(self) -> int:
        """Unmap the arena (it is re-created by the next pass); returns the bytes given back."""
        with self.cond:
            if self.arena is None or self.arena.live:
                return 0
            freed = self.arena.capacity
            self.arena.close()
            self.arena = None
            return freed


class _Reader:
    """Per-agent file reader (buffered or O_DIRECT)."""

    def __init__(self, direct: bool) -> None:
        self.direct = direct
        self._fds: dict[Any, int] = {}

    def _fd(self, path: Any) -> int:
        fd = self._fds.get(path)
        if fd is None:
            flags = os.O_RDONLY
            if self.direct:
                try:
                    fd = os.open(path, flags | os.O_DIRECT)
                except OSError:  # filesystems such as tmpfs refuse O_DIRECT
                    log.info("O_DIRECT refused for %s; using buffered reads", path)
                    fd = os.open(path, flags)
            else:
                fd = os.open(path, flags)
            self._fds[path] = fd
        return fd

    def read(self, unit: Unit, buf: _Buf) -> None:
        view = memoryview(buf.mm)[buf.offset: buf.offset + unit.buffer_bytes]
        try:
            for seg in unit.segments:
                fd = self._fd(seg.path)
                if self.direct:
                    length = -(-(seg.end - seg.read_start) // PAGE) * PAGE
                    dest = view[seg.read_buf_offset: seg.read_buf_offset + length]
                    try:
                        read_exact(fd, seg.read_start, dest, seg.path, min_bytes=seg.end - seg.read_start)
                        continue
                    except OSError:  # O_DIRECT not possible here: fall back to a buffered read
                        self.direct = False
                        os.close(self._fds.pop(seg.path))
                        fd = self._fd(seg.path)
                read_exact(fd, seg.start, view[seg.buf_offset: seg.buf_offset + seg.end - seg.start], seg.path)
        finally:
            view.release()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _views(unit: Unit, buf: _Buf) -> list[torch.nn.Parameter]:
    out = []
    for s in unit.slots:
        if s.nbytes == 0:
            t = torch.empty(s.shape, dtype=s.dtype)
        else:
            t = torch.frombuffer(buf.mm, dtype=s.dtype, count=s.nbytes // s.dtype.itemsize,
                                 offset=buf.offset + s.offset)
        out.append(torch.nn.Parameter(t.view(s.shape), requires_grad=False))
    return out


class PipeLoadEngine:
    """Streams the weights of ``model`` (a skeleton with meta parameters) unit by unit during each forward.

    Attach with :meth:`install`; then every call of the model is one pass of the PipeLoad pipeline.
    """

    def __init__(self, model: torch.nn.Module, units: list[Unit], config: EngineConfig) -> None:
        self.model = model
        self.units = units
        self.config = config
        self.aliases, self.resident, self.min_budget = self._residency(config)
        self.daemon = Daemon(config.budget_bytes, self._arena_bytes(config))
        self._modules = {u.index: model.get_submodule(u.name) for u in units}
        self._meta: dict[int, list[torch.Tensor]] = {
            u.index: [model.get_submodule(s.module)._parameters[s.attr] for s in u.slots] for u in units}
        self._resident_loaded: dict[int, _Loaded] = {}
        self._attached: dict[int, tuple[int, _Loaded]] = {}  # unit index -> (position, loaded), computing now
        self._pass: _Pass | None = None
        self._next: _Pass | None = None  # the next pass, already loading (inside a session)
        self._session = 0  # > 0 inside continuous(): loading agents run across pass boundaries
        self.history: list[PassStats] | None = None  # when a list, every finished pass's stats are appended
        self.last_generation: Any = None  # GenerationStats of the last generate call (hermes.generation)
        self._handles: list[Any] = []
        self.last: PassStats | None = None
        self.passes = 0
        # Fault-injection seam for tests and benchmarks: called by a loading agent before it reads a unit.
        self.before_read: Any = None

    def _residency(self, config: EngineConfig) -> tuple[dict[int, int], set[int], int]:
        """(tied aliases, resident unit indices, minimum budget) of ``config``, checked against this model.

        Raises:
            HermesError: a resident name is not a unit. BudgetError: the budget is below the minimum.
        """
        units = self.units
        names = {u.name for u in units}
        unknown = [r for r in config.resident if r not in names]
        if unknown:
            raise HermesError(f"resident units {unknown} are not units of this model; units are {sorted(names)}")
        aliases = tied_aliases(units, config.resident)
        resident = {u.index for u in units if u.name in config.resident and u.index not in aliases}
        minimum = minimum_budget(units, config.resident)
        if config.budget_bytes < minimum:
            largest = max((u for u in units if u.index not in resident), key=lambda u: u.buffer_bytes,
                          default=units[0])
            raise BudgetError(
                f"budget {format_bytes(config.budget_bytes)} is below the minimum {format_bytes(minimum)} "
                f"for this model (largest unit {largest.name!r} = {format_bytes(largest.buffer_bytes)}"
                + (f", plus {len(resident)} resident unit(s)" if resident else "")
                + f"); use a budget of at least {minimum} bytes (--budget {_ceil_mib(minimum)}MiB)")
        return aliases, resident, minimum

    def _arena_bytes(self, config: EngineConfig) -> int:
        resident = sum(u.buffer_bytes for u in self.units if u.index in self.resident)
        streamed = sum(u.buffer_bytes for u in self.units
                       if u.index not in self.resident and u.index not in self.aliases)
        return min(config.budget_bytes - resident, streamed)

    def reconfigure(self, config: EngineConfig) -> None:
        """Change loaders / prefetch / io / budget / resident units between passes.

        Units that stop being resident are freed now; new resident units are loaded by the next pass. The arena
        is kept when its size is unchanged (no page faults are paid again).
        """
        if self._pass is not None:
            raise EngineError("cannot reconfigure during a forward pass")
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
        """Run a sequence of forward passes (e.g. the tokens of ``generate``) as one pipeline: once a pass has
        handed out its last unit, loading agents start on the next pass's first units while the current pass
        computes and while the caller prepares the next call. The prefetched pass is dropped on exit."""
        self._session += 1
        try:
            yield
        finally:
            self._session -= 1
            if not self._session:
                self._drop_next()

    def _drop_next(self) -> None:
        with self.daemon.cond:
            nxt, self._next = self._next, None
        if nxt is not None:
            self._finish(nxt, record=False)

    # ---- hooks -------------------------------------------------------------------------------------------
    def install(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        self._handles.append(self.model.register_forward_pre_hook(self._begin_pass))
        self._handles.append(self.model.register_forward_hook(self._end_pass, always_call=True))
        for u in self.units:
            mod = self._modules[u.index]
            self._handles.append(mod.register_forward_pre_hook(lambda m, a, i=u.index: self._before_unit(i)))
            self._handles.append(mod.register_forward_hook(lambda m, a, o, i=u.index: self._after_unit(i),
                                                           always_call=True))

    def remove(self) -> None:
        """Remove the hooks and free every buffer (the model can no longer run)."""
        self.close()
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---- pass lifecycle ----------------------------------------------------------------------------------
    def _begin_pass(self, module: torch.nn.Module, args: Any) -> None:
        me = threading.current_thread()
        with self.daemon.cond:
            stale = self._pass
            if stale is not None:
                if stale.owner is me or not stale.owner.is_alive():
                    pass  # a previous pass on this thread was interrupted (e.g. Ctrl-C inside torch code)
                else:
                    raise EngineError("this streamed model is already running a forward pass in another thread; "
                                      "a Hermes model serves one call at a time — serialize calls with a lock "
                                      "or load one model per thread")
        if stale is not None:
            stale.aborted = True
            self._finish(stale)
        with self.daemon.cond:
            p = self._next if self._session else None
            self._next = None
            if p is not None and (p.cancelled or p.error is not None):
                p.owner = me
                self._pass = p
                return  # its agents failed: the first unit raises the error
            if p is not None:  # prefetched during the previous pass: make its times relative to this forward
                shift = time.perf_counter() - p.t0
                p.owner, p.t0 = me, p.t0 + shift
                for ev in p.events.values():
                    for f in ("reserve", "load_start", "load_end", "free"):
                        if getattr(ev, f) is not None:
                            setattr(ev, f, getattr(ev, f) - shift)
                p.stats.memory = [(t - shift, a, h) for t, a, h in p.stats.memory]
                if p.next_claim >= len(p.schedule):  # its agents finished before it began
                    self._prefetch_next(p)
            else:
                self.daemon.open()
                p = self._new_pass(me)
            self.daemon.peak, self.daemon.held_peak = self.daemon.allocated, self.daemon.held
            self._pass = p
            self._sample(p)
            if not p.threads:
                self._start_agents(p)

    def _new_pass(self, owner: threading.Thread | None, after: _Pass | None = None) -> _Pass:
        schedule = [u.index for u in self.units if u.index not in self._resident_loaded and
                    u.index not in self.aliases and (after is None or u.index not in self.resident)]
        p = _Pass(schedule, owner, time.perf_counter(), after)
        p.stats.loaders = self.config.loaders
        p.stats.budget_bytes = self.config.budget_bytes
        p.events = {u.index: UnitEvent(u.index, u.name, u.nbytes) for u in self.units}
        return p

    def _prefetch_next(self, p: _Pass) -> None:
        """Cross-pass prefetch (``cond`` held): once running pass ``p`` has handed out its last unit, start the
        agents of the next pass. Only one pass ahead: a pass not begun yet starts its successor when it begins."""
        if self._session and p.successor is None and p.owner is not None and not p.cancelled:
            p.successor = self._next = self._new_pass(None, after=p)
            self._start_agents(p.successor)

    def _start_agents(self, p: _Pass) -> None:
        for agent in range(min(self.config.loaders, max(len(p.schedule), 1))):
            t = threading.Thread(target=self._loader, args=(p, agent), name=f"hermes-loader-{agent}", daemon=True)
            p.threads.append(t)
            t.start()

    def _end_pass(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        p = self._pass
        if p is None or p.owner is not threading.current_thread():
            return  # e.g. a second thread refused by _begin_pass: the running pass is not its to end
        if output is None:  # the forward raised (torch calls always_call hooks without a result)
            p.aborted = True
        self._finish(p)
        if p.error is not None and not p.error_surfaced:
            raise LoadError(f"a loading agent failed: {p.error}") from p.error

    def _finish(self, p: _Pass, *, record: bool = True) -> None:
        with self.daemon.cond:
            p.cancelled = True
            if p.error is not None or p.aborted:
                # the forward did not complete (or is not one): what was prefetched after it must not be used
                p.aborted = True
                if self._next is p.successor:
                    self._next = None
            self.daemon.cond.notify_all()
        for t in p.threads:
            t.join()
        if p.aborted and p.successor is not None:
            self._finish(p.successor, record=False)
        with self.daemon.cond:
            for pos, loaded in [*p.ready.items(), *self._attached.values()]:
                self._release(p, pos, loaded)
            p.ready.clear()
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
        self.last = p.stats
        self.passes += 1
        if self.history is not None:
            self.history.append(p.stats)

    def close(self) -> None:
        """End any pass in progress and free every buffer, resident ones included."""
        if self._pass is not None:
            self._finish(self._pass)
        self._drop_next()
        with self.daemon.cond:
            for i, loaded in list(self._resident_loaded.items()):
                self._detach(i)
                self.daemon.give_back(loaded.buffer)
            self._resident_loaded.clear()
        self.daemon.trim()

    # ---- loading agents ----------------------------------------------------------------------------------
    def _loader(self, p: _Pass, agent: int) -> None:
        reader = _Reader(self.config.io == "direct")
        cond = self.daemon.cond
        try:
            while True:
                with cond:
                    if p.cancelled or p.error is not None:
                        return
                    if p.next_claim >= len(p.schedule):
                        self._prefetch_next(p)
                        return
                    pos = p.next_claim
                    p.next_claim += 1
                    unit = self.units[p.schedule[pos]]

                    def admissible(pos: int = pos) -> bool:
                        if p.cancelled or p.error is not None:
                            raise _Cancelled
                        if p.next_admit != pos:
                            return False
                        ahead = pos - p.consumed
                        if p.after is not None and not p.after.cancelled:  # the pass before is still running
                            if p.after.next_admit < len(p.after.schedule):
                                return False
                            ahead += len(p.after.schedule) - p.after.consumed
                        depth = self.config.prefetch
                        return depth is None or ahead < depth

                    buf = self.daemon.take(unit.buffer_bytes, resident=unit.index in self.resident,
                                           wait_until=admissible)
                    p.next_admit += 1
                    ev = p.events[unit.index]
                    ev.agent, ev.reserve = agent, time.perf_counter() - p.t0
                    self._sample(p)
                    cond.notify_all()
                try:
                    ev.load_start = time.perf_counter() - p.t0
                    if self.before_read is not None:
                        self.before_read(unit)
                    reader.read(unit, buf)
                    params = _views(unit, buf)
                    ev.load_end = time.perf_counter() - p.t0
                except BaseException:
                    with cond:
                        self.daemon.give_back(buf)
                    raise
                with cond:
                    loaded = _Loaded(unit, buf, params)
                    p.stats.bytes_read += unit.nbytes
                    p.stats.units_loaded += 1
                    if p.cancelled:
                        self._release(p, pos, loaded)
                        return
                    p.ready[pos] = loaded
                    cond.notify_all()
        except _Cancelled:
            return
        except BaseException as exc:  # noqa: BLE001 - surfaced in the inference agent by _consume
            with cond:
                if p.error is None:
                    p.error = exc
                cond.notify_all()
        finally:
            reader.close()

    # ---- inference agent ---------------------------------------------------------------------------------
    def _before_unit(self, index: int) -> None:
        p = self._pass
        if p is None:
            raise EngineError(f"unit {self.units[index].name!r} was called outside a forward of the streamed model; "
                              "call the model object returned by hermes.load, not its submodules")
        if index < p.expect:
            raise EngineError(f"unit {self.units[index].name!r} ran twice or out of order in one forward pass; "
                              "hermes streams units in module registration order and cannot serve this model")
        for skipped in range(p.expect, index):  # units the forward did not call (e.g. an unused pooler)
            self._consume(p, skipped, attach=False)
        self._consume(p, index, attach=True)
        p.events[index].compute_start = time.perf_counter() - p.t0
        p.expect = index + 1

    def _consume(self, p: _Pass, index: int, *, attach: bool) -> None:
        if index in self.aliases:  # tied weights: the serving unit was loaded (and kept) before this one
            source = self._resident_loaded.get(self.aliases[index])
            if source is None:
                raise EngineError(f"unit {self.units[index].name!r} shares weights with "
                                  f"{self.units[self.aliases[index]].name!r}, which is not loaded")
            if attach:
                by_key = {s.key: prm for s, prm in zip(source.unit.slots, source.params, strict=True)}
                self._attach(index, [by_key[s.key] for s in self.units[index].slots])
            return
        if index in self._resident_loaded:
            if attach:
                self._attach(index, self._resident_loaded[index].params)
            return
        pos = p.position[index]
        cond = self.daemon.cond
        t0 = time.perf_counter()
        try:
            with cond:
                while pos not in p.ready:
                    if p.error is not None:
                        p.error_surfaced = True
                        raise LoadError(f"loading unit {self.units[index].name!r} failed: {p.error}") from p.error
                    if p.cancelled:
                        raise EngineError("this forward pass was cancelled (the engine was closed meanwhile)")
                    cond.wait()
                loaded = p.ready.pop(pos)
        except BaseException:
            # Ctrl-C or a loader error while waiting: stop the agents now, not at the end of the forward.
            with cond:
                p.cancelled = p.aborted = True
                cond.notify_all()
            raise
        p.stats.stall_s += time.perf_counter() - t0
        if attach:
            self._attach(index, loaded.params)
            self._attached[index] = (pos, loaded)
        elif index in self.resident:  # not called by this forward, but kept
            with cond:
                self._resident_loaded[index] = loaded
                p.consumed += 1
                cond.notify_all()
        else:
            with cond:
                self._release(p, pos, loaded)

    def _after_unit(self, index: int) -> None:
        p = self._pass
        if p is None:
            return
        p.events[index].compute_end = time.perf_counter() - p.t0
        attached = self._attached.pop(index, None)
        if attached is None:
            return  # a resident unit loaded in an earlier pass
        pos, loaded = attached
        if index in self.resident:  # stays loaded and attached across passes
            with self.daemon.cond:
                self._resident_loaded[index] = loaded
                p.consumed += 1
                self.daemon.cond.notify_all()
            return
        self._detach(index)  # before the buffer can be reused by a loading agent
        with self.daemon.cond:
            self._release(p, pos, loaded)

    # ---- helpers -----------------------------------------------------------------------------------------
    def _release(self, p: _Pass, pos: int, loaded: _Loaded) -> None:
        """Free a unit's buffer (cond held)."""
        loaded.params.clear()
        self.daemon.give_back(loaded.buffer)
        p.consumed += 1
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


def tied_aliases(units: list[Unit], resident: tuple[str, ...] | list[str] | set[str]) -> dict[int, int]:
    """Units every tensor of which is also a tensor of an earlier resident unit (tied weights, e.g. GPT-2's
    lm_head and its token embedding): they are served from that unit's loaded bytes — no buffer, no read.
    Returns {unit index: index of the resident unit serving it}."""
    sources = [u for u in units if u.name in resident]
    out: dict[int, int] = {}
    for u in units:
        if not u.shares:
            continue
        keys = {s.key for s in u.slots}
        for r in sources:
            if r.index < u.index and r.index not in out and keys <= {s.key for s in r.slots}:
                out[u.index] = r.index
                break
    return out


def minimum_budget(units: list[Unit], resident: tuple[str, ...] | list[str] = ()) -> int:
    """Smallest weight budget that can run the model: every resident unit plus the largest streamed unit
    (units served by a resident unit's tied weights cost nothing)."""
    alias = tied_aliases(units, resident)
    res = sum(u.buffer_bytes for u in units if u.name in resident and u.index not in alias)
    streamed = [u.buffer_bytes for u in units if u.name not in resident and u.index not in alias]
    return res + (max(streamed) if streamed else 0)


def _ceil_mib(n: int) -> int:
    return -(-n // 2**20)
