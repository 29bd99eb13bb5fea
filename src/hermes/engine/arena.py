"""Weight memory: page-aligned buffers, the arena (a FIFO ring for streamed units) and the daemon's admission
control over it (the budget is never exceeded, at any instant)."""
from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
from dataclasses import dataclass
from typing import Any

from hermes.store import PAGE

log = logging.getLogger(__name__)


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


def unmap(buf: mmap.mmap) -> None:
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

    def _offset(self, size: int) -> int | None:
        if size > self.capacity:
            return None
        if not self.live:
            return 0
        offsets = list(self.live)
        first, last = offsets[0], offsets[-1]
        end = last + self.live[last][0]
        if last >= first:  # not wrapped: free space is [end, capacity) and [0, first)
            return end if end + size <= self.capacity else (0 if size <= first else None)
        return end if end + size <= first else None  # wrapped: free space is [end, first)

    def fits(self, size: int) -> bool:
        """Whether ``size`` contiguous bytes are free now."""
        return self._offset(size) is not None

    def take(self, size: int) -> int | None:
        """Offset of ``size`` contiguous free bytes, or None if the ring has no such room now."""
        offset = self._offset(size)
        if offset is not None:
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
        unmap(self.buffer)


@dataclass
class Buf:
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

    def __init__(self, budget_bytes: int, arena_bytes: int, side_bytes: int = 0, *, eager: bool = True) -> None:
        self.budget = budget_bytes
        self.cond = threading.Condition()
        self.arena: Arena | None = None
        self.arena_bytes = arena_bytes
        self.side_bytes = side_bytes  # one buffer the inference agent reads into: routed experts, embedding rows
        self.side_buffer: mmap.mmap | None = None
        self.resident_bytes = 0
        self.held = 0  # bytes of buffers holding a unit
        self.peak = 0
        self.held_peak = 0
        if eager:  # else at the first pass (or reconfigure)
            self.open()

    def open(self) -> None:
        if self.arena is None:
            self.arena = Arena(self.arena_bytes)
            self._account()
        if self.side_bytes and self.side_buffer is None:
            self.side_buffer = new_buffer(self.side_bytes)
            touch_pages(self.side_buffer)
            self._account()

    @property
    def allocated(self) -> int:
        experts = len(self.side_buffer) if self.side_buffer is not None else 0
        return (self.arena.capacity if self.arena else 0) + self.resident_bytes + experts

    def _account(self) -> None:
        self.peak = max(self.peak, self.allocated)
        self.held_peak = max(self.held_peak, self.held)

    def take(self, size: int, *, resident: bool, wait_until: Any) -> Buf:
        """Wait until ``wait_until()`` holds and the unit fits, then hand out its buffer (``cond`` held).

        ``wait_until`` raises to give up; whoever makes it true or frees memory notifies ``cond``."""
        while True:
            if wait_until():
                if resident:  # its bytes were set aside when the arena was sized
                    self.resident_bytes += size
                    self.held += size
                    self._account()
                    return Buf(new_buffer(size, huge=False), 0, size, True)
                assert self.arena is not None
                offset = self.arena.take(size)
                if offset is not None:
                    self.held += size
                    self._account()
                    return Buf(self.arena.buffer, offset, size, False)
            self.cond.wait()

    def give_back(self, buf: Buf) -> None:
        """Release a unit's buffer (``cond`` held)."""
        self.held -= buf.size
        if buf.resident:
            self.resident_bytes -= buf.size
            unmap(buf.mm)
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
            if self.side_buffer is not None:
                freed += len(self.side_buffer)
                unmap(self.side_buffer)
                self.side_buffer = None
            return freed
