"""Serving benchmark (issue 14): aggregate tokens/s and per-request latency of ``hermes serve`` with 1/2/4/8
concurrent clients (the official ``openai`` client, localhost), on emulated devices whose RAM (page cache included)
is the runtime + 25/50 % of the checkpoint's tensor bytes; the server finds its budget itself (``--budget auto``).

Each client sends ``--requests`` requests one after the other (random prompts of ``--prompt-len`` tokens, greedy,
``--max-tokens`` new tokens). Client counts are interleaved in a shuffled order per round; medians over rounds.
A request that fails counts as lost (the benchmark reports every error).

    hermes synth gpt2 ckpt/gpt2 && hermes synth llama-3.2-1b ckpt/llama-3.2-1b --dtype bfloat16
    sudo .venv/bin/python benchmarks/bench_serve.py ckpt/gpt2 ckpt/llama-3.2-1b -o docs/results/serve

``--soak SECONDS``: the soak of issue 21 instead (benchmarks/serve_soak.py): 32 clients with normal, oversized,
malformed and disconnecting requests against the first model at the first fraction, e.g.

    sudo .venv/bin/python benchmarks/bench_serve.py ckpt/gpt2-text --fractions 0.25 --soak 600 -o docs/results/serve
"""
from __future__ import annotations

import argparse
import asyncio
import json
import queue
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from hermes.api import open_model
from hermes.atomic import atomic_write_text
from hermes.generation import kv_cache_bytes
from hermes.memory import format_bytes, parse_bytes

CLIENTS = (1, 2, 4, 8)


def start_server(model_dir: Path, preexec: Any, extra: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    cmd = [sys.executable, "-m", "hermes.cli", "serve", str(model_dir), "--budget", "auto", "--port", "0",
           "--io", "direct", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, preexec_fn=preexec)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.append(line)
            lines.put(line)
    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 600
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
        except queue.Empty:
            proc.kill()
            raise RuntimeError("server did not start: " + "".join(log)) from None
        if " at http://" in line:
            return proc, line.split(" at ", 1)[1].split()[0], log


async def clients(url: str, model: str, n: int, args: argparse.Namespace, vocab: int, seed: int) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=args.timeout)
    rng = random.Random(seed)
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []

    async def one_client() -> None:
        for _ in range(args.requests):
            prompt = [rng.randrange(vocab) for _ in range(args.prompt_len)]
            t0 = time.perf_counter()
            try:
                r = await client.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens,
                                                    temperature=0)
            except openai.OpenAIError as exc:
                errors.append(str(exc))
                continue
            latencies.append(time.perf_counter() - t0)
            tokens.append(r.usage.completion_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(n)))
    wall = time.perf_counter() - t0
    await client.close()
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"clients": n, "requests": n * args.requests, "completed": len(latencies), "lost": len(errors),
            "errors": errors[:5], "wall_s": wall, "tokens": sum(tokens), "tokens_per_s": sum(tokens) / wall,
            "latency_p50_s": q[49] if q else None, "latency_p90_s": q[89] if q else None,
            "latency_p99_s": q[98] if q else None}


def metrics(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=60) as r:
        text = r.read().decode()
    return {k: float(v) for k, v in (line.split() for line in text.splitlines() if not line.startswith("#"))}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--fractions", default="0.25,0.5")
    p.add_argument("--runtime", default="400MiB", help="device RAM = this (Python, torch, transformers, FastAPI, "
                   "uvicorn) + a fraction of the model")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=2, help="requests per client per measurement")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--timeout", type=float, default=900, help="seconds one request may take")
    p.add_argument("-o", "--out", type=Path, default=Path("results/serve"))
    p.add_argument("--soak", type=float, metavar="SECONDS", help="instead: the soak (benchmarks/serve_soak.py) of the "
                   "first model at the first fraction for this long")
    p.add_argument("--clients", type=int, default=32, help="clients of the soak (default 32)")
    args = p.parse_args()
    if args.soak:
        return run_soak(args)
    from hermes.device import Device, DeviceSpec

    runtime = parse_bytes(args.runtime)
    results: dict[str, Any] = {"runtime_bytes": runtime, "prompt_len": args.prompt_len,
                               "max_tokens": args.max_tokens, "requests_per_client": args.requests, "cases": []}
    for model_dir in args.models:
        layout = open_model(model_dir)
        size = layout.nbytes
        text = layout.config.get_text_config(decoder=True)
        # the KV cache pool holds every client's request at once (8 x (prompt + new tokens), a page of slack each)
        kv = kv_cache_bytes(text, max(CLIENTS), args.prompt_len + args.max_tokens + 16, layout.model.dtype)
        for f in (float(x) for x in args.fractions.split(",")):
            ram = runtime + int(f * size)
            print(f"{model_dir.name} at {f:.0%}: device RAM {format_bytes(ram)}", file=sys.stderr, flush=True)
            with Device(DeviceSpec(ram_bytes=ram), model_dir) as dev:
                proc, url, log = start_server(model_dir, dev.preexec, ["--max-batch", str(max(CLIENTS)),
                                                                       "--max-queue", "64", "--kv-cache", str(kv)])
                runs: list[dict[str, Any]] = []
                try:
                    asyncio.run(clients(url, model_dir.name, 1, argparse.Namespace(**{**vars(args), "requests": 1}),
                                        text.vocab_size, 0))  # warm-up: the first pass's one-time costs
                    for r in range(args.rounds):
                        order = list(CLIENTS)
                        random.Random(r).shuffle(order)
                        for n in order:
                            res = asyncio.run(clients(url, model_dir.name, n, args, text.vocab_size, 100 * r + n))
                            res["round"] = r
                            print(f"  round {r + 1}: {n} client(s): {res['tokens_per_s']:.2f} tokens/s, "
                                  f"p50 {res['latency_p50_s'] or 0:.1f} s, lost {res['lost']} {res['errors'][:1]}",
                                  file=sys.stderr, flush=True)
                            if proc.poll() is not None:
                                raise RuntimeError(f"the server exited ({proc.returncode}, OOM-killed: "
                                                   f"{dev.oom_killed()}): " + "".join(log[-20:]))
                            runs.append(res)
                    m = metrics(url)
                finally:
                    proc.send_signal(signal.SIGTERM)
                    code = proc.wait(timeout=120)
                case = {"model": model_dir.name, "fraction": f, "device_ram_bytes": ram, "model_bytes": size,
                        "runs": runs, "metrics": m, "server_exit": code, "oom_killed": dev.oom_killed(),
                        "server_log": [line for line in log if "budget" in line]}
                results["cases"].append(case)
    summarize(results)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps(results, indent=1))
    atomic_write_text(args.out / "results.md", to_markdown(results))
    print(to_markdown(results))
    return 0


def run_soak(args: argparse.Namespace) -> int:
    from serve_soak import soak
    from serve_soak import to_markdown as soak_markdown

    result = soak(args.models[0], args, start_server, metrics)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "soak.json", json.dumps(result, indent=1))
    atomic_write_text(args.out / "soak.md", soak_markdown(result))
    print(soak_markdown(result))
    ok = not result["oom_killed"] and result["lost"] == 0 and abs(result["rss_end_vs_warm"] - 1) <= 0.05 \
        and result["server_exit"] == 0
    return 0 if ok else 1


def summarize(results: dict[str, Any]) -> None:
    for case in results["cases"]:
        by = {}
        for n in CLIENTS:
            runs = [r for r in case["runs"] if r["clients"] == n]
            by[n] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                     "latency_p50_s": statistics.median(r["latency_p50_s"] for r in runs),
                     "latency_p90_s": statistics.median(r["latency_p90_s"] for r in runs),
                     "latency_p99_s": statistics.median(r["latency_p99_s"] for r in runs),
                     "lost": sum(r["lost"] for r in runs), "requests": sum(r["requests"] for r in runs)}
        for n in CLIENTS:
            by[n]["vs_1_client"] = by[n]["tokens_per_s"] / by[1]["tokens_per_s"]
        case["summary"] = by


def to_markdown(results: dict[str, Any]) -> str:
    lines = [f"Every server inside an emulated device with RAM = {format_bytes(results['runtime_bytes'])} (runtime) + "
             "the share of the model, page cache included (cgroup v1); `--budget auto`. Each client sends "
             f"{results['requests_per_client']} requests one after another ({results['prompt_len']}-token random "
             f"prompt, {results['max_tokens']} new tokens, greedy); medians over rounds.", "",
             "| model | device RAM | clients | aggregate tokens/s | vs 1 client | latency p50 / p90 / p99 (s) | "
             "lost | budget | weights / KV cache | bytes read per step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for case in results["cases"]:
        m = case["metrics"]
        for n, s in case["summary"].items():
            lines.append(
                f"| {case['model']} | {format_bytes(case['device_ram_bytes'])} ({case['fraction']:.0%}) | {n} | "
                f"{s['tokens_per_s']:.2f} | {s['vs_1_client']:.2f}x | {s['latency_p50_s']:.1f} / "
                f"{s['latency_p90_s']:.1f} / {s['latency_p99_s']:.1f} | {s['lost']} of {s['requests']} | "
                f"{format_bytes(m['hermes_budget_bytes'])} | {format_bytes(m['hermes_weight_budget_bytes'])} / "
                f"{format_bytes(m['hermes_kv_cache_bytes'])} | {format_bytes(m['hermes_step_bytes_read'])} |")
    lines += ["", "Server exits: " + ", ".join(f"{c['model']} {c['fraction']:.0%}: code {c['server_exit']}"
                                               f"{' (OOM-killed)' if c['oom_killed'] else ''}"
                                               for c in results["cases"])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
