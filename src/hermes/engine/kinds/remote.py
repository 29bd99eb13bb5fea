"""Remote units: the units another device of a ring computes (``hermes.ring``). Never read here; their module still
runs, on the meta device, so that the model's own forward goes on around them unchanged: a remote attention layer
updates its cache layer with meta keys and values (no memory, the right length — masks and positions stay right),
its output has the right shape and dtype. Before this rank's own blocks a remote unit's output is a real zero
tensor of that shape (code between units, such as rotary tables and masks built from the embedding's output, runs
on real tensors); after them it stays on the meta device (no logits are computed for nothing). A mixture-of-experts
experts module, whose routing depends on values, returns a zero tensor of its input's shape instead of running.
A remote module's buffers (position ids, masks, rotary tables) are put on the meta device too: its computation
never needs their values here (and they would not mix with meta activations). torch's meta kernels are slow Python
(a Llama block ~13 ms of one core), so once a module's meta run for the same input shapes is trusted (nothing in
it has the keys' length, or it was seen twice alike) it is replayed instead (``hermes.engine.kinds.replay``: the
same cache calls, outputs of the same shapes), and the runs that are not replayed answer each meta kernel they have
already seen from its recorded output shapes (``hermes.engine.kinds.memo``; ``HERMES_META_MEMO=0`` turns it off).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch

from hermes.engine.kinds.base import UnitKind
from hermes.engine.kinds.kin import Forwards, Kin, likeness
from hermes.engine.kinds.memo import MetaMemo
from hermes.engine.kinds.replay import Replays
from hermes.lean import MetaCat
from hermes.units import Unit


class _MetaRuns:
    """Runs modules on the meta device: their buffers moved there (and back on :meth:`restore`), their inputs made
    meta, their output real zeros of its shape when asked for — unless they are called inside another module run
    this way (the outer one's output is what matters)."""

    def __init__(self) -> None:
        self.saved: list[tuple[torch.nn.Module, str, torch.Tensor]] = []  # (module, name, real buffer)
        self.depth = 0  # runs in progress
        self.memo = MetaMemo() if os.environ.get("HERMES_META_MEMO", "1") != "0" else None

    def hide_buffers(self, module: torch.nn.Module) -> None:
        for m in module.modules():
            for k, b in m._buffers.items():
                if b is not None and b.device.type != "meta":
                    self.saved.append((m, k, b))
                    m._buffers[k] = b.to("meta")

    def restore(self) -> None:
        for m, k, b in self.saved:
            m._buffers[k] = b
        self.saved.clear()

    def run(self, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any], real: bool,
            replays: Replays | None = None) -> Any:
        """``original(*args, **kwargs)`` on the meta device — or, at the outer run, its replay by ``replays`` — its
        output real zeros if ``real`` (at the outer run)."""
        if replays is not None and self.depth == 0:  # a replay needs no meta inputs: only their shapes
            record = replays.trusted_record(original, args, kwargs)
            if record is not None:
                out = replays.replay(record, args, kwargs)
                return _zeros(out) if real else out
        self.depth += 1
        try:
            args, kwargs = _to_meta(args), _to_meta(kwargs)
            if self.memo is not None and self.depth == 1:
                original = _memoized(self.memo, original)
            with MetaCat():  # torch's meta cat (a remote layer's cache update) is slow Python and imports sympy
                if replays is not None and self.depth == 1:
                    out = replays.run(original, args, kwargs)
                else:
                    out = original(*args, **kwargs)
        finally:
            self.depth -= 1
        return _zeros(out) if real and not self.depth else out


def _memoized(memo: MetaMemo, original: Any) -> Any:
    """``original`` run inside ``memo`` (its signature kept: a replay reads its parameters' names)."""
    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any) -> Any:
        with memo:
            return original(*args, **kwargs)

    return run


def _experts_placeholder(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """An experts module's output on the meta device: zeros of its input's shape (its routing depends on values)."""
    return torch.zeros_like(next(x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)), device="meta")


class Remote(UnitKind):
    """Units computed by another rank: planned never, attached never, run on the meta device."""

    holds_weights = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meta = _MetaRuns()
        self.replays: dict[str, Replays] = {}  # by module: its meta runs, learned and replayed
        self.forwards = Forwards()  # the model's forwards (a record made in this one answers alike modules)
        self._counting: Any = None

    def planned(self, index: int) -> bool:
        return False

    def bypass_params(self, unit: Unit) -> list[torch.nn.Parameter] | None:
        return None

    def install(self) -> None:
        stage = self.engine.stage
        done: set[str] = set()
        kins: dict[Any, Kin] = {}
        for u in self.units:
            if u.module in done:
                continue
            done.add(u.module)
            if stage.kinds[u.index] == "expert":
                self.wrap_forward(u.module, lambda original, a, kw: _experts_placeholder(a, kw))
            else:
                like = likeness(self.engine.model.get_submodule(u.module))
                kin = kins.setdefault(like, Kin(self.forwards))
                replays = self.replays[u.module] = Replays(kin if Kin.enabled else None)
                self.wrap_forward(u.module, lambda original, a, kw, r=replays: self.meta.run(
                    original, a, kw, not stage.past_own, r))
                self.meta.hide_buffers(self.engine.model.get_submodule(u.module))
        self._counting = self.engine.model.register_forward_pre_hook(self.forwards)

    def meta_runs(self) -> tuple[int, int]:
        """(remote module calls answered by replaying their recorded meta run, calls run on the meta device)."""
        replayed = sum(r.replayed for r in self.replays.values())
        return replayed, sum(r.calls for r in self.replays.values()) - replayed

    def remove(self) -> None:
        if self._counting is not None:
            self._counting.remove()
            self._counting = None
        self.meta.restore()
        super().remove()


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x if x.device.type == "meta" else x.to("meta")
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_to_meta(v) for v in x)
    if isinstance(x, list):
        return [_to_meta(v) for v in x]
    if type(x) is dict:
        return {k: _to_meta(v) for k, v in x.items()}
    return x


def _zeros(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.zeros(x.shape, dtype=x.dtype) if x.device.type == "meta" else x
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_zeros(v) for v in x)
    if isinstance(x, list):
        return [_zeros(v) for v in x]
    if hasattr(x, "items") and hasattr(x, "__setitem__"):  # a ModelOutput or dict
        for k, v in list(x.items()):
            x[k] = _zeros(v)
        return x
    return x


def execution_order(model: torch.nn.Module, units: list[Unit], inputs: dict[str, torch.Tensor]) -> dict[int, int]:
    """{unit index: position of its module's first call} in one forward of ``model`` on ``inputs`` where every unit
    runs as a remote unit does (on the meta device, real zeros out): the order the units really run in, which is
    not always the order they are registered in (OPT registers its final norm before its layers). Nothing is read
    or computed; units never called are left out."""
    by_module: dict[str, list[int]] = {}
    for u in units:
        if u.kind != "pinned":
            by_module.setdefault(u.module, []).append(u.index)
    seen: dict[int, int] = {}
    meta = _MetaRuns()
    wrapped: list[torch.nn.Module] = []

    def call(name: str, original: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        for i in by_module[name]:
            seen.setdefault(i, len(seen))
        if any(units[i].kind == "expert" for i in by_module[name]):
            return _experts_placeholder(args, kwargs)
        return meta.run(original, args, kwargs, real=True)

    try:
        for name in by_module:
            mod = model.get_submodule(name)
            original = mod.forward
            mod.forward = lambda *a, _n=name, _o=original, **kw: call(_n, _o, a, kw)
            wrapped.append(mod)
            meta.hide_buffers(mod)
        with torch.no_grad():
            model(**inputs)
    finally:
        for mod in wrapped:
            del mod.forward
        meta.restore()
    return seen
