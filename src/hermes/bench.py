"""Benchmark harness: each strategy run in a fresh subprocess (clean peak RSS), page cache evicted first,
strategies interleaved (A B A B ...) because the disk and CPU are shared and noisy; medians and ratios.
Writes results.json (every run, machine facts, versions) and results.md."""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hermes.memory import format_bytes
from hermes.store import atomic_write_text

FORMAT_VERSION = 1


def parse_strategy(spec: str) -> tuple[str, dict[str, str]]:
    """``"pipeload:loaders=1,io=direct"`` -> ("pipeload", {"loaders": "1", "io": "direct"})."""
    name, _, opts = spec.partition(":")
    kw = dict(kv.split("=", 1) for kv in opts.replace(";", ",").split(",") if kv)
    return name, kw


def _worker(args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "hermes.baselines", *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_facts() -> dict[str, Any]:
    """The profiler's machine facts plus the software versions a results file should record."""
    import transformers

    from hermes.profiler import machine_facts as core_facts

    return {**core_facts(), "platform": platform.platform(), "python": platform.python_version(),
            "transformers": transformers.__version__}


def run_benchmark(model_dir: str | os.PathLike[str], *, strategies: list[str], budget: str, seq_len: int = 128,
                  repeat: int = 3, bounds: bool = True,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every strategy ``repeat`` times, interleaved, each in a fresh subprocess with a cold page cache."""
    runs: list[dict[str, Any]] = []
    for r in range(repeat):
        for spec in strategies:
            name, kw = parse_strategy(spec)
            args = [name, str(model_dir), "--budget", budget, "--seq-len", str(seq_len)]
            args += [a for k, v in kw.items() for a in (f"--{k}", v)]
            if progress:
                progress(f"run {r + 1}/{repeat}: {spec}")
            res = _worker(args)
            runs.append({"spec": spec, "repeat": r, **res})
    result: dict[str, Any] = {"format_version": FORMAT_VERSION, "model_dir": str(model_dir), "budget": budget,
                              "seq_len": seq_len, "repeat": repeat, "machine": machine_facts(), "runs": runs}
    if bounds:
        if progress:
            progress("lower bound: per-unit compute (weights resident) and best cold read bandwidth")
        result["bounds"] = _worker(["bounds", str(model_dir), "--seq-len", str(seq_len)])
    result["summary"] = summarize(result)
    return result


def summarize(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Median latency / peak memory per strategy, and ratios to ``full`` and to the lower bound."""
    out: dict[str, dict[str, Any]] = {}
    for spec in dict.fromkeys(r["spec"] for r in result["runs"]):
        ok = [r for r in result["runs"] if r["spec"] == spec and "error" not in r]
        if not ok:
            out[spec] = {"error": next(r["error"] for r in result["runs"] if r["spec"] == spec)}
            continue
        s: dict[str, Any] = {"n": len(ok)}
        for key in ("latency_s", "load_s", "forward_s", "stall_s", "peak_rss_above_baseline_bytes",
                    "weights_peak_bytes", "peak_rss_bytes", "baseline_rss_bytes"):
            vals = [r[key] for r in ok if key in r]
            if vals:
                s[key] = statistics.median(vals)
        out[spec] = s
    full = out.get("full", {})
    bound = (result.get("bounds") or {}).get("lower_bound_s")
    for s in out.values():
        if "latency_s" in s and "latency_s" in full:
            s["latency_vs_full"] = s["latency_s"] / full["latency_s"]
            s["memory_vs_full"] = s["peak_rss_above_baseline_bytes"] / full["peak_rss_above_baseline_bytes"]
        if "forward_s" in s and bound:
            s["forward_vs_lower_bound"] = s["forward_s"] / bound
    return out


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"Model `{result['model_dir']}`, input length {result['seq_len']}, weight budget {result['budget']}, "
             f"median of {result['repeat']} cold runs per strategy (fresh process each, interleaved).", "",
             "| strategy | first output (s) | of which load (s) | forward (s) | stall (s) | peak RSS above baseline "
             "| weights peak | latency vs full | memory vs full | forward vs lower bound |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for spec, s in result["summary"].items():
        if "error" in s:
            lines.append(f"| {spec} | failed: {s['error']} |||||||||")
            continue

        def f(k: str, fmt: str = "{:.3f}", s: dict = s) -> str:
            return fmt.format(s[k]) if k in s else "–"

        lines.append(f"| {spec} | {f('latency_s')} | {f('load_s')} | {f('forward_s')} | {f('stall_s')} | "
                     f"{format_bytes(s['peak_rss_above_baseline_bytes'])} | "
                     f"{format_bytes(s['weights_peak_bytes']) if 'weights_peak_bytes' in s else '–'} | "
                     f"{f('latency_vs_full', '{:.2f}x')} | {f('memory_vs_full', '{:.1%}')} | "
                     f"{f('forward_vs_lower_bound', '{:.2f}x')} |")
    b = result.get("bounds")
    if b and "error" not in b:
        bw = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in b["read_bandwidth_bps"].items())
        lines += ["", f"Lower bound max(Σ load, Σ compute) + first load = **{b['lower_bound_s']:.3f} s** "
                      f"(Σ compute with weights resident {b['sum_compute_s']:.3f} s; Σ load at the best cold "
                      f"bandwidth {b['best_bandwidth_bps'] / 1e9:.2f} GB/s = {b['sum_load_s']:.3f} s). "
                      f"Cold read bandwidth by mode x readers (GB/s): {bw}."]
    m = result["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cpus']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
                  f"transformers {m['transformers']}."]
    return "\n".join(lines) + "\n"


def write_results(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    atomic_write_text(out / "results.md", to_markdown(result))
    return out / "results.json", out / "results.md"
