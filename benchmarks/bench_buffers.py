"""Reproduce docs/ENGINE.md, section "Huge pages": cold O_DIRECT read bandwidth into three kinds of
pre-faulted buffers, in a process whose free memory has been fragmented by small allocations (as a long-running
process's is): shared anonymous (Python's default mmap), private anonymous with 4 KiB pages, and private
anonymous with transparent huge pages (what the engine's arena uses). Interleaved, medians.

    .venv/bin/python benchmarks/bench_buffers.py [FILE] [--mib 120] [--repeat 5] [-o docs/results/buffers.json]

FILE defaults to the synthesized BERT-Large checkpoint (made on first use, ~1.3 GB).
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

from hermes.atomic import atomic_write_text
from hermes.cli import main
from hermes.engine import new_buffer, touch_pages
from hermes.store import evict_page_cache
from hermes.synth import DEFAULT_CACHE

KINDS = {
    "shared 4 KiB (mmap default)": lambda n: mmap.mmap(-1, n),
    "private 4 KiB": lambda n: mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
    "private, huge pages (engine)": new_buffer,
}


def read_gbps(path: Path, buf: mmap.mmap, size: int, chunk: int = 16 << 20) -> float:
    evict_page_cache([path])
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    view = memoryview(buf)
    try:
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            os.preadv(fd, [view[off: off + chunk]], off)
        return size / (time.perf_counter() - t0) / 1e9
    finally:
        view.release()
        os.close(fd)


def run() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("file", nargs="?", type=Path)
    p.add_argument("--mib", type=int, default=120)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("-o", "--out", type=Path, default=Path("docs/results/buffers.json"))
    a = p.parse_args()
    path = a.file
    if path is None:
        model = DEFAULT_CACHE / "bert-large"
        if not (model / "config.json").is_file() and main(["synth", "bert-large", str(model)]):
            return 1
        path = model / "model.safetensors"
    size = (a.mib << 20) // (16 << 20) * (16 << 20)
    if path.stat().st_size < size:
        print(f"{path} is smaller than {a.mib} MiB; pass a larger file or a smaller --mib", file=sys.stderr)
        return 2
    junk = [bytearray(3 * 4096) for _ in range(200_000)]  # fragment free memory: allocate, free every other
    del junk[::2]
    gbps: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(a.repeat):
        for kind, make in KINDS.items():
            buf = make(size)
            touch_pages(buf)
            gbps[kind].append(read_gbps(path, buf, size))
            buf.close()
    result = {"file": str(path), "bytes": size, "repeat": a.repeat,
              "gbps": {k: {"median": statistics.median(v), "runs": v} for k, v in gbps.items()}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(a.out, json.dumps(result, indent=1))
    for k, v in result["gbps"].items():
        runs = ", ".join(f"{x:.2f}" for x in v["runs"])
        print(f"{k:>30}: {v['median']:.2f} GB/s (median of {a.repeat}; runs {runs})")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
