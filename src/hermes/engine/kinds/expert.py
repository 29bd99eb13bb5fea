"""Routed experts: mixture-of-experts layers that read only the experts a call routes to.

transformers' fused experts modules (Mixtral, Qwen2-MoE, ...) dispatch their forward through its experts
interface (``ALL_EXPERTS_FUNCTIONS``, chosen by the config's experts implementation). Hermes registers one more
implementation there, ``"hermes_stream"``: the experts class's own eager forward, unchanged (its gate — Inkling 2's
soft-capped SwiGLU —, its accumulation dtype), run with each 3-D weight replaced by a view whose ``[expert]`` reads
that routed expert's weights on demand into the engine's side buffer (by the inference agent, inside the layer's
forward) instead of indexing a tensor held in memory. Unrouted experts are never read; the same kernels run on the
same bytes, so outputs are bit-exact with ``experts_implementation="eager"``. Which engine serves which module is
kept here (a weak table), not on transformers' objects.
"""
from __future__ import annotations

import time
import weakref
from typing import Any

import torch

from hermes.engine.arena import Buf
from hermes.engine.kinds.base import UnitKind
from hermes.engine.reader import views
from hermes.errors import EngineError

IMPLEMENTATION = "hermes_stream"

#: experts module -> (the kind serving it, {expert number: unit index})
_ROUTES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[RoutedExperts, dict[int, int]]] = \
    weakref.WeakKeyDictionary()


class _PerExpert:
    """Stands for one 3-D experts weight during the eager forward: ``view[e]`` is routed expert ``e``'s slice, read
    on demand (one expert's tensors at a time, all of them with one read)."""

    def __init__(self, name: str, meta: torch.Tensor, read: Any) -> None:
        self.name, self.meta, self.read = name, meta, read
        self.shape, self.dtype, self.device = meta.shape, meta.dtype, torch.device("cpu")

    def __getitem__(self, index: Any) -> torch.Tensor:
        if isinstance(index, tuple) or (isinstance(index, torch.Tensor) and index.numel() != 1):
            raise EngineError(f"{self.name} is indexed by {index!r}, not by one expert: this experts module cannot "
                              "read its experts one by one")
        return self.read(int(index))[self.name]

    def __len__(self) -> int:
        return int(self.shape[0])


def streamed_experts_forward(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The experts class's own eager forward, with ``self.gate_up_proj[e]`` / ``self.down_proj[e]`` read per routed
    expert."""
    kind, units = _ROUTES[self]
    last: list[Any] = [None, None]  # (expert number, its tensors): valid until the next read

    def read(e: int) -> dict[str, torch.Tensor]:
        if last[0] != e:
            last[0], last[1] = e, kind.read(units[e])
        return last[1]

    eager = type(self).forward.__wrapped__  # transformers' use_experts_implementation keeps the class's forward
    saved = dict(self._parameters)
    try:
        for name, p in saved.items():
            if p is not None and p.dim() >= 2 and p.shape[0] == self.num_experts:
                self._parameters[name] = _PerExpert(name, p, read)  # type: ignore[assignment]
        return eager(self, *args, **kwargs)
    finally:
        self._parameters.update(saved)


def register() -> None:
    """Make ``"hermes_stream"`` an experts implementation transformers knows (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS[IMPLEMENTATION] = streamed_experts_forward


class RoutedExperts(UnitKind):
    """One unit per expert of each experts module; never loaded by the agents, read when routed."""

    allows_bypass = False  # some expert is read on every call

    def planned(self, index: int) -> bool:
        return False

    def install(self) -> None:
        by_module: dict[str, dict[int, int]] = {}
        for u in self.units:
            module, _, number = u.name.rpartition("#")
            by_module.setdefault(module, {})[int(number)] = u.index
        register()
        model = self.engine.model
        if callable(getattr(model, "set_experts_implementation", None)):
            model.set_experts_implementation(IMPLEMENTATION)  # transformers' public switch (sub-models included)
        for module, experts in by_module.items():
            mod = model.get_submodule(module)
            _ROUTES[mod] = (self, experts)
            if getattr(mod.config, "_experts_implementation", None) != IMPLEMENTATION:
                # a config the public switch does not reach (a sub-config of a model that is not a sub-model): the
                # key transformers' experts interface dispatches on
                mod.config._experts_implementation = IMPLEMENTATION

    def remove(self) -> None:
        for u in self.units:
            _ROUTES.pop(self.engine.model.get_submodule(u.module), None)
        super().remove()

    def read(self, index: int) -> dict[str, torch.Tensor]:
        """Read expert unit ``index`` into the side buffer (in the calling thread, inside its layer's forward) and
        return its tensors by parameter name; they are valid until the next read."""
        e = self.engine
        p = e.lifecycle.current
        if p is None:
            raise EngineError("a mixture-of-experts layer ran outside a forward of the streamed model; call the "
                              "model object returned by hermes.load")
        unit = e.units[index]
        buffer, reader = e.side_buffer()
        ev = p.events[index]
        t0 = time.perf_counter()
        ev.load_start = t0 - p.t0
        buf = Buf(buffer, 0, unit.buffer_bytes, False)
        reader.read(unit, buf)
        tensors = {s.attr: prm for s, prm in zip(unit.slots, views(unit, buf), strict=True)}
        ev.load_end = ev.compute_start = time.perf_counter() - p.t0
        p.stats.stall_s += time.perf_counter() - t0
        p.stats.bytes_read += unit.nbytes
        p.stats.units_loaded += 1
        p.stats.experts_read += 1
        return tensors
