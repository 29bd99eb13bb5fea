"""Inputs of a benchmark's lower bound (``hermes bench --bounds``): per-unit compute with every weight resident and
the best cold read bandwidth of the disk. Run through ``python -m hermes.baselines bounds`` in a fresh process."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from hermes.inputs import build_inputs


def profile_bounds(model_dir: str, *, seq_len: int, repeat: int = 3) -> dict[str, Any]:
    """Inputs of the lower bound max(sum load, sum compute) + first load: per-unit compute with weights
    resident (best of ``repeat`` warm passes) and the best cold read bandwidth (1, 2, 4 readers; buffered
    and O_DIRECT)."""
    from hermes.api import open_model

    layout = open_model(model_dir)
    units = layout.units
    compute = _resident_compute(model_dir, layout, seq_len=seq_len, repeat=repeat)
    bandwidth = {f"{'direct' if direct else 'buffered'}x{n}": _cold_read_bandwidth(layout.store.files, n, direct)
                 for direct in (False, True) for n in (1, 2, 4)}
    best = max(bandwidth.values())
    sizes = [u.nbytes for u in units]
    # a gathered embedding is read a few rows at a time, never whole (a head tied to it streams as its own chunks)
    read = [u.nbytes for u in units if u.kind != "gather"]
    sum_load = sum(read) / best
    bound = max(sum_load, sum(compute)) + read[0] / best
    return {"unit_compute_s": compute, "unit_bytes": sizes, "unit_names": [u.name for u in units],
            "read_bandwidth_bps": bandwidth, "best_bandwidth_bps": best, "sum_load_s": sum_load,
            "first_load_s": read[0] / best, "sum_compute_s": sum(compute), "lower_bound_s": bound}


def _resident_compute(model_dir: str, layout: Any, *, seq_len: int, repeat: int) -> list[float]:
    """Per-unit compute times with every unit resident: those of the fastest of ``repeat`` warm passes."""
    from hermes.api import load
    from hermes.engine import minimum_budget

    units = layout.units
    model = load(model_dir, budget=minimum_budget(units, [u.name for u in units]), loaders=1,
                 resident=[u.name for u in units])
    model.hermes.allow_bypass = False  # per-unit compute times are what is measured here
    inputs = build_inputs(model_dir, layout.config, random_seq_len=seq_len)
    compute: list[float] | None = None
    with torch.no_grad():
        for i in range(repeat + 1):
            model(**inputs)
            times = [e.compute_s for e in model.hermes.last.events]
            if i > 0 and (compute is None or sum(times) < sum(compute)):
                compute = times
    model.hermes.remove()
    assert compute is not None
    return compute


def _cold_read_bandwidth(files: list[Path], readers: int, direct: bool) -> float:
    """Bytes/s reading ``files`` whole from a cold page cache in 32 MiB chunks with ``readers`` threads."""
    import os
    import threading

    from hermes.engine import new_buffer
    from hermes.store import evict_page_cache

    chunk = 32 * 2**20
    evict_page_cache(files)
    jobs = [(f, o) for f in files for o in range(0, f.stat().st_size // 4096 * 4096, chunk)]
    lock = threading.Lock()

    def reader() -> None:
        buf = new_buffer(chunk)  # as the engine's arena (huge pages where allowed)
        view = memoryview(buf)
        while True:
            with lock:
                if not jobs:
                    break
                path, off = jobs.pop()
            fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
            try:
                os.preadv(fd, [view], off)
            finally:
                os.close(fd)
        view.release()

    nbytes = sum(f.stat().st_size for f in files)
    t = time.perf_counter()
    threads = [threading.Thread(target=reader) for _ in range(readers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return nbytes / (time.perf_counter() - t)
