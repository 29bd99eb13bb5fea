"""Generation benchmark (issue 5): tokens/s, time to first token and peak memory of hermes, accelerate disk
offload, AirLLM (Llama family) and a full load, greedy, 32 new tokens after a 64-token random prompt, at
budgets of 10/25/50/100 % of the checkpoint's tensor bytes.

Every run is a fresh process (``python -m hermes.baselines gen-STRATEGY``) with the page cache of the files it
reads evicted first; runs are interleaved in a shuffled order per round; medians over rounds. Every strategy's
tokens are compared with the full model's.

    python benchmarks/bench_generate.py ~/.cache/hermes/gpt2 ~/.cache/hermes/llama-3.2-1b-bf16 \
        --repeat 3 -o docs/results/generate
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
from hermes.memory import format_bytes, parse_bytes
from hermes.store import atomic_write_text

FRACTIONS = (0.10, 0.25, 0.50, 1.00)


def worker(strategy: str, model_dir: Path, budget: int, args: argparse.Namespace, work: str) -> dict[str, Any]:
    from hermes.bench import _worker
    from hermes.device import Device, DeviceSpec

    cmd = [sys.executable, "-m", "hermes.baselines", f"gen-{strategy}", str(model_dir), "--budget", str(budget),
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--loaders",
           str(args.loaders), "--io", args.io, "--work-dir", work]
    if args.ram_extra is None:
        return _worker(cmd[3:])
    # An edge device whose RAM (page cache included) is the budget plus room for the runtime: no strategy can
    # keep the checkpoint in the page cache between tokens.
    ram = budget + parse_bytes(args.ram_extra)
    with Device(DeviceSpec(ram_bytes=ram), model_dir) as dev:
        return {"device_ram_bytes": ram, **_worker(cmd[3:], dev)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--loaders", type=int, default=1)
    p.add_argument("--io", default="direct")
    p.add_argument("--ram-extra", default=None, help="emulate a device with budget + this much RAM (cgroup v1), "
                   "e.g. 768MiB; full runs with model size + this much")
    p.add_argument("--only", default="hermes,accelerate,airllm,full")
    p.add_argument("--fractions", default=",".join(str(f) for f in FRACTIONS))
    p.add_argument("--work-dir", default=None, help="scratch (AirLLM's per-layer copy); default a temp dir")
    p.add_argument("-o", "--out", type=Path, default=Path("docs/results/generate"))
    args = p.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="hermes-gen-")
    results: dict[str, Any] = {"ram_extra": args.ram_extra,
                               "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeat": args.repeat,
                               "loaders": args.loaders, "io": args.io, "models": {}}
    rng = random.Random(0)
    for model_dir in args.models:
        layout = open_model(model_dir)
        size = layout.store.nbytes  # checkpoint tensor bytes
        llama = layout.config.model_type == "llama"
        only = args.only.split(",")
        fractions = [float(f) for f in args.fractions.split(",")]
        per_budget = [s for s in ("hermes", "accelerate") + (("airllm",) if llama else ()) if s in only]
        cells = [(s, int(f * size)) for f in fractions for s in per_budget]
        cells += [("full", size)] if "full" in only else []
        runs: list[dict[str, Any]] = []
        for r in range(args.repeat):
            order = cells[:]
            rng.shuffle(order)
            for strategy, budget in order:
                print(f"{model_dir.name} round {r + 1}/{args.repeat}: {strategy} {format_bytes(budget)}",
                      file=sys.stderr, flush=True)
                res = worker(strategy, model_dir, budget, args, str(Path(work) / model_dir.name))
                runs.append({"strategy": strategy, "budget_bytes": budget, "round": r, **res})
        results["models"][model_dir.name] = {"model_bytes": size, "runs": runs,
                                             "summary": summarize(runs, size)}
        write(results, args.out)
    return 0


def summarize(runs: list[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    ref = next((r["tokens"] for r in runs if r["strategy"] == "full" and "tokens" in r), None)
    out = []
    for key in dict.fromkeys((r["strategy"], r["budget_bytes"]) for r in runs):
        ok = [r for r in runs if (r["strategy"], r["budget_bytes"]) == key and "error" not in r]
        row: dict[str, Any] = {"strategy": key[0], "budget_bytes": key[1], "budget_fraction": key[1] / size,
                               "n": len(ok)}
        if not ok:
            row["error"] = next(r["error"] for r in runs if (r["strategy"], r["budget_bytes"]) == key)
        else:
            for k in ("ttft_s", "total_s", "tokens_per_s", "decode_tokens_per_s", "peak_rss_above_baseline_bytes",
                      "weights_peak_bytes", "bytes_read_per_token", "resident_units"):
                vals = [r[k] for r in ok if k in r]
                if vals:
                    row[k] = statistics.median(vals)
            row["same_tokens_as_full"] = ref is not None and all(r["tokens"] == ref for r in ok)
        out.append(row)
    order = {"hermes": 0, "accelerate": 1, "airllm": 2, "full": 3}
    return sorted(out, key=lambda x: (x["budget_bytes"], order[x["strategy"]]))


def to_markdown(results: dict[str, Any]) -> str:
    lines = [f"Greedy generation, {results['new_tokens']} new tokens after a {results['prompt_len']}-token random "
             f"prompt, batch 1; median of {results['repeat']} runs, each a fresh process with a cold page cache, "
             f"interleaved. hermes: {results['loaders']} loader(s), {results['io']} I/O, the budget covers weights "
             "+ KV cache; accelerate: `device_map=\"auto\", max_memory={\"cpu\": budget}`, the rest disk-offloaded; "
             "AirLLM and full load have no budget setting"
             + (f"; every run inside an emulated device with RAM = budget + {results['ram_extra']} (page cache "
                "included; full: model + that), so nothing keeps the checkpoint in the page cache between tokens."
                if results.get("ram_extra") else "; no RAM cap: buffered readers are served by the page cache."),
             ""]
    for name, m in results["models"].items():
        lines += [f"### {name} ({format_bytes(m['model_bytes'])})", "",
                  "| strategy | budget | tokens/s (all) | tokens/s after first | first token (s) | total (s) | "
                  "peak RSS above baseline | hermes weights peak | read per token | same tokens as full |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in m["summary"]:
            budget = (f"{row['budget_fraction']:.0%} ({format_bytes(row['budget_bytes'])})"
                      if row["strategy"] != "full" else "–")
            if "error" in row:
                lines.append(f"| {row['strategy']} | {budget} | cannot run: {row['error']} ||||||||")
                continue
            lines.append(
                f"| {row['strategy']} | {budget} | {row['tokens_per_s']:.2f} | {row['decode_tokens_per_s']:.2f} | "
                f"{row['ttft_s']:.2f} | {row['total_s']:.1f} | {format_bytes(row['peak_rss_above_baseline_bytes'])} | "
                f"{format_bytes(row['weights_peak_bytes']) if 'weights_peak_bytes' in row else '–'} | "
                f"{format_bytes(int(row['bytes_read_per_token'])) if 'bytes_read_per_token' in row else '–'} | "
                f"{'yes' if row['same_tokens_as_full'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(out / "results.md", to_markdown(results))


if __name__ == "__main__":
    sys.exit(main())
