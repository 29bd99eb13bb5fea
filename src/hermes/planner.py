"""Pipeline Planner: a pure function (profile, budget, workload) -> Plan.

It enumerates the decision variables (loading agents, prefetch depth, I/O mode, which leading units stay
resident), predicts each candidate's latency by simulating the pipeline with the profiled times, and keeps
the fastest whose predicted peak memory fits the budget. No I/O, deterministic.
"""
from __future__ import annotations

import heapq
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from hermes.errors import BudgetError, HermesError, versioned_json
from hermes.figures import budget_flag, minimum_text
from hermes.memory import format_bytes
from hermes.profile import IO_MODES, Profile, setting

FORMAT_VERSION = 2  # 2: unit names of gathered embeddings and head chunks (issue 12)
LOADERS = (1, 2, 4)
PREFETCH: tuple[int | None, ...] = (None, 0, 1, 2, 4)  # 0: sequential (no overlap); None: budget-bound
LADDER_STEP = 1.25


@dataclass(frozen=True)
class Plan:
    """An execution plan: engine settings plus what the planner predicted for them."""

    format_version: int
    budget_bytes: int  # the user's budget: weights + activations + runtime slack (hermes.share)
    weight_budget_bytes: int  # what the engine may hold for weights (<= budget - profiled activations - slack)
    loaders: int
    prefetch: int | None
    io: str
    resident: tuple[str, ...]
    passes: int  # workload: number of forward passes the plan is optimized for
    predicted_latency_s: float  # mean per pass over the workload
    predicted_first_pass_s: float
    predicted_steady_pass_s: float
    predicted_weights_peak_bytes: int  # the engine's weights peak (its arena whole + residents + side buffer)
    predicted_peak_bytes: int  # weights + activations (the process's peak above its runtime, slack aside)
    profile_key: str
    notes: tuple[str, ...] = field(default=())

    @property
    def activation_bytes(self) -> int:
        """The profiled activations the plan's budget holds beside the weights."""
        return self.predicted_peak_bytes - self.predicted_weights_peak_bytes

    def engine_config(self) -> Any:
        from hermes.engine import EngineConfig

        return EngineConfig(self.weight_budget_bytes, loaders=self.loaders, prefetch=self.prefetch, io=self.io,
                            resident=self.resident)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = versioned_json(text, FORMAT_VERSION, what="plan", command="hermes plan")
        d["resident"], d["notes"] = tuple(d["resident"]), tuple(d.get("notes", ()))
        return cls(**d)


@dataclass(frozen=True)
class Candidate:
    """One point of the search space and its prediction."""

    weight_budget: int  # engine weight budget (a ladder step at or below the user's budget minus activations)
    loaders: int
    prefetch: int | None
    io: str
    resident: int  # number of leading units kept resident
    latency_s: float
    first_pass_s: float
    steady_pass_s: float
    weights_peak_bytes: int  # the engine's weights peak (Profile.weights_peak), what `run` reports
    fits: bool  # the simulation could place every unit (units held at once <= the weight budget)
    reason: str = ""


@dataclass(frozen=True)
class SimResult:
    latency_s: float
    weights_peak_bytes: int  # units held at once (not the engine's arena, claimed whole: Profile.weights_peak)
    load_intervals: tuple[tuple[float, float], ...]


def simulate(profile: Profile, *, weight_budget: int, loaders: int, prefetch: int | None, io: str,
             resident: int = 0, steady: bool = False, iterations: int = 3) -> SimResult:
    """Discrete-event simulation of one pass.

    Loading agents take units in order; a unit is admitted when a loader is free, the previous unit has
    been admitted, its bytes fit the weight budget (held units are released when computed) and at most
    ``prefetch`` units are held besides the one computing (the unit ``prefetch`` places before it has begun
    to compute); with ``prefetch`` 0 (sequential) only once the unit before it has finished computing. A unit
    computes when loaded and its predecessor is done. A load runs at the per-reader share of the profiled
    bandwidth for the reads in flight beside it (as the previous iteration placed them: at most ``loaders``,
    one with ``prefetch`` 0); compute (load) is slowed by the profiled contention factor for the fraction of its
    time that overlaps a load (a compute). ``prefetch`` 0 is what the profile's clean passes measured: no
    contention factor and no calibration apply.
    With ``steady`` the first ``resident`` units are already loaded (a later pass); else they load and stay.
    """
    units = profile.units
    n = len(units)
    readers = 1 if prefetch == 0 else loaders  # reads that may be in flight at once
    bw = profile.bandwidth[io]
    # load time multiplier vs the clean one-reader profile when k reads run at once (each gets bw[k] / k)
    slow = [1.0] + [bw["1"] / (bw[_nearest(bw, k)] / k) for k in range(1, readers + 1)]
    base_load = [u.load_s[io] for u in units]
    kept = set(range(resident))
    preloaded = kept if steady else set()
    compute_intervals: list[tuple[float, float]] = []
    load_intervals: list[tuple[float, float]] = []
    key = setting(io, loaders)
    # sequential (prefetch 0) is what the profile's clean passes measured: no contention, no calibration
    cslow, lslow = (1.0, 1.0) if prefetch == 0 else (profile.compute_slowdown[key], profile.load_slowdown[key])
    calibrated = setting(io, loaders, prefetch) if setting(io, loaders, prefetch) in profile.calibration else key
    for _ in range(iterations):
        loads, peak, ends, comp = _run(units, base_load, weight_budget, loaders, prefetch, preloaded, kept,
                                       cslow, lslow, load_intervals, compute_intervals, slow)
        load_intervals, compute_intervals = loads, comp
    factor = 1.0 if prefetch == 0 else profile.calibration_factor(calibrated, weight_budget)
    latency = ((ends[-1] if n else 0.0) + profile.pass_overhead_s) * factor
    return SimResult(latency, peak, tuple(load_intervals))


def _nearest(bw: dict[str, float], k: int) -> str:
    """The profiled reader count closest to ``k`` from below (bandwidth is profiled at 1, 2, 4 readers)."""
    return str(max((int(r) for r in bw if int(r) <= k), default=1))


def _overlap(start: float, dur: float, intervals: list[tuple[float, float]]) -> float:
    end = start + dur
    covered = sum(max(0.0, min(end, b) - max(start, a)) for a, b in intervals)
    return min(1.0, covered / dur) if dur > 0 else 0.0


def _run(units: Any, base_load: list[float], budget: int, loaders: int, prefetch: int | None,
         preloaded: set[int], kept: set[int], cslow: float, lslow: float,
         prev_loads: list[tuple[float, float]], prev_comp: list[tuple[float, float]],
         slow: list[float]) -> tuple[Any, int, Any, Any]:
    n = len(units)
    stream = [i for i in range(n) if i not in preloaded]
    free_at = [0.0] * loaders  # when each loading agent is next free (a heap)
    load_end: dict[int, float] = {}
    comp_start, comp_end = [0.0] * n, [0.0] * n
    ring: list[tuple[int, int, int]] = []  # streamed units admitted, not yet freed: (offset, bytes, unit)
    fixed = sum(units[i].bytes for i in preloaded)  # resident from an earlier pass
    # the arena: what residents and the side buffer (a gathered embedding's rows) leave
    side = max((u.bytes for u in units if u.kind == "gather"), default=0)
    ring_bytes = budget - fixed - sum(units[i].bytes for i in kept - preloaded) - side
    kept_bytes = 0  # units made resident in this pass (never released)
    peak = fixed
    loads: list[tuple[float, float]] = []
    done = 0  # units whose compute times are known

    def advance() -> None:
        nonlocal done
        while done < n and (done in preloaded or done in load_end):
            start = max(comp_end[done - 1] if done else 0.0, load_end.get(done, 0.0))
            dur = units[done].compute_s
            dur *= 1 + (cslow - 1) * _overlap(start, dur, prev_loads)
            comp_start[done], comp_end[done] = start, start + dur
            done += 1

    advance()  # resident units before the first streamed one compute first
    prev_admit = 0.0
    for pos, j in enumerate(stream):
        t = max(heapq.heappop(free_at), prev_admit)
        if prefetch == 0 and j:  # sequential: read when the forward asks for it, after the unit before computed
            t = max(t, comp_end[j - 1])
        elif prefetch and pos >= prefetch:  # `prefetch` units held besides the one computing
            t = max(t, comp_start[stream[pos - prefetch]])
        need = units[j].bytes
        if units[j].kind == "gather":  # read into the side buffer inside its compute: no ring room
            pass
        elif j in kept:  # made resident: a buffer of its own, outside the ring
            if fixed + kept_bytes + sum(size for _, size, _ in ring) + need > budget:
                return loads, 1 << 62, [float("inf")] * n, []
        else:  # streamed units are carved out of a ring (arena.py): contiguous room, not only enough bytes
            t = _ring_admit(ring, j, need, ring_bytes, t, comp_end)
            if t is None:
                return loads, 1 << 62, [float("inf")] * n, []  # resident units leave no room: does not fit
        # the reads in flight beside this one (as the previous iteration placed them) share the disk with it
        others = sum(1 for q, (a, b) in enumerate(prev_loads) if q != pos and a < t + base_load[j] and b > t)
        dur = base_load[j] * slow[min(1 + others, len(slow) - 1)]
        dur *= 1 + (lslow - 1) * _overlap(t, dur, prev_comp)
        load_end[j] = t + dur
        loads.append((t, t + dur))
        heapq.heappush(free_at, t + dur)
        if j in kept:
            kept_bytes += need
        peak = max(peak, fixed + kept_bytes + sum(size for _, size, _ in ring))
        prev_admit = t
        advance()
    advance()
    return loads, peak, comp_end, list(zip(comp_start, comp_end, strict=True))


def _ring_offset(live: list[tuple[int, int, int]], size: int, capacity: int) -> int | None:
    """Where the engine's ring (``arena.Arena``) would carve ``size`` bytes after ``live`` (offset, size, unit)
    in allocation order: after the newest one, or at 0 when the tail is too short; None: no contiguous room."""
    if size > capacity:
        return None
    if not live:
        return 0
    first, (last, last_size, _) = live[0][0], live[-1]
    end = last + last_size
    if last >= first:  # not wrapped: free space is [end, capacity) and [0, first)
        return end if end + size <= capacity else (0 if size <= first else None)
    return end if end + size <= first else None  # wrapped: free space is [end, first)


def _ring_admit(ring: list[tuple[int, int, int]], j: int, need: int, capacity: int, t: float,
                comp_end: list[float]) -> float | None:
    """Place unit ``j`` in the ring at the earliest time from ``t`` (units computed by then are freed, oldest
    first); that time, or None if it never fits."""
    while True:
        while ring and comp_end[ring[0][2]] <= t:
            ring.pop(0)
        offset = _ring_offset(ring, need, capacity)
        if offset is not None:
            ring.append((offset, need, j))
            return t
        if not ring:
            return None
        t = max(t, comp_end[ring[0][2]])  # wait until the oldest held unit is computed and freed


def budget_ladder(profile: Profile, weight_budget: int) -> list[int]:
    """Weight budgets the planner tries: a fixed geometric ladder from the minimum to the whole model (so that a
    larger budget always searches a superset: more budget never predicts slower), capped by ``weight_budget``."""
    ladder, w = [], profile.min_weight_budget
    while w < profile.model_bytes:
        ladder.append(w)
        w = max(int(w * LADDER_STEP), w + 1)
    ladder.append(profile.model_bytes)
    return [w for w in ladder if w <= weight_budget]


def _resident_options(n: int, passes: int) -> list[int]:
    if passes == 1:
        return [0]  # with one pass, keeping units resident cannot help: they are loaded anyway
    return sorted({k for k in (0, 1, 2, n // 4, n // 2, (3 * n) // 4, n) if k <= n})


def candidates(profile: Profile, budget_bytes: int, *, passes: int = 1) -> list[Candidate]:
    """Every candidate of the search space with its prediction, fastest first."""
    out = []
    n = len(profile.units)
    for weight_budget in budget_ladder(profile, weights_cap(profile, budget_bytes)):
        for io in IO_MODES:
            for loaders in LOADERS:
                for prefetch in PREFETCH:
                    if prefetch == 0 and loaders > 1:  # one read at a time: more loaders change nothing
                        continue
                    for resident in _resident_options(n, passes):
                        kept = sum(u.bytes for u in profile.units[:resident])
                        rest = max((u.bytes for u in profile.units[resident:]), default=0)
                        if kept + rest > weight_budget:
                            continue
                        kw = {"weight_budget": weight_budget, "loaders": loaders, "prefetch": prefetch, "io": io,
                              "resident": resident}
                        first = simulate(profile, **kw)
                        steady = simulate(profile, steady=True, **kw) if passes > 1 else first
                        mean = (first.latency_s + (passes - 1) * steady.latency_s) / passes
                        fits = max(first.weights_peak_bytes, steady.weights_peak_bytes) <= weight_budget
                        out.append(Candidate(weight_budget, loaders, prefetch, io, resident, mean, first.latency_s,
                                             steady.latency_s, profile.weights_peak(weight_budget), fits,
                                             "" if fits else "predicted peak exceeds the budget"))
    return sorted(out, key=lambda c: (not c.fits, c.latency_s, c.weight_budget, c.loaders, c.resident))


def plan(profile: Profile, budget_bytes: int, *, passes: int = 1) -> Plan:
    """The fastest plan whose predicted peak memory (weights + activations) fits ``budget_bytes``.

    Raises:
        BudgetError: no plan fits; the message names the minimum budget.
    """
    if passes < 1:
        raise HermesError(f"passes must be >= 1, got {passes}")
    minimum = profile.min_weight_budget + profile.activation_bytes
    if budget_bytes < minimum:
        raise BudgetError(f"budget {format_bytes(budget_bytes)} is below the {minimum_figure(profile)} for this "
                          f"model and input; use a budget of at least {minimum} bytes ({budget_flag(minimum)})")
    best = next(c for c in candidates(profile, budget_bytes, passes=passes) if c.fits)
    return Plan(
        format_version=FORMAT_VERSION, budget_bytes=budget_bytes, weight_budget_bytes=best.weight_budget,
        loaders=best.loaders,
        prefetch=best.prefetch, io=best.io,
        # a gathered token embedding is profiled at its row buffer's size: made resident it would hold its matrix
        resident=tuple(u.name for u in profile.units[:best.resident] if u.kind != "gather"),
        passes=passes, predicted_latency_s=best.latency_s, predicted_first_pass_s=best.first_pass_s,
        predicted_steady_pass_s=best.steady_pass_s, predicted_weights_peak_bytes=best.weights_peak_bytes,
        predicted_peak_bytes=best.weights_peak_bytes + profile.activation_bytes, profile_key=profile.key,
        notes=(f"torch intra-op threads as profiled: {profile.machine.get('torch_threads')}",))


def weights_cap(profile: Profile, budget_bytes: int) -> int:
    """The most a plan's weights may take of ``budget_bytes``: what the profiled activations and the runtime slack
    leave (:func:`hermes.share.share`; the slack gets less where the budget is tight)."""
    from hermes.share import share

    return share(budget_bytes, profile.min_weight_budget, activations=profile.activation_bytes).weights


def minimum_figure(profile: Profile) -> str:
    """``minimum budget with activations X = minimum weight budget Y + activations Z``: what ``plan`` needs."""
    return minimum_text(profile.min_weight_budget, ("activations", profile.activation_bytes), what="with activations")


def explain(profile: Profile, budget_bytes: int, *, passes: int = 1, top: int = 12) -> str:
    """A table of the best candidates per setting, the winner first, and why the others lost."""
    best_per_setting: dict[tuple[Any, ...], Candidate] = {}
    for c in candidates(profile, budget_bytes, passes=passes):
        best_per_setting.setdefault((c.loaders, c.prefetch, c.io, c.resident), c)
    rows = sorted(best_per_setting.values(), key=lambda c: (not c.fits, c.latency_s))
    if not rows:
        return f"no candidate fits: the budget is below the {minimum_figure(profile)}"
    win = rows[0]
    lines = [f"budget {format_bytes(budget_bytes)} = weights + activations ({format_bytes(profile.activation_bytes)})"
             f" + runtime slack; {len(best_per_setting)} settings, each tried at weight budgets up to "
             f"{format_bytes(weights_cap(profile, budget_bytes))} (w. budget: what the engine may hold; "
             "w. peak: the weights peak `run` reports, the engine's arena claimed whole + residents + side buffer)",
             "",
             f"{'loaders':>7} {'prefetch':>8} {'io':>8} {'resident':>8} {'w. budget':>11} {'w. peak':>11} "
             f"{'pred. s':>8}  verdict"]
    for c in rows[:top]:
        if c is win:
            verdict = "CHOSEN: fastest predicted latency that fits"
        elif not c.fits:
            verdict = f"rejected: {c.reason}"
        else:
            verdict = f"rejected: {100 * (c.latency_s / win.latency_s - 1):.1f}% slower"
        lines.append(f"{c.loaders:>7} {c.prefetch if c.prefetch is not None else 'budget':>8} {c.io:>8} "
                     f"{c.resident:>8} {format_bytes(c.weight_budget):>11} {format_bytes(c.weights_peak_bytes):>11} "
                     f"{c.latency_s:>8.3f}  {verdict}")
    if len(rows) > top:
        lines.append(f"... {len(rows) - top} more settings, all slower")
    return "\n".join(lines)
