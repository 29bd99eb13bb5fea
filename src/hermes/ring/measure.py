"""What each device of a ring measures of itself when the ring assembles, for the block assignment: how fast it
computes a decode step's bytes (a matrix-vector product in the model's dtype over a matrix larger than the CPU's
caches: a decode step reads each weight once from memory) and how fast it reads its checkpoint cold. The devices
measure one after the other (devices emulated on one machine would otherwise slow each other's figures); about a
quarter of a second each."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SAMPLE_BYTES = 64 * 2**20  # bytes read (cold) and multiplied per measurement: beyond a CPU's last-level cache


@dataclass(frozen=True)
class DeviceFacts:
    """One device's budget and measured speeds (None: not measured; the assignment then shares by budget)."""

    budget_bytes: int
    compute_bps: float | None = None  # weight bytes a decode step computes per second
    disk_bps: float | None = None  # checkpoint bytes read per second, cold


def compute_speed(dtype: torch.dtype, repeat: int = 5) -> float:
    """Weight bytes per second through ``F.linear`` of one row (a decode step) in ``dtype``, median of ``repeat``."""
    cols = 4096
    rows = max(SAMPLE_BYTES // (cols * torch.finfo(dtype).bits // 8), 1)
    w = torch.full((rows, cols), 0.01, dtype=dtype)  # the values do not change the time
    x = torch.full((1, cols), 0.5, dtype=dtype)
    times = []
    with torch.no_grad():
        torch.nn.functional.linear(x, w)  # warm-up
        for _ in range(repeat):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            times.append(time.perf_counter() - t0)
    return w.numel() * w.element_size() / max(sorted(times)[len(times) // 2], 1e-9)


def disk_speed(files: list[Path]) -> float | None:
    """Bytes per second of a cold read of up to SAMPLE_BYTES from the middle of the largest of ``files`` (its pages
    dropped from the page cache first); None when there is nothing to read."""
    files = [f for f in files if f.is_file()]
    if not files:
        return None
    path = max(files, key=lambda f: f.stat().st_size)
    size = path.stat().st_size
    n = min(SAMPLE_BYTES, size)
    start = (size - n) // 2 // 4096 * 4096
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, start, n, os.POSIX_FADV_DONTNEED)
        buf = bytearray(n)
        t0 = time.perf_counter()
        got = os.preadv(fd, [buf], start)
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return got / max(elapsed, 1e-9)


def measure(files: list[Path], dtype: torch.dtype, budget_bytes: int) -> DeviceFacts:
    """This device's facts for the assignment."""
    return DeviceFacts(budget_bytes, compute_speed(dtype), disk_speed(files))
