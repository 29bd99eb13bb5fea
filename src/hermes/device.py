"""Edge-device emulation with cgroup v1: a hard RAM cap (page cache included), a disk read bandwidth cap and a
set of cores, applied to benchmark worker processes.

A :class:`Device` creates its own groups (``/sys/fs/cgroup/<controller>/hermes-<pid>-<n>``), a worker joins
them before it executes (``preexec``), and :meth:`Device.close` removes them. Where cgroup v1 is not writable
(not root, cgroup v2 only, a container) :func:`available` says why and the harness runs without emulation.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hermes.errors import HermesError

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
_counter = itertools.count()


@dataclass(frozen=True)
class DeviceSpec:
    """What to emulate; None leaves that resource as the machine has it."""

    ram_bytes: int | None = None
    read_bps: int | None = None
    cpus: int | None = None
    first_cpu: int = 0  # the cores are first_cpu .. first_cpu + cpus - 1 (devices of a ring get their own)

    @property
    def empty(self) -> bool:
        return self.ram_bytes is None and self.read_bps is None and self.cpus is None

    def describe(self) -> str:
        from hermes.memory import format_bytes

        parts = []
        if self.ram_bytes is not None:
            parts.append(f"RAM {format_bytes(self.ram_bytes)}")
        if self.read_bps is not None:
            parts.append(f"disk {self.read_bps / 1e6:.0f} MB/s")
        if self.cpus is not None:
            parts.append(f"{self.cpus} core(s)")
        return ", ".join(parts) or "the machine as it is"


def emulated_device(*, budget: str, device_ram: str | None = None, disk_bw: str | None = None,
                    cpus: int | None = None) -> DeviceSpec:
    """The device a benchmark emulates, from sizes as given on the command line (``disk_bw`` such as ``200MB/s``).

    Raises:
        HermesError: more cores than this process has, or a RAM size that does not exceed ``budget``.
    """
    from hermes.memory import parse_bytes

    bw = disk_bw
    if bw is not None:
        bw = bw.strip()
        bw = bw[:-2] if bw.lower().endswith("/s") else bw
    cores = len(os.sched_getaffinity(0))
    if cpus is not None and cpus > cores:
        raise HermesError(f"--cpus {cpus}: this machine gives this process {cores} core(s); emulate at most "
                          f"{cores}")
    ram = parse_bytes(device_ram, what="--device-ram") if device_ram else None
    if ram is not None and ram <= parse_bytes(budget):
        raise HermesError(f"--device-ram {device_ram} does not exceed the budget {budget}: the device "
                          "also holds the runtime (Python, torch: about 350 MiB) and the page cache; give more RAM "
                          "or a smaller budget")
    return DeviceSpec(ram_bytes=ram, read_bps=parse_bytes(bw, what="--disk-bw") if bw else None, cpus=cpus)


def _controllers(spec: DeviceSpec) -> list[str]:
    return [c for c, on in (("memory", spec.ram_bytes), ("blkio", spec.read_bps), ("cpuset", spec.cpus))
            if on is not None]


def available(spec: DeviceSpec) -> str | None:
    """None when ``spec`` can be emulated here, else the reason it cannot."""
    for c in _controllers(spec):
        d = ROOT / c
        if not d.is_dir():
            return f"cgroup v1 controller {c!r} is not mounted at {d}"
        if not os.access(d, os.W_OK):
            return f"{d} is not writable (emulation needs root)"
    if spec.cpus is not None and spec.cpus > (os.cpu_count() or 1):
        return f"--cpus {spec.cpus} exceeds the machine's {os.cpu_count()} cores"
    return None


def block_device(path: str | os.PathLike[str]) -> str:
    """``major:minor`` of the whole disk holding ``path`` (the blkio throttle wants a disk, not a partition)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    sys_dev = Path(f"/sys/dev/block/{major}:{minor}")
    if (sys_dev / "partition").exists():  # a partition: throttle its parent disk
        parent = (sys_dev.resolve().parent / "dev")
        if parent.exists():
            return parent.read_text().strip()
    return f"{major}:{minor}"


class Device:
    """cgroups emulating ``spec`` for worker processes reading from ``data_path``'s disk."""

    def __init__(self, spec: DeviceSpec, data_path: str | os.PathLike[str]) -> None:
        why = available(spec)
        if why is not None:
            raise HermesError(f"cannot emulate {spec.describe()}: {why}")
        self.spec = spec
        self.name = f"hermes-{os.getpid()}-{next(_counter)}"
        self.groups: list[Path] = []
        try:
            for c in _controllers(spec):
                g = ROOT / c / self.name
                g.mkdir()
                self.groups.append(g)
                if c == "memory":
                    (g / "memory.limit_in_bytes").write_text(str(spec.ram_bytes))
                    swap = g / "memory.memsw.limit_in_bytes"
                    if swap.exists():  # no swapping around the cap
                        swap.write_text(str(spec.ram_bytes))
                elif c == "blkio":
                    (g / "blkio.throttle.read_bps_device").write_text(f"{block_device(data_path)} {spec.read_bps}")
                elif c == "cpuset":
                    a, n = spec.first_cpu, spec.cpus or 1
                    (g / "cpuset.cpus").write_text(f"{a}-{a + n - 1}" if n > 1 else str(a))
                    (g / "cpuset.mems").write_text((ROOT / "cpuset" / "cpuset.mems").read_text().strip())
        except OSError as exc:
            self.close()
            raise HermesError(f"cannot set up cgroups for {spec.describe()}: {exc}") from exc

    def preexec(self) -> None:
        """Run in the child between fork and exec: join every group (before the workload allocates)."""
        for g in self.groups:
            (g / "cgroup.procs").write_text(str(os.getpid()))

    def oom_killed(self) -> bool:
        """Whether the RAM cap killed a process of this device (memory.failcnt and oom_control)."""
        g = ROOT / "memory" / self.name
        try:
            oom = (g / "memory.oom_control").read_text()
        except OSError:
            return False
        return any(line.startswith("oom_kill ") and int(line.split()[1]) > 0 for line in oom.splitlines())

    def close(self) -> None:
        for g in reversed(self.groups):
            for attempt in range(20):  # a worker that just exited can stay in a group's task list a moment
                try:
                    g.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if attempt == 19:
                        log.warning("could not remove cgroup %s: %s", g, exc)
                    time.sleep(0.05)
        self.groups.clear()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def device_info(spec: DeviceSpec | None) -> dict[str, Any]:
    """What the results record about emulation: asked for, applied or not (and why)."""
    if spec is None or spec.empty:
        return {"emulated": False, "requested": None, "describe": "the machine as it is"}
    why = available(spec)
    return {"emulated": why is None, "requested": asdict(spec), "describe": spec.describe(), "skipped_because": why}
