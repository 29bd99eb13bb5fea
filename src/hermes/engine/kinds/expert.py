"""Routed experts: mixture-of-experts layers that read only the experts a call routes to.

transformers' fused experts modules (Mixtral, Qwen2-MoE, ...) dispatch their forward through its experts
interface (``ALL_EXPERTS_FUNCTIONS``, chosen by the config's experts implementation). Hermes registers one more
implementation there, ``"hermes_stream"``: transformers' eager loop, unchanged, except that each routed
expert's weights are read on demand into the engine's side buffer (by the inference agent, inside the layer's
forward) instead of being indexed out of a 3-D tensor held in memory. Unrouted experts are never read; the same
kernels run on the same bytes, so outputs are bit-exact. Which engine serves which module is kept here (a weak
table), not on transformers' objects.
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


def streamed_experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts forward with ``self.gate_up_proj[e]`` / ``self.down_proj[e]`` read per routed
    expert."""
    kind, units = _ROUTES[self]
    final_hidden_states = torch.zeros_like(hidden_states)
    with torch.no_grad():
        expert_mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1)
        expert_mask = expert_mask.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        expert_idx = expert_idx[0]
        if expert_idx == self.num_experts:
            continue
        top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
        current_state = hidden_states[token_idx]
        weights = kind.read(units[int(expert_idx)])  # valid until the next read
        gate, up = torch.nn.functional.linear(current_state, weights["gate_up_proj"]).chunk(2, dim=-1)
        current_hidden_states = self.act_fn(gate) * up
        current_hidden_states = torch.nn.functional.linear(current_hidden_states, weights["down_proj"])
        current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos, None]
        final_hidden_states.index_add_(0, token_idx, current_hidden_states.to(final_hidden_states.dtype))
    return final_hidden_states


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
