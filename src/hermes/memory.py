"""Byte sizes, budget parsing and process memory readings (RSS). A leaf module: imports nothing from hermes
except errors."""
from __future__ import annotations

import ctypes
import functools
import gc
import logging
import math
import os
import platform
import re
from dataclasses import dataclass
from typing import Any

from hermes.errors import BudgetError

log = logging.getLogger(__name__)

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | float, *, what: str = "budget") -> int:
    """Parse a size such as ``"300MiB"``, ``"1.5GB"``, ``"4096"`` or an int into a positive number of bytes.

    Raises:
        BudgetError: the text does not parse, or is zero or negative.
    """
    if isinstance(text, bool):
        raise BudgetError(f"{what} must be a size such as '300MiB' or '2GB', got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
        if not math.isfinite(value) or value <= 0:
            raise BudgetError(f"{what} must be a positive size such as '300MiB' or '2GB', got {text!r}")
        return int(value)
    match = _SIZE_RE.match(str(text))
    if str(text).strip().startswith("-"):
        raise BudgetError(f"{what} must be positive, got {text!r}; use a size such as '300MiB' or '2GB'")
    if not match or match.group(2).lower() not in _UNITS:
        raise BudgetError(
            f"cannot parse {what} {text!r}: use a number with an optional unit "
            "(B, KB, MB, GB, KiB, MiB, GiB), e.g. '300MiB' or '1.5GB'"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value < 1:
        raise BudgetError(f"{what} must be positive, got {text!r}; use a size such as '300MiB' or '2GB'")
    return int(value)


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``format_bytes(3 * 2**20) == '3.0 MiB'``."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def machine_ram() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _kib_field(path: str, field: str) -> int | None:
    """A ``Field:   N kB`` line of a /proc file, in bytes (None: no such file or field)."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _status_field(field: str) -> int:
    value = _kib_field("/proc/self/status", field)
    if value is None:
        raise RuntimeError(f"{field} not found in /proc/self/status")
    return value


def current_rss() -> int:
    """Resident set size of this process, in bytes."""
    return _status_field("VmRSS")


def peak_rss() -> int:
    """Peak resident set size of this process (VmHWM) since start or since the last :func:`reset_peak_rss`."""
    return _status_field("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS. Returns False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


@functools.cache
def glibc() -> Any:
    """The C library when it is glibc (its allocator's ``mallopt``, ``malloc_trim``), else None."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_free_heap() -> int:
    """Give the C allocator's free heap pages back to the OS (glibc ``malloc_trim(0)``); returns the bytes RSS fell
    by (0 where the C library is not glibc). Loading a tokenizer frees most of what it allocated but glibc keeps
    it: Llama 3's left 153 MiB of free heap counted in RSS (AutoTokenizer: RSS +285 MiB, +132 MiB after the trim),
    which every budget measured against the process's memory would have lost."""
    libc = glibc()
    if libc is None:
        return 0
    before = current_rss()
    try:
        libc.malloc_trim(0)
    except AttributeError:
        return 0
    released = max(0, before - current_rss())
    log.debug("free heap given back: %s", format_bytes(released))
    return released


def settled_rss() -> int:
    """RSS once the process has given back what it no longer holds: Python's unreachable cycles collected and the
    allocator's free heap trimmed. A baseline taken without this counts garbage that a collection during the
    measured work then frees, and the growth above it comes out short of what the work held (seen in a long-lived
    process: a run's peak 200 KiB above a baseline while its weight arena alone held 272 KiB)."""
    gc.collect()
    release_free_heap()
    return current_rss()


_UNLIMITED = 1 << 60


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except OSError:
        return None
    if text == "max":
        return _UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _stat(path: str, *names: str) -> int:
    total = 0
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key in names:
                    total += int(value)
    except (OSError, ValueError):
        return 0
    return total


def _reclaimable(stat: str, v1_prefix: str = "") -> int:
    """The page cache a cgroup's ``memory.stat`` says the kernel can reclaim: its file pages less the mapped ones
    (v1 names them ``total_inactive_file``, ... ``total_mapped_file``; v2 ``inactive_file``, ... ``file_mapped``)."""
    files = _stat(stat, f"{v1_prefix}inactive_file", f"{v1_prefix}active_file")
    return max(files - _stat(stat, "total_mapped_file" if v1_prefix else "file_mapped"), 0)


def cgroup_memory_room(*, root: str = "/sys/fs/cgroup", membership: str = "/proc/self/cgroup"
                       ) -> tuple[int, int, str] | None:
    """(memory limit of this process's cgroup, what the group may still take, the limit's file) under cgroup v1
    (the hierarchical limit) or v2 (the level on the way to the root that leaves the least room). What it may
    still take is the limit minus the group's usage, its page cache excluded (the kernel reclaims it under the
    limit) — except mapped file pages (the code and files the processes are running: reclaiming them makes the
    process fault them back in; a ring device's cap was overrun by them) and shared memory (not reclaimed without
    swap). None when no limit applies or none can be read. ``root`` and ``membership`` are the cgroup mount and
    this process's membership file."""
    try:
        with open(membership, encoding="ascii") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    best: tuple[int, int, str] | None = None
    for _, controllers, path in (x for x in lines if len(x) == 3):
        if "memory" in controllers.split(","):  # v1: the group's own directory, or the mount root in a namespace
            for d in (f"{root}/memory{path}".rstrip("/"), f"{root}/memory"):
                limit = _read_int(f"{d}/memory.limit_in_bytes")
                usage = _read_int(f"{d}/memory.usage_in_bytes")
                if limit is None or usage is None:
                    continue
                limit = min(limit, _stat(f"{d}/memory.stat", "hierarchical_memory_limit") or limit)
                cache = _reclaimable(f"{d}/memory.stat", "total_")
                if limit < _UNLIMITED and (best is None or limit - usage + cache < best[1]):
                    best = (limit, limit - usage + cache, f"{d}/memory.limit_in_bytes")
                break
        elif controllers == "":  # v2: every level's memory.max bounds the group
            parts = [p for p in path.split("/") if p]
            for k in range(len(parts), -1, -1):
                d = (f"{root}/" + "/".join(parts[:k])).rstrip("/")
                limit, usage = _read_int(f"{d}/memory.max"), _read_int(f"{d}/memory.current")
                if limit is None or usage is None or limit >= _UNLIMITED:
                    continue
                room = limit - usage + _reclaimable(f"{d}/memory.stat")
                if best is None or room < best[1]:
                    best = (limit, room, f"{d}/memory.max")
    return best


@dataclass(frozen=True)
class AutoBudget:
    """What ``budget="auto"`` chose, and from what."""

    budget_bytes: int  # what this process may still take: min(cgroup limit - group usage w/o cache, MemAvailable)
    source: str  # where it comes from

    def describe(self) -> str:
        return (f"budget auto = {format_bytes(self.budget_bytes)}: what {self.source} leaves this process "
                "(its runtime slack inside, as in every budget)")


def auto_budget() -> AutoBudget:
    """The memory budget of ``budget="auto"``: the memory this process may still take (its cgroup's limit minus
    what the group already holds — the Python runtime, torch, the model skeleton — page cache excepted, or the
    machine's MemAvailable, whichever is smaller). Like every budget it holds the runtime slack
    (:mod:`hermes.share`): that is the one margin, the same as a fixed budget's.

    Raises:
        BudgetError: nothing is usable.
    """
    release_free_heap()  # what the process has freed is not what it holds
    avail = _kib_field("/proc/meminfo", "MemAvailable")
    usable, source = (avail, "MemAvailable") if avail is not None else (None, "")
    cg = cgroup_memory_room()
    if cg is not None and (usable is None or cg[1] < usable):
        usable = cg[1]
        source = f"the cgroup limit {format_bytes(cg[0])} ({cg[2]}) minus what the group holds"
    if usable is None:
        raise BudgetError("budget 'auto' cannot read this machine's available memory (/proc/meminfo); give a size")
    if usable <= 0:
        raise BudgetError(f"budget 'auto': nothing is usable ({source}); free memory or give a size")
    return AutoBudget(usable, source)
