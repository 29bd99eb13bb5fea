"""Which blocks each device of a ring computes: the blocks in the order a traced forward runs them, their bytes,
each rank's range (by hand, by budget, or by measured speed — a slow device left out), the ranges cut into laps,
and the rank that computes each unit."""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable

from hermes.ring.link import RingError
from hermes.ring.measure import DeviceFacts
from hermes.units import Unit


def ordered(units: list[Unit], order: dict[int, int]) -> tuple[list[Unit], list[int]]:
    """(the blocks in the order they run, each unit's position in that order) — a unit never run by the traced
    forward (an unused head, an expert, a pinned parameter) is placed by registration among the others."""
    pos = {u.index: order.get(u.index, -1) for u in units}
    blocks = sorted((u for u in units if u.kind == "block" and u.index in order), key=lambda u: order[u.index])
    if not blocks:
        raise RingError("this model runs no repeated blocks to share between devices; run it on one device")
    return blocks, [pos[u.index] for u in units]


def _enclosing(u: Unit, blocks: list[Unit], pos: list[int]) -> int | None:
    """Position in ``blocks`` of the block unit ``u`` is part of (an expert of a layer), or of the block it runs
    after (a leftover between blocks); None: it runs before the first block (or never), or after the last."""
    for i, b in enumerate(blocks):
        if u.module.startswith(b.name + "."):
            return i
    first, last = pos[blocks[0].index], pos[blocks[-1].index]
    if first < pos[u.index] < last:
        return max(i for i, b in enumerate(blocks) if pos[b.index] < pos[u.index])
    return None


def block_costs(units: list[Unit], order: dict[int, int]) -> tuple[list[int], int, int]:
    """(each block's bytes with its experts', in running order; bytes run before the first block; after the last)
    — what a rank owning them holds or reads for a pass (a gathered embedding: a few rows, counted as nothing)."""
    blocks, pos = ordered(units, order)
    cost = [u.nbytes for u in blocks]
    before = after = 0
    for u in units:
        if u.kind in ("block", "pinned", "gather"):
            continue
        inside = _enclosing(u, blocks, pos)
        if inside is not None:
            cost[inside] += u.nbytes
        elif pos[u.index] > pos[blocks[-1].index]:
            after += u.nbytes
        else:
            before += u.nbytes
    return cost, before, after


#: a split by measured speed replaces the split by budget only when it is predicted this much faster (measurements of
#: equal devices differ by noise: a lopsided split for nothing would crowd one device's KV cache and budget)
TIMED_GAIN = 0.9

#: ... and a device is left out only when that saves at least this much per token (a device costs a hop, and on a
#: small model the predicted times are microseconds: noise, not a reason)
DROP_GAIN_S = 0.01


def assign(units: list[Unit], order: dict[int, int], devices: list[DeviceFacts],
           stages: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
    """Each rank's range of blocks [start, end) in running order (``order``: unit index -> position in a traced
    forward): ``stages`` blocks per rank when given; else ranges whose bytes are proportional to the budgets as
    nearly as possible (the largest bytes/budget of any rank the least), unless every device measured its speeds
    and the ranges with the least predicted time per token are at least 10 % faster — a one-sequence pipeline runs
    its ranks one after the other: the sum over ranks of (bytes computed / compute speed + bytes beyond the budget,
    read again per token / disk speed), ties broken by the slowest rank; a rank is left out (no blocks) when that is
    predicted at least 10 % and 10 ms per token faster again. The rank of the first block also reads the units
    before it, the rank of the last block those after it."""
    cost, before, after = block_costs(units, order)
    n, k = len(cost), len(devices)
    if stages is not None:
        if sum(stages) != n or min(stages) < 0 or not any(stages):
            raise RingError(f"--stages {','.join(map(str, stages))} does not share the model's {n} blocks (the "
                            f"counts must add up to {n}; 0: a device that computes nothing)")
        bounds = [0, *itertools.accumulate(stages)]
        return [(bounds[r], bounds[r + 1]) for r in range(k)]
    prefix = [0, *itertools.accumulate(cost)]

    def size(r: int, a: int, b: int) -> int:
        return range_bytes(prefix, before, after, a, b)

    def seconds(r: int, a: int, b: int) -> float:
        d, s = devices[r], size(r, a, b)
        return s / d.compute_bps + max(s - d.budget_bytes, 0) / d.disk_bps  # type: ignore[operator]

    by_budget = _split(n, k, lambda r, a, b: size(r, a, b) / max(devices[r].budget_bytes, 1), total=False,
                       empty=k > n)
    if not all(d.compute_bps and d.disk_bps for d in devices):
        return by_budget
    predicted = lambda ranges: sum(seconds(r, a, b) for r, (a, b) in enumerate(ranges))  # noqa: E731
    timed = _split(n, k, seconds, total=True, empty=k > n)
    # a device that slows the ring computes nothing — when leaving it out is predicted clearly faster
    fewer = _split(n, k, seconds, total=True, empty=True)
    if predicted(fewer) <= TIMED_GAIN * predicted(timed) and predicted(timed) - predicted(fewer) >= DROP_GAIN_S:
        timed = fewer
    return timed if predicted(timed) <= TIMED_GAIN * predicted(by_budget) else by_budget


def _split(n: int, k: int, cost: Callable[[int, int, int], float], *, total: bool,
           empty: bool = False) -> list[tuple[int, int]]:
    """Contiguous ranges of ``n`` blocks for ``k`` ranks (each at least one; with ``empty``, any number — a rank
    with none is left out of the pipeline) minimising the sum of ``cost(rank, start, end)`` (ties: the largest), or
    with ``total`` False the largest."""
    def join(prev: tuple[float, float], t: float) -> tuple[float, float]:
        return (prev[0] + t, max(prev[1], t)) if total else (max(prev[0], t), 0.0)

    # best[r][b]: ((objective, tie-break) of ranks 0..r covering blocks [0, b), where rank r's range starts)
    inf = (math.inf, math.inf)
    best: list[list[tuple[tuple[float, float], int]]] = [[(inf, 0)] * (n + 1) for _ in range(k)]
    least = 0 if empty else 1  # blocks per rank
    for b in range(least, n + 1):
        best[0][b] = (join((0.0, 0.0), cost(0, 0, b)), 0)
    for r in range(1, k):
        for b in range(least * (r + 1), n + 1):
            best[r][b] = min((join(best[r - 1][a][0], cost(r, a, b)), a) for a in range(least * r, b - least + 1))
    ranges, b = [], n
    for r in range(k - 1, -1, -1):
        a = best[r][b][1]
        ranges.append((a, b))
        b = a
    return ranges[::-1]


def laps_of(ranges: list[tuple[int, int]], laps: int) -> list[tuple[int, int, int]]:
    """(rank, start, end) of every part in running order: each rank's one-lap range cut into ``laps`` near-equal
    parts, lap after lap (a rank with fewer blocks than laps sits out some laps: the first rank's blocks come in
    the first laps, the last rank's in the last, so that the embedding and the head keep their ranks)."""
    last = max((r for r, (a, b) in enumerate(ranges) if a < b), default=0)
    parts = []
    for r, (a, b) in enumerate(ranges):
        c, n = b - a, min(laps, b - a) if b > a else 0
        sizes = [c // laps + (1 if i < c % laps else 0) for i in range(laps)]
        parts.append(sizes[::-1] if r == last and n else sizes)
    out: list[tuple[int, int, int]] = []
    pos = 0
    for lap in range(laps):
        for r, sizes in enumerate(parts):
            if not sizes[lap]:
                continue
            if out and out[-1][0] == r:  # the same rank again (the ranks between have no part in this lap)
                out[-1] = (r, out[-1][1], pos + sizes[lap])
            else:
                out.append((r, pos, pos + sizes[lap]))
            pos += sizes[lap]
    return out


def range_bytes(prefix: list[int], before: int, after: int, a: int, b: int) -> int:
    """Bytes a rank owning blocks [a, b) computes (``prefix``: the blocks' bytes summed in running order): with
    what runs before the first block and after the last when its range holds them."""
    n = len(prefix) - 1
    return prefix[b] - prefix[a] + (before if a == 0 < b else 0) + (after if a < b == n else 0) if a < b else 0


def auto_laps(units: list[Unit], order: dict[int, int], ranges: list[tuple[int, int]], budgets: list[int]) -> int:
    """Laps for ``--laps auto``: as many as the rank whose blocks exceed its budget the most needs for one part to
    fit it (1 where every share fits), at most its number of blocks."""
    cost, before, after = block_costs(units, order)
    prefix, laps = [0, *itertools.accumulate(cost)], 1
    for r, (a, b) in enumerate(ranges):
        if a < b:
            size = range_bytes(prefix, before, after, a, b)
            laps = max(laps, min(math.ceil(size / max(budgets[r], 1)), b - a))
    return laps


def owners(units: list[Unit], order: dict[int, int], parts: list[tuple[int, int, int]]) -> dict[int, int | None]:
    """Unit index -> the rank that computes it (None: every rank — a pinned parameter); ``parts``: (rank, start,
    end) of blocks in running order (:func:`laps_of`)."""
    blocks, pos = ordered(units, order)
    rank_of_block = {blocks[i].index: r for r, a, b in parts for i in range(a, b)}
    out: dict[int, int | None] = {}
    for u in units:
        if u.kind == "pinned":
            out[u.index] = None
        elif u.index in rank_of_block:
            out[u.index] = rank_of_block[u.index]
        else:
            inside = _enclosing(u, blocks, pos)
            if inside is None:  # before the first block or after the last: that block's rank
                inside = len(blocks) - 1 if pos[u.index] > pos[blocks[-1].index] else 0
            out[u.index] = rank_of_block[blocks[inside].index]
    return out
