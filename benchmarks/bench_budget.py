"""Does the budget hold the process? Every command (``run``, ``generate``, ``serve``, ``bench``'s pipeload) with a
fixed ``--budget`` of 10 / 25 / 50 % of a model (and ``generate --budget auto`` on a device of runtime + that
share), each in a fresh process inside a cgroup-v1 memory group of RAM = runtime + budget (the runtime: the
command's RSS before the engine claims memory, measured first without a cap): the peak RSS above the runtime,
whether it stays within the budget, and whether the cap OOM-killed anything.

    sudo .venv/bin/python benchmarks/bench_budget.py ckpt/gpt2 ckpt/llama-3.2-1b -o docs/results/budget

Writes budget.json and budget.md to ``-o``. Needs root (cgroups); the models need a tokenizer only for serve's
text (ids are sent here).
"""
from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from hermes.atomic import atomic_write_text
from hermes.device import Device, DeviceSpec
from hermes.memory import format_bytes
from hermes.share import RUNTIME_SLACK_BYTES

AUTO = "auto"  # a cell whose budget is --budget auto (the device: runtime + the fraction)
CELLS = {  # command -> [(label, arguments)]
    "run": [("64 tokens", ["--random-input", "64"]), ("256 tokens", ["--random-input", "256"])],
    "generate": [("prompt 32 + 16 new", ["--random-prompt", "32", "--max-new-tokens", "16"]),
                 ("batch 4, prompt 32 + 16", ["--random-prompt", "32", "--max-new-tokens", "16", "--batch", "4"]),
                 ("auto, prompt 32 + 16", ["--random-prompt", "32", "--max-new-tokens", "16", AUTO])],
    "serve": [("4 requests, 32 + 16", [])],
    "bench": [("pipeload, 64 tokens", ["--strategies", "pipeload:loaders=1", "--repeat", "1", "--no-bounds",
                                       "--seq-len", "64"])],
}


def hermes_cmd(command: str, model: Path, budget: int, extra: list[str]) -> list[str]:
    size = "auto" if AUTO in extra else f"{budget}B"
    args = [sys.executable, "-m", "hermes.cli", command, str(model), "--budget", size, *(x for x in extra if x != AUTO)]
    return args + {"serve": ["--port", "0"], "bench": []}.get(command, ["--json"])


def one(command: str, model: Path, budget: int, extra: list[str], dev: Device | None) -> dict[str, Any]:
    """One fresh process: its JSON result (run, generate) or its figures (serve), the exit code and the time."""
    t0 = time.perf_counter()
    if command == "serve":
        return serve_once(model, budget, dev) | {"wall_s": time.perf_counter() - t0}
    if command == "bench":
        ram = (dev.spec.ram_bytes if dev else None)
        return bench_once(model, budget, extra, ram) | {"wall_s": time.perf_counter() - t0}
    p = subprocess.run(hermes_cmd(command, model, budget, extra), capture_output=True, text=True, timeout=1800,
                       preexec_fn=dev.preexec if dev else None)
    out: dict[str, Any] = {"rc": p.returncode, "wall_s": time.perf_counter() - t0}
    if p.returncode == 0:
        res = json.loads(p.stdout)
        out |= {k: res.get(k) for k in ("baseline_rss_bytes", "peak_rss_above_baseline_bytes", "weights_peak_bytes",
                                        "budget_share", "latency_s", "decode_tokens_per_s", "ttft_s", "auto_budget",
                                        "slack_bytes")}
        if res.get("auto_budget"):  # the budget auto chose on the capped device
            out["chosen_budget_bytes"] = res["budget_bytes"]
        out["weight_budget_bytes"] = res.get("weight_budget_bytes", res.get("budget_bytes"))
    else:
        out["error"] = p.stderr.strip().splitlines()[-1:] if p.stderr.strip() else []
    return out


def bench_once(model: Path, budget: int, extra: list[str], ram: int | None) -> dict[str, Any]:
    """``hermes bench`` of pipeload alone, its worker in bench's own emulated device of ``ram`` (the bench process
    itself stays outside: it holds a runtime of its own): the worker's figures from results.json."""
    device = ["--device-ram", f"{ram}B"] if ram else []
    with tempfile.TemporaryDirectory() as out:
        p = subprocess.run([*hermes_cmd("bench", model, budget, extra), *device, "-o", out], capture_output=True,
                           text=True, timeout=1800)
        results = Path(out) / "results.json"
        if not results.is_file():
            return {"rc": p.returncode, "error": p.stderr.strip().splitlines()[-1:]}
        run = json.loads(results.read_text())["runs"][0]
    if "error" in run:
        return {"rc": 2, "error": [run["error"]], "oom_killed": bool(run.get("oom"))}
    return {"rc": 0, "slack_bytes": RUNTIME_SLACK_BYTES, "weight_budget_bytes": run["budget_bytes"],
            **{k: run.get(k) for k in ("baseline_rss_bytes", "peak_rss_above_baseline_bytes", "weights_peak_bytes",
                                       "latency_s")}}


def serve_once(model: Path, budget: int, dev: Device | None) -> dict[str, Any]:
    """A server under ``budget``: four id prompts of 32 tokens, 16 new tokens each, one after another; its peak RSS
    above its runtime (the model opened, no weights held: /metrics)."""
    proc = subprocess.Popen(hermes_cmd("serve", model, budget, []), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, preexec_fn=dev.preexec if dev else None)
    url, log, lines = None, [], queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stderr or ()], daemon=True).start()
    deadline = time.monotonic() + 600  # a server that never says where it listens is killed, not waited for
    while url is None and time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        log.append(line)
        if " at http://" in line:
            url = line.split(" at ", 1)[1].split()[0].removesuffix("/v1")
    if url is None:
        proc.kill()
        proc.wait()
        return {"rc": proc.returncode, "error": [ln.strip() for ln in log if "error" in ln][-1:] or log[-1:]}
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
        baseline = _status(proc.pid, "VmRSS") - int(m["hermes_rss_above_baseline_bytes"])
        return {"rc": 0, "baseline_rss_bytes": baseline,
                "peak_rss_above_baseline_bytes": int(m["hermes_rss_peak_above_baseline_bytes"]),
                "weight_budget_bytes": int(m["hermes_weight_budget_bytes"]),
                "slack_bytes": int(m["hermes_runtime_slack_bytes"]),
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
    p.add_argument("--commands", default="run,generate,serve,bench")
    p.add_argument("-o", "--out", type=Path, default=Path("results/budget"))
    p.add_argument("--update", action="store_true", help="keep the cases of an earlier budget.json in --out, "
                   "replacing those measured again")
    args = p.parse_args()
    old = args.out / "budget.json"
    cases = json.loads(old.read_text())["cases"] if args.update and old.is_file() else []
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
                            capped["oom_killed"] = capped.get("oom_killed") or dev.oom_killed()
                        case |= {"device_ram_bytes": ram, "capped": capped}
                    key = [case[k] for k in ("model", "command", "cell", "fraction")]
                    cases = [c for c in cases if [c[k] for k in ("model", "command", "cell", "fraction")] != key]
                    cases.append(case)
                    print(row(case), file=sys.stderr, flush=True)
    commands, cells = list(CELLS), {c: [label for label, _ in v] for c, v in CELLS.items()}
    cases.sort(key=lambda c: (c["model"], commands.index(c["command"]), cells[c["command"]].index(c["cell"]),
                              c["fraction"]))
    result = {"cases": cases, "all_within": all(within(c) or refused(c) for c in cases)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "budget.json", json.dumps(result, indent=1))
    atomic_write_text(args.out / "budget.md", to_markdown(result))
    print(to_markdown(result))
    return 0 if result["all_within"] else 1


def refused(case: dict[str, Any]) -> bool:
    """The command refused the budget as below the minimum (exit 2, the minimum named)."""
    f = case["uncapped"]
    text = " ".join(f.get("error", []))
    return f.get("rc") == 2 and ("below the minimum" in text or "cannot serve" in text)


def within(case: dict[str, Any]) -> bool:
    c = case.get("capped") or {}
    if not c or c.get("rc") != 0 or c.get("oom_killed"):
        return False
    return c["peak_rss_above_baseline_bytes"] <= allowed(case)


def allowed(case: dict[str, Any]) -> int:
    """The budget, plus the part of the runtime slack it could not hold (a budget below the minimum + the slack
    runs with what is left of it, and says by how much the process may exceed it)."""
    c = case["capped"]
    budget = c.get("chosen_budget_bytes") or case["budget_bytes"]
    return budget + max(RUNTIME_SLACK_BYTES - (c.get("slack_bytes") or 0), 0)


def row(case: dict[str, Any]) -> str:
    c, f = case.get("capped") or {}, case["uncapped"]
    if "capped" not in case:
        return (f"| {case['model']} | {case['command']} | {case['cell']} | {case['fraction']:.0%} "
                f"({format_bytes(case['budget_bytes'])}) | refused: {' '.join(f.get('error', []))} ||||||")
    speed = c.get("decode_tokens_per_s") or c.get("tokens_per_s")
    speed_text = f"{speed:.2f} tok/s" if speed else f"{c.get('latency_s', 0) * 1000:.0f} ms" if c.get("latency_s") \
        else "–"
    above = c.get("peak_rss_above_baseline_bytes")
    budget = c.get("chosen_budget_bytes") or case["budget_bytes"]
    given = f"auto = {format_bytes(budget)}" if c.get("chosen_budget_bytes") else format_bytes(budget)
    return (f"| {case['model']} | {case['command']} | {case['cell']} | {case['fraction']:.0%} "
            f"({given}) | {format_bytes(c.get('weight_budget_bytes') or 0)} | "
            f"{format_bytes(above) if above is not None else 'rc ' + str(c.get('rc'))} "
            f"({100 * (above or 0) / budget:.0f}%) | "
            f"{format_bytes(f.get('peak_rss_above_baseline_bytes') or 0)} | "
            f"{format_bytes(c.get('slack_bytes') or 0)} | {'OOM' if c.get('oom_killed') else 'no'} | {speed_text} | "
            f"{'yes' if within(case) else 'NO'} |")


def to_markdown(result: dict[str, Any]) -> str:
    head = ("| model | command | cell | budget | weights get | peak RSS above runtime, capped (of budget) | "
            "same, uncapped | runtime slack held | OOM kill | speed (capped) | within |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    note = ("\n\nwithin: peak RSS above the runtime <= the budget (plus the part of the "
            f"{format_bytes(RUNTIME_SLACK_BYTES)} runtime slack a tight budget could not hold, which the command "
            "states), no OOM kill; refused: the budget is below the minimum with this call's activations (and KV "
            "cache), and the command said so before loading anything.\n")
    return "\n".join([head, *(row(c) for c in result["cases"])]) + note + (
        "Every cell within or refused.\n" if result["all_within"] else "NOT every cell within.\n")


if __name__ == "__main__":
    raise SystemExit(main())
