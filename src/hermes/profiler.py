"""Layer Profiler: per-unit bytes, cold load time, compute time, the contention between loading and
computing on this machine, read bandwidth by number of readers, and the activation peak.

Profiling runs the PipeLoad engine itself under a small budget, so a model that does not fit in memory can
be profiled on the device that will run it: a sequential pass (prefetch 0: each unit read when the forward
asks for it, no read overlapping a compute) gives clean load and compute times, a pipelined pass gives how much
each slows the other.
"""
from __future__ import annotations

import itertools
import logging
import mmap
import os
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hermes.profile import (
    FORMAT_VERSION,
    IO_MODES,
    READERS,
    Profile,
    UnitProfile,
    cached_profile,
    cached_profiles,
    calibration_budgets,
    default_profile_path,
    machine_facts,
    profile_key,
    setting,
)
from hermes.store import evict_page_cache

log = logging.getLogger(__name__)


def profile_inputs(model_dir: str | os.PathLike[str], seq_len: int, batch: int) -> dict[str, torch.Tensor]:
    """The inputs a profile is measured (and looked up) for: ``batch`` random inputs of ``seq_len`` tokens (vision
    models: random images of the model's size)."""
    from hermes.inputs import build_inputs
    from hermes.skeleton import load_config

    return build_inputs(model_dir, load_config(model_dir), random_seq_len=seq_len, batch=batch)


#: the input length profiled when none is given and no profile is cached
DEFAULT_SEQ_LEN = 128
#: ``progress(done, total, what)``: steps done of ``total``, and the step starting now
Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ProfileChoice:
    """Which input to plan for and its cached profile, if any (:func:`choose_profile`)."""

    seq_len: int
    batch: int
    profile: Profile | None  # None: it must be profiled first
    note: str  # what was chosen and why, for the user ("" when it is what they asked for and cached)


def choose_profile(model_dir: str | os.PathLike[str], *, seq_len: int | None,
                   batch: int | None) -> ProfileChoice:
    """The profile to plan from: the cached one of the input asked for; with no length or batch given, the newest
    cached profile of any input (else DEFAULT_SEQ_LEN, batch 1, to be profiled). The note says when the choice
    is not the one asked for, or when profiling is needed first and a cached profile of another input exists."""
    want = (seq_len or DEFAULT_SEQ_LEN, batch or 1)
    shape = {k: list(v.shape) for k, v in profile_inputs(model_dir, *want).items()}
    prof = cached_profile(model_dir, shape)
    if prof is not None:
        return ProfileChoice(*want, prof, "")
    others = [(_input_of(model_dir, p), p) for p in cached_profiles(model_dir)]
    others = [(inp, p) for inp, p in others if inp is not None]
    if seq_len is None and batch is None and others:
        (s, b), p = others[0]
        return ProfileChoice(s, b, p, f"planning for the cached profile's input, seq-len {s}, batch {b} (no "
                                      "--seq-len given); pass --seq-len N to plan for another length (profiled first)")
    other = (f": the cached profile is for seq-len {others[0][0][0]}, batch {others[0][0][1]}; pass --seq-len "
             f"{others[0][0][0]} --batch {others[0][0][1]} to use it") if others else ""
    return ProfileChoice(*want, None, f"profiling {model_dir} for seq-len {want[0]}, batch {want[1]} first (minutes "
                                      f"on a large model){other}")


def _input_of(model_dir: str | os.PathLike[str], prof: Profile) -> tuple[int, int] | None:
    """(seq-len, batch) whose :func:`profile_inputs` a cached profile measured (None: not one of those)."""
    ids = prof.input_shape.get("input_ids")
    batch, seq = (ids[0], ids[1]) if ids and len(ids) == 2 else (next(iter(prof.input_shape.values()))[0],
                                                                 DEFAULT_SEQ_LEN)
    shape = {k: list(v.shape) for k, v in profile_inputs(model_dir, seq, batch).items()}
    return (seq, batch) if shape == prof.input_shape else None


def load_or_profile(model_dir: str | os.PathLike[str], *, seq_len: int, batch: int, repeat: int = 3,
                    force: bool = False, progress: Progress | None = None) -> Profile:
    """The profile of ``model_dir`` on this machine for :func:`profile_inputs`: the cached one (next to the model,
    see :func:`hermes.profile.default_profile_path`), else measured now with :func:`profile_model` and cached.

    Args:
        force: measure again even when a cached profile exists.
        progress: ``progress(done, total, what)`` before each measuring step, and once at the end (only when
            measuring).
    """
    inputs = profile_inputs(model_dir, seq_len, batch)
    prof = None if force else cached_profile(model_dir, {k: list(v.shape) for k, v in inputs.items()})
    if prof is None:
        prof = profile_model(model_dir, inputs, repeat=repeat, progress=progress)
        prof.save(default_profile_path(model_dir, prof.key))
    return prof


def profile_model(model_dir: str | os.PathLike[str], inputs: dict[str, torch.Tensor], *, repeat: int = 3,
                  progress: Progress | None = None) -> Profile:
    """Measure a model on this machine for these inputs.

    One engine, reconfigured between passes: sequential passes (clean times) per I/O mode and pipelined
    passes per (I/O mode, loaders, weight budget), all interleaved round by round so that the disk's slow
    phases do not land on one setting; the page cache is evicted before every pass; medians over ``repeat``
    rounds.
    """
    from hermes.api import open_model
    from hermes.engine import EngineConfig, minimum_budget

    layout = open_model(model_dir)
    small = 2 * minimum_budget(layout.units)
    budgets = calibration_budgets(minimum_budget(layout.units), layout.nbytes)
    configs = {(f"seq:{io}", small): EngineConfig(small, loaders=1, prefetch=0, io=io) for io in IO_MODES}
    configs |= {(setting(io, k), b): EngineConfig(b, loaders=k, io=io)
                for io in IO_MODES for k in READERS for b in budgets}
    # double buffering behaves apart from a deep prefetch here (2 vCPUs: reads far ahead cost the compute)
    configs |= {(setting(io, 1, 1), b): EngineConfig(b, loaders=1, prefetch=1, io=io)
                for io in IO_MODES for b in budgets}
    total = 1 + repeat * (len(configs) + 1)  # the warm-up pass; per round, every setting and a bandwidth sweep
    steps = itertools.count()
    tell = progress or (lambda done, total, what: None)
    runs, bandwidth_runs = _measure(layout, inputs, configs, max(budgets[-1], small), repeat=repeat,
                                    say=lambda what: tell(next(steps), total, what))
    tell(total, total, "done")
    # the largest budget has the most overlap: contention factors are measured there
    profile = _summarize(model_dir, layout.units, {k: list(v.shape) for k, v in inputs.items()}, runs,
                         bandwidth_runs, small=small, contention_budget=budgets[-1])
    med = statistics.median
    measured = {(key, b): med(r.latency_s for r, _ in rs) for (key, b), rs in runs.items()
                if not key.startswith("seq:")}
    return calibrate(profile, measured)


_Runs = dict[tuple[str, int], list[Any]]  # (setting, weight budget) -> [(pass stats, peak RSS growth), ...]


def _measure(layout: Any, inputs: dict[str, torch.Tensor], configs: dict[tuple[str, int], Any], arena_bytes: int,
             *, repeat: int, say: Callable[[str], None]) -> tuple[_Runs, dict[str, list[float]]]:
    """Run every setting once per round, ``repeat`` rounds, after a warm-up pass; and the cold read bandwidth of
    every (I/O mode, readers) per round. Returns (runs, bandwidth samples by setting)."""
    from hermes.engine import EngineConfig, PipeLoadEngine
    from hermes.memory import current_rss, format_bytes, peak_rss, reset_peak_rss

    units, files = layout.units, layout.store.files
    engine = PipeLoadEngine(layout.model, units, EngineConfig(arena_bytes, loaders=max(READERS), io="direct"))
    engine.install()
    runs: _Runs = {name: [] for name in configs}
    bandwidth_runs: dict[str, list[float]] = {setting(io, k): [] for io in IO_MODES for k in READERS}
    try:
        with torch.no_grad():
            say("warm-up pass")
            layout.model(**inputs)
            for r in range(repeat):
                for i, (name, cfg) in enumerate(configs.items()):
                    say(f"round {r + 1}/{repeat}, setting {i + 1}/{len(configs)}: {name[0]} at "
                        f"{format_bytes(name[1])}")
                    engine.reconfigure(cfg)
                    evict_page_cache(files)
                    base = current_rss()  # the arena is already allocated and touched by reconfigure
                    reset_peak_rss()
                    layout.model(**inputs)
                    st = engine.last
                    assert st is not None
                    runs[name].append((st, peak_rss() - base))
                say(f"round {r + 1}/{repeat}: cold read bandwidth")
                for key in bandwidth_runs:
                    io, k = key.split(":")
                    bandwidth_runs[key].append(_read_bandwidth(units, files, int(k), io == "direct"))
    finally:
        engine.remove()
    return runs, bandwidth_runs


def _summarize(model_dir: str | os.PathLike[str], units: list[Any], input_shape: dict[str, list[int]], runs: _Runs,
               bandwidth_runs: dict[str, list[float]], *, small: int, contention_budget: int) -> Profile:
    """The profile (uncalibrated) of the measured runs: medians of the sequential passes give clean per-unit
    times, the pipelined passes at ``contention_budget`` how much loading and computing slow each other."""
    from hermes.engine.budget import gather_room

    med = statistics.median
    seq = {io: runs[(f"seq:{io}", small)] for io in IO_MODES}
    load_s = {io: [med(r.events[u.index].load_s for r, _ in seq[io])
                   for u in units] for io in IO_MODES}
    compute_s = [med(r.events[u.index].compute_s
                     for io in IO_MODES for r, _ in seq[io]) for u in units]
    activation = max(grown for io in IO_MODES for _, grown in seq[io])
    seq_latency = med(r.latency_s for io in IO_MODES for r, _ in seq[io])
    overhead = max(0.0, seq_latency - sum(compute_s) - med([sum(load_s[io]) for io in IO_MODES]))
    bandwidth = {io: {k: med(bandwidth_runs[setting(io, int(k))]) for k in map(str, READERS)} for io in IO_MODES}
    compute_slow, load_slow = {}, {}
    for io in IO_MODES:
        for k in READERS:
            key = setting(io, k)
            piped = runs[(key, contention_budget)]
            scale = bandwidth[io]["1"] / (bandwidth[io][str(k)] / k)
            c = med(sum(e.compute_s for e in r.events[1:]) for r, _ in piped)
            ld = med(sum(e.load_s for e in r.events[1:]) for r, _ in piped)
            compute_slow[key] = max(1.0, c / max(sum(compute_s[1:]), 1e-9))
            load_slow[key] = max(1.0, ld / max(sum(load_s[io][1:]) * scale, 1e-9))
    return Profile(
        format_version=FORMAT_VERSION, key=profile_key(model_dir, input_shape), model_dir=str(model_dir),
        input_shape=input_shape, machine=machine_facts(),
        # a gathered embedding's rows are read inside its compute, into the side buffer: that is what it holds
        units=tuple(UnitProfile(u.name, u.buffer_bytes if u.kind != "gather" else gather_room(u),
                                {io: load_s[io][u.index] for io in IO_MODES},
                                compute_s[u.index], u.kind) for u in units),
        bandwidth=bandwidth, compute_slowdown=compute_slow, load_slowdown=load_slow,
        activation_bytes=int(max(activation, 0)), pass_overhead_s=overhead, calibration={})


def calibrate(profile: Profile, measured: dict[tuple[str, int], float]) -> Profile:
    """Scale predictions so that the simulation reproduces the pipelined passes measured while profiling:
    ``measured`` maps (setting, weight budget) to a measured latency."""
    from dataclasses import replace

    from hermes.planner import simulate

    factors: dict[str, list[list[float]]] = {}
    for (key, budget), latency in sorted(measured.items()):
        io, k, *depth = key.split(":")
        sim = simulate(replace(profile, calibration={}), weight_budget=budget, loaders=int(k),
                       prefetch=1 if depth else None, io=io).latency_s
        factors.setdefault(key, []).append([budget, min(2.0, max(0.5, latency / sim)) if sim > 0 else 1.0])
    return replace(profile, calibration=factors)


def _read_bandwidth(units: list[Any], files: list[Path], readers: int, direct: bool) -> float:
    """Aggregate cold bandwidth reading the units' byte ranges with ``readers`` threads."""
    from hermes.engine import Buf, Reader, new_buffer, touch_pages

    evict_page_cache(files)
    todo = list(reversed(units))
    lock = threading.Lock()
    size = max(u.buffer_bytes for u in units)

    buffers = [new_buffer(size) for _ in range(readers)]
    for b in buffers:
        touch_pages(b)  # measure the disk, not the page faults

    def work(mm: mmap.mmap) -> None:
        reader, buf = Reader(direct), Buf(mm, 0, size, False)
        try:
            while True:
                with lock:
                    if not todo:
                        return
                    unit = todo.pop()
                reader.read(unit, buf)
        finally:
            reader.close()

    threads = [threading.Thread(target=work, args=(b,)) for b in buffers]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(u.nbytes for u in units) / (time.perf_counter() - t0)
