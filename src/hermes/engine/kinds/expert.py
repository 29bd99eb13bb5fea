"""Routed experts: mixture-of-experts layers that read only the experts a call routes to.

transformers' fused experts modules (Mixtral, Qwen2-MoE, ...) dispatch their forward through its experts
interface (``ALL_EXPERTS_FUNCTIONS``, chosen by the config's experts implementation). Hermes registers one more
implementation there, ``"hermes_stream"``, which computes as the implementation the model had chosen (what
``from_pretrained`` picks by default: ``grouped_mm`` where torch has it, as here; or ``eager`` when asked), reading
each routed expert's weights on demand into the engine's side buffer (by the inference agent, inside the layer's
forward) instead of indexing tensors held in memory. Unrouted experts are never read.

- ``eager``: the experts class's own eager forward, unchanged (its gate — Inkling 2's soft-capped SwiGLU —, its
  accumulation dtype), run with each 3-D weight replaced by a view whose ``[expert]`` reads that routed expert (all
  its tensors in one read).
- ``grouped_mm`` (:func:`grouped_experts_forward`): transformers' grouped forward step by step — tokens sorted by
  expert, each projection one grouped matmul per routed expert (torch's grouped kernel computes each group as its
  own matmul: the same bits), and everything else (gate, activation, the norm after the experts, the weighting and
  the sum over the top-k) on the whole batch as transformers does it. Its up projections all come before its down
  projections, so each routed expert is read in two parts (up, then down): the same bytes, one more read.

Experts stored quantized (``"hermes_quant"``, ``hermes.quant.experts``) compute as ``grouped_mm`` with the
quantized kernels. Other implementations (``batched_mm``, ...) are computed as ``eager``. Which engine serves
which module is kept here (a weak table), not on transformers' objects.
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
from hermes.moe import grouped_experts_forward, switch_experts_implementation

IMPLEMENTATION = "hermes_stream"

#: experts module -> (the kind serving it, {expert number: unit index}, the implementation it computes as)
_ROUTES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[RoutedExperts, dict[int, int], str]] = \
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
    """The experts' forward as the implementation the model had chosen computes it, each routed expert read on
    demand."""
    kind, units, implementation = _ROUTES[self]
    if implementation in ("grouped_mm", "hermes_quant") and not getattr(self, "_is_expert_parallel", False):
        return grouped_experts_forward(self, lambda e, names, first: kind.read(units[e], names, count=first),
                                       *args, **kwargs)
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
        chosen = {module: getattr(model.get_submodule(module).config, "_experts_implementation", None) or "eager"
                  for module in by_module}  # what from_pretrained would compute with (before the switch below)
        switch_experts_implementation(model, list(by_module), IMPLEMENTATION)
        for module, experts in by_module.items():
            _ROUTES[model.get_submodule(module)] = (self, experts, chosen[module])

    def remove(self) -> None:
        for u in self.units:
            _ROUTES.pop(self.engine.model.get_submodule(u.module), None)
        super().remove()

    def read(self, index: int, names: tuple[str, ...] | None = None, *, count: bool = True) -> dict[str, torch.Tensor]:
        """Read expert unit ``index`` (only its tensors ``names`` if given) into the side buffer (in the calling
        thread, inside its layer's forward) and return its tensors by parameter name; they are valid until the
        next read. ``count``: counts as one more expert read (not for an expert's second part)."""
        e = self.engine
        p = e.lifecycle.current
        if p is None:
            raise EngineError("a mixture-of-experts layer ran outside a forward of the streamed model; call the "
                              "model object returned by hermes.load")
        unit = e.units[index]
        slots = [s for s in unit.slots if names is None or s.attr in names]
        segments = None
        if names is not None:
            spans = [(s.offset, s.offset + s.nbytes) for s in slots]
            segments = [g for g in unit.segments
                        if any(a < g.buf_offset + g.end - g.start and g.buf_offset < b for a, b in spans)]
        buffer, reader = e.side_buffer()
        ev = p.events[index]
        t0 = time.perf_counter()
        if count:
            ev.load_start = t0 - p.t0
        buf = Buf(buffer, 0, unit.buffer_bytes, False)
        reader.read(unit, buf, segments)
        tensors = {s.attr: prm for s, prm in zip(unit.slots, views(unit, buf), strict=True) if s in slots}
        ev.load_end = ev.compute_start = time.perf_counter() - p.t0
        p.stats.stall_s += time.perf_counter() - t0
        p.stats.bytes_read += sum(g.end - g.start for g in (unit.segments if segments is None else segments))
        if count:
            p.stats.units_loaded += 1
            p.stats.experts_read += 1
        return tensors
