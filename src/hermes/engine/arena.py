"""Weight memory: page-aligned buffers and the arena (a FIFO ring for streamed units). The daemon (``daemon.py``)
owns them and admits units into them."""
from __future__ import annotations

import contextlib
import logging
import mmap
import os
from dataclasses import dataclass

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
