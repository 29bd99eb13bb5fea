"""Strategies a benchmark compares, each run once in the current (fresh) process.

- ``full``: ``from_pretrained`` + forward (what a user would do with enough memory).
- ``pipeswitch``: pipelined loading with one loader, keeping every layer (PipeSwitch).
- ``sequential``: load -> compute -> free, one unit at a time, no overlap.
- ``pipeload``: Hermes, with the given loaders / I/O mode.
Run as ``python -m hermes.baselines STRATEGY MODEL_DIR ...``: prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from hermes.inputs import build_inputs
from hermes.memory import current_rss, parse_bytes, peak_rss, reset_peak_rss

STRATEGIES = ("full", "pipeswitch", "sequential", "pipeload")


def run_strategy(strategy: str, model_dir: str, *, budget: int, seq_len: int, loaders: int = 2,
                 io: str = "buffered", cold: bool = True) -> dict[str, Any]:
    """Run one strategy once: time from nothing loaded to the first output, and peak memory."""
    from hermes.store import Store, evict_page_cache
    from hermes.units import load_config, resolve_model_class

    config = load_config(model_dir)
    inputs = build_inputs(model_dir, config, random_seq_len=seq_len)
    model_class = resolve_model_class(config)  # imports count as runtime for every strategy, not as loading
    import hermes.api  # noqa: F401
    if cold:
        evict_page_cache(Store(model_dir).files)
    baseline = current_rss()
    reset_peak_rss()
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    with torch.no_grad():
        if strategy == "full":
            model = model_class.from_pretrained(model_dir).eval()
            t1 = time.perf_counter()
            model(**inputs)
            extra = {"load_s": t1 - t0, "forward_s": time.perf_counter() - t1}
        else:
            from hermes.api import load, open_model

            units = open_model(model_dir).units
            names = [u.name for u in units]
            total = sum(u.buffer_bytes for u in units)
            kw: dict[str, Any] = {
                "pipeswitch": {"budget": total, "loaders": 1, "resident": names},
                "sequential": {"budget": budget, "loaders": 1, "prefetch": 1},
                "pipeload": {"budget": budget, "loaders": loaders},
            }[strategy]
            model = load(model_dir, io=io if strategy != "pipeswitch" else "buffered", **kw)
            t1 = time.perf_counter()
            model(**inputs)
            st = model.hermes.last
            extra = {"load_s": t1 - t0, "forward_s": st.latency_s, "stall_s": st.stall_s,
                     "weights_peak_bytes": st.weights_peak_bytes, "budget_bytes": kw["budget"],
                     "loaders": kw["loaders"], "io": io if strategy != "pipeswitch" else "buffered"}
    latency = time.perf_counter() - t0
    peak = peak_rss()
    return {"strategy": strategy, "latency_s": latency, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
            "peak_rss_above_baseline_bytes": peak - baseline, **extra}


def profile_bounds(model_dir: str, *, seq_len: int, repeat: int = 3) -> dict[str, Any]:
    """Inputs of the lower bound max(sum load, sum compute) + first load: per-unit compute with weights
    resident (best of ``repeat`` warm passes) and the best cold read bandwidth (1, 2, 4 readers; buffered
    and O_DIRECT)."""
    import mmap
    import os
    import threading

    from hermes.api import load, open_model
    from hermes.store import evict_page_cache

    layout = open_model(model_dir)
    units = layout.units
    model = load(model_dir, budget=sum(u.buffer_bytes for u in units), loaders=1,
                 resident=[u.name for u in units])
    inputs = build_inputs(model_dir, layout.config, random_seq_len=seq_len)
    compute: list[float] | None = None
    with torch.no_grad():
        for i in range(repeat + 1):
            model(**inputs)
            times = [e.compute_end - e.compute_start for e in model.hermes.last.events]
            if i > 0 and (compute is None or sum(times) < sum(compute)):
                compute = times
    model.hermes.remove()
    assert compute is not None
    files = layout.store.files
    chunk = 32 * 2**20
    bandwidth: dict[str, float] = {}
    for direct in (False, True):
        for n in (1, 2, 4):
            evict_page_cache(files)
            jobs = [(f, o) for f in files for o in range(0, f.stat().st_size // 4096 * 4096, chunk)]
            lock = threading.Lock()

            def reader(jobs: list = jobs, lock: threading.Lock = lock, direct: bool = direct) -> None:
                buf = mmap.mmap(-1, chunk)
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
            threads = [threading.Thread(target=reader) for _ in range(n)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            bandwidth[f"{'direct' if direct else 'buffered'}x{n}"] = nbytes / (time.perf_counter() - t)
    best = max(bandwidth.values())
    sizes = [u.nbytes for u in units]
    sum_load = sum(sizes) / best
    bound = max(sum_load, sum(compute)) + sizes[0] / best
    return {"unit_compute_s": compute, "unit_bytes": sizes, "unit_names": [u.name for u in units],
            "read_bandwidth_bps": bandwidth, "best_bandwidth_bps": best, "sum_load_s": sum_load,
            "sum_compute_s": sum(compute), "lower_bound_s": bound}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hermes.baselines")
    p.add_argument("strategy", choices=[*STRATEGIES, "bounds"])
    p.add_argument("model_dir")
    p.add_argument("--budget", default="0")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--loaders", type=int, default=2)
    p.add_argument("--io", default="buffered")
    p.add_argument("--warm", action="store_true", help="do not evict the page cache first")
    a = p.parse_args(argv)
    if a.strategy == "bounds":
        res = profile_bounds(a.model_dir, seq_len=a.seq_len)
    else:
        budget = parse_bytes(a.budget) if a.strategy in ("sequential", "pipeload") else 0
        res = run_strategy(a.strategy, a.model_dir, budget=budget, seq_len=a.seq_len, loaders=a.loaders,
                           io=a.io, cold=not a.warm)
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
