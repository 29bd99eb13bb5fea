"""Mixture-of-experts experts stored quantized: each expert's projection (``gate_up_proj`` / ``up_proj`` /
``down_proj``, one 3-D tensor per layer in transformers 5) quantized as a linear layer of its own (8 bits: one
scale per output channel; 4 bits: groups), stacked over the experts:

- ``NAME``: ``int8 [experts, out, in]`` or ``uint8 [experts, out padded to 16, in/2]`` (the 4-bit kernel's packing),
- ``NAME_scale`` ``[experts, out]`` (8 bits) or ``NAME_scale_zero`` ``[experts, in/group, out padded, 2]`` (4 bits),

a transposed layout (GPT-OSS: ``[experts, in, out]``) quantized as its transpose. Biases and the router are kept as
stored. The experts then compute as transformers' default (grouped) experts forward does, each projection by the
quantized kernel one routed expert at a time (``hermes.moe``): the experts implementation ``"hermes_quant"``,
registered with transformers, is what the model held whole computes with; Hermes streams the same experts one
by one (every tensor has one slice per expert) with the same arithmetic."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hermes.quant.linear import COMPUTE_DTYPE, check_shape, quant_mm, quantized_shapes

IMPLEMENTATION = "hermes_quant"
WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")  # the per-expert projections the grouped forward computes


@dataclass(frozen=True)
class ExpertsQuant:
    """How an experts module's projections are stored: ``bits``, ``group_size``, each projection's outputs."""

    bits: int
    group_size: int
    out: dict[str, int]

    def scale_name(self, name: str) -> str:
        return f"{name}_scale" if self.bits == 8 else f"{name}_scale_zero"

    def per_expert(self, module: Any, read: Any, groups: list[tuple[int, int, int]], x: torch.Tensor, name: str,
                   first: bool) -> torch.Tensor:
        """Projection ``name`` of each group's rows by its expert's quantized weight (and bias)."""
        n, scale = self.out[name], self.scale_name(name)
        out = torch.zeros((x.shape[0], n), dtype=x.dtype)
        for e, s, t in groups:
            w = read(e, (name, scale, f"{name}_bias"), first)
            y = quant_mm(x[s:t], w[name], w[scale], self.bits, self.group_size, n)
            if module.has_bias:
                y = y + w[f"{name}_bias"]
            out[s:t] = y
        return out


def projections(module: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{name: (outputs, inputs)} of an experts module's per-expert projections (a transposed layout's as its
    transpose)."""
    out = {}
    for name in WEIGHTS:
        p = module._parameters.get(name)
        if p is not None and p.dim() == 3:
            a, b = p.shape[1:]
            out[name] = (b, a) if getattr(module, "is_transposed", False) else (a, b)
    return out


def check_experts(module_name: str, module: torch.nn.Module, bits: int, group_size: int) -> None:
    """A ``ValueError`` naming the projection these settings cannot quantize."""
    for name, (_, k) in projections(module).items():
        try:
            check_shape(k, bits, group_size)
        except ValueError as exc:
            raise ValueError(f"{module_name}.{name}: {exc}") from None


def replace_experts(model: torch.nn.Module, modules: list[str], bits: int, group_size: int) -> None:
    """Give each experts module named its quantized tensors (empty, on its device) in place of its projections,
    and make the model compute its experts with them (``"hermes_quant"``)."""
    register()
    for mname in modules:
        module = model.get_submodule(mname)
        shapes = projections(module)
        if not shapes:
            raise ValueError(f"the quantization config names experts module {mname!r}, which has no per-expert "
                             "projections; the checkpoint was quantized for another architecture or is damaged")
        experts = int(module.num_experts)
        for name, (n, k) in shapes.items():
            device = module._parameters[name].device
            for q, (shape, dt) in quantized_shapes(n, k, bits, group_size).items():
                full = name if q == "weight" else name + q.removeprefix("weight")
                module._parameters.pop(full, None)
                module.register_parameter(full, torch.nn.Parameter(
                    torch.empty((experts, *shape), dtype=dt or COMPUTE_DTYPE, device=device), requires_grad=False))
        module.hermes_quant = ExpertsQuant(bits, group_size, {name: n for name, (n, _) in shapes.items()})
    if modules:
        from hermes.moe import switch_experts_implementation

        switch_experts_implementation(model, modules, IMPLEMENTATION)


def quantized_experts_forward(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """The experts forward of a model held whole: the grouped forward on its own quantized tensors (an experts
    module not stored quantized: transformers' grouped forward)."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    from hermes.moe import grouped_experts_forward

    if getattr(self, "hermes_quant", None) is None:
        return grouped_mm_experts_forward(self, *args, **kwargs)
    params = self._parameters
    return grouped_experts_forward(self, lambda e, names, first: {n: params[n][e] for n in names
                                                                 if params.get(n) is not None}, *args, **kwargs)


def register() -> None:
    """Make ``"hermes_quant"`` an experts implementation transformers knows (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS[IMPLEMENTATION] = quantized_experts_forward
