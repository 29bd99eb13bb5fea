"""Does the budget hold the process? Every command (``run``, ``generate``, ``serve``) with a fixed ``--budget`` of
10 / 25 / 50 % of a model, each in a fresh process inside a cgroup-v1 memory group of RAM = runtime + budget (the
runtime: the command's RSS before the engine claims memory, measured first without a cap): the peak RSS above the
runtime, whether it stays within the budget, and whether the cap OOM-killed anything.

    sudo .venv/bin/python benchmarks/bench_budget.py ckpt/gpt2 ckpt/llama-3.2-1b -o docs/results/budget

Writes budget.json and budget.md to ``-o``. Needs root (cgroups); the models need a tokenizer only for serve's
text (ids are sent here).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from hermes.atomic import atomic_write_text
from hermes.device import Device, DeviceSpec
from hermes.memory import format_bytes

CELLS = {  # command -> [(label, arguments)]
    "run": [("64 tokens", ["--random-input", "64"]), ("256 tokens", ["--random-input", "256"])],
    "generate": [("prompt 32 + 16 new", ["--random-prompt", "32", "--max-new-tokens", "16"]),
                 ("batch 4, prompt 32 + 16", ["--random-prompt", "32", "--max-new-tokens", "16", "--batch", "4"])],
    "serve": [("4 requests, 32 + 16", [])],
}


def hermes_cmd(command: str, model: Path, budget: int, extra: list[str]) -> list[str]:
    args = [sys.executable, "-m", "hermes.cli", command, str(model), "--budget", f"{budget}B", *extra]
    return args + (["--port", "0"] if command == "serve" else ["--json"])


def one(command: str, model: Path, budget: int, extra: list[str], dev: Device | None) -> dict[str, Any]:
    """One fresh process: its JSON result (run, generate) or its figures (serve), the exit code and the time."""
    t0 = time.perf_counter()
    if command == "serve":
        return serve_once(model, budget, dev) | {"wall_s": time.perf_counter() - t0}
    p = subprocess.run(hermes_cmd(command, model, budget, extra), capture_output=True, text=True, timeout=1800,
                       preexec_fn=dev.preexec if dev else None)
    out: dict[str, Any] = {"rc": p.returncode, "wall_s": time.perf_counter() - t0}
    if p.returncode == 0:
        res = json.loads(p.stdout)
        out |= {k: res.get(k) for k in ("baseline_rss_bytes", "peak_rss_above_baseline_bytes", "weights_peak_bytes",
                                        "budget_share", "latency_s", "decode_tokens_per_s", "ttft_s")}
        out["weight_budget_bytes"] = res.get("weight_budget_bytes", res.get("budget_bytes"))
    else:
        out["error"] = p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else []
    return out


def serve_once(model: Path, budget: int, dev: Device | None) -> dict[str, Any]:
    """A server under ``budget``: four id prompts of 32 tokens, 16 new tokens each, two at a time; its peak RSS
    (VmHWM) above its RSS before the model opened (from /metrics)."""
    proc = subprocess.Popen(hermes_cmd("serve", model, budget, []), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, preexec_fn=dev.preexec if dev else None)
    url, log = None, []
    assert proc.stderr is not None
    deadline = time.monotonic() + 600
    for line in proc.stderr:
        log.append(line)
        if " at http://" in line:
            url = line.split(" at ", 1)[1].split()[0].removesuffix("/v1")
            break
        if time.monotonic() > deadline:
            break
    if url is None:
        proc.kill()
        proc.wait()
        return {"rc": proc.returncode, "error": log[-2:]}
    try:
        body = json.dumps({"model": model.name, "prompt": list(range(10, 42)), "max_tokens": 16,
                           "temperature": 0}).encode()
        t0 = time.perf_counter()
        for _ in range(4):
            req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=900) as r:
                r.read()
        tps = 64 / (time.perf_counter() - t0)
        with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
            m = {k: float(v) for k, v in (ln.split() for ln in r.read().decode().splitlines()
                                          if ln and not ln.startswith("#"))}
        hwm = _status(proc.pid, "VmHWM")
        rss = _status(proc.pid, "VmRSS")
        baseline = rss - int(m["hermes_rss_above_baseline_bytes"])
        return {"rc": 0, "baseline_rss_bytes": baseline, "peak_rss_above_baseline_bytes": hwm - baseline,
                "weight_budget_bytes": int(m["hermes_weight_budget_bytes"]),
                "weights_peak_bytes": int(m["hermes_weights_peak_bytes"]), "tokens_per_s": tps,
                "budget_share": next((ln.strip() for ln in log if "budget" in ln and "weights" in ln), "")}
    except (OSError, ValueError, KeyError) as exc:
        return {"rc": proc.poll(), "error": [str(exc)]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--fractions", default="0.1,0.25,0.5")
    p.add_argument("--commands", default="run,generate,serve")
    p.add_argument("-o", "--out", type=Path, default=Path("results/budget"))
    args = p.parse_args()
    cases = []
    for model in args.models:
        size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
        for command in args.commands.split(","):
            for label, extra in CELLS[command]:
                for frac in (float(x) for x in args.fractions.split(",")):
                    budget = int(frac * size)
                    free = one(command, model, budget, extra, None)  # the runtime, without a cap
                    case = {"model": model.name, "command": command, "cell": label, "fraction": frac,
                            "budget_bytes": budget, "uncapped": free}
                    if free.get("rc") == 0:
                        ram = free["baseline_rss_bytes"] + budget
                        with Device(DeviceSpec(ram_bytes=ram), model) as dev:
                            capped = one(command, model, budget, extra, dev)
                            capped["oom_killed"] = dev.oom_killed()
                        case |= {"device_ram_bytes": ram, "capped": capped}
                    cases.append(case)
                    print(row(case), file=sys.stderr, flush=True)
    result = {"cases": cases, "all_within": all(within(c) for c in cases)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "budget.json", json.dumps(result, indent=1))
    atomic_write_text(args.out / "budget.md", to_markdown(result))
    print(to_markdown(result))
    return 0 if result["all_within"] else 1


def within(case: dict[str, Any]) -> bool:
    c = case.get("capped") or {}
    return c.get("rc") == 0 and not c.get("oom_killed") and c["peak_rss_above_baseline_bytes"] <= case["budget_bytes"]


def row(case: dict[str, Any]) -> str:
    c, f = case.get("capped") or {}, case["uncapped"]
    if "capped" not in case:
        return (f"| {case['model']} | {case['command']} | {case['cell']} | {case['fraction']:.0%} "
                f"({format_bytes(case['budget_bytes'])}) | refused or failed: {' '.join(f.get('error', []))} |||||")
    speed = c.get("decode_tokens_per_s") or c.get("tokens_per_s")
    speed_text = f"{speed:.2f} tok/s" if speed else f"{c.get('latency_s', 0) * 1000:.0f} ms" if c.get("latency_s") \
        else "–"
    above = c.get("peak_rss_above_baseline_bytes")
    return (f"| {case['model']} | {case['command']} | {case['cell']} | {case['fraction']:.0%} "
            f"({format_bytes(case['budget_bytes'])}) | {format_bytes(c.get('weight_budget_bytes') or 0)} | "
            f"{format_bytes(above) if above is not None else 'rc ' + str(c.get('rc'))} "
            f"({100 * (above or 0) / case['budget_bytes']:.0f}%) | "
            f"{format_bytes(f.get('peak_rss_above_baseline_bytes') or 0)} | "
            f"{'OOM' if c.get('oom_killed') else 'no'} | {speed_text} | {'yes' if within(case) else 'NO'} |")


def to_markdown(result: dict[str, Any]) -> str:
    head = ("| model | command | cell | budget | weights get | peak RSS above runtime, capped (of budget) | "
            "same, uncapped | OOM kill | speed (capped) | within |\n|---|---|---|---|---|---|---|---|---|---|")
    return "\n".join([head, *(row(c) for c in result["cases"])]) + (
        "\n\nEvery cell within its budget.\n" if result["all_within"] else "\n\nNOT every cell within its budget.\n")


if __name__ == "__main__":
    raise SystemExit(main())
