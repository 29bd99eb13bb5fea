"""One device's stage of a ring: which units it computes, and the seams that join its forward to its neighbours'.

Every rank runs the model's own transformers forward — the same Python, masks, positions and cache object — in
lockstep with the others. A rank *owns* a contiguous range of the model's blocks (rank 0 also what runs before the
first block, the embedding; the last rank what runs after the last, the final norm and head; pinned parameters
every rank) and streams those with its own PipeLoad engine under its own budget. The other units are *remote*
(``hermes.engine.kinds.remote``): never read here, their forward runs on the meta device (no memory, no compute),
which keeps their cache layers' lengths and the shapes of their outputs right. At its first block a rank takes the
hidden states from the rank before it (``recv``) in place of the placeholder its remote units produced; after its
last block it sends its output to the next rank. The last rank's output (the logits) goes back: in ``generate`` to
every rank (each one's transformers ``generate`` then picks the same token, sampling included, with the same seed),
for a plain forward to rank 0, which prints it. Rank 0 takes the requests (``hermes.ring.driver``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hermes.ring.link import Ring, RingError
from hermes.ring.measure import DeviceFacts, measure
from hermes.units import Unit

#: what the ranks' output relay does after each forward: "generate" (the logits to every rank), "forward" (every
#: output to rank 0) or "token" (nothing: ``generate`` sends its chosen token, hermes.ring.driver.relay_tokens)
RELAY_MODES = ("generate", "forward", "token")


def checkpoint_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """sha256 of a checkpoint's config and of each weight file's size and sampled bytes (``hermes.checksums``):
    equal on two devices when they hold the same checkpoint."""
    from hermes.checksums import SAMPLE_BLOCKS, SAMPLE_BYTES, file_fingerprint

    d = Path(model_dir)
    h = hashlib.sha256((d / "config.json").read_bytes())
    sample = {"blocks": SAMPLE_BLOCKS, "block_bytes": SAMPLE_BYTES}
    for p in sorted(d.glob("*.safetensors")):
        h.update(json.dumps([p.name, file_fingerprint(p, sample)], sort_keys=True).encode())
    return h.hexdigest()


def _ordered(units: list[Unit], order: dict[int, int]) -> tuple[list[Unit], list[int]]:
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
    blocks, pos = _ordered(units, order)
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

    def size(r: int, a: int, b: int) -> int:  # what runs before the first block and after the last: its owner's
        return prefix[b] - prefix[a] + (before if a == 0 < b else 0) + (after if a < b == n else 0) if a < b else 0

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


def owners(units: list[Unit], order: dict[int, int], ranges: list[tuple[int, int]]) -> dict[int, int | None]:
    """Unit index -> the rank that computes it (None: every rank — a pinned parameter)."""
    blocks, pos = _ordered(units, order)
    rank_of_block = {blocks[i].index: r for r, (a, b) in enumerate(ranges) for i in range(a, b)}
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


def _measure_in_turn(ring: Ring, layout: Any, budget_bytes: int) -> DeviceFacts:
    """This device's facts, measured while the others wait (a round of the ring per device; a device that could not
    open the checkpoint, ``layout`` None, measures nothing but takes its turns)."""
    facts = DeviceFacts(budget_bytes)
    ring.gather_json(None, "the devices' readiness to measure")  # no device measures while another still opens
    for turn in range(ring.size):
        if turn == ring.rank and layout is not None:
            facts = measure(list(layout.store.files), layout.model.dtype, budget_bytes)
        ring.gather_json(turn, "the devices' measurements, one after the other")
    return facts


class Stage:
    """This rank's share of the model and the hooks joining its forward to the other ranks'."""

    def __init__(self, ring: Ring, units: list[Unit], order: dict[int, int], ranges: list[tuple[int, int]],
                 peers: list[dict[str, Any]]) -> None:
        self.ring = ring
        self.ranges = ranges
        self.peers = peers  # what each rank reported when the ring assembled (host, budget)
        self.owner = owners(units, order, ranges)
        mine = {i for i, r in self.owner.items() if r in (None, ring.rank)}
        self.kinds = {u.index: u.kind for u in units}  # the kind each unit has where it is computed
        self.units = [u if u.index in mine else dataclasses.replace(u, kind="remote") for u in units]
        blocks = _ordered(units, order)[0]
        a, b = ranges[ring.rank]
        self.first_block, self.last_block = (blocks[a].name, blocks[b - 1].name) if a < b else (None, None)
        self.blocks = (a, b)
        self.total_blocks = len(blocks)
        rank_of = [r for r, (x, y) in enumerate(ranges) for _ in range(x, y)]  # block position -> its rank
        self.src = rank_of[a - 1] if 0 < a < b else None  # the rank whose hidden states this one takes
        self.dst = rank_of[b] if a < b < len(blocks) else None  # the rank this one sends its hidden states to
        self.tail = rank_of[-1]  # the rank that computes the last block and the head
        self.relay = "generate"  # set by the driver per request (RELAY_MODES)
        self.past_own = False  # in the running forward: this rank's last block has run
        self._handles: list[Any] = []

    @classmethod
    def join(cls, ring: Ring, opened: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any, Stage]:
        """Meet the other ranks with what ``opened()`` returns — (the checkpoint opened, hermes.api.ModelLayout;
        this rank's budget, bytes or what auto chose) — or the error it raised, which stops every rank; check they
        opened the same checkpoint, share the blocks by budget. Returns (the layout with this rank's units, the
        budget, the stage)."""
        from hermes.errors import HermesError

        layout = error = None
        try:
            layout, budget = opened()
            size = budget if isinstance(budget, int) else budget.budget_bytes
            mine: dict[str, Any] = {"host": os.uname().nodename, "budget_bytes": size, "error": None,
                                    "fingerprint": checkpoint_fingerprint(layout.path)}
        except (HermesError, OSError) as exc:
            mine, error = {"error": str(exc)}, exc
        facts = _measure_in_turn(ring, layout, mine.get("budget_bytes", 0))  # every rank takes every turn
        mine.update(compute_bps=facts.compute_bps, disk_bps=facts.disk_bps)
        peers = ring.gather_json(mine, "each device's checkpoint and budget")
        failed = [(r, p["error"]) for r, p in enumerate(peers) if p["error"]]
        if failed:
            message = "; ".join(f"rank {r} could not open the checkpoint: {e}" for r, e in failed)
            if mine["error"]:
                raise RingError(message) from error
            raise RingError(message)
        stage = cls.assemble(ring, layout, peers)
        return dataclasses.replace(layout, units=stage.units), budget, stage

    @classmethod
    def assemble(cls, ring: Ring, layout: Any, peers: list[dict[str, Any]]) -> Stage:
        """This rank's stage, once every rank reported its checkpoint and budget (``peers``)."""
        mine = peers[ring.rank]
        differ = [r for r, p in enumerate(peers) if p["fingerprint"] != peers[0]["fingerprint"]]
        if differ:
            raise RingError(f"rank(s) {differ} opened another checkpoint than rank 0 (config or weight files differ: "
                            f"{mine['fingerprint'][:12]} here); give every device a copy of the same checkpoint")
        from hermes.engine.kinds.remote import execution_order
        from hermes.inputs import build_inputs

        if getattr(layout.config, "is_encoder_decoder", False):
            raise RingError(f"{type(layout.model).__name__} is an encoder-decoder (generate calls its encoder on its "
                            "own): a ring runs decoder-only and encoder-only models; run this one on one device")
        try:  # every rank traces the same model on the same input: each fails the same way, or none does
            order = execution_order(layout.model, layout.units, build_inputs(layout.path, layout.config,
                                                                             random_seq_len=2))
        except Exception as exc:  # noqa: BLE001 - a model whose forward cannot run on placeholders
            raise RingError(f"cannot trace the order {type(layout.model).__name__} runs its units in on this "
                            f"device ({type(exc).__name__}: {str(exc)[:200]}); run it on one device") from exc
        devices = [DeviceFacts(p["budget_bytes"], p.get("compute_bps"), p.get("disk_bps")) for p in peers]
        ranges = assign(layout.units, order, devices, ring.spec.stages)
        return cls(ring, layout.units, order, ranges, peers)

    def describe(self) -> str:
        a, b = self.blocks
        mine = f"blocks {a}..{b - 1}" if a < b else "no blocks (left out of the pipeline)"
        return f"rank {self.ring.rank} of {self.ring.size}: {mine} of {self.total_blocks}"

    def kv_share(self, kv_bytes: int) -> int:
        """This rank's part of a whole model's KV cache: its blocks' (the remote ones' cache is meta: no memory)."""
        a, b = self.blocks
        return math.ceil(kv_bytes * (b - a) / self.total_blocks)

    # ---- the seams ---------------------------------------------------------------------------------------
    def install(self, model: torch.nn.Module, engine: Any) -> None:
        """Hook the model: each forward starts before this rank's blocks, takes the previous rank's hidden states
        at its first block, sends its own after its last, and relays the last rank's output."""
        engine.stage = self
        self._handles.append(model.register_forward_pre_hook(self._begin, prepend=True))
        if self.src is not None:
            first = model.get_submodule(self.first_block)
            self._handles.append(first.register_forward_pre_hook(self._take, with_kwargs=True, prepend=True))
        if self.dst is not None:
            self._handles.append(model.get_submodule(self.last_block).register_forward_hook(self._give))
        self._handles.append(model.register_forward_hook(self._relay))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _begin(self, module: Any, args: Any) -> None:
        self.past_own = False

    def _take(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """The first block's input: the hidden states the previous rank computed (here a placeholder stood)."""
        src = self.src
        if args and isinstance(args[0], torch.Tensor):
            x = self.ring.recv(args[0], src, f"the hidden states for {self.first_block}")
            return (x, *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            kwargs["hidden_states"] = self.ring.recv(kwargs["hidden_states"], src,
                                                     f"the hidden states for {self.first_block}")
            return args, kwargs
        raise RingError(f"{self.first_block} is not called with its hidden states first: this model cannot be "
                        "split there; choose other --stages or run it on one device")

    def _give(self, module: Any, args: Any, output: Any) -> None:
        """After this rank's last block: its output to the next rank; what follows here runs on the meta device."""
        y = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(y, torch.Tensor):
            raise RingError(f"{self.last_block} returns no hidden states tensor first: this model cannot be split "
                            "there; choose other --stages or run it on one device")
        self.ring.send(y, self.dst, f"the hidden states of {self.last_block}")
        self.past_own = True

    def _relay(self, module: Any, args: Any, output: Any) -> Any:
        """The output of the rank that computes the head (the tail) where it is needed: its logits to every rank
        (generate), or every output tensor to rank 0 (a forward)."""
        ring, last = self.ring, self.tail
        at_tail = ring.rank == last
        if self.relay == "token":  # the token comes after generate's processors; real scores for them here
            logits = getattr(output, "logits", None)
            if isinstance(logits, torch.Tensor) and logits.device.type == "meta":
                output.logits = torch.zeros(logits.shape, dtype=logits.dtype)
            return output
        if self.relay == "generate":
            logits = getattr(output, "logits", None)
            if not isinstance(logits, torch.Tensor):
                raise RingError(f"{type(module).__name__} returns no logits to generate from")
            got = ring.broadcast(logits, last, "the logits")
            if not at_tail:
                output.logits = got
            return output
        if last == 0 or not (ring.first or at_tail):
            return output
        named = hasattr(output, "items")
        items = list(output.items() if named else enumerate(output))
        got = {}
        for key, value in items:
            if not isinstance(value, torch.Tensor):
                continue
            if at_tail:
                ring.send(value, 0, f"the output {key}")
            else:
                got[key] = ring.recv(value, last, f"the output {key}")
        if at_tail or not got:
            return output
        if named:
            for key, value in got.items():
                output[key] = value
            return output
        return type(output)(got.get(i, v) for i, v in items)
