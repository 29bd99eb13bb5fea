"""transformers' grouped experts forward (``grouped_mm``, its default experts implementation) computed one routed
expert at a time, each expert's tensors given by a ``read`` function: the engine's on-demand reads
(``hermes.engine.kinds.expert``), or a quantized experts module's own tensors (``hermes.quant.experts``)."""
from __future__ import annotations

from typing import Any

import torch


def grouped_experts_forward(self: Any, read: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' ``grouped_mm_experts_forward`` (5.x, without expert parallelism), each projection's grouped
    matmul done one routed expert at a time with ``read(expert, names, first)`` giving that expert's named tensors
    (``first``: its first part read in this call)."""
    num_top_k, num_tokens, hidden_dim = top_k_index.size(-1), hidden_states.size(0), hidden_states.size(-1)
    sample_weights = top_k_weights.reshape(-1)
    expert_ids_g, perm = torch.sort(top_k_index.reshape(-1))
    selected = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    ids, counts = torch.unique_consecutive(expert_ids_g, return_counts=True)
    groups, start = [], 0
    for e, c in zip(ids.tolist(), counts.tolist(), strict=True):
        if 0 <= e < self.num_experts:  # ids beyond the experts (a router's "no expert") are rows no group covers
            groups.append((e, start, start + c))
        start += c
    proj_out = _per_expert(self, read, groups, selected, "gate_up_proj" if self.has_gate else "up_proj", True)
    proj_out = self._apply_gate(proj_out) if self.has_gate else self.act_fn(proj_out)
    proj_out = _per_expert(self, read, groups, proj_out, "down_proj", False)
    if self.has_post_expert_norm:
        proj_out = self.post_expert_norm(proj_out)
    weighted_out = proj_out * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=perm.device)
    weighted_out = weighted_out[inv_perm]
    return weighted_out.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _per_expert(self: Any, read: Any, groups: list[tuple[int, int, int]], x: torch.Tensor, name: str,
                first: bool) -> torch.Tensor:
    """One grouped linear (transformers' ``_grouped_linear``: its kernel, its bias add) over the rows of each group,
    a group's expert's ``name`` weight (and bias) read for it."""
    from transformers.integrations.moe import _grouped_linear

    quant = getattr(self, "hermes_quant", None)
    if quant is not None:  # stored quantized (hermes.quant.experts): its kernels, its tensors' names
        return quant.per_expert(self, read, groups, x, name, first)
    meta = self._parameters[name]
    out_dim = meta.shape[-1] if self.is_transposed else meta.shape[-2]
    out = torch.zeros((x.shape[0], out_dim), dtype=meta.dtype)
    for e, s, t in groups:
        w = read(e, (name, f"{name}_bias"), first)
        bias = w.get(f"{name}_bias") if self.has_bias else None
        offs = torch.tensor([t - s], dtype=torch.int32)
        out[s:t] = _grouped_linear(x[s:t], w[name].unsqueeze(0), offs, bias=bias, is_transposed=self.is_transposed)
    return out


def switch_experts_implementation(model: torch.nn.Module, modules: list[str], name: str) -> None:
    """Make the experts modules ``modules`` of ``model`` dispatch to implementation ``name``: transformers'
    public switch (sub-models included), then each module's config the switch does not reach (a sub-config of a
    model that is not a sub-model) — the key transformers' experts interface dispatches on."""
    if callable(getattr(model, "set_experts_implementation", None)):
        model.set_experts_implementation(name)
    for module in modules:
        config = model.get_submodule(module).config
        if getattr(config, "_experts_implementation", None) != name:
            config._experts_implementation = name
