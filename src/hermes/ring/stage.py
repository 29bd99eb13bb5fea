"""One device's stage of a ring: which units it computes, and the seams that join its forward to its neighbours'.

Every rank runs the model's own transformers forward — the same Python, masks, positions and cache object — in
lockstep with the others. A rank *owns* a contiguous range of the model's blocks (rank 0 also what runs before the
first block, the embedding; the last rank what runs after the last, the final norm and head; pinned parameters every
rank) and streams those with its own PipeLoad engine under its own budget. With several *laps* each rank's range is
cut into that many parts, owned in turn (lap 1: every rank's first part, lap 2: the second, ...): a token passes the
ring once per lap, and while the others compute a rank's loading agents read its next part. The other units are
*remote* (``hermes.engine.kinds.remote``): never read here, their forward runs on the meta device (no memory, no
compute), which keeps their cache layers' lengths and the shapes of their outputs right. At the first block of each
of its parts a rank takes the hidden states from the rank before it (``recv``) in place of the placeholder its
remote units produced; after the part's last block it sends its output to the next rank. The last rank's output (the
logits) goes back: in ``generate`` to every rank (each one's transformers ``generate`` then picks the same token,
sampling included, with the same seed), for a plain forward to rank 0, which prints it. Rank 0 takes the requests
(``hermes.ring.driver``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hermes.ring.link import Ring, RingError
from hermes.ring.measure import DeviceFacts, measure
from hermes.ring.split import assign, auto_laps, laps_of, ordered, owners
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


def _measure_in_turn(ring: Ring, layout: Any) -> DeviceFacts:
    """This device's speeds, measured while the others wait (a round of the ring per device; a device that could
    not open the checkpoint, ``layout`` None, measures nothing but takes its turns). Its budget is filled in
    later."""
    facts = DeviceFacts(0)
    ring.gather_json(None, "the devices' readiness to measure")  # no device measures while another still opens
    for turn in range(ring.size):
        if turn == ring.rank and layout is not None:
            facts = measure(list(layout.store.files), layout.model.dtype, 0)
        ring.gather_json(turn, "the devices' measurements, one after the other")
    return facts


def trace_order(layout: Any) -> dict[int, int]:
    """The order ``layout``'s model runs its units in (``execution_order``), or a RingError saying why it cannot
    be split."""
    from hermes.engine.kinds.remote import execution_order
    from hermes.inputs import build_inputs

    if getattr(layout.config, "is_encoder_decoder", False):
        raise RingError(f"{type(layout.model).__name__} is an encoder-decoder (generate calls its encoder on its "
                        "own): a ring runs decoder-only and encoder-only models; run this one on one device")
    try:  # every rank traces the same model on the same input: each fails the same way, or none does
        return execution_order(layout.model, layout.units, build_inputs(layout.path, layout.config,
                                                                        random_seq_len=2))
    except Exception as exc:  # noqa: BLE001 - a model whose forward cannot run on placeholders
        raise RingError(f"cannot trace the order {type(layout.model).__name__} runs its units in on this "
                        f"device ({type(exc).__name__}: {str(exc)[:200]}); run it on one device") from exc


class Stage:
    """This rank's share of the model and the hooks joining its forward to the other ranks'."""

    def __init__(self, ring: Ring, units: list[Unit], order: dict[int, int], parts: list[tuple[int, int, int]],
                 peers: list[dict[str, Any]]) -> None:
        self.ring = ring
        self.parts = parts  # (rank, start, end) of every part of the blocks, in running order
        self.peers = peers  # what each rank reported when the ring assembled (host, budget)
        self.owner = owners(units, order, parts)
        mine = {i for i, r in self.owner.items() if r in (None, ring.rank)}
        self.kinds = {u.index: u.kind for u in units}  # the kind each unit has where it is computed
        self.units = [u if u.index in mine else dataclasses.replace(u, kind="remote") for u in units]
        self.block_names = [b.name for b in ordered(units, order)[0]]
        self.total_blocks = len(self.block_names)
        self.own = [(a, b) for r, a, b in parts if r == ring.rank]  # this rank's parts
        self.laps = max((sum(1 for r, _, _ in parts if r == q) for q in range(ring.size)), default=1)
        self.blocks = (self.own[0][0], self.own[-1][1]) if self.own else (0, 0)  # from its first block to its last
        self.rank_of = [r for r, a, b in parts for _ in range(a, b)]  # block position -> its rank
        self.tail = self.rank_of[-1]  # the rank that computes the last block and the head
        self.relay = "generate"  # set by the driver per request (RELAY_MODES)
        self.past_own = False  # in the running forward: this rank's last block has run
        self.threads = torch.get_num_threads()  # this device's compute threads, in its turn (set at install)
        self._in_turn = True
        self._handles: list[Any] = []

    @classmethod
    def join(cls, ring: Ring, opened: Callable[[], tuple[Any, Callable[[], Any]]]) -> tuple[Any, Any, Stage]:
        """Meet the other ranks with what ``opened()`` returns — (the checkpoint opened, hermes.api.ModelLayout;
        a function giving this rank's budget, bytes or what auto chose) — or the error it raised, which stops every
        rank; check they opened the same checkpoint, share the blocks by budget. The budget is resolved last, once
        the model's order is traced and this device's speeds measured: what those leave in the process is part of
        the runtime that ``auto`` leaves out. Returns (the layout with this rank's units, the budget, the stage)."""
        from hermes.errors import HermesError

        layout = error = budget = order = None
        try:
            layout, resolve = opened()
            order = trace_order(layout)
        except (HermesError, OSError) as exc:
            error = exc
        facts = _measure_in_turn(ring, layout if error is None else None)  # every rank takes every turn
        try:
            if error is not None:
                raise error
            budget = resolve()
            size = budget if isinstance(budget, int) else budget.budget_bytes
            mine: dict[str, Any] = {"host": os.uname().nodename, "budget_bytes": size, "error": None,
                                    "fingerprint": checkpoint_fingerprint(layout.path)}
        except (HermesError, OSError) as exc:
            mine, error = {"error": str(exc)}, exc
        mine.update(compute_bps=facts.compute_bps, disk_bps=facts.disk_bps)
        peers = ring.gather_json(mine, "each device's checkpoint and budget")
        failed = [(r, p["error"]) for r, p in enumerate(peers) if p["error"]]
        if failed:
            message = "; ".join(f"rank {r} could not open the checkpoint: {e}" for r, e in failed)
            if mine["error"]:
                raise RingError(message) from error
            raise RingError(message)
        stage = cls.assemble(ring, layout, peers, order)
        return dataclasses.replace(layout, units=stage.units), budget, stage

    @classmethod
    def assemble(cls, ring: Ring, layout: Any, peers: list[dict[str, Any]],
                 order: dict[int, int] | None = None) -> Stage:
        """This rank's stage, once every rank reported its checkpoint and budget (``peers``); ``order``: the traced
        order of the units (traced here if not given)."""
        mine = peers[ring.rank]
        differ = [r for r, p in enumerate(peers) if p["fingerprint"] != peers[0]["fingerprint"]]
        if differ:
            raise RingError(f"rank(s) {differ} opened another checkpoint than rank 0 (config or weight files differ: "
                            f"{mine['fingerprint'][:12]} here); give every device a copy of the same checkpoint")
        if order is None:
            order = trace_order(layout)
        devices = [DeviceFacts(p["budget_bytes"], p.get("compute_bps"), p.get("disk_bps")) for p in peers]
        ranges = assign(layout.units, order, devices, ring.spec.stages)
        laps = ring.spec.laps or auto_laps(layout.units, order, ranges, [d.budget_bytes for d in devices])
        return cls(ring, layout.units, order, laps_of(ranges, laps), peers)

    def describe(self) -> str:
        if not self.own:
            return f"rank {self.ring.rank} of {self.ring.size}: no blocks (left out of the pipeline)"
        mine = ", ".join(f"{a}..{b - 1}" for a, b in self.own)
        laps = f" ({self.laps} laps)" if self.laps > 1 else ""
        return f"rank {self.ring.rank} of {self.ring.size}: blocks {mine} of {self.total_blocks}{laps}"

    def kv_share(self, kv_bytes: int) -> int:
        """This rank's part of a whole model's KV cache: its blocks' (the remote ones' cache is meta: no memory)."""
        return math.ceil(kv_bytes * sum(b - a for a, b in self.own) / self.total_blocks)

    # ---- the seams ---------------------------------------------------------------------------------------
    def install(self, model: torch.nn.Module, engine: Any) -> None:
        """Hook the model: each forward starts before this rank's blocks; at the first block of each of its parts
        it takes the previous rank's hidden states, after the part's last it sends its own; the last rank's output
        is relayed."""
        engine.stage = self
        self.threads, self._in_turn = torch.get_num_threads(), True
        names, n = self.block_names, self.total_blocks
        self._handles.append(model.register_forward_pre_hook(self._begin, prepend=True))
        for a, b in self.own:
            if a > 0:
                take = functools.partial(self._take, names[a], self.rank_of[a - 1])
                self._handles.append(model.get_submodule(names[a]).register_forward_pre_hook(
                    take, with_kwargs=True, prepend=True))
            if b < n:
                give = functools.partial(self._give, names[b - 1], self.rank_of[b], b == self.own[-1][1])
                self._handles.append(model.get_submodule(names[b - 1]).register_forward_hook(give))
        self._handles.append(model.register_forward_hook(self._relay))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.turn(True)

    def turn(self, mine: bool) -> None:
        """This device's turn begins (``mine``: its threads compute its blocks) or ends (one thread until its next
        turn: what runs outside it — the other devices' blocks replayed, ``generate``'s step on the token, the
        logits' relay — is small, and on cores shared with other devices, as emulated devices share them, a
        thread team woken for it would spin idle after it while another device computes: ~5 ms of CPU a token each
        off-turn parallel op, measured)."""
        if mine != self._in_turn:
            torch.set_num_threads(self.threads if mine else 1)
            self._in_turn = mine

    def _begin(self, module: Any, args: Any) -> None:
        self.past_own = False
        self.turn(bool(self.own) and self.rank_of[0] == self.ring.rank)  # the first block's device embeds

    def _take(self, name: str, src: int, module: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """A part's first block's input: the hidden states rank ``src`` computed (here a placeholder stood)."""
        if args and isinstance(args[0], torch.Tensor):
            x = self.ring.recv(args[0], src, f"the hidden states for {name}")
            self.turn(True)
            return (x, *args[1:]), kwargs
        if isinstance(kwargs.get("hidden_states"), torch.Tensor):
            kwargs["hidden_states"] = self.ring.recv(kwargs["hidden_states"], src, f"the hidden states for {name}")
            self.turn(True)
            return args, kwargs
        raise RingError(f"{name} is not called with its hidden states first: this model cannot be split there; "
                        "choose other --stages or run it on one device")

    def _give(self, name: str, dst: int, last: bool, module: Any, args: Any, output: Any) -> None:
        """After a part's last block: its output to rank ``dst``; after this rank's last part, what follows here
        runs on the meta device."""
        y = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(y, torch.Tensor):
            raise RingError(f"{name} returns no hidden states tensor first: this model cannot be split there; "
                            "choose other --stages or run it on one device")
        self.ring.send(y, dst, f"the hidden states of {name}")
        self.turn(False)
        self.past_own = last

    def _relay(self, module: Any, args: Any, output: Any) -> Any:
        """The output of the rank that computes the head (the tail) where it is needed: its logits to every rank
        (generate), or every output tensor to rank 0 (a forward); the tail's turn ends then (with ``generate``'s
        token relay: once the token is sent, ``hermes.ring.driver``)."""
        output = self._relayed(module, output)
        if self.relay != "token":
            self.turn(False)
        return output

    def _relayed(self, module: Any, output: Any) -> Any:
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
