"""Low-bit decode kernels as a model reads them: one row through each of ``--weights`` 8192x2048 weights in turn
(beyond the last-level cache, as a decode step reads every weight once from memory); ms per weight, medians.

    .venv/bin/python benchmarks/bench_kernels.py [--compile] [-o docs/results/kernels.json]

bf16 ``F.linear``; torch's int8 and int4 (groups 32 and 128) kernels that Hermes uses; fbgemm's dynamic int8
(activations quantized per step: other numerics, not used); with ``--compile``, ``torch.compile`` of a
dequantize-and-reduce int8 and int4 function (inductor's C++ code; not used). See docs/QUANT.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

N, K = 8192, 2048


def bench(fn, ws, reps: int = 5) -> float:
    for w in ws[:2]:
        fn(w)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for w in ws:
            fn(w)
        times.append((time.perf_counter() - t0) / len(ws) * 1000)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true")
    p.add_argument("-o", "--out", type=Path)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    x = torch.randn(1, K, dtype=torch.bfloat16)
    out: dict[str, float] = {}
    ws = [torch.randn(N, K, dtype=torch.bfloat16) for _ in range(a.weights)]
    out["bf16 F.linear"] = bench(lambda w: torch.nn.functional.linear(x, w), ws)
    del ws
    w8 = [(torch.randint(-127, 127, (N, K), dtype=torch.int8), torch.rand(N, dtype=torch.bfloat16))
          for _ in range(a.weights)]
    out["int8 _weight_int8pack_mm"] = bench(lambda w: torch.ops.aten._weight_int8pack_mm(x, w[0], w[1]), w8)
    if a.compile:
        @torch.compile(dynamic=False)
        def gemv8(x, w, s):
            return ((x.float() * w.float()).sum(-1) * s.float()).to(torch.bfloat16)

        out["int8 torch.compile"] = bench(lambda w: gemv8(x, w[0], w[1]), w8)
    del w8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = [torch.ops.quantized.linear_prepack(torch.quantize_per_channel(
            torch.randn(N, K), torch.rand(N) * 0.01 + 1e-3, torch.zeros(N, dtype=torch.long), 0, torch.qint8), None)
            for _ in range(a.weights)]
    xf = x.float()
    out["int8 fbgemm dynamic (activations quantized)"] = bench(lambda w: torch.ops.quantized.linear_dynamic(xf, w),
                                                               packed)
    del packed
    for g in (32, 128):
        w4 = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 1),
               torch.rand(K // g, N, 2, dtype=torch.bfloat16)) for _ in range(a.weights)]
        out[f"int4 g{g} _weight_int4pack_mm_for_cpu"] = bench(
            lambda w, g=g: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], g, w[1]), w4)
    if a.compile:
        g = 32

        @torch.compile(dynamic=False)
        def gemv4(x, w, s, z):
            q = torch.stack([(w & 15).float(), (w >> 4).float()], -1).reshape(N, K // g, g)
            xx = x.float().reshape(1, K // g, g)
            return (((q * xx).sum(-1) - 8 * xx.sum(-1)) * s.float() + xx.sum(-1) * z.float()).sum(-1)

        w4c = [(torch.randint(0, 255, (N, K // 2), dtype=torch.uint8), torch.rand(N, K // g, dtype=torch.bfloat16),
                torch.rand(N, K // g, dtype=torch.bfloat16)) for _ in range(a.weights)]
        out["int4 g32 torch.compile"] = bench(lambda w: gemv4(x, *w), w4c)
    for k, v in out.items():
        print(f"{k:>46}  {v:.3f} ms")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"shape": [N, K], "threads": a.threads, "weights": a.weights, "ms": out},
                                    indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
