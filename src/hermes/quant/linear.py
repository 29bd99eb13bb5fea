"""Weight-only quantized linear layers, computed by PyTorch's own low-bit CPU kernels on the packed bytes as they
are stored (no dequantized copy of a layer, no repacking at load or per token).

- 8 bits: symmetric, one scale per output channel; ``torch.ops.aten._weight_int8pack_mm`` (int8 ``[N, K]``).
- 4 bits: asymmetric, one scale and zero per ``group_size`` inputs of each output channel;
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on its own CPU packing (``uint8 [N, K/2]``, two values a byte,
  value ``2j`` in the low nibble) with ``scales_and_zeros [K/group, N, 2]``; a weight is ``(q - 8) * scale + zero``.

Both kernels run on bfloat16 activations and scales whatever the model's dtype (its activations are cast to
bfloat16 for these layers and back): with float32 activations the same kernels take 2-4x longer than a float32
``F.linear`` instead of 3-5x less. Measured on this project's CPU (AVX2 without native bf16, 2 threads, torch
2.13, one 8192x2048 weight; ms, medians):

| rows | f32 linear | bf16 linear | int8 (bf16) | int4 g128 (bf16) | int4 g32 (bf16) | int8 (f32) | int4 g128 (f32) |
|---|---|---|---|---|---|---|---|
| 1 (decode) | 3.82 | 1.99 | 0.65 | 0.43 | 0.45 | 7.02 | 14.3 |
| 8 | 9.23 | 1.94 | 2.54 | 1.57 | 1.64 | 59.9 | 115 |
| 64 (prefill) | 24.4 | 6.50 | 18.5 | 12.9 | 13.1 | 474 | 925 |

So a decode step is 3-5x faster than bf16 on a quarter / half of the bytes, and a prefill about 2x slower.
"""
from __future__ import annotations

import math

import torch

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_GROUP_SIZE = 128
INT4_ROWS = 16  # the 4-bit kernel computes outputs in blocks of 16
INT8_ALIGN = 16  # bytes: the int8 kernel's weight alignment for more than one row
COMPUTE_DTYPE = torch.bfloat16  # of the kernels' activations and of the stored scales


class QuantLinear(torch.nn.Module):
    """``y = x W^T + b`` with ``W`` stored as 8- or 4-bit integers (see the module docstring for the layout).

    Its tensors are parameters (``weight``, ``weight_scale`` for 8 bits or ``weight_scale_zero`` for 4 bits,
    ``bias``) so that a checkpoint's state dict names them as transformers saves and loads them."""

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int, bias: bool,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        check_shape(in_features, bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        shapes = quantized_shapes(out_features, in_features, bits, group_size)
        for name, (shape, dt) in shapes.items():
            dt = COMPUTE_DTYPE if dt is None else dt
            setattr(self, name, torch.nn.Parameter(torch.empty(shape, dtype=dt, device=device), requires_grad=False))
        self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                       requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = quant_mm(x.reshape(-1, self.in_features), self.weight,
                     self.weight_scale if self.bits == 8 else self.weight_scale_zero, self.bits, self.group_size,
                     self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, y.shape[-1])


def quant_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int,
             out_features: int) -> torch.Tensor:
    """``x [rows, in] @ W^T`` in ``x``'s dtype, for ``W`` stored as 8 bits (``scale``: per output channel) or 4
    bits (``scale``: the scales and zeros ``[in/group, rows padded, 2]``), computed on bfloat16 activations."""
    x2 = x.to(COMPUTE_DTYPE).contiguous()
    if bits == 8 and weight.data_ptr() % INT8_ALIGN and x2.shape[0] > 1:
        # torch's int8 kernel reads a weight that is not 16-byte aligned out of bounds (a crash) for more
        # than one row; `hermes quantize` aligns every tensor, a checkpoint re-saved elsewhere may not
        y = torch.cat([torch.ops.aten._weight_int8pack_mm(r, weight, scale) for r in x2.split(1)])
    elif bits == 8:
        y = torch.ops.aten._weight_int8pack_mm(x2, weight, scale)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, group_size, scale)
        if y.shape[-1] != out_features:  # rows padded to the kernel's block
            y = y[:, :out_features].contiguous()
    return y.to(x.dtype)


def check_shape(in_features: int, bits: int, group_size: int) -> None:
    """A ``ValueError`` naming what to change when these settings cannot quantize a layer of ``in_features``."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if bits == 4:
        if group_size not in GROUP_SIZES:
            raise ValueError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))} for 4 bits, got "
                             f"{group_size}")
        if in_features % group_size:
            fits = [g for g in GROUP_SIZES if in_features % g == 0]
            raise ValueError(f"group size {group_size} does not divide the layer's {in_features} inputs; use "
                             + (f"--group-size {' or '.join(map(str, fits))}" if fits else "8 bits for this model"))


def quantized_shapes(out_features: int, in_features: int, bits: int,
                     group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """name -> (shape, dtype) of a quantized layer's tensors; a ``None`` dtype is the scales' (bfloat16)."""
    if bits == 8:
        return {"weight": ((out_features, in_features), torch.int8), "weight_scale": ((out_features,), None)}
    n = padded_outputs(out_features)
    return {"weight": ((n, in_features // 2), torch.uint8), "weight_scale_zero": ((in_features // group_size, n, 2),
                                                                                   None)}


def padded_outputs(out_features: int) -> int:
    """Rows a 4-bit layer stores: its outputs rounded up to the kernel's block of 16 (GPT-2's 50257-token head
    stores 50272 rows, the last 15 zero; their outputs are dropped)."""
    return -(-out_features // INT4_ROWS) * INT4_ROWS


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """The tensors of a quantized layer for a float ``weight [out, in]``; scales rounded to bfloat16 first, so
    that the integers are chosen for the scales the kernel will use."""
    dtype = COMPUTE_DTYPE
    w = weight.detach().to(torch.float32)
    n, k = w.shape
    check_shape(k, bits, group_size)
    if bits == 8:
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(dtype)
        q = torch.round(w / scale.float()[:, None]).clamp(-128, 127).to(torch.int8)
        return {"weight": q, "weight_scale": scale}
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(dtype).float()
    zero = (lo + 8 * scale).to(dtype).float()  # the weight is (q - 8) * scale + zero
    q = torch.round((g - zero[..., None]) / scale[..., None] + 8).clamp(0, 15).reshape(n, k)
    return int4_tensors(q, scale, zero)


def int4_tensors(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
    """A 4-bit layer's tensors from its integers ``q [N, K]`` (0..15) and per-group ``scale``/``zero``
    ``[N, K/group]`` (the weight is ``(q - 8) * scale + zero``): rows padded to the kernel's block of 16 (zero
    weights), ``q`` packed as the kernel reads it, scales and zeros as ``[K/group, N, 2]`` bfloat16."""
    n = q.shape[0]
    pad = padded_outputs(n) - n
    if pad:
        q = torch.cat([q.to(torch.int32), q.new_full((pad, q.shape[1]), 8, dtype=torch.int32)])
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
    sz = torch.stack([scale.float(), zero.float()], dim=-1).transpose(0, 1).contiguous().to(COMPUTE_DTYPE)
    return {"weight": pack_int4(q), "weight_scale_zero": sz}


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` integers 0..15 -> the CPU kernel's ``uint8 [N, K/2]``, packed by torch's own
    ``_convert_weight_to_int4pack_for_cpu`` (its layout interleaves rows and columns in blocks)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def dequantize(tensors: dict[str, torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """The weight ``[out, in]`` (float32) a quantized layer computes with, for quality checks and tests (4 bits:
    with its padding rows; read back through the kernel itself, in bfloat16 as it computes)."""
    if bits == 8:
        return tensors["weight"].float() * tensors["weight_scale"].float()[:, None]
    packed, sz = tensors["weight"], tensors["weight_scale_zero"]
    k = packed.shape[1] * 2
    eye = torch.eye(k, dtype=COMPUTE_DTYPE)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, sz).float().t().contiguous()


def quantized_nbytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    return sum(math.prod(s) * torch.empty((), dtype=dt or COMPUTE_DTYPE).element_size()
               for s, dt in quantized_shapes(out_features, in_features, bits, group_size).values())
