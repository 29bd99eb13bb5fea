"""Reproduce docs/BENCHMARKS.md, section "The paper's comparison" (issue 4): one forward pass per model, every
strategy, each run a fresh process with a cold page cache, interleaved, medians; plots next to each results.json.

    .venv/bin/python benchmarks/bench_paper.py [--only bert-large,gpt2] [--repeat 3] [--out docs/results/paper]

Synthesizes the checkpoints into ~/.cache/hermes once (GPT-J-6B in float16: 12 GB; Llama-3.2-1B in bfloat16,
its native dtype). Cases:
- bert-large, gpt2, vit-large, llama-3.2-1b on the machine as it is;
- bert-large again on an emulated 200 MB/s disk and 2 cores (cgroup v1);
- gpt-j-6b on an emulated device with 2 GiB of RAM (page cache included), where `full` cannot run;
- bert-large-sweep, vit-large-sweep: PipeLoad at several budgets against pipeswitch (the memory/latency
  trade-off; a strategy option ``budget=`` overrides the case's budget);
- bert-large-min-ram: the smallest emulated RAM cap (page cache included) at which each strategy completes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hermes.atomic import atomic_write_text
from hermes.cli import main
from hermes.memory import format_bytes
from hermes.synth import DEFAULT_CACHE

# plain pipeload runs the planner's plan (profiled first on the same device, untimed); the fixed setting beside it
# is the one the first runs used. GPT-J-6B, Llama-3.2-1B and the 200 MB/s disk compare the fixed setting only:
# profiling them takes 10-20 minutes here (every setting at three budgets, three rounds).
# sequential: prefetch 0 (nothing overlaps); double-buffer: prefetch 1, what `sequential` ran before issue 25
BASE = ("full,pipeswitch,sequential:io=direct,double-buffer:io=direct,pipeload,pipeload:loaders=1;io=direct,"
        "accelerate,airllm")
FIXED_ONLY = BASE.replace(",pipeload,", ",")


def sweep(*budgets: str) -> str:
    return ",".join(["pipeswitch", *(f"pipeload:budget={b};loaders=1;io=direct" for b in budgets)])


CASES = {
    # name: (arch, dtype, input args, budget, strategies, device args)
    "bert-large": ("bert-large", "float32", ["--seq-len", "128"], "170MB", BASE, []),
    "gpt2": ("gpt2", "float32", ["--seq-len", "128"], "200MB", BASE, []),
    "vit-large": ("vit-large", "float32", [], "160MB", BASE, []),
    "llama-3.2-1b": ("llama-3.2-1b", "bfloat16", ["--seq-len", "32"], "750MB", FIXED_ONLY, []),
    "bert-large-200MBps": ("bert-large", "float32", ["--seq-len", "128"], "170MB", FIXED_ONLY,
                           ["--disk-bw", "200MB/s", "--cpus", "2"]),
    "gpt-j-6b-2GiB": ("gpt-j-6b", "float16", ["--seq-len", "16"], "1GiB",
                      "full,pipeswitch,pipeload:loaders=1;io=direct,sequential:io=direct,double-buffer:io=direct,accelerate",
                      ["--device-ram", "2GiB"]),
    "bert-large-sweep": ("bert-large", "float32", ["--seq-len", "128"], "170MB",
                         sweep("130MB", "150MB", "170MB", "250MB", "400MB"), []),
    "bert-large-min-ram": ("bert-large", "float32", ["--seq-len", "128"], "170MB",
                           "full,pipeswitch,pipeload:loaders=1;io=direct,accelerate", ["--find-min-ram"]),
    "vit-large-sweep": ("vit-large", "float32", [], "160MB", sweep("60MB", "100MB", "130MB", "160MB", "250MB",
                                                                  "400MB"), []),
}


SUMMARY_CASES = ("bert-large", "gpt2", "vit-large", "llama-3.2-1b", "gpt-j-6b-2GiB", "bert-large-200MBps")


def summary(out: Path) -> str:
    """One row per measured case: PipeLoad (planned where measured, else the fixed setting) against the others."""
    def t(s: dict[str, Any] | None) -> str:
        return f"{s['latency_s']:.3f}" if s and "latency_s" in s else "cannot run" if s else "–"

    lines = ["| case | budget | device | pipeload | pipeload (s) | pipeswitch (s) | speedup vs pipeswitch | peak RSS "
             "pipeload / pipeswitch | memory reduction | full (s) | accelerate (s) | pipeload vs accelerate | "
             "forward vs lower bound | airllm (s) |", "|---" * 14 + "|"]
    for name in SUMMARY_CASES:
        path = out / name / "results.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        sm = r["summary"]
        key = "pipeload" if "latency_s" in sm.get("pipeload", {}) else "pipeload:loaders=1,io=direct"
        pl, ps, acc = sm[key], sm.get("pipeswitch"), sm.get("accelerate")
        how = (f"plan: {pl['plan']['loaders']} loader(s), {pl['plan']['io']}" if "plan" in pl else "1 loader, direct")
        ps_ok = ps is not None and "latency_s" in ps
        acc_ok = acc is not None and "latency_s" in acc
        cells = [
            f"[{name}]({name}/results.md)", r["budget"], r["device"]["describe"], how,
            f"**{pl['latency_s']:.3f}**", t(ps),
            f"**{ps['latency_s'] / pl['latency_s']:.2f}x**" if ps_ok else "–",
            format_bytes(pl["peak_rss_above_baseline_bytes"]) + " / "
            + (format_bytes(ps["peak_rss_above_baseline_bytes"]) if ps_ok else "–"),
            f"**{pl['memory_reduction_vs_pipeswitch']:.1%}**" if ps_ok else "–",
            t(sm.get("full")), t(acc),
            f"{acc['latency_s'] / pl['latency_s']:.2f}x" if acc_ok else "–",
            f"{pl['forward_vs_lower_bound']:.2f}x" if "forward_vs_lower_bound" in pl else "–",
            t(sm["airllm"]) if "latency_s" in sm.get("airllm", {}) else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--only", help="comma-separated case names: " + ", ".join(CASES))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("docs/results/paper"))
    p.add_argument("--summary", action="store_true", help="only write OUT/summary.md from the results there")
    a = p.parse_args()
    if a.summary:
        text = summary(a.out)
        atomic_write_text(a.out / "summary.md", text)
        print(text)
        return 0
    for name in (a.only.split(",") if a.only else CASES):
        arch, dtype, inputs, budget, strategies, device = CASES[name]
        model = DEFAULT_CACHE / (arch if dtype == "float32" else f"{arch}-{dtype}")
        if not (model / "config.json").is_file() and (code := main(["synth", arch, str(model), "--dtype", dtype])):
            return code
        code = main(["bench", str(model), "--budget", budget, "--repeat", str(a.repeat), "--strategies", strategies,
                     *inputs, *device, "-o", str(a.out / name)])
        if code:
            return code
    atomic_write_text(a.out / "summary.md", summary(a.out))
    return 0


if __name__ == "__main__":
    sys.exit(run())
