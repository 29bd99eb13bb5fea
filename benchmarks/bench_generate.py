"""Generation benchmark (issues 5 and 12): tokens/s, time to first token and peak memory of hermes, accelerate disk
offload, AirLLM (Llama family) and a full load, greedy, 32 new tokens after a 64-token random prompt, on
emulated devices whose RAM (page cache included) is the runtime + 10/25/50/100 % of the checkpoint's tensor bytes;
hermes finds its budget itself (``--budget auto``).

Every run is a fresh process (``python -m hermes.baselines gen-STRATEGY``) with the page cache of the files it
reads evicted first; runs are interleaved in a shuffled order per round; medians over rounds. Every strategy's
tokens are compared with the full model's.

    hermes synth gpt2 ckpt/gpt2 && hermes synth llama-3.2-1b ckpt/llama-3.2-1b --dtype bfloat16
    sudo .venv/bin/python benchmarks/bench_generate.py ckpt/gpt2 ckpt/llama-3.2-1b --repeat 3 \
        -o docs/results/generate
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from hermes.api import open_model
from hermes.atomic import atomic_write_text
from hermes.memory import format_bytes, parse_bytes

FRACTIONS = (0.10, 0.25, 0.50, 1.00)


def worker(strategy: str, model_dir: Path, budget: int | str, ram: int | None, args: argparse.Namespace,
           work: str) -> dict[str, Any]:
    from hermes.bench import run_worker
    from hermes.device import Device, DeviceSpec

    cmd = ["-m", "hermes.baselines", f"gen-{strategy}", str(model_dir), "--budget", str(budget),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--loaders",
           str(args.loaders), "--io", args.io, "--work-dir", work]
    if ram is None:
        return run_worker(cmd[2:], timeout=args.timeout)
    with Device(DeviceSpec(ram_bytes=ram), model_dir) as dev:  # RAM cap, page cache included
        return {"device_ram_bytes": ram, **run_worker(cmd[2:], dev, args.timeout)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--loaders", type=int, default=1)
    p.add_argument("--io", default="direct")
    p.add_argument("--runtime", default="300MiB", help="device RAM = this (Python, torch, transformers, the first "
                   "call's scratch) + a fraction of the model; every strategy runs under the same cap")
    p.add_argument("--no-device", action="store_true", help="no RAM cap: budgets only (hermes, accelerate)")
    p.add_argument("--only", default="hermes,accelerate,airllm,full")
    p.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    p.add_argument("--full-fractions", default=None, help="run full only at these fractions (it pages under a "
                   "smaller cap until killed); default: every fraction")
    p.add_argument("--airllm-fractions", default=None, help="run AirLLM only at these fractions (it reads every "
                   "layer per token whatever the RAM); default: every fraction")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a run is killed (a thrashing run)")
    p.add_argument("--work-dir", default=None, help="scratch (AirLLM's per-layer copy); default a temp dir")
    p.add_argument("-o", "--out", type=Path, default=Path("docs/results/generate"))
    args = p.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="hermes-gen-")
    runtime = parse_bytes(args.runtime)
    results: dict[str, Any] = {"runtime_bytes": None if args.no_device else runtime,
                               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeat": args.repeat,
                               "loaders": args.loaders, "io": args.io, "models": {}}
    rng = random.Random(0)
    for model_dir in args.models:
        layout = open_model(model_dir)
        size = layout.store.nbytes  # checkpoint tensor bytes
        llama = layout.config.model_type == "llama"
        only = args.only.split(",")
        fractions = [float(f) for f in args.fractions.split(",")]
        strategies = [s for s in ("hermes", "accelerate", "full") + (("airllm",) if llama else ()) if s in only]
        # a cell: (strategy, the device's share of the model, budget argument, device RAM)
        cells = []
        for f in fractions:
            ram = None if args.no_device else runtime + int(f * size)
            for s in strategies:
                if args.no_device and s in ("full", "airllm") and f < 1:
                    continue
                only_at = {"full": args.full_fractions, "airllm": args.airllm_fractions}.get(s)
                if only_at is not None and f not in [float(x) for x in only_at.split(",")]:
                    continue
                # hermes: the device's memory, found by itself; accelerate: max_memory = the model's share of
                # the device (its best setting here: see docs/BENCHMARKS.md); full and AirLLM have no setting
                budget = "auto" if s == "hermes" and not args.no_device else int(f * size)
                cells.append((s, f, budget, ram))
        runs: list[dict[str, Any]] = []
        for r in range(args.repeat):
            order = cells[:]
            rng.shuffle(order)
            for strategy, f, budget, ram in order:
                print(f"{model_dir.name} round {r + 1}/{args.repeat}: {strategy} at {f:.0%}"
                      + (f" (device {format_bytes(ram)})" if ram else ""), file=sys.stderr, flush=True)
                res = worker(strategy, model_dir, budget, ram, args, str(Path(work) / model_dir.name))
                runs.append({"strategy": strategy, "fraction": f, "budget": budget, "round": r, **res})
                print(f"  -> {res.get('tokens_per_s', 0):.2f} tok/s" if "error" not in res else f"  -> {res['error']}",
                      file=sys.stderr, flush=True)
            results["models"][model_dir.name] = {"model_bytes": size, "runs": runs, "summary": summarize(runs, size)}
            write(results, args.out)
    return 0


def summarize(runs: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    ref = next((r["tokens"] for r in runs if r["strategy"] == "full" and "tokens" in r), None)
    out = []
    for key in dict.fromkeys((r["strategy"], r["fraction"]) for r in runs):
        mine = [r for r in runs if (r["strategy"], r["fraction"]) == key]
        ok = [r for r in mine if "error" not in r]
        row: dict[str, Any] = {"strategy": key[0], "fraction": key[1], "n": len(ok),
                               "device_ram_bytes": mine[0].get("device_ram_bytes")}
        if not ok:
            row["error"] = mine[0]["error"]
        else:
            for k in ("ttft_s", "total_s", "tokens_per_s", "decode_tokens_per_s", "peak_rss_above_baseline_bytes",
                      "weights_peak_bytes", "bytes_read_per_token", "resident_units", "hermes_budget_bytes"):
                vals = [r[k] for r in ok if r.get(k) is not None]
                if vals:
                    row[k] = statistics.median(vals)
            row["same_tokens_as_full"] = ref is not None and all(r["tokens"] == ref for r in ok)
        out.append(row)
    order = {"hermes": 0, "accelerate": 1, "airllm": 2, "full": 3}
    return sorted(out, key=lambda x: (x["fraction"], order[x["strategy"]]))


def to_markdown(results: dict[str, Any]) -> str:
    runtime = results.get("runtime_bytes")
    lines = [f"Greedy generation, {results['new_tokens']} new tokens after a {results['prompt_len']}-token random "
             f"prompt, batch 1; median of {results['repeat']} runs, each a fresh process with a cold page cache, "
             f"interleaved. hermes: `--budget auto`, {results['loaders']} loader(s), {results['io']} I/O; "
             "accelerate: `device_map=\"auto\", max_memory={\"cpu\": the model's share of the device}`, the rest "
             "disk-offloaded; AirLLM and full load have no setting. "
             + (f"Every run inside an emulated device with RAM = {format_bytes(runtime)} (runtime) + the share of "
                "the model, page cache included (cgroup v1)." if runtime else "No RAM cap: budgets only."), ""]
    for name, m in results["models"].items():
        lines += [f"### {name} ({format_bytes(m['model_bytes'])})", "",
                  "| device RAM | strategy | tokens/s (all) | tokens/s after first | first token (s) | total (s) | "
                  "peak RSS above baseline | hermes budget (auto) | read per token | same tokens as full |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in m["summary"]:
            ram = f"{row['fraction']:.0%}" + (f" ({format_bytes(row['device_ram_bytes'])})"
                                              if row.get("device_ram_bytes") else "")
            if "error" in row:
                lines.append(f"| {ram} | {row['strategy']} | cannot run: {row['error'][:160]} ||||||||")
                continue
            lines.append(
                f"| {ram} | {row['strategy']} | {row['tokens_per_s']:.2f} | {row['decode_tokens_per_s']:.2f} | "
                f"{row['ttft_s']:.2f} | {row['total_s']:.1f} | {format_bytes(row['peak_rss_above_baseline_bytes'])} | "
                f"{format_bytes(row['hermes_budget_bytes']) if 'hermes_budget_bytes' in row else '–'} | "
                f"{format_bytes(int(row['bytes_read_per_token'])) if 'bytes_read_per_token' in row else '–'} | "
                f"{'yes' if row['same_tokens_as_full'] else 'NO'} |")
        lines += ["", *targets(m["summary"]), ""]
    return "\n".join(lines)


def targets(summary: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, computed from the medians: tokens/s vs the best other strategy below 100 %, vs AirLLM
    everywhere, first token and decode vs full at 100 %."""
    out = []
    by = {(r["strategy"], r["fraction"]): r for r in summary if "error" not in r}
    for f in sorted({r["fraction"] for r in summary}):
        h = by.get(("hermes", f))
        if h is None:
            out.append(f"- {f:.0%}: hermes did not run")
            continue
        others = {s: r["tokens_per_s"] for (s, g), r in by.items() if g == f and s != "hermes"}
        parts = []
        if others:
            best = max(others, key=others.get)
            parts.append(f"{h['tokens_per_s'] / others[best]:.2f}x the best other ({best}, "
                         f"{others[best]:.2f} tokens/s)" + (" [target >= 1.3x]" if f < 1 else ""))
        if "airllm" in others:
            parts.append(f"{h['tokens_per_s'] / others['airllm']:.2f}x AirLLM [target >= 3x]")
        full = by.get(("full", f))
        if f >= 1 and full is not None:
            parts.append(f"first token {h['ttft_s'] / full['ttft_s']:.2f}x full's [target <= 1.1x], decode "
                         f"{h['decode_tokens_per_s'] / full['decode_tokens_per_s']:.2f}x full's [target >= 0.95x]")
        out.append(f"- {f:.0%}: hermes {h['tokens_per_s']:.2f} tokens/s = " + "; ".join(parts))
    return out


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", to_markdown(results))


if __name__ == "__main__":
    sys.exit(main())
