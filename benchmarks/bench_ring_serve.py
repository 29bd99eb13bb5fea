"""``hermes serve`` on a ring: aggregate tokens/s of concurrent clients against rank 0's server, on 1, 2 or 4
emulated devices, each a cgroup-v1 group (RAM = runtime + a share of the model, page cache included; its own core
where the machine has enough; its own disk read bandwidth cap) holding one ``hermes serve --ring`` process with
``--budget auto``; the devices talk over loopback. Every configuration starts cold (checkpoint evicted) in fresh
processes; configurations are interleaved in a shuffled order per round; medians.

    sudo .venv/bin/python benchmarks/bench_ring_serve.py ckpt/llama1b --devices 1,2 --shares 0.5 \\
        --clients 4 --repeat 2 -o docs/results/ring-serve

Every request is greedy on a fixed random prompt. Before the timed part (then the checkpoint is evicted again),
``--check`` of the prompts are sent one at a time to the fresh server and their tokens compared with one device's
(the same state everywhere). The timed requests are batched as they happen to arrive, and a bf16 step's numerics
depend on its batch and on the pages a request was given: their tokens are reported, not required, to match.
Writes results.json and results.md to ``-o``.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from bench_ring import emulated_devices, free_port, write_results  # noqa: E402
from bench_serve import metrics, start_server  # noqa: E402

from hermes.memory import format_bytes  # noqa: E402
from hermes.store import evict_page_cache  # noqa: E402


def complete(url: str, prompt: list[int], n: int, timeout: float) -> list[int]:
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": n, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/completions", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())["hermes"]["token_ids"]


def serve_run(model: Path, a: argparse.Namespace, world: int, share: float, size: int,
              prompts: list[list[int]]) -> dict[str, Any]:
    devices, ram, per = emulated_devices(model, a, world, share, size)
    address = f"127.0.0.1:{free_port()}"
    ring = ["--ring", address, "--world-size", str(world), "--ring-timeout", "600"] if world > 1 else []
    base = [sys.executable, "-m", "hermes.cli", "serve", str(model), "--budget", "auto", "--io", "direct"]
    procs: list[subprocess.Popen] = []
    out: dict[str, Any] = {"world": world, "share": share, "device_ram_bytes": ram, "cores_per_device": per}
    try:
        evict_page_cache(sorted(model.glob("*.safetensors")))
        procs = [subprocess.Popen([*base, *ring, "--rank", str(r)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True, preexec_fn=devices[r].preexec) for r in range(1, world)]
        server, url, log = start_server(model, devices[0].preexec,
                                        [*ring, *(["--rank", "0"] if ring else []), "--model-name", "m",
                                         "--max-batch", str(a.clients)])
        procs.insert(0, server)
        # the check first, on a fresh pool: requests one at a time, the same state in every configuration
        check = [complete(url, p, a.new_tokens, a.timeout) for p in prompts[:a.check]]
        evict_page_cache(sorted(model.glob("*.safetensors")))
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(a.clients) as pool:
            tokens = list(pool.map(lambda p: complete(url, p, a.new_tokens, a.timeout), prompts))
        wall = time.perf_counter() - t0
        m = metrics(url)
        server.send_signal(signal.SIGTERM)
        rcs = [p.wait(timeout=120) for p in procs]
        out |= {"wall_s": wall, "tokens": tokens, "check_tokens": check,
                "tokens_per_s": sum(map(len, tokens)) / wall, "rc": rcs,
                "oom": [d.oom_killed() for d in devices],
                **{k: m[k] for k in ("hermes_budget_bytes", "hermes_kv_cache_bytes", "hermes_weights_peak_bytes",
                                     "hermes_rss_peak_above_baseline_bytes", "hermes_step_bytes_read")}}
    except Exception as exc:  # noqa: BLE001 - a failed configuration is reported, the others go on
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for d in devices:
            d.close()
    return out


def summarize(runs: list[dict[str, Any]], configs: list[tuple[int, float]]) -> list[dict[str, Any]]:
    """Medians per configuration; each checked request compared with every one-device run's (a request counts as
    equal when one of them gave the same tokens: a capped one-device server gives one of two variants of a
    near-tied token on this random model from run to run, docs/BENCHMARKS.md)."""
    summary = []
    for world, share in configs:
        ok = [r for r in runs if (r["world"], r["share"]) == (world, share) and "error" not in r]
        one = [r for r in runs if (r["world"], r["share"]) == (1, share) and "error" not in r]
        if not ok or not one:
            continue
        ones = [r for r in runs if r["world"] == 1 and "error" not in r]  # any share: the same model
        seen = [{tuple(r["check_tokens"][i]) for r in ones} for i in range(len(one[0]["check_tokens"]))]
        base = statistics.median(r["tokens_per_s"] for r in one)
        tps = statistics.median(r["tokens_per_s"] for r in ok)
        summary.append({"world": world, "share": share, "device_ram_bytes": ok[0]["device_ram_bytes"],
                        "tokens_per_s": tps, "speedup": tps / base,
                        "rss_peak": max(r["hermes_rss_peak_above_baseline_bytes"] for r in ok),
                        "budget": ok[0]["hermes_budget_bytes"], "oom": any(any(r["oom"]) for r in ok),
                        "checked": sum(tuple(t) in seen[i] for r in ok for i, t in enumerate(r["check_tokens"])),
                        "checked_requests": sum(len(r["check_tokens"]) for r in ok),
                        "read_per_step": statistics.median(r["hermes_step_bytes_read"] for r in ok)})
    return summary


def to_markdown(results: dict[str, Any]) -> str:
    lines = [f"`hermes serve` on a ring: {results['model']}, {results['clients']} concurrent clients x 1 request "
             f"({results['prompt']} + {results['new_tokens']} tokens, greedy), medians of {results['repeat']} cold "
             "rounds", "", "| devices x RAM | tokens/s (all clients) | vs one such device | rank 0 read per step | "
             "rank 0 peak RSS above runtime / budget | OOM | checked requests equal to one device's |",
             "|---|---|---|---|---|---|---|"]
    for r in results["summary"]:
        lines.append(f"| {r['world']} x {r['share']:.0%} ({format_bytes(r['device_ram_bytes'])}) | "
                     f"{r['tokens_per_s']:.2f} | {r['speedup']:.2f}x | {format_bytes(int(r['read_per_step']))} | "
                     f"{format_bytes(r['rss_peak'])} / {format_bytes(r['budget'])} | {'yes' if r['oom'] else 'no'} | "
                     f"{r['checked']} of {r['checked_requests']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--devices", default="1,2")
    p.add_argument("--shares", default="0.5")
    p.add_argument("--runtime", default="400MiB", help="RAM each device gives the runtime (default 400MiB)")
    p.add_argument("--disk-bw", default="1GB/s")
    p.add_argument("--cores-per-device", type=int, default=1)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--check", type=int, default=2, help="prompts sent again one at a time after the timed part, "
                   "their tokens compared across configurations (default 2)")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("-o", "--out", type=Path, default=Path("docs/results/ring-serve"))
    p.add_argument("--render", action="store_true", help="only summarize -o's results.json again")
    a = p.parse_args()
    if a.render:
        results = json.loads((a.out / "results.json").read_text())
        configs = list(dict.fromkeys((r["world"], r["share"]) for r in sorted(results["runs"], key=lambda r: (
            r["share"], r["world"]))))
        results["summary"] = summarize(results["runs"], configs)
        write_results(a.out, results, to_markdown)
        return 0
    size = sum(f.stat().st_size for f in a.model.glob("*.safetensors"))
    vocab = json.loads((a.model / "config.json").read_text()).get("vocab_size", 1000)
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(a.prompt)] for _ in range(a.clients)]
    configs = [(int(w), float(s)) for s in a.shares.split(",") for w in a.devices.split(",")]
    runs: list[dict[str, Any]] = []
    for round_ in range(a.repeat):
        order = configs[:]
        random.Random(round_).shuffle(order)
        for world, share in order:
            r = serve_run(a.model, a, world, share, size, prompts)
            r["round"] = round_
            runs.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "tokens"}), file=sys.stderr, flush=True)
    summary = summarize(runs, configs)
    results = {"model": str(a.model), "clients": a.clients, "prompt": a.prompt, "new_tokens": a.new_tokens,
               "repeat": a.repeat, "disk_bw": a.disk_bw, "runtime": a.runtime, "runs": runs, "summary": summary}
    write_results(a.out, results, to_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
