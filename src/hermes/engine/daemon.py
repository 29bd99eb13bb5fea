"""The daemon of the paper: the one owner of weight memory. Loading agents ask it for a unit's buffer before they
read (admission control: the budget is never exceeded, at any instant); the inference agent hands each unit back
once computed, and the daemon frees it. Agents coordinate on its condition variable (``cond``), never by polling.
"""
from __future__ import annotations

import mmap
import threading
from typing import Any

from hermes.engine.arena import Arena, Buf, new_buffer, touch_pages, unmap


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
