"""Reading a unit's byte ranges into its buffer (buffered or O_DIRECT) and viewing them as parameters."""
from __future__ import annotations

import logging
import os
from typing import Any

import torch

from hermes.engine.arena import Buf
from hermes.store import PAGE, read_exact
from hermes.units import Segment, Unit, round_up

log = logging.getLogger(__name__)


class Reader:
    """Per-agent file reader (buffered or O_DIRECT)."""

    def __init__(self, direct: bool) -> None:
        self.direct = direct
        self._fds: dict[Any, int] = {}

    def _fd(self, path: Any, direct: bool | None = None) -> int:
        """The file's descriptor, O_DIRECT as this reader reads (``direct=False``: a buffered one)."""
        direct = self.direct if direct is None else direct and self.direct
        key = path if direct == self.direct else (path, "buffered")
        fd = self._fds.get(key)
        if fd is None:
            flags = os.O_RDONLY
            if direct:
                try:
                    fd = os.open(path, flags | os.O_DIRECT)
                except OSError:  # filesystems such as tmpfs refuse O_DIRECT
                    log.info("O_DIRECT refused for %s; using buffered reads", path)
                    fd = os.open(path, flags)
            else:
                fd = os.open(path, flags)
            self._fds[key] = fd
        return fd

    def read(self, unit: Unit, buf: Buf, segments: list[Segment] | None = None) -> None:
        """Read the unit's segments (or only ``segments`` of them) into ``buf``. A strided slice's pieces are read
        buffered to their exact place, then dropped from the page cache where reads are O_DIRECT."""
        view = memoryview(buf.mm)[buf.offset: buf.offset + unit.buffer_bytes]
        spans: dict[Any, list[int]] = {}
        try:
            for seg in unit.segments if segments is None else segments:
                if self.direct and seg.direct:
                    fd = self._fd(seg.path)
                    length = -(-(seg.end - seg.read_start) // PAGE) * PAGE
                    dest = view[seg.read_buf_offset: seg.read_buf_offset + length]
                    try:
                        read_exact(fd, seg.read_start, dest, seg.path, min_bytes=seg.end - seg.read_start)
                        continue
                    except OSError:  # O_DIRECT not possible here: fall back to a buffered read
                        self.direct = False
                        os.close(self._fds.pop(seg.path))
                elif self.direct:
                    span = spans.setdefault(seg.path, [seg.start, seg.end])
                    span[0], span[1] = min(span[0], seg.start), max(span[1], seg.end)
                fd = self._fd(seg.path, direct=False)
                read_exact(fd, seg.start, view[seg.buf_offset: seg.buf_offset + seg.end - seg.start], seg.path)
        finally:
            view.release()
            for path, (a, b) in spans.items():
                os.posix_fadvise(self._fd(path, direct=False), a, b - a, os.POSIX_FADV_DONTNEED)

    def read_rows(self, path: Any, base: int, row_bytes: int, ids: list[int], dest: memoryview,
                  bounce: memoryview) -> None:
        """Read rows ``ids`` (ascending) of a row-major tensor starting at file offset ``base`` into ``dest``, one
        after another; runs of consecutive ids are one read. With O_DIRECT, whole pages are read into the
        page-aligned ``bounce`` (a multiple of pages) and the rows copied out of it."""
        fd = self._fd(path)
        pos = 0
        while pos < len(ids):
            end = pos + 1
            while end < len(ids) and ids[end] == ids[end - 1] + 1:
                end += 1
            off = base + ids[pos] * row_bytes
            out = dest[pos * row_bytes: end * row_bytes]
            if self.direct:
                try:
                    self._read_paged(fd, path, off, out, bounce)
                except OSError:  # O_DIRECT not possible here
                    self.direct = False
                    os.close(self._fds.pop(path))
                    fd = self._fd(path)
                    read_exact(fd, off, out, path)
            else:
                read_exact(fd, off, out, path)
            pos = end

    @staticmethod
    def _read_paged(fd: int, path: Any, off: int, out: memoryview, bounce: memoryview) -> None:
        done = 0
        while done < len(out):
            start = off + done
            lead = start % PAGE
            take = min(len(out) - done, len(bounce) - lead)
            span = round_up(lead + take, PAGE)
            read_exact(fd, start - lead, bounce[:span], path, min_bytes=lead + take)
            out[done: done + take] = bounce[lead: lead + take]
            done += take

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def views(unit: Unit, buf: Buf) -> list[torch.nn.Parameter]:
    out = []
    for s in unit.slots:
        if s.nbytes == 0:
            t = torch.empty(s.shape, dtype=s.dtype)
        else:
            t = torch.frombuffer(buf.mm, dtype=s.dtype, count=s.nbytes // s.dtype.itemsize,
                                 offset=buf.offset + s.offset)
        out.append(torch.nn.Parameter(t.view(s.shape), requires_grad=False))
    return out
