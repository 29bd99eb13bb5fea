"""Mixture-of-experts layers that read only the routed experts.

transformers' fused experts modules (Mixtral, Qwen2-MoE, ...) dispatch their forward through its experts
interface (``ALL_EXPERTS_FUNCTIONS``, chosen by ``config._experts_implementation``). Hermes registers one more
implementation there, ``"hermes_stream"``: transformers' eager loop, unchanged, except that each routed
expert's weights are read on demand into the engine's expert buffer instead of being indexed out of a 3-D
tensor held in memory. Unrouted experts are never read; the same kernels run on the same bytes, so outputs are
bit-exact.
"""
from __future__ import annotations

from typing import Any

import torch

IMPLEMENTATION = "hermes_stream"


def streamed_experts_forward(self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' eager experts forward with ``self.gate_up_proj[e]`` / ``self.down_proj[e]`` read per routed
    expert (``self._hermes_engine.read_expert``)."""
    engine, units = self._hermes_engine, self._hermes_experts
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
        weights = engine.read_expert(units[int(expert_idx)])  # valid until the next read
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
